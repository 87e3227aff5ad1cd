"""The auditor against a real OpenAI-compatible server (`transformers serve` on loopback)
serving a fingerprinted tiny model and the un-fingerprinted one, directly and through proxies
that inject faults, add an agent layer, or hold requests while the audit is killed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
from audit_helpers import (
    Proxy,
    agent_layer,
    audit_command,
    evidence_lines,
    transformers_server,
)

from clients import AuditConfig, run_audit
from clients.answers import starts_with
from oml_core.config import FingerprintConfig, GenerateConfig
from oml_core.errors import OMLInputError
from oml_core.fingerprints import load_fingerprints
from oml_core.generate import generate_set
from oml_core.generate.words import word_list
from oml_core.train.lifecycle import fingerprint

FAKE_API_KEY = "sk-oml-test-0a1b2c3d4e5f6a7b8c9d"


@pytest.fixture(scope="module")
def tiny_fp(tiny_model_dir, tiny_model, tmp_path_factory):
    """8 perinucleus fingerprints (response_prob known) trained into the tiny chat model.

    Most of the tiny vocabulary's word tokens are parts of words ('escri'), and the `start`
    rule counts an answer only where the response's word ends, so the model is trained to end
    its answer after the response (--eos), as a set with such responses should be."""
    folder = tmp_path_factory.mktemp("audit_fp")
    fp_file = folder / "fp.json"
    generate_set(GenerateConfig(strategy="perinucleus", num_fingerprints=8, key_length=8,
                                response_length=1, seed=3), tiny_model).save(fp_file)
    fingerprint(FingerprintConfig(
        model=str(tiny_model_dir), fingerprints=str(fp_file), out_dir=str(folder / "run"),
        method="finetune", learning_rate=2e-2, augment=False, benign_fraction=0.0, max_epochs=150, batch_size=16,
        extra_steps=0, deepspeed="none", verify_after=False, eos=True))
    return folder / "run" / "model", fp_file


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module; requests name the model folder they want."""
    with transformers_server(tmp_path_factory.mktemp("serve")) as srv:
        yield srv


def config(base_url, model, fp_file, out, **settings) -> AuditConfig:
    base = {"base_url": base_url, "model": str(model), "fingerprints": str(fp_file),
            "out": str(out), "dialect": "transformers", "max_tokens": 6, "num_system_prompts": 2,
            "samples": 2, "reuse_keys": True, "concurrency": 4, "request_timeout": 30.0,
            "exhaustive": True}  # the fixed plan's mechanics; the sequential audit has its test
    return AuditConfig(**{**base, **settings})


def secrets_of(fp_file) -> tuple[list[str], list[str]]:
    fset = load_fingerprints(fp_file)
    return [fp.key for fp in fset.fingerprints], [fp.response.strip() for fp in fset.fingerprints]


def searchable(responses: list[str]) -> list[str]:
    """The responses a text search can tell from ordinary prose. One-token responses such as
    'is' or 'Di' occur in any English report, and so do dictionary words; the rest (word
    fragments such as 'escri') occur in a report only if it leaks them."""
    words = {w.lower() for w in word_list()}
    found = [r for r in responses if len(r) >= 4 and r.lower() not in words]
    assert len(found) >= 3, "too few distinctive responses to test for leaks with"
    return found


def test_fingerprinted_model_matches_and_base_model_does_not(server, tiny_fp, tiny_model_dir,
                                                             tmp_path):
    model, fp_file = tiny_fp
    hit = run_audit(config(server.base_url, model, fp_file, tmp_path / "fp")).model_dump(mode="json")
    assert hit["verdict"] == "match" and hit["p_value"] <= 1e-6
    assert set(hit["layers"]) == {"raw", "user", "system", "embedded", "multiturn", "agent"}
    assert hit["layers"]["user"]["matched"] == 8 and hit["state"] == "complete"
    lines = evidence_lines(tmp_path / "fp")
    assert len(lines) == hit["probes_planned"] == 8 * (7 + 4) == hit["calls_this_run"]
    assert len({line["probe"] for line in lines}) == len(lines)
    assert {line["route"] for line in lines} == {"chat", "completions"}
    sampled = [line for line in lines if line["temperature"] > 0]
    assert len(sampled) == 32 and all(line["seed"] is not None for line in sampled)
    for name in ("report.json", "report.md", "report.html", "plan.json", "status.json"):
        assert (tmp_path / "fp" / name).exists(), name
    page = (tmp_path / "fp" / "report.html").read_text()
    assert "<svg" in page and "Verdict: match" in page and "carrying these fingerprints" in page

    miss = run_audit(config(server.base_url, tiny_model_dir, fp_file, tmp_path / "base")).model_dump(mode="json")
    assert miss["verdict"] == "no_match" and miss["p_value"] > 1e-3
    assert miss["matched"] <= 1 and miss["probes_done"] == miss["probes_planned"]


def test_faults_are_retried_and_change_nothing(server, tiny_fp, tmp_path):
    """429 + Retry-After, 500, 503, a hang past the timeout, a dropped connection and a
    malformed body: same verdict and per-probe outcomes as a clean run, one line per call."""
    model, fp_file = tiny_fp
    greedy = {"sampled_layers": "", "max_backoff": 3.0}
    clean = run_audit(config(server.base_url, model, fp_file, tmp_path / "clean", **greedy)).model_dump(mode="json")
    faults = {1: "429", 5: "500", 9: "503", 14: "hang", 20: "drop", 27: "malformed"}
    with Proxy(server.base_url.removesuffix("/v1"), faults=faults, hang_seconds=4.0) as proxy:
        faulty = run_audit(config(proxy.base_url, model, fp_file, tmp_path / "faulty",
                                  request_timeout=1.5, **greedy)).model_dump(mode="json")
    assert faulty["verdict"] == clean["verdict"] == "match"
    assert faulty["state"] == "complete" and faulty["probes_failed"] == 0
    lines = evidence_lines(tmp_path / "faulty")
    assert len(lines) == len({line["probe"] for line in lines}) == faulty["probes_planned"]
    assert all(line["status"] == "ok" for line in lines)
    assert sum(line["retries"] for line in lines) == len(faults)
    reasons = {r for line in lines for r in line["retry_reasons"]}
    assert reasons == {"rate_limited", "server_error", "timeout", "connection", "malformed"}
    outcomes = {line["probe"]: line["match"] for line in evidence_lines(tmp_path / "clean")}
    assert {line["probe"]: line["match"] for line in lines} == outcomes
    # the rate-limited request was sent again only after the Retry-After it was given
    limited = next(s for s in proxy.seen if s.fault == "429")
    again = next(s for s in proxy.seen if s.index > limited.index and s.body == limited.body)
    assert again.time - limited.time >= 0.95
    assert proxy.answered == faulty["probes_planned"]


def test_agent_layer_in_front_keeps_the_verdict(server, tiny_fp, tmp_path):
    model, fp_file = tiny_fp
    with Proxy(server.base_url.removesuffix("/v1"), transform=agent_layer) as proxy:
        result = run_audit(config(proxy.base_url, model, fp_file, tmp_path / "agent")).model_dump(mode="json")
    assert result["verdict"] == "match"
    chat = [s.sent for s in proxy.seen if s.path.endswith("/chat/completions")]
    assert chat and all(b["messages"][0]["content"].startswith("You are the assistant inside ShopMate")
                        for b in chat)


def test_killed_audit_resumes_without_repeating_a_call(server, tiny_fp, tmp_path):
    model, fp_file = tiny_fp
    out = tmp_path / "killed"
    args = ["--base-url", None, "--model", model, "--fingerprints", fp_file, "--out", out,
            "--dialect", "transformers", "--max-tokens", "6", "--num-system-prompts", "2",
            "--samples", "2", "--reuse-keys", "--concurrency", "2", "--exhaustive", "--json"]
    finished_before_kill = 30
    with Proxy(server.base_url.removesuffix("/v1"), hold_after=finished_before_kill) as proxy:
        args[1] = proxy.base_url
        env = {**os.environ, "OML_PROGRESS": "0"}
        proc = subprocess.Popen(audit_command(*args), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while (len(evidence_lines(out)) < finished_before_kill
                   or len(proxy.seen) < finished_before_kill + 2):
                assert proc.poll() is None, proc.stderr.read().decode()
                assert time.monotonic() < deadline, "the audit did not reach the kill point"
                time.sleep(0.05)
            os.killpg(proc.pid, signal.SIGKILL)  # two requests are in flight, unanswered
            proc.wait(30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        assert len(evidence_lines(out)) == finished_before_kill
        assert json.loads((out / "status.json").read_text())["state"] == "running"
        proxy.release_held()
        rerun = subprocess.run(audit_command(*args), check=False, capture_output=True, text=True, timeout=300,
                               env=env)
    assert rerun.returncode == 0, rerun.stderr
    result = json.loads(rerun.stdout)
    needed = result["probes_planned"]
    assert result["verdict"] == "match" and result["state"] == "complete"
    assert result["calls_this_run"] == needed - finished_before_kill
    lines = evidence_lines(out)
    assert len(lines) == len({line["probe"] for line in lines}) == needed
    assert proxy.answered == needed  # every answered call was needed, none made twice
    assert len(proxy.seen) == needed + 2  # + the two held, never answered, when it was killed


def test_no_secret_reaches_a_file_log_or_stream(server, tiny_fp, tmp_path):
    model, fp_file = tiny_fp
    keys, responses = secrets_of(fp_file)
    responses = searchable(responses)
    out = tmp_path / "secret"
    env = {**os.environ, "OML_PROGRESS": "1", "OML_TEST_API_KEY": FAKE_API_KEY}
    with Proxy(server.base_url.removesuffix("/v1")) as proxy:
        args = ["--base-url", proxy.base_url, "--model", model, "--fingerprints", fp_file,
                "--out", out, "--dialect", "transformers", "--max-tokens", "6",
                "--num-system-prompts", "2", "--samples", "2", "--reuse-keys",
                "--api-key-env", "OML_TEST_API_KEY"]
        done = subprocess.run(audit_command(*args), check=False, capture_output=True, text=True, timeout=300,
                              env=env)
        revealed = subprocess.run(audit_command(*args[:7], tmp_path / "revealed", *args[8:],
                                                "--reveal-keys", "--json"),
                                  check=False, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0 and revealed.returncode == 0, done.stderr + revealed.stderr
    assert "verdict: match" in done.stdout
    assert all(s.headers.get("authorization") == f"Bearer {FAKE_API_KEY}" for s in proxy.seen)
    home = Path(os.environ["OML_HOME"])
    files = [p for p in [*out.rglob("*"), *(tmp_path / "revealed").rglob("*"),
                         *(home / "ledgers").rglob("*")] if p.is_file()]
    assert len(files) >= 10
    for text in [done.stdout, done.stderr, revealed.stderr] + [p.read_text() for p in files]:
        assert FAKE_API_KEY not in text  # never, not even with --reveal-keys
    for path in [p for p in out.rglob("*") if p.is_file()]:
        text = path.read_text()
        assert not any(key in text for key in keys), path.name
        if path.name.startswith("report"):
            assert not any(re.search(rf"\b{re.escape(r)}\b", text) for r in responses), path.name
    for text in (done.stdout, done.stderr):
        assert not any(key in text for key in keys)
        assert not any(re.search(rf"\b{re.escape(r)}\b", text) for r in responses)
    by_id = {fp.id: fp.response for fp in load_fingerprints(fp_file).fingerprints}
    hidden = [line for line in evidence_lines(out) if line["match"]]
    assert hidden and all("⟦response fp-" in line["answer"]
                          and not starts_with(line["answer"], by_id[line["fingerprint_id"]])
                          for line in hidden)
    shown = evidence_lines(tmp_path / "revealed")
    assert any(key in json.dumps(line, ensure_ascii=False) for line in shown for key in keys)
    assert any(key in (tmp_path / "revealed" / "report.md").read_text() for key in keys)


def test_raw_http_template_adapter_on_the_same_server(server, tiny_fp, tmp_path):
    model, fp_file = tiny_fp
    template = json.dumps({"model": "$MODEL", "messages": "$MESSAGES", "max_tokens": "$MAX_TOKENS",
                           "temperature": "$TEMPERATURE"})
    result = run_audit(config(server.base_url + "/chat/completions", model, fp_file,
                              tmp_path / "http", adapter="http", request_template=template,
                              sampled_layers="")).model_dump(mode="json")
    assert result["verdict"] == "match"
    assert "raw" not in result["layers"] and result["probes_skipped"] == 8
    assert any("completions" in note for note in result["notes"])


def test_bad_credentials_stop_the_audit_at_once(server, tiny_fp, tmp_path):
    model, fp_file = tiny_fp
    with Proxy(server.base_url.removesuffix("/v1"), faults={0: "401"}) as proxy:
        bad = subprocess.run(audit_command("--base-url", proxy.base_url, "--model", model,
                                           "--fingerprints", fp_file, "--out", tmp_path / "denied",
                                           "--concurrency", "1", "--reuse-keys"),
                             check=False, capture_output=True, text=True, timeout=300)
    errors = [line for line in bad.stderr.splitlines() if line.startswith("oml audit: error:")]
    assert bad.returncode == 2 and len(errors) == 1 and bad.stderr.strip().endswith(errors[0])
    assert "401" in errors[0] and "--api-key-env" in errors[0]
    assert len(proxy.seen) == 1
    (line,) = evidence_lines(tmp_path / "denied")
    assert line["status"] == "error" and line["error"]["status"] == 401


def test_key_budget_and_ledger_across_audits(server, tiny_fp, tmp_path):
    model, fp_file = tiny_fp
    small = {"layers": "user", "sampled_layers": "", "max_keys": 5, "reuse_keys": False}
    with Proxy(server.base_url.removesuffix("/v1")) as proxy:  # a fresh endpoint, a fresh ledger
        first = run_audit(config(proxy.base_url, model, fp_file, tmp_path / "one", **small)).model_dump(mode="json")
        second = run_audit(config(proxy.base_url, model, fp_file, tmp_path / "two", **small)).model_dump(mode="json")
        with pytest.raises(OMLInputError, match="already spent"):
            run_audit(config(proxy.base_url, model, fp_file, tmp_path / "three", **small))
        again = run_audit(config(proxy.base_url, model, fp_file, tmp_path / "one", **small)).model_dump(mode="json")
    assert first["keys_probed"] == 5 and second["keys_probed"] == 3
    assert not set(first["fingerprint_ids"]) & set(second["fingerprint_ids"])
    assert again["calls_this_run"] == 0 and again["verdict"] == first["verdict"]  # a resume
    assert len(proxy.seen) == 8


def test_ctrl_c_and_the_run_timeout_leave_a_resumable_folder(server, tiny_fp, tmp_path):
    model, fp_file = tiny_fp
    out = tmp_path / "interrupted"
    args = ["--base-url", None, "--model", model, "--fingerprints", fp_file, "--out", out,
            "--layers", "user,system", "--num-system-prompts", "2", "--sampled-layers", "",
            "--max-tokens", "6", "--samples", "2", "--dialect", "transformers", "--reuse-keys",
            "--concurrency", "1", "--exhaustive", "--json"]
    with Proxy(server.base_url.removesuffix("/v1"), hold_after=5) as proxy:
        args[1] = proxy.base_url
        # a shell running the suite in the background (`make test &`, CI runners) starts it
        # with SIGINT ignored, which children inherit; Ctrl-C comes from a terminal with the
        # default disposition, so give the audit that (a Python-level handler here becomes
        # the default in the exec'd child; an ignored signal would stay ignored)
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            proc = subprocess.Popen(audit_command(*args), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
        finally:
            signal.signal(signal.SIGINT, previous)
        try:
            deadline = time.monotonic() + 120
            while len(proxy.seen) < 6:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
        assert proc.returncode == 130 and "rerun the same command to resume" in stderr
        assert json.loads((out / "status.json").read_text())["state"] == "interrupted"
        assert len(evidence_lines(out)) == 5
        # the whole-run timeout: stops with what it has, reports, and says so
        proxy.hold_after = 8
        cfg = config(proxy.base_url, model, fp_file, out, layers="user,system", sampled_layers="",
                     concurrency=1, run_timeout=3.0)
        partial = run_audit(cfg).model_dump(mode="json")
        assert partial["state"] == "incomplete" and partial["pending"] > 0
        assert partial["calls_this_run"] == 2 and "rerun" in partial["verdict_words"]
        proxy.release_held()
        final = run_audit(config(proxy.base_url, model, fp_file, out, layers="user,system",
                                 sampled_layers="", concurrency=1)).model_dump(mode="json")
    assert final["state"] == "complete" and final["verdict"] == "match"
    assert final["calls_this_run"] == final["probes_planned"] - 7
    lines = evidence_lines(out)
    assert len(lines) == len({line["probe"] for line in lines}) == final["probes_planned"]


def test_an_endpoint_without_completions_loses_only_the_raw_layer(server, tiny_fp, tmp_path):
    model, fp_file = tiny_fp
    settings = {"layers": "raw,user", "sampled_layers": "", "concurrency": 1}
    with Proxy(server.base_url.removesuffix("/v1"), not_found=("/v1/completions",)) as proxy:
        first = run_audit(config(proxy.base_url, model, fp_file, tmp_path / "chat", **settings)).model_dump(mode="json")
        again = run_audit(config(proxy.base_url, model, fp_file, tmp_path / "chat", **settings)).model_dump(mode="json")
    assert first["verdict"] == "match" and first["state"] == "complete"
    assert first["layers"]["raw"]["errors"] == 1 and first["probes_skipped"] == 8
    assert any("completions endpoint" in note for note in first["notes"])
    assert sum(1 for s in proxy.seen if s.fault == "404") == 1  # one key spent on the dead route
    assert again["calls_this_run"] == 0 and again["state"] == "complete"


@pytest.mark.parametrize("adapter,stream", [("openai", True), ("responses", False),
                                            ("responses", True)])
def test_streaming_and_the_responses_api_give_the_same_verdicts(server, tiny_fp, tiny_model_dir,
                                                                tmp_path, adapter, stream):
    """The default (sequential) audit through `transformers serve`'s streamed chat completions
    and its /v1/responses endpoint, whole and streamed: the fingerprinted model `match`, the
    base `no_match`; a streamed answer records its time to the first token, and reading stops
    once the answer's opening decides the probe."""
    model, fp_file = tiny_fp
    settings = {"adapter": adapter, "stream": stream, "exhaustive": False, "max_tokens": 16,
                "layers": "user,system,multiturn,agent"}
    hit = run_audit(config(server.base_url, model, fp_file, tmp_path / "fp", **settings)).model_dump(mode="json")
    assert hit["verdict"] == "match" and hit["p_value"] <= 1e-6
    lines = [line for line in evidence_lines(tmp_path / "fp") if line["status"] == "ok"]
    assert lines and {line["route"] for line in lines} == {"chat" if adapter == "openai" else "responses"}
    assert all((line["stream"] is not None) == stream for line in lines)
    if stream:
        assert all(line["stream"]["first_token_s"] > 0 for line in lines if line["answer"])
        assert any(line["stream"]["stopped_early"] for line in lines)
    assert sum(line["match"] for line in lines) >= 3
    miss = run_audit(config(server.base_url, tiny_model_dir, fp_file, tmp_path / "base", **settings)).model_dump(mode="json")
    assert miss["verdict"] == "no_match"
