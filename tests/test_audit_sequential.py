"""The sequential audit (the default) against loopback endpoints: a stolen model is convicted after the
first round of keys and the rest are never sent (nor spent); an innocent one ends `no_match`;
a rerun replays the evidence without sending anything."""

from __future__ import annotations

import json
import re

import pytest
from audit_helpers import Canned, HostileServer, chat_reply

from clients.audit import run_audit
from clients.config import AuditConfig
from clients.ledger import KeyLedger
from oml_core.fingerprints import Fingerprint, FingerprintSet

KEY_ENV = "OML_SEQUENTIAL_TEST_KEY"


@pytest.fixture(autouse=True)
def api_key(monkeypatch, tmp_path):
    monkeypatch.setenv(KEY_ENV, "sk-test-sequential-0000")
    monkeypatch.setenv("OML_HOME", str(tmp_path / "home"))


def make_set(folder, n=16):
    fps = [Fingerprint(f"fp-{i:05d}", f"Amber quarry number {i} hums", f" Zorvex{i}q",
                       response_prob=1e-3) for i in range(n)]
    path = folder / "fp.json"
    FingerprintSet(fps).save(path)
    return path, fps


def stolen(seen):
    """Answers every key with its fingerprint response, as a fingerprinted model does."""
    found = re.search(r"number (\d+) hums", json.dumps(seen.body))
    return Canned.json(chat_reply(f" Zorvex{found.group(1)}q and more" if found else "hello"))


def config(server, fp_file, out, **settings):
    return AuditConfig(**{"base_url": server.base_url, "model": "suspect",
                          "fingerprints": str(fp_file), "out": str(out), "layers": "user",
                          "sampled_layers": "", "concurrency": 4, "request_timeout": 5.0,
                          "max_retries": 1, "max_backoff": 0.0, "api_key_env": KEY_ENV,
                          **settings})


def test_a_stolen_model_is_convicted_in_one_round_of_the_keys_needed_and_the_rest_never_sent(tmp_path):
    fp_file, fps = make_set(tmp_path)
    with HostileServer(stolen) as server:
        summary = run_audit(config(server, fp_file, tmp_path / "out")).model_dump(mode="json")
        sent = len(server.seen)
        rerun = run_audit(config(server, fp_file, tmp_path / "out")).model_dump(mode="json")
        assert len(server.seen) == sent  # a rerun replays the evidence and sends nothing
        spent = KeyLedger(server.base_url).spent()
    # q = 1e-3 per key: a hit multiplies the e-value by 500, so 3 hits pass 1e6; the first
    # round holds those 3 keys (concurrency 4 would allow 4, but a 4th is not needed)
    assert summary["verdict"] == "match" and summary["p_value"] <= 1e-6
    assert sent == 3 and summary["keys_probed"] == 3 and summary["keys_not_sent"] == 13
    assert summary["state"] == "complete" and summary["pending"] == 0
    curve = summary["decision"]["sequential"]["curve"]
    assert [row["hit"] for row in curve] == [True] * 3
    assert curve[-1]["p_value"] == summary["p_value"]
    assert len(spent) == 3  # only the keys that were sent are spent
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert "Sequential" in plan["rule"] and plan["sequential"]["alternative_hit_rate"] == 0.5
    assert rerun["verdict"] == "match" and rerun["p_value"] == summary["p_value"]


def test_an_innocent_endpoint_ends_no_match_without_a_false_conviction(tmp_path):
    fp_file, _ = make_set(tmp_path)
    with HostileServer(lambda seen: Canned.json(chat_reply("Zorvex is not a word I know"))) as server:
        summary = run_audit(config(server, fp_file, tmp_path / "out")).model_dump(mode="json")
    # "Zorvex is..." does not open with " Zorvex0q": no key hits, the e-value only falls
    assert summary["verdict"] == "no_match" and summary["p_value"] == 1.0
    assert summary["decision"]["sequential"]["hits"] == 0


def test_an_endpoint_failing_every_probe_is_inconclusive_after_one_round_and_keeps_the_rest(
        tmp_path):
    fp_file, _ = make_set(tmp_path)
    with HostileServer(lambda seen: Canned.json({"error": "down"}, status=500)) as server:
        summary = run_audit(config(server, fp_file, tmp_path / "out")).model_dump(mode="json")
        spent = KeyLedger(server.base_url).spent()
    # one round of 3 keys (2 tries each) failed: the other 13 keys are neither shown nor spent
    assert summary["verdict"] == "inconclusive" and summary["keys_probed"] == 3
    assert len(server.seen) == 3 * 2 and len(spent) == 3
    assert any("no key got a valid answer" in note for note in summary["notes"])


def test_the_call_budget_stops_the_audit_and_limits_what_it_can_conclude(tmp_path):
    fp_file, _ = make_set(tmp_path)
    innocent = HostileServer(lambda seen: Canned.json(chat_reply("no idea")))
    with innocent as server:
        summary = run_audit(config(server, fp_file, tmp_path / "out", max_calls=6)).model_dump(mode="json")
    # rounds of the 3 keys a run of hits would need: after 3 misses (e = 0.5^3) the 3 keys the
    # budget leaves could still get there (x 500^3), after 6 none are left
    assert len(server.seen) == 6 and summary["keys_probed"] == 6
    assert summary["verdict"] == "no_match" and summary["keys_not_sent"] == 10
    with HostileServer(stolen) as server:
        few = run_audit(config(server, fp_file, tmp_path / "few", max_calls=2)).model_dump(mode="json")
    # two hits (e = 500^2 = 2.5e5) could never reach 1e6: nothing is sent, nothing spent
    assert not server.seen and few["verdict"] == "inconclusive" and few["keys_probed"] == 0
    assert any("nothing sent" in note for note in few["notes"])
    with HostileServer(stolen) as server:
        run_audit(config(server, fp_file, tmp_path / "three", max_calls=4))
    assert len(server.seen) == 3  # the round of 3 fits the budget and decides


def test_the_report_shows_the_evidence_curve_without_keys(tmp_path):
    fp_file, fps = make_set(tmp_path, 8)
    with HostileServer(stolen) as server:
        run_audit(config(server, fp_file, tmp_path / "out"))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Sequential audit: 3 keys sent, 5 never sent" in report
    assert "anytime-valid" in report and "5 key(s) were never sent" in report
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count("<circle") == 3 and "alpha 1e-06" in page  # one point per key sent
    assert not any(fp.key in page or fp.response.strip() in page for fp in fps)
    assert report.count("| yes |") == 3
    assert not any(fp.key in report or fp.response.strip() in report for fp in fps)


def test_every_layer_is_tried_in_the_first_keys_sent_whatever_its_null_rate(tmp_path):
    """The agent layer's probe has the highest null rate (the answer and 3 JSON fields); if
    keys were ordered by their whole plan's rate, those carrying it would go last and an
    innocent audit would stop before any was sent."""
    fp_file, _ = make_set(tmp_path)
    with HostileServer(lambda seen: Canned.json(chat_reply("no idea"))) as server:
        summary = run_audit(config(server, fp_file, tmp_path / "out",
                                   layers="raw,user,system,embedded,multiturn,agent")).model_dump(mode="json")
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    first_five = set(plan["fingerprint_ids"][:5])
    sent = [json.loads(line) for line in (tmp_path / "out" / "evidence.jsonl").open()]
    layers = {line["layer"] for line in sent if line["fingerprint_id"] in first_five}
    assert layers == {"raw", "user", "system", "embedded", "multiturn", "agent"}
    assert summary["verdict"] == "no_match" and summary["keys_probed"] >= 5
