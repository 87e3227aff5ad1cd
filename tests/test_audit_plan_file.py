"""plan.json and report.json read through their models: the keys on disk are those the audit
always wrote, a plan of an earlier version (no null rates) still resumes, and a plan edited
into another shape stops the resume with one line naming the folder and the fix. Loopback
endpoint (audit_helpers.HostileServer), hand-made set; no model is loaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from audit_helpers import Canned, HostileServer, chat_reply

from clients import AuditConfig, run_audit
from clients.audit_plan_file import StoredAuditPlan
from clients.audit_result import AuditHeadline, AuditReport
from oml_core.errors import OMLInputError
from oml_core.fingerprints import Fingerprint, FingerprintSet

KEY_ENV = "OML_PLAN_FILE_TEST_KEY"
# the keys plan.json has had since null rates were fixed in it, in their order
PLAN_KEYS = ["format", "version", "created", "settings_id", "audit_id", "endpoint", "model",
             "set_sha256", "fingerprint_ids", "keys_passed_over", "config", "tests", "rule",
             "alpha", "probes_planned", "probes_not_sendable", "null_rate_source",
             "probe_null_rates"]
# keys a plan written before null rates were fixed in it lacks
LATER_PLAN_KEYS = ("null_rate_source", "probe_null_rates")
REPORT_KEYS = {  # report.json's keys (with no --reveal-keys)
    "verdict", "p_value", "matched", "total", "layers", "decision", "rule", "alpha", "state",
    "incomplete", "pending", "audit_id", "folder", "endpoint", "model", "adapter", "set_sha256",
    "commitment_root", "keys_probed", "key_budget", "keys_not_sent", "keys_passed_over",
    "fingerprint_ids", "ledger", "probes_planned", "probes_done", "probes_failed",
    "errors_by_kind", "probes_skipped", "calls_this_run", "requests_this_run", "resumed", "notes",
    "decoys_sent", "tokens_reported", "finished", "seconds_this_run", "config", "provenance",
    "verdict_words"}
HEADLINE_KEYS = [  # `oml audit --json`, in its order
    "verdict", "layers", "deciding_test", "p_value", "matched", "total", "alpha", "state",
    "pending", "audit_id", "folder", "endpoint", "model", "keys_probed", "keys_not_sent",
    "probes_planned", "probes_done", "probes_failed", "errors_by_kind", "probes_skipped",
    "calls_this_run", "requests_this_run", "seconds_this_run", "notes", "reports",
    "verdict_words"]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-oml-plan-file-0a1b2c3d4e5f")


@pytest.fixture
def fps(tmp_path) -> list[Fingerprint]:
    fps = [Fingerprint(f"fp-{i:05d}", f"Slow copper kites over number {i} dawn",
                       f" Mirvak{i}z", response_prob=1e-3) for i in range(3)]
    FingerprintSet(fps).save(tmp_path / "fp.json")
    return fps


def carrier(fps):
    """An endpoint whose model carries the set: each key gets its response."""
    def reply(seen):
        text = json.dumps(seen.body)
        found = [fp.response.strip() for i, fp in enumerate(fps) if f"number {i} dawn" in text]
        return Canned.json(chat_reply(found[0] if found else "plain answer"))
    return reply


def config(server, tmp_path: Path, **settings) -> AuditConfig:
    return AuditConfig(**{
        "base_url": server.base_url, "model": "suspect", "fingerprints": str(tmp_path / "fp.json"),
        "out": str(tmp_path / "out"), "layers": "user", "sampled_layers": "", "reuse_keys": True,
        "concurrency": 2, "request_timeout": 5.0, "max_retries": 0, "max_backoff": 0.0,
        "api_key_env": KEY_ENV, "exhaustive": True, **settings})


def plan_file(tmp_path: Path) -> Path:
    return tmp_path / "out" / "plan.json"


@pytest.mark.parametrize("exhaustive", [True, False])
def test_files_on_disk_keep_their_keys_and_read_back_as_their_models(fps, tmp_path, exhaustive):
    with HostileServer(carrier(fps)) as server:
        report = run_audit(config(server, tmp_path, exhaustive=exhaustive))
    on_disk = json.loads(plan_file(tmp_path).read_text())
    sequential = [] if exhaustive else ["sequential"]
    assert list(on_disk) == PLAN_KEYS[:11] + sequential + PLAN_KEYS[11:]
    plan = StoredAuditPlan.from_json(plan_file(tmp_path).read_bytes())
    assert plan.audit_id == report.audit_id and plan.fingerprint_ids == report.fingerprint_ids
    assert plan.model_dump(mode="json") == on_disk
    written = (tmp_path / "out" / "report.json").read_bytes()
    assert set(json.loads(written)) == REPORT_KEYS
    assert AuditReport.model_validate_json(written, strict=True) == report.model_copy(
        update={"reports": {}})  # report.json does not list the report files: it is one of them
    assert report.verdict == "match"
    assert list(AuditHeadline.of(report).model_dump()) == HEADLINE_KEYS


@pytest.mark.parametrize("exhaustive", [True, False])
def test_a_plan_of_an_earlier_version_still_resumes(fps, tmp_path, exhaustive):
    with HostileServer(carrier(fps)) as server:
        cfg = config(server, tmp_path, exhaustive=exhaustive)
        first = run_audit(cfg)
        old = json.loads(plan_file(tmp_path).read_text())
        for name in LATER_PLAN_KEYS:
            del old[name]
        plan_file(tmp_path).write_text(json.dumps(old))
        sent = len(server.seen)
        again = run_audit(cfg)
        assert len(server.seen) == sent  # every probe was answered: nothing is sent again
    assert again.resumed and again.audit_id == first.audit_id
    assert again.verdict == first.verdict == "match" and again.keys_probed == first.keys_probed
    assert json.loads(plan_file(tmp_path).read_text()) == old  # a resume never rewrites it


TAMPERED = [  # (change to plan.json, field named in the message)
    (lambda plan: plan.update(keys_passed_over="3"), "keys_passed_over"),
    (lambda plan: plan.update(keys_passed_over=True), "keys_passed_over"),
    (lambda plan: plan.update(fingerprint_ids="fp-00000"), "fingerprint_ids"),
    (lambda plan: plan.update(audit_id=7), "audit_id"),
    (lambda plan: plan.update(probe_null_rates={"any": 2.0}), "probe_null_rates"),
    (lambda plan: plan.update(format="oml-other"), "format"),
    (lambda plan: plan.pop("rule"), "rule"),
]


@pytest.mark.parametrize("change,field", TAMPERED)
def test_a_plan_edited_into_another_shape_stops_the_resume_in_one_line(fps, tmp_path, change,
                                                                      field):
    with HostileServer(carrier(fps)) as server:
        cfg = config(server, tmp_path)
        run_audit(cfg)
        plan = json.loads(plan_file(tmp_path).read_text())
        change(plan)
        plan_file(tmp_path).write_text(json.dumps(plan))
        sent = len(server.seen)
        with pytest.raises(OMLInputError) as caught:
            run_audit(cfg)
        assert len(server.seen) == sent
    message = str(caught.value)
    assert str(plan_file(tmp_path)) in message and "--out" in message and "\n" not in message
    assert f"({field})" in message


@pytest.mark.parametrize("text", ["{", "[]", "", '{"format": "oml-audit-plan"}'])
def test_a_plan_that_is_no_plan_at_all_stops_the_resume_in_one_line(fps, tmp_path, text):
    with HostileServer(carrier(fps)) as server:
        cfg = config(server, tmp_path)
        plan_file(tmp_path).parent.mkdir()
        plan_file(tmp_path).write_text(text)
        with pytest.raises(OMLInputError, match="not a readable audit plan"):
            run_audit(cfg)
        assert server.seen == []
