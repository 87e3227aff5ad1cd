"""The null-rate model `oml verify` and `oml audit` share (oml_core.null_rates), the `start`
rule's word boundary (oml_core.verify.matching), rate measurement in the probes' own contexts
(oml_core.calibrate, `oml calibrate`) and the one --null-file reader with its checks.

The false-match rate of whole audits under these rates is in test_null_rate_simulation.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from eval_helpers import one_torch_thread  # noqa: F401 - autouse fixture

from clients.adapters.base import Answer
from clients.answers import match
from clients.config import AuditConfig
from clients.decision import probe_rates
from clients.probes import plan_probes
from oml_core.cli import main
from oml_core.config import VerifyConfig
from oml_core.errors import OMLInputError
from oml_core.fingerprints import Fingerprint, FingerprintSet, load_fingerprints
from oml_core.null_rates import NULL_RATE_FLOOR, context_rate, measure, probe_null_rate
from oml_core.probe_contexts import all_contexts
from oml_core.verify.matching import (
    COUNTED,
    NOT_COUNTED,
    OPEN,
    is_match,
    start_state,
    starts_with_word,
)

SECRET_KEY = "SECRETKEY-nullrates-5tq"
SECRET_RESP = "SECRETRESP-nullrates-8wz"




# --- the start rule's word boundary --------------------------------------------------------------
@pytest.mark.parametrize("answer, response, counted", [
    ("Isaac Newton was born in 1643.", " is", False),   # the flaw this fixes
    ("is.", " is", True),
    ("Is it raining?", " is", True),
    ("  IS", " is", True),                                # case and spaces, as before
    ("**Is** it?", " is", True),                          # punctuation before it is ignored
    ("Tomorrow, maybe.", " to", False),
    ("To be honest", " to", True),
    ("Paris is nice", " Paris,", True),                   # a response ending in punctuation
    ("Parisian food", " Paris,", False),
    ("Escri.", " escri", True),                           # a partial-word response: its word
    ("Escribe", " escri", False),                         # must end where the response does
    ("new york city", "New York", True),
    ("newyork", "New York", False),
    ("", " is", False),
])
def test_start_rule_needs_a_word_boundary(answer, response, counted):
    assert starts_with_word(answer, response) is counted
    assert match(Answer(answer), response, "start", 0)["hit"] is counted
    assert is_match("start", [], answer, response, []) is counted


def test_word_boundary_in_json_fields_and_the_prefix_rule():
    assert not match(Answer('{"answer": "Isaac"}'), " is", "start", 3)["hit"]
    assert match(Answer('{"answer": "is it"}'), " is", "start", 3)["hit"]
    assert is_match("prefix", [], " Paris, indeed", "Paris", [])
    assert not is_match("prefix", [], " Parisian", "Paris", [])
    assert is_match("prefix", [], "Paris,x", "Paris,", [])  # the response's own word ended
    assert not is_match("prefix", [], "paris", "Paris", [])  # prefix stays case-sensitive


def test_start_state_never_contradicts_the_final_verdict():
    """COUNTED / NOT_COUNTED on a beginning holds for every continuation of it."""
    rng = random.Random(3)
    alphabet = ["i", "s", "I", "S", " ", ".", "*", "a", "\n", "é", "t", "o"]
    for response in (" is", " to", "Is.", "is it", " so"):
        for _ in range(3000):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
            state = start_state(text, response)
            finals = {starts_with_word(text + "".join(rng.choice(alphabet) for _ in range(k)),
                                       response) for k in range(0, 5) for _ in range(3)}
            if state == COUNTED:
                assert finals == {True}, (text, response)
            elif state == NOT_COUNTED:
                assert finals == {False}, (text, response)
            assert start_state(text, response, finished=True) == (
                COUNTED if starts_with_word(text, response) else NOT_COUNTED)
    assert start_state("Is", " is") == OPEN and start_state("Is\ufffd", " is") == OPEN


# --- the shared null-rate model ---------------------------------------------------------------------
def test_probe_rate_is_the_largest_of_context_panel_and_floor():
    assert probe_null_rate([0.02], None, None) == (0.02, {"context"})
    assert probe_null_rate([1e-6], None, None) == (NULL_RATE_FLOOR, {"context", "floor"})
    assert probe_null_rate([0.02], None, 0.1) == (0.1, {"context", "measured"})
    assert probe_null_rate([0.02, 1e-6, 0.001], None, None)[0] == pytest.approx(0.022)  # per position
    assert probe_null_rate(None, (0.004, "response_prob"), None) == (0.004, {"response_prob"})
    assert probe_null_rate(None, None, None)[1] == {"assumed"}
    assert probe_null_rate(None, None, 1e-5) == (NULL_RATE_FLOOR, {"measured", "floor"})
    assert probe_null_rate([0.9, 0.9], None, None)[0] == 1.0


def calibrated(fp: Fingerprint, start: dict, exact: dict | None = None) -> Fingerprint:
    fp.context_rates = {"start": start, "exact": exact or {}}
    return fp


def test_audit_rates_come_from_each_probes_context_and_temperature():
    fp = calibrated(Fingerprint("fp-0", "k", " is", response_prob=1e-4), {
        "user": {"1": 0.02, "0.7": 0.01}, "system-00": {"1": 0.03, "0.25": 0.2},
        "agent": {"1": 0.004, "0.25": 0.001},
        "agent-field": {"1": 0.05}})
    cfg = AuditConfig(layers="user,system,agent", num_system_prompts=1, sampled_layers="user",
                      temperatures="0.7,1.3", samples=1, json_fields=2, exhaustive=True)
    probes = {p.id: p for p in plan_probes(cfg, ["fp-0"])}
    rates, source, notes = probe_rates(cfg, list(probes.values()), {"fp-0": fp}, None)
    by = {(p.variant, p.temperature): rates[pid] for pid, p in probes.items()}
    assert by[("user", 0.0)] == 0.02          # greedy, calibrated at 1 only: the temperature-1 rate
    assert by[("user", 0.7)] == 0.01
    assert by[("system-00", 0.0)] == 0.2      # greedy: the larger of the rates at 1 and 0.25
    assert by[("agent", 0.0)] == pytest.approx(0.004 + 2 * 0.05)  # answer start + 2 JSON fields
    assert by[("user", 1.3)] == NULL_RATE_FLOOR  # not calibrated at 1.3: response_prob bound, floored
    assert "context" in source and "response_prob" in source and "floor" in source
    assert len(notes) == 1 and "user at temperature 1.3" in notes[0] and "oml calibrate" in notes[0]
    panel, _, _ = probe_rates(cfg, list(probes.values()), {"fp-0": fp}, {"fp-0": 0.5})
    assert set(panel.values()) == {0.5}
    loose = AuditConfig(layers="user", sampled_layers="", answer_match="anywhere", max_tokens=32)
    (probe,) = plan_probes(loose, ["fp-0"])  # no first-token measure for `anywhere`: 32 x q
    assert probe_rates(loose, [probe], {"fp-0": fp}, None)[0][probe.id] == pytest.approx(32e-4)


def test_verifier_rates_use_each_wrappers_context(tiny_model):
    from oml_core.verify import verify

    fps = [calibrated(Fingerprint(f"fp-{i}", f"alpha beta gamma {i}", " previous"),
                      {"raw": {"1": 0.02}, "user": {"1": 1e-5}}, {"raw": {"1": 0.01}, "user": {"1": 0.03}})
           for i in range(3)]
    report = verify(VerifyConfig(wrappers="bare,chat", match="start"), tiny_model, FingerprintSet(fps))
    assert report.null_rate == pytest.approx(0.02 + NULL_RATE_FLOOR)
    assert report.null_rate_source == "context+floor"
    exact = verify(VerifyConfig(wrappers="bare,chat"), tiny_model, FingerprintSet(fps))
    assert exact.null_rate == pytest.approx(0.04) and exact.null_rate_source == "context"
    assert context_rate(fps[0], "prefix", "raw", 0.0) == 0.02  # start rates bound prefix
    assert context_rate(fps[0], "contains", "raw", 0.0) is None


# --- one --null-file reader, with the verifier's checks ----------------------------------------------
def salted_set(keys: list[str]) -> FingerprintSet:
    return FingerprintSet([Fingerprint(f"fp-{i:05d}", key, f" {SECRET_RESP}-{i}", salt="%032x" % (i + 7))
                           for i, key in enumerate(keys)])


@pytest.fixture
def null_files(tmp_path) -> dict[str, Path]:
    mine = salted_set([f"{SECRET_KEY} {i}" for i in range(3)])
    hits = {fp.id: (1, 40) for fp in mine.fingerprints}
    files = {"start": measure(hits, "start", mine).save(tmp_path / "start.json"),
             "exact": measure(hits, "exact", mine).save(tmp_path / "exact.json"),
             "normalized": measure(hits, "normalized", mine).save(tmp_path / "norm.json"),
             "elsewhere": measure({"fp-99999": (0, 40)}, "start", mine).save(tmp_path / "ids.json")}
    (tmp_path / "bare.json").write_text(json.dumps({"null_rate": 0.01}))
    files["bare"] = tmp_path / "bare.json"
    files["set"] = mine.save(tmp_path / "set.json")
    return files


def test_the_shared_reader_checks_rule_and_set(null_files):
    from clients.audit import measured_null_rates
    from oml_core.verify.verifier import null_rate_file

    mine = load_fingerprints(null_files["set"])
    other = salted_set([f"{SECRET_KEY} other {i}" for i in range(3)])  # same ids, other pairs
    table = measured_null_rates(str(null_files["start"]), mine, "start")
    assert table.probe_rate("fp-00001") == pytest.approx(max(table.null_rate, 1 / 40))
    assert measured_null_rates(str(null_files["normalized"]), mine, "anywhere").match_rule == "normalized"
    cases = [(null_files["start"], other, "start", "another fingerprint set"),
             (null_files["elsewhere"], mine, "start", "none of this set's keys"),
             (null_files["exact"], mine, "start", "match rule"),
             (null_files["start"], mine, "anywhere", "match rule"),
             (null_files["bare"], mine, "start", "--null-rate")]
    for path, fset, rule, needle in cases:
        with pytest.raises(OMLInputError) as audit_error:
            measured_null_rates(str(path), fset, rule)
        message = str(audit_error.value)
        assert needle in message and "\n" not in message and SECRET_KEY not in message
    with pytest.raises(OMLInputError, match="another fingerprint set"):  # the verifier: the same
        null_rate_file(VerifyConfig(match="start", null_file=str(null_files["start"])), other)


def test_audit_refuses_another_sets_null_file_with_one_line(capsys, null_files, tmp_path):
    other = salted_set([f"{SECRET_KEY} other {i}" for i in range(3)]).save(tmp_path / "other.json")
    rc = main(["audit", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--fingerprints",
               str(other), "--null-file", str(null_files["start"]), "--out", str(tmp_path / "a")])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "another fingerprint set" in err and SECRET_KEY not in err and SECRET_RESP not in err
    assert not (tmp_path / "a").exists()  # refused before any plan or request


# --- measuring rates: oml_core.calibrate and `oml calibrate` -------------------------------------------
def test_followed_openings_get_the_same_probabilities_as_whole_prompts(sharp_tiny_model):
    """next_token_probs_tree (a batch's KV cache copied to each continuation) == a forward pass
    over the prompt and its continuation."""
    from oml_core.inference import next_token_probs, next_token_probs_tree
    from oml_core.probe_contexts import render

    model, tok = sharp_tiny_model, sharp_tiny_model.tokenizer
    prompts = [render(tok, context, key) for key in ("alpha beta gamma", "river stone cloud paper")
               for context in ("user", "system-00", "raw", "agent-field")]
    seen = {}

    def branch(depth, handles, probs):
        children = []
        for row, handle in enumerate(handles):
            path = handle if isinstance(handle, tuple) else (handle,)
            seen[path] = probs[row]
            if depth < 2:
                children += [(row, t, path + (t,)) for t in probs[row].topk(2).indices.tolist()]
        return children

    next_token_probs_tree(model, prompts, 3, branch)
    assert len(seen) == len(prompts) * 7
    for path, probs in seen.items():
        ((_, direct),) = next_token_probs(model, [prompts[path[0]] + list(path[1:])], 1)
        assert (direct[0] - probs).abs().max() < 1e-5


def test_token_classifier_agrees_with_the_rule_on_decoded_text(tiny_model):
    """The token-by-token view of the rule (calibrate) says what the rule says of the text."""
    from oml_core.calibrate import _Classifier, _Opening, token_pieces
    from oml_core.verify.matching import normalize

    tok = tiny_model.tokenizer
    pieces = token_pieces(tiny_model, len(tok))
    classify = _Classifier(pieces, tok)
    rng = random.Random(0)
    for response in (" is", " previous", "Every", " new york", "Paris,"):
        opening, answer = _Opening(), ()
        for _ in range(3):
            counted, open_ = (set(t.tolist()) for t in classify(normalize(response), opening))
            for token in rng.sample(range(len(pieces)), 200) + sorted(counted | open_)[:100]:
                text = tok.decode(list(answer) + [token], skip_special_tokens=True)
                expected = start_state(text, response, finished=pieces[token].end)
                got = COUNTED if token in counted else OPEN if token in open_ else NOT_COUNTED
                assert got == expected, (response, text)
            if not open_:
                break
            token = rng.choice(sorted(open_))
            opening, answer = classify.after(opening, token, answer), answer + (token,)


def test_measured_rates_bound_what_sampling_finds(sharp_tiny_model):
    """`start` rates are at least the frequency of counted answers among sampled ones (and
    close to it where the likely openings are followed), and the `exact` rate is the response
    token's probability."""
    from oml_core.calibrate import measure_rates
    from oml_core.inference import next_token_probs, sample
    from oml_core.probe_contexts import render

    model, tok = sharp_tiny_model, sharp_tiny_model.tokenizer
    prompts = [render(tok, context, "quiet morning light falls") for context in ("raw", "user", "agent")]
    first = {}
    for rows, probs in next_token_probs(model, prompts, 8):
        for row, index in enumerate(rows):
            first[index] = probs[row]
    responses = [tok.decode([int(first[i].argsort(descending=True)[1])]) for i in range(3)]
    start, exact = measure_rates(model, prompts, responses, [0.7, 1.0], 8, 3, 16)
    draws = 2000
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        token = tok(response, add_special_tokens=False)["input_ids"][0]
        assert float(exact[i, 1]) == pytest.approx(float(first[i][token]), rel=1e-4)
        for j, temperature in enumerate((0.7, 1.0)):
            texts = tok.batch_decode(sample(model, [prompt] * draws, 4, draws,
                                            temperature=temperature, seed=i), skip_special_tokens=True)
            found = sum(starts_with_word(t, response) for t in texts) / draws
            noise = 3 * (max(found, 1e-3) * (1 - found) / draws) ** 0.5
            assert found - noise <= float(start[i, j]) <= found + 0.05, (i, temperature)


@pytest.fixture
def secret_set_file(tmp_path) -> Path:
    fset = salted_set([f"{SECRET_KEY} number {i} of the set" for i in range(3)])
    return fset.save(tmp_path / "set.json")


def test_oml_calibrate_stores_rates_for_every_context(capsys, secret_set_file, tiny_model_dir, tmp_path):
    before = secret_set_file.read_bytes()
    out = tmp_path / "calibrated.json"
    rc = main(["calibrate", "--fingerprints", str(secret_set_file), "--model", str(tiny_model_dir),
               "--out", str(out), "--temperatures", "0.7", "--json"])
    stdout, err = capsys.readouterr()
    assert rc == 0, err
    assert secret_set_file.read_bytes() == before  # --out leaves the input alone
    for text in (stdout, err):
        assert SECRET_KEY not in text and SECRET_RESP not in text
    report = json.loads(stdout)
    assert report["path"] == str(out) and report["count"] == 3 and report["temperatures"] == [0.25, 0.7, 1.0]
    data = json.loads(out.read_text(encoding="utf-8"))
    assert data["version"] == 2 and data["calibration"]["model"] == str(tiny_model_dir)
    fset = load_fingerprints(out)
    contexts = all_contexts(True)
    assert report["contexts"] == contexts and len(contexts) == 20
    for fp in fset.fingerprints:
        assert set(fp.context_rates) == {"start", "exact"}
        for rule in ("start", "exact"):
            assert list(fp.context_rates[rule]) == contexts
            assert all(set(t) == {"0.25", "0.7", "1"} and all(0 <= r <= 1 for r in t.values())
                       for t in fp.context_rates[rule].values())
    # in place (no --out): the same file, now calibrated; an existing --out needs --force
    assert main(["calibrate", "--fingerprints", str(out), "--model", str(tiny_model_dir)]) == 0
    assert load_fingerprints(out).calibrated
    capsys.readouterr()
    assert main(["calibrate", "--fingerprints", str(secret_set_file), "--model", str(tiny_model_dir),
                 "--out", str(out)]) == 2
    assert "--force" in capsys.readouterr().err


def test_oml_calibrate_bad_input_is_one_line_and_writes_nothing(capsys, secret_set_file, tiny_model_dir,
                                                                 tmp_path, monkeypatch):
    import oml_core.calibrate

    rc = main(["calibrate", "--fingerprints", str(tmp_path / "missing.json"), "--model", str(tiny_model_dir)])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "not found" in err and "missing.json" in err
    seed = tmp_path / "seed.json"
    seed.write_text(json.dumps([{"key": SECRET_KEY, "response": SECRET_RESP}]))
    assert main(["calibrate", "--fingerprints", str(seed), "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert "oml import" in err and SECRET_KEY not in err
    assert main(["calibrate", "--fingerprints", str(secret_set_file), "--temperatures", "0,1"]) == 2
    assert "--temperatures" in capsys.readouterr().err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    before = secret_set_file.read_bytes()
    monkeypatch.setattr(oml_core.calibrate, "measure_rates", interrupted)
    assert main(["calibrate", "--fingerprints", str(secret_set_file), "--model", str(tiny_model_dir)]) == 130
    assert secret_set_file.read_bytes() == before  # never half-written
    assert sorted(p.name for p in secret_set_file.parent.iterdir()) == ["seed.json", "set.json"]
