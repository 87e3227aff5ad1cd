"""The MCP tools through the SDK's in-process client, on the tiny in-test model.

Every tool: the happy path and bad input (an `is_error` result naming the problem, and the
server keeps serving). Every result is searched for every key and response of the sets made
here: none may appear except in `reveal_fingerprint`. Paths outside the workspace (`..`,
absolute, symlinks out) are refused. Jobs run real detached workers: one to completion, one
cancelled (its process group must be gone), one killed from outside (reported failed).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import anyio
import mcp
import pytest
from mcp.shared.exceptions import MCPError
from mcp_helpers import (
    FAST_JOB,
    FINAL,
    SLOW_JOB,
    TOOLS,
    assert_no_secrets,
    read_resource as read,
    result_text,
    secrets_of,
    wait_until,
)

from oml_core.commitment import check_reveal
from clients.config import LAYERS
from oml_core.config import EVAL_PARTS, FingerprintConfig, GenerateConfig
from oml_core.errors import OMLInputError
from oml_core.fingerprints import load_fingerprints
from oml_mcp.jobs import JobStore, _group_has_live_member, is_alive
from oml_mcp.paths import Workspace
from oml_mcp.server import build_server

SECRETS: list[str] = []  # keys and responses of every set made in this module


# --- fixtures and helpers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_model_dir, tiny_base_model_dir) -> Workspace:
    """OML_HOME plus three roots: an empty folder and the two tiny models' folders."""
    home = tmp_path_factory.mktemp("mcp_home")
    root = tmp_path_factory.mktemp("mcp_root")
    models = (Path(tiny_model_dir).resolve(), Path(tiny_base_model_dir).resolve())
    return Workspace(home.resolve(), (root.resolve(), *models))


@pytest.fixture(scope="module")
def app(ws):
    return build_server(ws)


def call(app, tool: str, args: dict | None = None, progress=None):
    async def go():
        async with mcp.Client(app) as client:
            return await client.call_tool(tool, args or {}, progress_callback=progress)
    return anyio.run(go)


def ok(app, tool: str, args: dict | None = None, progress=None) -> dict:
    result = call(app, tool, args, progress)
    assert not result.is_error, result_text(result)
    assert_no_secrets(result_text(result), SECRETS)
    return result.structured_content


def err(app, tool: str, args: dict | None, *needles: str) -> str:
    result = call(app, tool, args)
    text = result_text(result)
    assert result.is_error, text
    for needle in needles:
        assert needle in text, text
    assert_no_secrets(text, SECRETS)
    assert call(app, "list_jobs", {"limit": 1}).is_error is False  # still serving
    return text




def generate(app, model_dir, out: str, **settings) -> dict:
    args = dict(model=str(model_dir), strategy="random_word", num_fingerprints=8, key_length=8,
                response_length=6, out=out, **settings)
    data = ok(app, "generate_fingerprints", args)
    found = secrets_of(data["path"])
    assert min(len(s) for s in found) >= 10  # long enough that the secret checks mean something
    SECRETS.extend(found)
    return data


@pytest.fixture(scope="module")
def fp_set(app, tiny_model_dir) -> dict:
    return generate(app, tiny_model_dir, "fingerprints/words.json", seed=3)


def wait_for_job(app, job_id: str, states, timeout: float = 180) -> dict:
    def check():
        status = ok(app, "job_status", {"job_id": job_id})
        return status if status["state"] in states else None
    return wait_until(check, timeout, f"job {job_id} to reach {states}")


def running_job(app, fp_set, tiny_model_dir, name: str) -> dict:
    started = ok(app, "start_fingerprinting", {"model": str(tiny_model_dir),
                                               "fingerprints": fp_set["path"],
                                               "out_dir": f"runs/{name}", **SLOW_JOB})
    status = wait_for_job(app, started["job_id"], ("running", *FINAL), timeout=120)
    assert status["state"] == "running", status
    return status


# --- the tool list ----------------------------------------------------------------------------

def test_tools_are_listed_with_schemas_from_the_engine_configs(app):
    async def go():
        async with mcp.Client(app) as client:
            return (await client.list_tools()).tools, await client.list_resource_templates()
    tools, templates = anyio.run(go)
    by_name = {t.name: t for t in tools}
    assert set(by_name) == TOOLS
    for tool in tools:
        assert tool.description and tool.output_schema and tool.annotations, tool.name
    read_only = {n for n, t in by_name.items() if t.annotations.read_only_hint}
    assert read_only == {"job_status", "list_jobs", "job_result", "list_fingerprint_sets",
                         "list_runs", "list_audits", "audit_result"}
    destructive = {n for n, t in by_name.items() if t.annotations.destructive_hint}
    assert destructive == {"cancel_job", "reveal_fingerprint", "start_audit"}  # audits spend keys

    # defaults, ranges and choices come from the config dataclasses, not retyped
    import dataclasses

    props = by_name["start_fingerprinting"].input_schema["properties"]
    assert by_name["start_fingerprinting"].input_schema["required"] == ["fingerprints"]
    for f in dataclasses.fields(FingerprintConfig):
        if f.name == "fingerprints":
            continue
        assert props[f.name]["default"] == f.default, f.name
        if f.metadata["low"] is not None:
            schema = json.dumps(props[f.name])
            assert f'"minimum": {f.metadata["low"]}' in schema, f.name
    strategy = by_name["generate_fingerprints"].input_schema["properties"]["strategy"]
    strategy_field = {f.name: f for f in dataclasses.fields(GenerateConfig)}["strategy"]
    assert strategy["enum"] == list(strategy_field.metadata["choices"])
    assert strategy["default"] == strategy_field.default
    # list settings: arrays whose items carry the choices or the range
    evaluation = by_name["start_evaluation"].input_schema["properties"]
    assert evaluation["parts"]["type"] == "array" and evaluation["parts"]["minItems"] == 1
    assert evaluation["parts"]["items"]["enum"] == list(EVAL_PARTS)
    assert evaluation["parts"]["default"] == list(EVAL_PARTS)
    assert {"merge_linear", "merge"} <= set(evaluation["attacks"]["items"]["enum"])
    assert evaluation["temperatures"]["items"] == {"type": "number", "exclusiveMinimum": 0.0,
                                                   "maximum": 2.0}
    assert evaluation["capacity_sizes"]["items"]["type"] == "integer"
    assert "minItems" not in evaluation["lm_eval_tasks"]  # [] means off
    audit = by_name["start_audit"].input_schema["properties"]
    assert audit["layers"]["items"]["enum"] == list(LAYERS)
    assert audit["answer_match"]["enum"] == ["start", "anywhere"] and "match" not in audit
    uris = {t.uri_template for t in templates.resource_templates}
    assert uris == {"oml://runs/{name}/summary", "oml://jobs/{job_id}/log",
                    "oml://audits/{audit_id}/report"}


# --- generate ---------------------------------------------------------------------------------

def test_generate_writes_a_set_inside_the_workspace(app, ws, fp_set):
    path = Path(fp_set["path"])
    assert path.parent == ws.home / "fingerprints" and path.is_file()
    fset = load_fingerprints(path)
    assert fp_set["count"] == len(fset) == 8
    assert fp_set["commitment_root"] == fset.manifest().root
    default = ok(app, "generate_fingerprints", {"model": fp_set["model"],
                                                "strategy": "random_word", "num_fingerprints": 2,
                                                "key_length": 8, "response_length": 6})
    SECRETS.extend(secrets_of(default["path"]))
    assert Path(default["path"]).parent == ws.home / "fingerprints"


def test_generate_reports_progress(app, tiny_model_dir):
    seen = []

    async def progress(value, total, message):
        seen.append((value, message))
    data = ok(app, "generate_fingerprints", {
        "model": str(tiny_model_dir), "strategy": "perinucleus", "num_fingerprints": 4,
        "key_length": 6, "response_length": 1, "out": "fingerprints/peri.json"}, progress)
    SECRETS.extend(secrets_of(data["path"]))
    values = [v for v, _ in seen]
    assert len(seen) >= 3 and values == sorted(values) and values[-1] > 0, seen
    assert any("keys" in m for _, m in seen) and data["mean_response_prob"] is not None


@pytest.mark.parametrize("args, needles", [
    ({"num_fingerprints": 0}, ["num_fingerprints", "greater than or equal to 1"]),
    ({"strategy": "nope"}, ["strategy"]),
    ({"out": "../escape.json"}, ["'..'", "allowed folders"]),
    ({"out": "/etc/oml-escape.json"}, ["outside the workspace", "allowed folders"]),
    ({"model": "/nonexistent/model"}, ["outside the workspace"]),
    ({"numfingerprints": 3}, ["unknown argument(s) numfingerprints"]),
    ({"out": "fingerprints/words.json"}, ["already exists"]),
    ({"keys_file": "missing-keys.json"}, ["not found"]),
], ids=["zero", "strategy", "dotdot", "absolute", "model-outside", "typo", "exists", "keys"])
def test_generate_bad_input(app, tiny_model_dir, fp_set, args, needles):
    base = {"model": str(tiny_model_dir), "strategy": "random_word", "num_fingerprints": 2,
            "key_length": 4, "out": "fingerprints/never.json"}
    err(app, "generate_fingerprints", {**base, **args}, *needles)


def test_generate_model_folder_without_config(app, ws):
    (ws.home / "not-a-model").mkdir(exist_ok=True)
    err(app, "generate_fingerprints", {"model": "not-a-model", "num_fingerprints": 2},
        "no config.json")


# --- paths ------------------------------------------------------------------------------------

def test_paths_outside_the_workspace_are_refused(app, ws, tmp_path, fp_set):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "set.json").write_text(Path(fp_set["path"]).read_text())
    (ws.home / "link-out").symlink_to(outside, target_is_directory=True)
    (ws.home / "file-link.json").symlink_to(outside / "set.json")
    cases = {
        "../outside/set.json": ["'..'"],
        "fingerprints/../../x.json": ["'..'"],
        str(outside / "set.json"): ["outside the workspace"],
        "link-out/set.json": ["symlink", str(outside.resolve())],
        "file-link.json": ["symlink"],
        "~/.ssh/id_rsa": ["outside the workspace"],
    }
    for path, needles in cases.items():
        for tool in ("show_commitment", "verify_model"):
            err(app, tool, {"fingerprints": path}, *needles, str(ws.home))
    err(app, "verify_model", {"fingerprints": fp_set["path"], "null_file": str(outside / "set.json")},
        "outside the workspace")
    err(app, "list_fingerprint_sets", {"folder": "link-out"}, "symlink")
    err(app, "reveal_fingerprint", {"fingerprints": "link-out/set.json", "fingerprint_id": "fp-00000",
                                    "confirm_reveal": True}, "symlink")
    # a symlink that stays inside is fine
    (ws.home / "link-in.json").symlink_to(fp_set["path"])
    assert ok(app, "show_commitment", {"fingerprints": "link-in.json"})["count"] == 8
    # a configured root is allowed
    inside_root = ws.roots[0] / "set.json"
    inside_root.write_text(Path(fp_set["path"]).read_text())
    assert ok(app, "show_commitment", {"fingerprints": str(inside_root)})["count"] == 8


def test_workspace_roots_and_model_arguments(ws, tmp_path, monkeypatch):
    assert ws.model(None) is None and ws.model("bundled") is None
    assert ws.model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    for spec in ("/etc", "../models/x", "~/models/x", "a/b/../../../etc"):
        with pytest.raises(OMLInputError, match="allowed folders"):
            ws.model(spec)
    monkeypatch.setenv("OML_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("OML_MCP_ROOTS", f"{tmp_path}{os.pathsep}{tmp_path / 'missing'}")
    with pytest.raises(OMLInputError, match="missing.*not an existing folder"):
        Workspace.from_env()
    monkeypatch.setenv("OML_MCP_ROOTS", str(tmp_path))
    made = Workspace.from_env()
    assert made.home == (tmp_path / "home").resolve() and made.roots == (tmp_path.resolve(),)


# --- verify -----------------------------------------------------------------------------------

def test_verify_reports_progress_and_a_report_without_secrets(app, ws, fp_set, tiny_model_dir):
    seen = []

    async def progress(value, total, message):
        seen.append(value)
    data = ok(app, "verify_model", {"model": str(tiny_model_dir),
                                    "fingerprints": fp_set["path"]}, progress)
    assert data["total"] == 8 and data["verdict"] in ("match", "no_match")
    assert set(data["wrappers"]) >= {"bare", "chat"}
    assert len(seen) >= 2 and seen == sorted(seen)
    report = Path(data["report_path"])
    assert report.parent == ws.home / "reports"
    assert_no_secrets(report.read_text(), SECRETS)
    assert len(json.loads(report.read_text())["per_fingerprint"]) == 8


# small enough for the tiny model: the two quick parts, seconds
QUICK_EVAL = {"parts": "utility,false_positives", "null_models": "base,random", "device": "cpu",
              "num_system_prompts": 2, "perplexity_tokens": 256, "batch_size": 64}


def test_evaluation_job_measures_a_finished_run(app, ws, fp_set, tiny_model_dir):
    trained = ok(app, "start_fingerprinting", {"model": str(tiny_model_dir), "fingerprints": fp_set["path"],
                                               "out_dir": "runs/to-evaluate", **FAST_JOB})
    assert wait_for_job(app, trained["job_id"], FINAL)["state"] == "completed"
    started = ok(app, "start_evaluation", {"run": "runs/to-evaluate", **QUICK_EVAL})
    assert started["kind"] == "eval" and started["run_dir"] == str(ws.home / "runs/to-evaluate/eval")
    done = wait_for_job(app, started["job_id"], FINAL)
    assert done["state"] == "completed", read(app, f"oml://jobs/{started['job_id']}/log")
    assert done["phase"] == "completed" and done["step"] == done["total_steps"] == 2
    output = ok(app, "job_result", {"job_id": started["job_id"]})["output"]
    assert output["computed"] == ["utility", "false_positives"]
    assert output["parts"]["utility"]["matched"] == 8 and output["parts"]["utility"]["base_matched"] == 0
    assert output["parts"]["false_positives"]["models"]["random"]["verdict"] == "no_match"
    report = ws.home / "runs/to-evaluate/eval"
    assert (report / "eval.html").exists() and (report / "null_rates.json").exists()
    assert_no_secrets(json.dumps(output) + read(app, f"oml://jobs/{started['job_id']}/log")
                      + (report / "eval.md").read_text(), SECRETS)


@pytest.mark.parametrize("args, needles", [
    ({}, ["run", "Field required"]),
    ({"run": "runs/never-made"}, ["not a folder"]),
    ({"run": "fingerprints"}, ["not an OML run"]),
    ({"run": "../elsewhere"}, ["'..'"]),
    ({"run": "/etc"}, ["outside"]),
    ({"run": "fingerprints", "out": "/tmp/report"}, ["out", "outside"]),
    ({"run": "fingerprints", "null_models": "base,/usr/lib"}, ["null_models", "outside"]),
    ({"run": "fingerprints", "parts": "utility,speed"}, ["parts", "Input should be 'utility'"]),
    ({"run": "fingerprints", "parts": ["utility", "speed"]}, ["parts", "input_value='speed'"]),
    ({"run": "fingerprints", "parts": []}, ["parts", "at least 1 item"]),
    ({"run": "fingerprints", "samples": 0}, ["samples"]),
    ({"run": "fingerprints", "attacks": "merge_frankenstein"}, ["attacks", "merge_frankenstein"]),
    ({"run": "fingerprints", "merge_base_weights": [0.3, 1.5]}, ["merge_base_weights", "less than or equal to 1"]),
    ({"run": "fingerprints", "temperatures": [0]}, ["temperatures", "greater than 0"]),
], ids=["missing", "absent", "not-a-run", "dotdot", "outside", "out-outside", "null-outside", "part",
        "part-list", "no-part", "samples", "attack", "merge-weights", "temperature"])
def test_start_evaluation_bad_input(app, fp_set, args, needles):  # fp_set: a folder that is no run
    err(app, "start_evaluation", args, *needles)


@pytest.mark.parametrize("args, needles", [
    ({}, ["fingerprints", "Field required"]),
    ({"fingerprints": "nothing-here.json"}, ["not found"]),
    ({"fingerprints": "{fp}", "match": "fuzzy"}, ["match"]),
    ({"fingerprints": "{fp}", "alpha": 2}, ["alpha"]),
    ({"fingerprints": "{fp}", "null_model": ["/elsewhere/model"]}, ["null_model", "outside"]),
    ({"fingerprints": "{fp}", "wrappers": "nonsense"}, ["wrapper"]),
], ids=["missing", "absent", "match", "alpha", "null-outside", "wrappers"])
def test_verify_bad_input(app, fp_set, tiny_model_dir, args, needles):
    args = {k: (v.format(fp=fp_set["path"]) if isinstance(v, str) else v) for k, v in args.items()}
    err(app, "verify_model", {"model": str(tiny_model_dir), **args}, *needles)


def test_verify_malformed_set(app, ws):
    (ws.home / "broken.json").write_text('{"format": "oml-fingerprints", ')
    err(app, "verify_model", {"fingerprints": "broken.json"}, "not valid JSON")


# --- listing, commitment, reveal --------------------------------------------------------------

def test_list_fingerprint_sets(app, ws, fp_set):
    (ws.home / "fingerprints" / "junk.json").write_text("[1, 2]")
    listed = ok(app, "list_fingerprint_sets")
    by_path = {s["path"]: s for s in listed["sets"]}
    assert by_path[fp_set["path"]]["count"] == 8
    assert by_path[fp_set["path"]]["committable"] is True
    assert by_path[str(ws.home / "fingerprints" / "junk.json")]["problem"]
    assert ok(app, "list_fingerprint_sets", {"folder": str(ws.roots[0])})["folder"] == str(ws.roots[0])
    err(app, "list_fingerprint_sets", {"folder": "/etc"}, "outside the workspace")
    err(app, "list_fingerprint_sets", {"folder": "no-such-folder"}, "not an existing folder")


def test_show_commitment(app, ws, fp_set):
    data = ok(app, "show_commitment", {"fingerprints": fp_set["path"], "out": "commitment.json"})
    manifest = json.loads((ws.home / "commitment.json").read_text())
    assert data["root"] == manifest["root"] == fp_set["commitment_root"]
    assert [leaf["id"] for leaf in data["leaves"]] == [leaf["id"] for leaf in manifest["leaves"]]
    assert_no_secrets(json.dumps(manifest), SECRETS)
    err(app, "show_commitment", {"fingerprints": fp_set["path"], "out": "commitment.json"},
        "already exists")
    (ws.home / "seed.json").write_text(json.dumps([{"key": "a b c", "response": "d e f"}]))
    err(app, "show_commitment", {"fingerprints": "seed.json"}, "no salt", "oml import")


def test_reveal_needs_confirmation_and_gives_one_pair_with_proof(app, ws, fp_set):
    err(app, "reveal_fingerprint", {"fingerprints": fp_set["path"], "fingerprint_id": "fp-00002"},
        "confirm_reveal")
    err(app, "reveal_fingerprint", {"fingerprints": fp_set["path"], "fingerprint_id": "fp-99999",
                                    "confirm_reveal": True}, "no fingerprint with id")
    result = call(app, "reveal_fingerprint", {"fingerprints": fp_set["path"],
                                              "fingerprint_id": "fp-00002", "confirm_reveal": True})
    assert not result.is_error, result_text(result)
    reveal = result.structured_content
    pair = load_fingerprints(fp_set["path"]).fingerprints[2]
    assert (reveal["key"], reveal["response"]) == (pair.key, pair.response)
    manifest = load_fingerprints(fp_set["path"]).manifest()
    check = check_reveal({k: v for k, v in reveal.items() if k != "written_to"}, manifest)
    assert check.valid, check.reason
    others = [s for s in SECRETS if s not in (pair.key.strip(), pair.response.strip())]
    assert_no_secrets(result_text(result), others)  # only the one pair asked for


# --- jobs -------------------------------------------------------------------------------------

def test_fingerprint_job_runs_to_completion(app, ws, fp_set, tiny_model_dir):
    started = ok(app, "start_fingerprinting", {"model": str(tiny_model_dir),
                                               "fingerprints": fp_set["path"], **FAST_JOB})
    assert started["state"] in ("starting", "running") and started["pid"]
    job_id, run_dir = started["job_id"], Path(started["run_dir"])
    assert run_dir.parent == ws.home / "runs"
    record = json.loads((ws.home / "jobs" / job_id / "job.json").read_text())
    assert record["pid_start"] and record["run_dir"] == str(run_dir)
    assert_no_secrets(json.dumps(record), SECRETS)

    done = wait_for_job(app, job_id, FINAL)
    assert done["state"] == "completed", read(app, f"oml://jobs/{job_id}/log")
    assert done["exit_code"] == 0 and done["step"] == done["total_steps"]
    result = ok(app, "job_result", {"job_id": job_id})
    assert result["output"]["run_dir"] == str(run_dir) and result["output"]["steps"] >= 1
    assert (run_dir / "COMPLETE").exists()

    assert job_id in [j["job_id"] for j in ok(app, "list_jobs")["jobs"]]
    runs = {r["name"]: r for r in ok(app, "list_runs")["runs"]}
    assert runs[run_dir.name]["complete"] and runs[run_dir.name]["model_dir"] == str(run_dir / "model")
    summary = json.loads(read(app, f"oml://runs/{run_dir.name}/summary"))
    assert summary["complete"] and summary["num_fingerprints"] == 8
    log = read(app, f"oml://jobs/{job_id}/log")
    assert "exit code 0" in log and len(log) <= 17_000
    assert_no_secrets(log + (run_dir / "train.log").read_text(), SECRETS)

    # the fingerprinted model answers its keys
    verified = ok(app, "verify_model", {"model": str(run_dir / "model"),
                                        "fingerprints": fp_set["path"]})
    assert verified["matched"] == 8 and verified["verdict"] == "match"

    # a fresh server (as after a restart) reads the same jobs from disk
    again = build_server(ws)
    assert ok(again, "job_status", {"job_id": job_id})["state"] == "completed"
    assert ok(again, "job_result", {"job_id": job_id})["exit_code"] == 0


@pytest.mark.parametrize("args, needles", [
    ({}, ["fingerprints", "Field required"]),
    ({"fingerprints": "nope.json"}, ["not found"]),
    ({"fingerprints": "{fp}", "learning_rate": 50}, ["learning_rate"]),
    ({"fingerprints": "{fp}", "format": "yaml"}, ["format"]),
    ({"fingerprints": "{fp}", "deepspeed": "/etc/ds.json"}, ["deepspeed", "outside"]),
    ({"fingerprints": "{fp}", "deepspeed": "zero9"}, ["deepspeed", "zero9"]),
    ({"fingerprints": "{fp}", "out_dir": "fingerprints"}, ["not empty", "not an OML run"]),
    ({"fingerprints": "{fp}", "out_dir": "../runs"}, ["'..'"]),
    ({"fingerprints": "{fp}", "model": "no-such-model/inside/home"}, ["does not exist"]),
    ({"fingerprints": "{fp}", "start_from": "/etc"}, ["start_from", "outside"]),
    ({"fingerprints": "{fp}", "start_from": "fingerprints"}, ["start-from", "not a model folder"]),
    ({"fingerprints": "{fp}", "method": "finetune", "lora_rank": 8, "deepspeed": "zero3"},
     ["--lora-rank", "ZeRO-3"]),
], ids=["missing", "absent", "lr", "format", "ds-outside", "ds-name", "nonempty", "dotdot", "model",
        "start-outside", "start-not-model", "lora-zero3"])
def test_start_fingerprinting_bad_input(app, fp_set, tiny_model_dir, args, needles):
    args = {k: (v.format(fp=fp_set["path"]) if isinstance(v, str) else v) for k, v in args.items()}
    err(app, "start_fingerprinting", {"model": str(tiny_model_dir), **args}, *needles)


def test_job_tools_bad_input(app):
    for tool in ("job_status", "job_result", "cancel_job"):
        err(app, tool, {"job_id": "../../etc"}, "not a valid job id")
        err(app, tool, {"job_id": "fingerprint-19990101-000000-abcdef"}, "no job", "list_jobs")
    err(app, "list_jobs", {"limit": 0}, "limit")
    err(app, "cancel_job", {"job_id": "x", "grace_seconds": 500}, "grace_seconds")
    for uri, needle in (("oml://runs/..%2F..%2Fetc/summary", "Unknown resource"),
                        ("oml://jobs/..%2F..%2Fetc/log", "Unknown resource"),
                        ("oml://runs/nothing/summary", "no run 'nothing'"),
                        ("oml://jobs/nothing/log", "no job 'nothing'")):
        with pytest.raises(MCPError, match=needle):
            read(app, uri)


def test_cancel_ends_the_workers_process_group(app, fp_set, tiny_model_dir):
    status = running_job(app, fp_set, tiny_model_dir, "to-cancel")
    job_id, pid = status["job_id"], status["pid"]
    err(app, "job_result", {"job_id": job_id}, "has not finished", "job_status")
    cancelled = ok(app, "cancel_job", {"job_id": job_id, "grace_seconds": 20})
    assert cancelled["state"] == "cancelled" and cancelled["was_running"]
    assert cancelled["signal"] == "SIGTERM"  # it stopped at the next step, no SIGKILL needed
    assert not is_alive(pid, None) and not _group_has_live_member(pid)
    after = ok(app, "job_status", {"job_id": job_id})
    assert after["state"] == "cancelled" and after["exit_code"] in (143, None)
    assert ok(app, "job_result", {"job_id": job_id})["state"] == "cancelled"
    again = ok(app, "cancel_job", {"job_id": job_id})
    assert not again["was_running"] and "already ended" in again["message"]


def test_worker_killed_from_outside_is_reported_failed(app, fp_set, tiny_model_dir):
    status = running_job(app, fp_set, tiny_model_dir, "to-kill")
    os.killpg(status["pid"], signal.SIGKILL)
    failed = wait_for_job(app, status["job_id"], FINAL, timeout=30)
    assert failed["state"] == "failed", failed
    assert "worker died" in failed["reason"]
    result = ok(app, "job_result", {"job_id": status["job_id"]})
    assert result["state"] == "failed" and "worker died" in result["reason"]


def test_a_failing_command_is_reported_with_its_reason(app, fp_set, tiny_base_model_dir):
    # a model without a chat template cannot train in chat format; only the trainer finds out
    started = ok(app, "start_fingerprinting", {"model": str(tiny_base_model_dir),
                                               "fingerprints": fp_set["path"], "format": "chat",
                                               **FAST_JOB})
    failed = wait_for_job(app, started["job_id"], FINAL, timeout=120)
    assert failed["state"] == "failed" and failed["exit_code"] == 2, failed
    assert "chat template" in failed["reason"] and "format" in failed["reason"]
    assert ok(app, "job_result", {"job_id": started["job_id"]})["output"] is None


def test_an_unexpected_error_is_generic_and_keeps_its_message_out(app, monkeypatch, caplog):
    secret = "SECRET-in-an-exception-message"

    def boom(self, limit):
        raise RuntimeError(secret)
    monkeypatch.setattr(JobStore, "list", boom)
    text = result_text(call(app, "list_jobs", {}))
    assert "internal error (RuntimeError)" in text and secret not in text
    assert secret not in caplog.text and "RuntimeError" in caplog.text
    monkeypatch.undo()
    assert not call(app, "list_jobs", {}).is_error  # and the server keeps serving
