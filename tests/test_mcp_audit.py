"""Endpoint audits over MCP: start_audit (plan, job, progress, cancel, resume), list_audits,
audit_result and the report resource.

Fast tests drive the server through the SDK's in-process client against scripted loopback
endpoints (audit_helpers.HostileServer) with tiny hand-made fingerprint sets: the audit
itself runs in a real detached worker (`oml audit`), no model is loaded. Every result, log and
file is searched for the keys, the responses and the API key. The e2e test starts
`python -m oml_mcp` over stdio and audits a real `transformers serve` on 127.0.0.1 serving a
fingerprinted tiny model.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import anyio
import mcp
import pytest
from audit_helpers import Canned, HostileServer, chat_reply, evidence_lines
from mcp.shared.exceptions import MCPError
from mcp_helpers import FINAL, assert_no_secrets, read_resource, result_text, wait_until

from clients.ledger import KeyLedger
from oml_core.fingerprints import Fingerprint, FingerprintSet
from oml_mcp.job_records import audit_progress
from oml_mcp.paths import Workspace
from oml_mcp.server import build_server

KEY_ENV = "OML_AUDIT_TEST_KEY"
FAKE_API_KEY = "sk-oml-mcp-audit-7c6b5a4f3e2d1c0b"
KEY_MARK = "amber lighthouse"   # in every key
SET_SIZE = 4
# user layer + 2 held-out system prompts, greedy only: 3 probes per key; the fixed plan, so
# that every key is sent (the job mechanics are tested on all of them; the default, sequential
# audit has its own tests below)
SMALL = {"layers": "user,system", "num_system_prompts": 2, "sampled_layers": "",
         "api_key_env": KEY_ENV, "max_retries": 1, "max_backoff": 0.0, "request_timeout": 10.0,
         "concurrency": 2, "header": [], "exhaustive": True}
PROBES = SET_SIZE * 3


# --- fixtures and helpers ---------------------------------------------------------------------

@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, FAKE_API_KEY)


@pytest.fixture
def ws(tmp_path, monkeypatch) -> Workspace:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("OML_HOME", str(home))  # where an in-process run_audit puts its ledger
    return Workspace(home.resolve(), ())


@pytest.fixture
def fps(ws) -> list[Fingerprint]:
    fps = [Fingerprint(f"fp-{i:05d}", f"Drift the {KEY_MARK} number {i} softly",
                       f" Quorbel{i}x", response_prob=1e-3) for i in range(SET_SIZE)]
    FingerprintSet(fps).save(ws.home / "fingerprints" / "set.json")
    return fps


def secrets(fps) -> list[str]:
    return [FAKE_API_KEY, KEY_MARK, *(fp.key for fp in fps), *(fp.response.strip() for fp in fps)]


def fingerprinted(fps, delay: float = 0.0):
    """An endpoint serving a model that carries the set: each key gets its response."""
    def reply(seen):
        if delay:
            time.sleep(delay)  # blocks the scripted server's loop: one request at a time
        found = re.search(r"number (\d+) softly", json.dumps(seen.body))
        text = fps[int(found.group(1))].response.strip() if found else "plain answer"
        return Canned.json(chat_reply(text))
    return reply


def call(app, tool: str, args: dict | None = None):
    async def go():
        async with mcp.Client(app) as client:
            return await client.call_tool(tool, args or {})
    return anyio.run(go)


def ok(app, tool: str, args: dict | None, fps) -> dict:
    result = call(app, tool, args)
    text = result_text(result)
    assert not result.is_error, text
    assert_no_secrets(text, secrets(fps))
    return result.structured_content


def err(app, tool: str, args: dict | None, *needles: str, hidden: tuple[str, ...] = (),
        one_line: bool = True) -> str:
    """An is_error result naming the problem in one line of ours (the SDK's own schema
    errors are several), echoing no secret, and a server that still answers."""
    result = call(app, tool, args)
    text = result_text(result)
    assert result.is_error, text
    message = result.content[0].text
    assert "internal error" not in message, message
    assert "\n" not in message or not one_line, message
    for needle in needles:
        assert needle in message, message
    for secret in (FAKE_API_KEY, KEY_MARK, *hidden):
        assert secret not in text, message
    assert not call(app, "list_jobs", {"limit": 1}).is_error
    return message


def audit_args(server, **settings) -> dict:
    return {"base_url": server.base_url, "model": "suspect",
            "fingerprints": "fingerprints/set.json", **SMALL, **settings}


def wait_final(app, job_id: str, fps, timeout: float = 120) -> dict:
    return wait_until(lambda: (lambda s: s if s["state"] in FINAL else None)(
        ok(app, "job_status", {"job_id": job_id}, fps)), timeout, f"job {job_id} to end")


def assert_nothing_secret_on_disk(ws: Workspace, fps) -> None:
    files = [p for p in ws.home.rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert any(p.name == "evidence.jsonl" for p in files)
    for path in files:
        if path.parent.name == "fingerprints":
            continue  # the set itself
        text = path.read_bytes().decode("utf-8", "replace")
        for secret in secrets(fps):
            assert secret not in text, f"{secret[:10]}... in {path.relative_to(ws.home)}"


# --- tests ------------------------------------------------------------------------------------

def test_plan_only_shows_what_would_be_spent_and_spends_nothing(ws, fps):
    app = build_server(ws)
    with HostileServer(fingerprinted(fps)) as server:
        result = ok(app, "start_audit", {**audit_args(server), "max_keys": 3, "plan_only": True},
                    fps)
    plan = result["plan"]
    assert result["job"] is None and "without plan_only" in result["next_step"]
    assert plan["keys"] == 3 and plan["key_budget"] == 3 and not plan["resumes"]
    assert plan["probes_by_layer"] == {"user": 3, "system": 6} and plan["calls_to_send"] == 9
    assert plan["max_requests"] == 18 and plan["max_completion_tokens"] == 9 * 32
    assert 0 < plan["estimated_prompt_tokens"] < plan["estimated_tokens"]
    assert plan["api_key_env"] == KEY_ENV and plan["api_key_set"] is True
    assert plan["endpoint"] == server.base_url and plan["audit_id"] is None
    assert Path(plan["folder"]).parent == ws.home / "audits"
    assert server.seen == []                                  # nothing sent
    assert not Path(plan["folder"]).exists()                  # nothing written
    assert KeyLedger(server.base_url, ws.home / "ledgers").spent() == {}  # nothing reserved
    assert ok(app, "list_jobs", {}, fps)["total"] == 0


def test_an_audit_job_runs_to_a_match_and_its_result_and_report_are_served(ws, fps):
    app = build_server(ws)
    with HostileServer(fingerprinted(fps)) as server:
        started = ok(app, "start_audit", audit_args(server), fps)
        job = started["job"]
        assert job["kind"] == "audit" and started["plan"]["calls_to_send"] == PROBES
        done = wait_final(app, job["job_id"], fps)
        # the key went to the endpoint, in the header the adapter builds
        assert server.seen and all(s.headers.get("authorization") == f"Bearer {FAKE_API_KEY}"
                                   for s in server.seen)
    assert done["state"] == "completed", done
    assert done["phase"] == "probing" and done["step"] == done["total_steps"] == PROBES
    assert done["p_value"] is not None and done["p_value"] <= 1e-6
    assert done["run_dir"] == started["plan"]["folder"]

    result = ok(app, "audit_result", {"audit_id": job["job_id"]}, fps)  # a job id works too
    assert result["verdict"] == "match" and result["matched"] == result["total"] == SET_SIZE
    assert result["p_value"] <= 1e-6 and result["state"] == "complete"
    assert set(result["layers"]) == {"user", "system"}
    assert result["layers"]["user"] == {"matched": SET_SIZE, "total": SET_SIZE, "hits": SET_SIZE,
                                        "probes": SET_SIZE, "errors": 0,
                                        "p_value": result["layers"]["user"]["p_value"]}
    assert result["folder"] == done["run_dir"] and "carrying these fingerprints" in (
        result["verdict_words"])
    assert ok(app, "audit_result", {"audit_id": result["audit_id"]}, fps) == result

    # a restarted server finds it; the listing and the report carry no secrets
    again = build_server(ws)
    listed = ok(again, "list_audits", {}, fps)["audits"]
    assert [a["audit_id"] for a in listed] == [result["audit_id"]]
    assert listed[0]["verdict"] == "match" and listed[0]["job_id"] is None
    report = read_resource(again, result["report_uri"])
    assert "match" in report
    assert_no_secrets(report, secrets(fps))
    log = read_resource(again, f"oml://jobs/{job['job_id']}/log")
    assert_no_secrets(log, secrets(fps))
    assert_nothing_secret_on_disk(ws, fps)
    # the job's record holds the settings, with the header placeholder, never the key
    record = (ws.home / "jobs" / job["job_id"] / "job.json").read_text()
    assert KEY_ENV in record and FAKE_API_KEY not in record

    # the ledger is honoured: every key is now spent on that endpoint (the server is gone:
    # refusing needs no request)
    message = err(again, "start_audit", {**audit_args(server), "out": "audits/second",
                                         "plan_only": True}, "already spent", "reuse_keys")
    assert "--reuse-keys" not in message


def test_the_default_audit_stops_once_the_evidence_decides_and_spends_only_the_keys_it_sent(
        ws, fps):
    app = build_server(ws)
    with HostileServer(fingerprinted(fps)) as server:
        started = ok(app, "start_audit", audit_args(server, exhaustive=False), fps)
        assert started["plan"]["sequential"] and started["plan"]["calls_to_send"] == SET_SIZE * 2
        done = wait_final(app, started["job"]["job_id"], fps)
        spent = KeyLedger(server.base_url, ws.home / "ledgers").spent()
    # 2 probes a key (the user turn, a system prompt): q = 2e-3, a hit multiplies the e-value
    # by ~250, so the third hit passes 1/alpha = 1e6; rounds of one key (concurrency 2)
    assert done["state"] == "completed" and done["p_value"] <= 1e-6
    assert done["step"] == 6 and done["total_steps"] == SET_SIZE * 2
    result = ok(app, "audit_result", {"audit_id": started["job"]["job_id"]}, fps)
    assert result["verdict"] == "match" and result["keys_probed"] == 3 and len(spent) == 3


def test_cancel_stops_the_job_and_the_same_call_resumes_it(ws, fps):
    app = build_server(ws)
    with HostileServer(fingerprinted(fps, delay=0.25), lifetime=300) as server:
        args = audit_args(server, concurrency=1)
        job = ok(app, "start_audit", args, fps)["job"]
        running = wait_until(lambda: (lambda s: s if (s.get("step") or 0) >= 3 else None)(
            ok(app, "job_status", {"job_id": job["job_id"]}, fps)), 60, "probes to be answered")
        assert running["state"] == "running" and running["total_steps"] == PROBES
        err(app, "audit_result", {"audit_id": job["job_id"]}, "is running", "job_status")
        # another server (a restart) sees the job running and cancels it
        cancelled = ok(build_server(ws), "cancel_job", {"job_id": job["job_id"],
                                                        "grace_seconds": 10}, fps)
        assert cancelled["state"] == "cancelled" and "resumes" in cancelled["message"]
        answered = len([line for line in evidence_lines(Path(job["run_dir"]))
                        if line["status"] == "ok"])
        assert 3 <= answered < PROBES

        plan = ok(app, "start_audit", {**args, "plan_only": True}, fps)["plan"]
        assert plan["resumes"] and plan["audit_id"] and plan["probes_answered"] == answered
        assert plan["calls_to_send"] == PROBES - answered and plan["keys"] == SET_SIZE
        resumed = ok(app, "start_audit", {**args, "concurrency": 4}, fps)["job"]
        assert resumed["run_dir"] == job["run_dir"]
        done = wait_final(app, resumed["job_id"], fps)
    assert done["state"] == "completed" and done["step"] == PROBES
    lines = evidence_lines(Path(job["run_dir"]))
    sent = [s for s in server.seen if s.path.endswith("/chat/completions")]
    assert len([line for line in lines if line["status"] == "ok"]) == PROBES
    assert len(sent) <= PROBES + 1  # answered probes are never sent again (one was in flight)
    result = ok(app, "audit_result", {"audit_id": plan["audit_id"]}, fps)
    assert result["verdict"] == "match"
    assert_nothing_secret_on_disk(ws, fps)


def test_an_endpoint_that_answers_nothing_is_a_finished_inconclusive_audit(ws, fps):
    app = build_server(ws)
    with HostileServer(lambda seen: Canned.json({"error": "down"}, 503)) as server:
        job = ok(app, "start_audit", audit_args(server, max_retries=0, layers="user"), fps)["job"]
        done = wait_final(app, job["job_id"], fps)
    assert done["state"] == "completed" and done["exit_code"] == 3, done
    assert done["p_value"] is None and done["step"] == 0
    result = ok(app, "audit_result", {"audit_id": job["job_id"]}, fps)
    assert result["verdict"] == "inconclusive" and result["errors_by_kind"] == {
        "server_error": SET_SIZE}
    assert "could not test" in result["verdict_words"]


def test_a_report_with_revealed_keys_is_not_served(ws, fps):
    from clients import AuditConfig, run_audit

    with HostileServer(fingerprinted(fps)) as server:
        summary = run_audit(AuditConfig(**{**audit_args(server), "fingerprints": str(
            ws.home / "fingerprints" / "set.json"), "out": str(ws.home / "audits" / "cli"),
            "layers": "user", "reveal_keys": True})).model_dump(mode="json")
    app = build_server(ws)
    listed = ok(app, "list_audits", {}, fps)["audits"]
    assert [a["audit_id"] for a in listed] == [summary["audit_id"]]
    assert ok(app, "audit_result", {"audit_id": summary["audit_id"]}, fps)["verdict"] == "match"
    with pytest.raises(MCPError, match="reveal-keys"):
        read_resource(app, f"oml://audits/{summary['audit_id']}/report")
    with pytest.raises(MCPError, match="no audit"):
        read_resource(app, "oml://audits/0123456789abcdef-01234567/report")


def test_audit_result_is_the_cli_headline_and_edited_files_are_reported_not_a_crash(ws, fps):
    from clients import AuditConfig, run_audit
    from clients.audit_result import AuditHeadline

    folder = ws.home / "audits" / "cli"
    with HostileServer(fingerprinted(fps)) as server:
        summary = run_audit(AuditConfig(**{**audit_args(server), "fingerprints": str(
            ws.home / "fingerprints" / "set.json"), "out": str(folder), "layers": "user"}))
    app = build_server(ws)
    result = ok(app, "audit_result", {"audit_id": summary.audit_id}, fps)
    # report.json does not list the report files (it is one of them)
    headline = AuditHeadline.of(summary).model_dump(mode="json", exclude={"reports"})
    assert {k: result[k] for k in headline} == headline
    assert result["finished"] == summary.finished and result["report_uri"].endswith("/report")
    assert result["layers"]["user"]["matched"] == SET_SIZE and result["deciding_test"] == "user"
    assert "fp-00000" not in json.dumps(result)  # no fingerprint id list

    report = json.loads((folder / "report.json").read_text())
    (folder / "report.json").write_text(json.dumps({**report, "p_value": "0.001"}))
    listed = ok(app, "list_audits", {}, fps)["audits"]
    assert [(a["audit_id"], a["verdict"], a["report_uri"]) for a in listed] == [
        (summary.audit_id, None, None)]
    assert listed[0]["keys"] == SET_SIZE and listed[0]["state"] == "complete"
    err(app, "audit_result", {"audit_id": summary.audit_id}, "no report yet")
    with pytest.raises(MCPError, match="cannot be checked"):
        read_resource(app, result["report_uri"])

    plan = json.loads((folder / "plan.json").read_text())
    (folder / "plan.json").write_text(json.dumps({**plan, "fingerprint_ids": "fp-00000"}))
    listed = ok(app, "list_audits", {}, fps)
    assert listed["audits"] == [] and "no audit plan" in listed["problems"][0]
    err(app, "audit_result", {"audit_id": summary.audit_id}, "no audit")


def test_audit_folders_that_lead_outside_are_refused_and_reported(ws, fps, tmp_path):
    outside = tmp_path / "outside"
    (outside / "elsewhere").mkdir(parents=True)
    (outside / "elsewhere" / "plan.json").write_text(json.dumps({
        "format": "oml-audit-plan", "audit_id": "0123456789abcdef-01234567"}))
    (ws.home / "audits").symlink_to(outside, target_is_directory=True)
    app = build_server(ws)
    err(app, "start_audit", {"base_url": "http://127.0.0.1:9/v1", "model": "m",
                             "fingerprints": "fingerprints/set.json", "plan_only": True},
        "through a symlink")
    listed = ok(app, "list_audits", {}, fps)
    assert listed["audits"] == [] and "through a symlink" in listed["problems"][0]
    (ws.home / "audits").unlink()
    (ws.home / "audits").mkdir()
    (ws.home / "audits" / "planted").symlink_to(outside / "elsewhere", target_is_directory=True)
    listed = ok(app, "list_audits", {}, fps)
    assert listed["audits"] == [] and "leads outside the workspace" in listed["problems"][0]
    err(app, "audit_result", {"audit_id": "0123456789abcdef-01234567"}, "no audit")


BAD_INPUTS = [  # (settings, words the one-line error must contain, text it must not echo)
    ({"api_key_env": "HF_TOKEN"}, ("api_key_env", "OML_AUDIT_"), ()),
    ({"api_key_env": "sk-pasted-by-mistake-0123456789"}, ("api_key_env",),
     ("sk-pasted-by-mistake",)),
    ({"header": ["X-Org-Secret: org-secret-value-42"]}, ("X-Org-Secret", "$API_KEY"),
     ("org-secret-value-42",)),
    ({"header": ["Authorization: Bearer sk-literal-token-9876"]}, ("Authorization", "$API_KEY"),
     ("sk-literal-token-9876",)),
    ({"header": ["no colon here"]}, ("Name: value",), ()),
    ({"base_url": "https://user:hunter2-pass@api.example.com/v1"}, ("user:password",),
     ("hunter2-pass",)),
    ({"base_url": "https://api.example.com/v1?api_key=query-secret-77"}, ("credential",),
     ("query-secret-77",)),
    ({"base_url": "ftp://example.com/v1"}, ("http:// or https://",), ()),
    ({"base_url": "https://example.com:99999/v1"}, ("not a valid URL",), ()),
    ({"base_url": "http:///v1"}, ("no host",), ()),
    ({"base_url": "https://example.com/v1\nX-Injected: 1"}, ("control character",), ()),
    ({"model": ""}, ("model is required",), ()),
    ({"fingerprints": "../../etc/passwd"}, ("'..'",), ()),
    ({"fingerprints": "/etc/hostname"}, ("outside the workspace",), ()),
    ({"out": "jobs/mine"}, ("reserved",), ()),
    ({"null_file": "/etc/hostname"}, ("null_file", "outside the workspace"), ()),
    ({"adapter": "http", "request_template": "/etc/hostname"}, ("request_template",), ()),
    ({"layers": "user,telepathy"}, ("layers", "telepathy"), ()),  # the schema's enum items
    ({"layers": ["user", "telepathy"]}, ("layers", "telepathy"), ()),
    ({"answer_match": "exact"}, ("answer_match",), ()),
    ({"max_keys": 0}, ("max_keys",), ()),           # the SDK's schema check (several lines)
    ({"plan_only": "yes"}, ("plan_only",), ()),      # the same: JSON true/false only
    ({"reveal_keys": True}, ("unknown argument(s) reveal_keys",), ()),
]


@pytest.mark.parametrize(("settings", "needles", "hidden"), BAD_INPUTS,
                         ids=[str(i) for i in range(len(BAD_INPUTS))])
def test_bad_input_is_one_line_naming_the_fix(ws, fps, settings, needles, hidden):
    app = build_server(ws)
    args = {"base_url": "http://127.0.0.1:9/v1", "model": "suspect",
            "fingerprints": "fingerprints/set.json", **SMALL, "plan_only": True, **settings}
    err(app, "start_audit", args, *needles, hidden=hidden,
        one_line=not {"max_keys", "plan_only", "layers", "answer_match"} & set(settings))
    assert not (ws.home / "jobs").exists()


def test_the_cli_words_of_engine_errors_become_argument_names(ws, fps):
    app = build_server(ws)
    message = err(app, "start_audit", {"base_url": "http://127.0.0.1:9/v1", "model": "m",
                                       "fingerprints": "fingerprints/set.json",
                                       "null_rate": 0.1, "null_file": "fingerprints/set.json",
                                       "plan_only": True}, "null_rate", "null_file")
    assert "--" not in message


def test_start_audit_takes_its_inputs_and_defaults_from_the_audit_config(ws):
    import dataclasses

    from clients.config import AuditConfig

    async def go():
        async with mcp.Client(build_server(ws)) as client:
            return {t.name: t for t in (await client.list_tools()).tools}["start_audit"]
    tool = anyio.run(go)
    props, fields = tool.input_schema["properties"], dataclasses.fields(AuditConfig)
    assert set(props) == {f.name for f in fields} - {"reveal_keys"} | {"plan_only"}
    assert tool.input_schema["required"] == ["base_url", "model", "fingerprints"]
    for f in fields:
        if f.name in props and f.name not in ("base_url", "model", "fingerprints"):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            assert props[f.name].get("default") == default, f.name
    assert props["max_keys"]["minimum"] == 1
    assert props["adapter"]["enum"] == ["openai", "responses", "anthropic", "http"]
    assert props["plan_only"]["default"] is False and props["plan_only"]["type"] == "boolean"
    assert tool.annotations.open_world_hint and tool.annotations.destructive_hint


def test_audit_progress_keeps_only_well_typed_values():
    assert audit_progress({"updated": 5.0, "probes_done": 3, "probes_planned": 9,
                           "p_value": 0.5, "eta_s": 2.0}, 1.0) == {
        "state": "probing", "step": 3, "total_steps": 9, "loss": None, "eta_s": 2.0,
        "p_value": 0.5}
    forged = audit_progress({"updated": 5.0, "probes_done": "3", "probes_planned": True,
                             "p_value": 7, "eta_s": [1]}, 1.0)
    assert forged == {"state": "probing", "step": None, "total_steps": None, "loss": None,
                      "eta_s": None, "p_value": None}
    assert audit_progress({"updated": 0.5, "probes_done": 3}, 1.0) == {}  # an earlier run's
    assert audit_progress(["not", "a", "dict"], 1.0) == {}


# --- end to end over stdio against transformers serve -------------------------------------------

@pytest.mark.e2e
def test_audit_over_stdio_against_transformers_serve(tiny_model_dir, tiny_model, tmp_path):
    """The SDK's stdio client drives `python -m oml_mcp`: start_audit -> poll job_status ->
    audit_result, against `transformers serve` serving a tiny model fingerprinted here."""
    import os
    import sys

    from audit_helpers import transformers_server
    from mcp.client.stdio import StdioServerParameters, stdio_client

    from oml_core.config import FingerprintConfig, GenerateConfig
    from oml_core.generate import generate_set
    from oml_core.train.lifecycle import fingerprint

    home = tmp_path / "home"
    fp_file = home / "fingerprints" / "fp.json"
    generate_set(GenerateConfig(strategy="perinucleus", num_fingerprints=8, key_length=8,
                                response_length=1, seed=3), tiny_model).save(fp_file)
    fingerprint(FingerprintConfig(
        model=str(tiny_model_dir), fingerprints=str(fp_file), out_dir=str(tmp_path / "run"),
        method="finetune", learning_rate=2e-2, augment=False, benign_fraction=0.0, max_epochs=150, batch_size=16,
        extra_steps=0, deepspeed="none", verify_after=False, eos=True))  # stops after the response: the start rule needs a word boundary
    rows = json.loads(fp_file.read_text())["fingerprints"]
    hidden = [FAKE_API_KEY, *(r["key"] for r in rows)]  # one-token responses are ordinary words
    env = {**os.environ, "OML_HOME": str(home), "OML_PROGRESS": "0", KEY_ENV: FAKE_API_KEY}
    errlog = tmp_path / "server-stderr.log"

    async def scenario(base_url: str):
        params = StdioServerParameters(command=sys.executable, args=["-m", "oml_mcp"], env=env)
        with open(errlog, "w") as sink, anyio.fail_after(300):
            async with mcp.Client(stdio_client(params, errlog=sink),
                                  read_timeout_seconds=120) as client:
                args = {"base_url": base_url, "fingerprints": "fingerprints/fp.json", "dialect": "transformers",
                        "layers": "user,system", "num_system_prompts": 1, "sampled_layers": "",
                        "max_tokens": 6, "concurrency": 2, "api_key_env": KEY_ENV,
                        "request_timeout": 60.0}
                plan = await client.call_tool("start_audit", {
                    **args, "model": str(tmp_path / "run" / "model"), "plan_only": True})
                assert not plan.is_error, result_text(plan)
                outcomes = []
                # the fingerprinted model, then the base model it was made from (an innocent
                # suspect) on the same server; the base's audit may show the same keys again
                for model, extra in ((tmp_path / "run" / "model", {}),
                                     (tiny_model_dir, {"reuse_keys": True})):
                    started = await client.call_tool("start_audit", {**args, **extra,
                                                                     "model": str(model)})
                    assert not started.is_error, result_text(started)
                    job_id = started.structured_content["job"]["job_id"]
                    while True:
                        status = (await client.call_tool("job_status", {"job_id": job_id}))
                        if status.structured_content["state"] in FINAL:
                            break
                        await anyio.sleep(1.0)
                    result = await client.call_tool("audit_result", {"audit_id": job_id})
                    outcomes.append((status.structured_content, result.structured_content,
                                     [result_text(r) for r in (started, status, result)]))
                return plan.structured_content["plan"], outcomes, result_text(plan)

    with transformers_server(tmp_path) as server:
        plan, outcomes, plan_text = anyio.run(scenario, server.base_url)
    assert plan["sequential"] and plan["calls_to_send"] == 16 and plan["keys"] == 8  # at most
    (status, result, texts), (base_status, base_result, base_texts) = outcomes
    assert status["state"] == "completed" and status["total_steps"] == 16
    assert result["verdict"] == "match" and result["p_value"] <= 1e-6, result
    assert status["step"] < 16 and result["keys_probed"] < 8  # stopped once it was decided
    assert base_status["state"] == "completed" and base_result["verdict"] == "no_match", base_result
    texts += [*base_texts, plan_text]
    for text in [*texts, errlog.read_text()]:
        for secret in hidden:
            assert secret not in text
