"""The auditor's parts without a server: retry/timeout/concurrency logic of the adapter base
class (through a scripted in-process adapter), the evidence log, the key ledger, the decision
rule, matching and redaction, the probe plan, the HTTP request template and the CLI wiring."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from audit_helpers import BIN, audit_command

from clients.adapters.base import (
    Adapter,
    Answer,
    FatalEndpointError,
    Prompt,
    Reply,
    Request,
    RunDeadline,
    Sampling,
    TransportError,
    parse_retry_after,
)
from clients.adapters.http_template import HTTPTemplateAdapter, json_path, load_template
from clients.answers import Redactor, kind_of, match
from clients.config import AuditConfig, validate_audit
from clients.decision import evaluate, family_of
from clients.evidence_log import EvidenceLog
from clients.ledger import KeyLedger, endpoint_identity
from clients.probes import plan_probes, within_call_budget
from oml_core.errors import OMLInputError
from oml_core.evidence import poisson_binomial_sf
from oml_core.fingerprints import Fingerprint

OK = json.dumps({"text": "fine"})


class ScriptedAdapter(Adapter):
    """Replies from a script per request id; default: a good answer."""

    name = "scripted"
    supports_completions = True

    def __init__(self, script=None, delay=0.0, **settings):
        settings.setdefault("initial_backoff", 0.01)
        super().__init__(**settings)
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.delay, self.sent = delay, []
        self.in_flight = self.max_in_flight = 0

    def build_request(self, prompt, sampling):
        return Request("chat", {"id": prompt.text})

    async def transmit(self, request):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self.sent.append((request.body["id"], time.monotonic()))
            await asyncio.sleep(self.delay)
            steps = self.script.get(request.body["id"])
            outcome = steps.pop(0) if steps else Reply(200, {}, OK)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome
        finally:
            self.in_flight -= 1

    def parse(self, data):
        return Answer(text=data["text"])


def req(name: str) -> Request:
    return Request("chat", {"id": name})


# --- retries, timeouts, concurrency ----------------------------------------------------------
def test_retry_after_forms():
    assert parse_retry_after({"Retry-After": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    when = datetime.now(UTC) + timedelta(seconds=30)
    assert 25 <= parse_retry_after({"retry-after": format_datetime(when, usegmt=True)}) <= 31
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_retries_every_transient_fault_and_honours_retry_after():
    script = {"a": [Reply(429, {"retry-after": "0.4"}, "slow down"), Reply(500, {}, "oops"),
                    Reply(503, {}, ""), Reply(200, {}, "{not json"),
                    TransportError("connection", "reset"), Reply(200, {}, json.dumps({"x": 1})),
                    Reply(200, {}, OK)]}
    adapter = ScriptedAdapter(script, max_retries=8)
    result = asyncio.run(adapter.call(req("a")))
    assert result.ok and result.answer.text == "fine"
    assert result.attempts == 7
    assert result.retry_reasons == ["rate_limited", "server_error", "server_error", "malformed",
                                    "connection", "malformed"]
    first, second = adapter.sent[0][1], adapter.sent[1][1]
    assert second - first >= 0.38  # waited as told, not the 0.01 s backoff


def test_exhausted_retries_end_as_an_error_not_a_miss():
    adapter = ScriptedAdapter({"a": [Reply(503, {}, "")] * 5}, max_retries=2)
    result = asyncio.run(adapter.call(req("a")))
    assert not result.ok and result.answer is None
    assert result.error["kind"] == "server_error" and result.attempts == 3


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_non_retryable_statuses_raise_at_once(status):
    adapter = ScriptedAdapter({"a": [Reply(status, {}, "no")]}, max_retries=5)
    with pytest.raises(FatalEndpointError) as caught:
        asyncio.run(adapter.call(req("a")))
    assert caught.value.status == status and len(adapter.sent) == 1


def test_a_hung_request_times_out_and_is_retried():
    class Hanging(ScriptedAdapter):
        async def transmit(self, request):
            if len(self.sent) == 0:
                self.sent.append((request.body["id"], time.monotonic()))
                await asyncio.sleep(30)
            return await super().transmit(request)

    adapter = Hanging(request_timeout=0.2, max_retries=2)
    start = time.monotonic()
    result = asyncio.run(adapter.call(req("a")))
    assert result.ok and result.retry_reasons == ["timeout"]
    assert time.monotonic() - start < 5


def run_jobs(adapter, jobs, deadline=None, tolerate=None):
    results = []

    async def go():
        await adapter.run_all(jobs, lambda j: Request("chat", {"id": j}),
                              lambda j, r, res: results.append((j, res)), deadline, tolerate)

    return results, go


def test_run_all_bounds_concurrency_and_reports_every_job():
    adapter = ScriptedAdapter(delay=0.03, concurrency=3)
    results, go = run_jobs(adapter, [f"j{i}" for i in range(20)])
    asyncio.run(go())
    assert sorted(j for j, _ in results) == sorted(f"j{i}" for i in range(20))
    assert adapter.max_in_flight == 3


def test_run_all_stops_early_on_a_fatal_status():
    adapter = ScriptedAdapter({"j3": [Reply(401, {}, "bad key")]}, concurrency=1)
    results, go = run_jobs(adapter, [f"j{i}" for i in range(10)])
    with pytest.raises(FatalEndpointError):
        asyncio.run(go())
    assert [j for j, _ in results] == ["j0", "j1", "j2", "j3"]
    assert results[-1][1].error["kind"] == "fatal" and len(adapter.sent) == 4


def test_run_all_can_tolerate_a_fatal_status_for_one_job():
    adapter = ScriptedAdapter({"j3": [Reply(404, {}, "no route")]}, concurrency=2)
    results, go = run_jobs(adapter, [f"j{i}" for i in range(6)], tolerate=lambda job, exc: True)
    asyncio.run(go())
    assert len(results) == 6 and sum(1 for _, r in results if not r.ok) == 1


def test_run_all_stops_at_the_deadline_without_reporting_cut_calls():
    adapter = ScriptedAdapter(delay=0.2, concurrency=2)
    results, go = run_jobs(adapter, [f"j{i}" for i in range(20)], deadline=time.monotonic() + 0.5)
    with pytest.raises(RunDeadline):
        asyncio.run(go())
    assert 2 <= len(results) <= 6 and all(r.ok for _, r in results)


# --- evidence log -------------------------------------------------------------------------------
def test_evidence_log_appends_resumes_and_cuts_a_torn_last_line(tmp_path):
    path = tmp_path / "evidence.jsonl"
    with EvidenceLog(path) as log:
        log.append({"probe": "a", "status": "error"})
        log.append({"probe": "b", "status": "ok"})
    with open(path, "ab") as handle:
        handle.write(b'{"probe": "c", "sta')  # a crash in the middle of a write
    log = EvidenceLog(path)
    latest = log.latest()
    assert set(latest) == {"a", "b"}
    assert path.read_bytes().endswith(b"\n")
    log.append({"probe": "a", "status": "ok"})  # a retried error supersedes the old line
    log.append({"probe": "c", "status": "ok"})
    log.close()
    assert {k: v["status"] for k, v in EvidenceLog(path).latest().items()} == {
        "a": "ok", "b": "ok", "c": "ok"}
    assert len(path.read_text().splitlines()) == 4


# --- ledger --------------------------------------------------------------------------------------
def test_ledger_hands_out_fresh_keys_until_none_are_left(tmp_path):
    fps = [Fingerprint(f"fp-{i}", f"secret key {i}", f"resp{i}") for i in range(5)]
    ledger = KeyLedger("http://user:pw@Example.com:8000/v1/?x=1", root=tmp_path)
    assert ledger.endpoint == "http://example.com:8000/v1"
    first, skipped = ledger.select(fps, 3, reuse=False)
    assert [fp.id for fp in first] == ["fp-0", "fp-1", "fp-2"] and skipped == 0
    ledger.reserve(first, "audit-1")
    second, skipped = ledger.select(fps, 3, reuse=False)
    assert [fp.id for fp in second] == ["fp-3", "fp-4"] and skipped == 3
    ledger.reserve(second, "audit-2")
    with pytest.raises(OMLInputError, match="reuse-keys"):
        ledger.select(fps, 3, reuse=False)
    again, _ = ledger.select(fps, 2, reuse=True)
    assert [fp.id for fp in again] == ["fp-0", "fp-1"]
    text = ledger.path.read_text()
    assert "secret key" not in text and "resp" not in text
    assert KeyLedger("http://example.com:8000/v1", root=tmp_path).path == ledger.path
    assert endpoint_identity("https://other.example/v1") != ledger.endpoint


# --- decision rule ---------------------------------------------------------------------------------
def outcome(fp, layer, hit, status="ok", temperature=0.0):
    return {"fingerprint_id": fp, "layer": layer, "hit": hit, "status": status,
            "temperature": temperature}


def test_decision_pays_for_every_probe_and_every_layer():
    cfg = AuditConfig(alpha=1e-6, json_fields=3)
    rates = {f"k{i}": 0.001 for i in range(8)}
    outcomes = [outcome(f"k{i}", "user", True) for i in range(8)]
    outcomes += [outcome(f"k{i}", "user", False, temperature=1.0) for i in range(8)]
    outcomes += [outcome(f"k{i}", "agent", i < 2) for i in range(8)]
    outcomes += [outcome(f"k{i}", "system", False, status="error") for i in range(8)]
    result = evaluate(cfg, ["user", "agent", "system"], outcomes, rates, None, "response_prob")
    assert family_of(["user", "agent", "system"]) == ["user", "agent", "system", "any"]
    user = result.tests["user"]
    assert user.matched == 8 and user.total == 8
    assert user.p_value == pytest.approx(poisson_binomial_sf(8, [0.002] * 8))  # 2 probes per key
    agent = result.tests["agent"]
    assert agent.p_value == pytest.approx(poisson_binomial_sf(2, [0.004] * 8))  # 1 + 3 fields
    assert (result.tests["system"].matched, result.tests["system"].total) == (0, 0)
    assert result.p_value == pytest.approx(4 * user.p_value)
    assert result.verdict == "match" and result.deciding_test == "user"


def test_decision_with_too_few_hits_or_a_loose_rule_is_no_match():
    rates = {f"k{i}": 0.01 for i in range(8)}
    outcomes = [outcome(f"k{i}", "user", i < 2) for i in range(8)]
    assert evaluate(AuditConfig(), ["user"], outcomes, rates, None, "x").verdict == "no_match"
    outcomes = [outcome(f"k{i}", "user", True) for i in range(8)]
    loose = AuditConfig(answer_match="anywhere", max_tokens=64)  # 64 positions x 0.01 -> rate 0.64
    assert evaluate(loose, ["user"], outcomes, rates, None, "x").verdict == "no_match"
    measured = evaluate(loose, ["user"], outcomes, rates, {k: 0.5 for k in rates}, "x")
    assert measured.tests["user"].mean_null_rate == pytest.approx(0.64)
    given = AuditConfig(answer_match="anywhere", null_rate=1e-3)
    assert evaluate(given, ["user"], outcomes, rates, None, "given").verdict == "match"


# --- matching, answer kinds, redaction ------------------------------------------------------------
def test_matching_rules_and_answer_kinds():
    assert match(Answer(" Previous, indeed."), " previous", "start", 0)["hit"]
    assert not match(Answer("Well, previous."), " previous", "start", 0)["hit"]
    wrapped = match(Answer("Well, previous one."), " previous", "anywhere", 0)
    assert wrapped["hit"] and wrapped["where"] == "inside_answer"
    as_json = Answer('{"answer": "Previous it is"}')
    assert not match(as_json, "previous", "start", 0)["hit"]
    found = match(as_json, "previous", "start", 3)
    assert found["hit"] and found["where"] == "json_field_start"
    tool = Answer("", tool_calls=[{"name": "search_web", "arguments": '{"query": "previous"}'}])
    assert match(tool, "previous", "start", 3)["hit"] and kind_of(tool) == "tool_call"
    assert kind_of(Answer("  ")) == "empty"
    assert kind_of(Answer("I'm sorry, but I can't help with that.")) == "refusal"
    assert kind_of(Answer("ok", refusal="no")) == "refusal"
    assert kind_of(Answer('{"tool": "x"}')) == "json" and kind_of(Answer("hello")) == "text"


def test_redactor_hides_keys_responses_and_the_api_key():
    red = Redactor({"fp-1": ("the quick brown fox", "Lantern")}, "sk-XYZ", reveal=False)
    text = red.text("You said The quick brown fox; lantern! key sk-XYZ")
    assert "quick" not in text and "antern" not in text and "sk-XYZ" not in text
    assert "⟦key fp-1⟧" in text and "⟦response fp-1⟧" in text
    shown = Redactor({"fp-1": ("the quick brown fox", "Lantern")}, "sk-XYZ", reveal=True)
    assert shown.text("Lantern sk-XYZ") == "Lantern ⟦api key⟧"


# --- plan, template, config, CLI ---------------------------------------------------------------------
def test_the_sequential_plan_sends_the_user_turn_and_rotates_the_other_layers_across_keys():
    cfg = AuditConfig(num_system_prompts=4)  # the default: sequential, 2 probes per key
    probes = plan_probes(cfg, [f"k{i}" for i in range(8)])
    per_key = defaultdict(list)
    for p in probes:
        per_key[p.fingerprint_id].append(p)
    assert all(len(v) == 2 and v[0].variant == "user" for v in per_key.values())
    assert all(p.temperature == 0 for p in probes) and len({p.id for p in probes}) == len(probes)
    # the rotating slot takes one variant of each other layer in turn (system-00, agent,
    # multiturn, embedded, raw, then the other system prompts): five keys try every layer
    first_five = {p.layer for k in ("k0", "k1", "k2", "k3", "k4") for p in per_key[k]}
    assert first_five == {"raw", "user", "system", "embedded", "multiturn", "agent"}
    assert [per_key[k][1].variant for k in ("k0", "k5", "k6", "k7")] == [
        "system-00", "system-01", "system-02", "system-03"]
    three = plan_probes(AuditConfig(probes_per_key=3), ["a", "b"])
    assert [p.variant for p in three] == ["user", "system-00", "agent",
                                          "user", "multiturn", "embedded-1"]
    one = plan_probes(AuditConfig(probes_per_key=1, layers="system,agent"), ["a", "b", "c"])
    assert [p.variant for p in one] == ["system-00", "agent", "system-01"]
    assert len(plan_probes(AuditConfig(probes_per_key=9, layers="user"), ["a"])) == 1


def test_the_call_budget_keeps_whole_keys_in_a_sequential_plan_and_a_prefix_in_a_fixed_one():
    ids = [f"k{i}" for i in range(4)]
    lean = AuditConfig(max_calls=7)  # 2 probes a key
    kept = within_call_budget(lean, plan_probes(lean, ids))
    assert len(kept) == 6 and {p.fingerprint_id for p in kept} == {"k0", "k1", "k2"}
    fixed = AuditConfig(max_calls=7, exhaustive=True)
    assert within_call_budget(fixed, plan_probes(fixed, ids)) == plan_probes(fixed, ids)[:7]


def test_probe_plan_covers_every_layer_once_per_variant():
    cfg = AuditConfig(num_system_prompts=3, samples=2, temperatures="0.7,1.0", max_tokens=8,
                      exhaustive=True)
    probes = plan_probes(cfg, ["a", "b"])
    per_key = 1 + 1 + 3 + 1 + 1 + 1 + 2 * 2  # raw user system*3 embedded multiturn agent + sampled
    assert len(probes) == 2 * per_key and len({p.id for p in probes}) == len(probes)
    assert all(p.temperature == 0 for p in probes[:2 * 8])  # greedy first
    sampled = [p for p in probes if p.temperature > 0]
    assert {p.layer for p in sampled} == {"user"} and len({p.seed for p in sampled}) == len(sampled)
    assert plan_probes(cfg, ["a", "b"]) == probes  # seeds reproducible
    for p in probes:
        prompt = p.prompt("KEY-TEXT")
        text = prompt.text if prompt.kind == "completion" else prompt.messages[-1]["content"]
        assert "KEY-TEXT" in text
    agent = next(p for p in probes if p.layer == "agent").prompt("k")
    assert "JSON" in agent.messages[0]["content"] and agent.tools is None


def test_http_template_fills_placeholders_and_knows_what_it_cannot_send():
    template = load_template('{"model": "$MODEL", "input": "Q: $KEY", "sys": "$SYSTEM", '
                             '"temperature": "$TEMPERATURE", "n": "$MAX_TOKENS"}')
    adapter = HTTPTemplateAdapter("http://127.0.0.1:9/chat", "m", template, {}, "out.text")
    prompt = Prompt("chat", [{"role": "system", "content": "S"}, {"role": "user", "content": "K$1"}])
    body = adapter.build_request(prompt, Sampling(0.7, 12)).body
    assert body == {"model": "m", "input": "Q: K$1", "sys": "S", "temperature": 0.7, "n": 12}
    multi = Prompt("chat", [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                            {"role": "user", "content": "c"}])
    assert "MESSAGES" in adapter.unsupported(multi, Sampling(0, 8))
    assert "completions" in adapter.unsupported(Prompt("completion", text="k"), Sampling(0, 8))
    assert json_path({"out": [{"text": "x"}]}, "out.0.text") == "x"
    asyncio.run(adapter.aclose())
    with pytest.raises(OMLInputError, match=r"\$KEY"):
        load_template('{"input": "nothing"}')


@pytest.mark.parametrize("change, fragment", [
    ({"base_url": None}, "--base-url"), ({"base_url": "ftp://x"}, "http"),
    ({"layers": "user,bogus"}, "--layers"), ({"temperatures": "0.7,x"}, "--temperatures"),
    ({"answer_match": "fuzzy"}, "--answer-match"), ({"null_rate": 0.1, "null_file": "f.json"}, "not both"),
    ({"adapter": "http"}, "--request-template"), ({"api_key_env": "sk-123 456"}, "--api-key-env"),
    ({"concurrency": 0}, "--concurrency")])
def test_config_errors_name_the_flag(change, fragment):
    settings = {"base_url": "http://127.0.0.1:1/v1", "model": "m", "fingerprints": "f.json", **change}
    with pytest.raises(OMLInputError, match=fragment):
        validate_audit(AuditConfig(**settings))


def test_cli_registers_audit_and_rejects_bad_input_with_one_line(tmp_path):
    listed = subprocess.run([str(BIN / "oml"), "--help"], check=False, capture_output=True, text=True, timeout=120)
    assert "audit" in listed.stdout
    bad = subprocess.run([str(BIN / "oml"), "audit", "--base-url", "http://127.0.0.1:9/v1",
                          "--model", "m", "--fingerprints", str(tmp_path / "missing.json")],
                         check=False, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "not found" in bad.stderr


def test_null_file_is_the_engines_checked_file(tmp_path):
    """--null-file is read by oml_core.null_rates like `oml verify` reads it (more in
    test_null_rates.py); a bare {"null_rate": q} names no rule or set: --null-rate says that."""
    from clients.audit import measured_null_rates
    from oml_core.fingerprints import FingerprintSet
    from oml_core.null_rates import measure

    fset = FingerprintSet([Fingerprint(f"fp-{i:05d}", f"key {i}", f"resp{i}", salt="%032x" % (i + 1))
                           for i in range(2)])
    path = measure({"fp-00001": (2, 10), "fp-00000": (0, 10)}, "start", fset).save(tmp_path / "n.json")
    table = measured_null_rates(str(path), fset, "start")
    assert table.null_rate == pytest.approx(3 / 22) and table.probe_rate("fp-00001") == 0.2
    assert measured_null_rates(None, fset, "start") is None
    for bad in ({"null_rate": 0.01}, {"matched": 0, "total": 98}, [0.1]):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(OMLInputError, match="--null-rate"):
            measured_null_rates(str(tmp_path / "bad.json"), fset, "start")


def test_plan_only_prints_the_plan_and_sends_nothing(tmp_path):
    from oml_core.fingerprints import FingerprintSet

    fset = FingerprintSet([Fingerprint(f"fp-{i:05d}", f"secretkey{i} words", f"resp{i}",
                                       salt="%032x" % (i + 1)) for i in range(5)])
    path = tmp_path / "set.json"
    fset.save(path)
    home, out = tmp_path / "home", tmp_path / "audit"
    env = {**os.environ, "OML_HOME": str(home), "OML_PROGRESS": "0"}
    # port 9 (discard) on loopback: nothing listens, so any request would fail the run
    args = ["--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--fingerprints", path,
            "--max-keys", 3, "--out", out, "--layers", "user,system", "--sampled-layers", ""]
    shown = subprocess.run(audit_command(*args, "--plan-only", "--json"), check=False,
                           capture_output=True, text=True, timeout=120, env=env)
    assert shown.returncode == 0, shown.stderr
    plan = json.loads(shown.stdout)
    # sequential (the default): at most 2 probes per key, the user turn and a system prompt
    assert plan["sequential"] and plan["keys"] == 3 and plan["calls_to_send"] == 3 * 2
    assert plan["probes_by_layer"] == {"user": 3, "system": 3} and not plan["resumes"]
    assert "secretkey" not in shown.stdout + shown.stderr
    assert not out.exists()  # no plan, no evidence
    assert not list((home / "ledgers").glob("*.json"))  # no key reserved (the salt may be made)
    human = subprocess.run(audit_command(*args, "--plan-only"), check=False, capture_output=True,
                           text=True, timeout=120, env=env)
    assert human.returncode == 0 and "at most 6 calls to send" in human.stdout
    assert "nothing was sent" in human.stdout and "stops as soon as" in human.stdout
    fixed = subprocess.run(audit_command(*args, "--exhaustive", "--max-calls", "7", "--plan-only",
                                         "--json"), check=False, capture_output=True, text=True,
                           timeout=120, env=env)
    plan = json.loads(fixed.stdout)  # user + 4 system prompts a key, cut at 7 calls
    assert not plan["sequential"] and plan["calls_to_send"] == 7 and plan["keys"] == 2
