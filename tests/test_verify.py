"""Batched verification on the tiny model: batching changes nothing, matches are found where
the model really answers, per-wrapper counts are right, match rules behave, and the
evidence follows the fixed rule."""

from __future__ import annotations

import pytest
from decoding_reference import hf_greedy

from oml_core.config import GenerateConfig, VerifyConfig
from oml_core.fingerprints import Fingerprint, FingerprintSet
from oml_core.generate import generate_set
from oml_core.generate.perinucleus import round_trip_prefix
from oml_core.inference import greedy
from oml_core.verify import check_keys, verify
from oml_core.verify.matching import is_match, normalize
from oml_core.verify.wrappers import Wrapper, build_wrappers, heldout_system_prompts


@pytest.fixture(scope="module")
def keys_set(tiny_model):
    return generate_set(GenerateConfig(strategy="random_word", num_fingerprints=12,
                                       key_length=6, response_length=2, seed=1), tiny_model)


def _answered_set(tiny_model, keys_set, wrapper: Wrapper, length=2) -> FingerprintSet:
    """Responses = the model's own greedy answer under `wrapper`: it must match there."""
    tok = tiny_model.tokenizer
    prompts = [wrapper.render(tok, fp.key) for fp in keys_set.fingerprints]
    outs = hf_greedy(tiny_model, prompts, length, stop_at_eos=False)
    fps = []
    for fp, out in zip(keys_set.fingerprints, outs):
        # only a response that re-tokenizes to the same ids can be matched exactly
        fps.append(Fingerprint(fp.id, fp.key, round_trip_prefix(tok, out), None, fp.salt))
    return FingerprintSet(fps)


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_shared_prefix_greedy_equals_transformers_generate(tiny_model, keys_set, batch_size):
    """Our decoding loop (shared prefix cache, per-row stop) == HF generate, row for row."""
    tok = tiny_model.tokenizer
    wrappers, _ = build_wrappers(["bare", "chat", "system"], 3, True)
    prompts = [w.render(tok, fp.key) for fp in keys_set.fingerprints for w in wrappers]
    reference = hf_greedy(tiny_model, prompts, 5, stop_at_eos=False)
    assert greedy(tiny_model, prompts, 5, batch_size, stop_at_eos=False) == reference
    limits = [1 + i % 5 for i in range(len(prompts))]
    short = greedy(tiny_model, prompts, limits, batch_size, stop_at_eos=False)
    assert [len(row) for row in short] == limits
    assert all(row == ref[:len(row)] for row, ref in zip(short, reference))


def test_model_own_answers_match_under_their_wrapper(tiny_model, keys_set):
    fset = _answered_set(tiny_model, keys_set, Wrapper("chat", "chat"))
    wrappers, _ = build_wrappers(["bare", "chat"], 1, True)
    hits = check_keys(tiny_model, fset, wrappers, "exact", batch_size=5)
    assert all(row[1] for row in hits), "chat wrapper must reproduce the model's chat answers"


def test_verify_report_counts_and_verdict(tiny_model, keys_set):
    fset = _answered_set(tiny_model, keys_set, Wrapper("chat", "chat"))
    report = verify(VerifyConfig(wrappers="bare,chat,system", num_system_prompts=2,
                                 null_rate=0.01), tiny_model, fset)
    assert report.total == 12 and report.matched == 12
    assert report.wrappers["chat"].model_dump() == {"matched": 12, "total": 12}
    assert set(report.wrappers) == {"bare", "chat", "system-00", "system-01"}
    assert report.verdict == "match" and report.p_value == pytest.approx(0.01 ** 12)
    assert report.null_rate_source == "given"
    assert all(row.matched and "chat" in row.wrappers for row in report.per_fingerprint)
    text = report.model_dump_json()
    assert not any(fp.key in text or fp.response in text for fp in fset.fingerprints)


def test_unanswered_set_is_no_match(tiny_model, keys_set):
    report = verify(VerifyConfig(wrappers="bare,chat"), tiny_model, keys_set)
    assert report.matched <= 1 and report.verdict == "no_match"
    assert report.null_rate_source == "assumed"


def test_response_prob_is_union_bounded_over_wrappers(tiny_model, keys_set):
    fset = _answered_set(tiny_model, keys_set, Wrapper("chat", "chat"))
    for fp in fset.fingerprints:
        fp.response_prob = 0.01
    report = verify(VerifyConfig(wrappers="bare,chat,system", num_system_prompts=3), tiny_model, fset)
    assert report.null_rate == pytest.approx(0.05)  # 5 wrappers x 0.01
    assert report.null_rate_source == "response_prob"
    loose = verify(VerifyConfig(wrappers="chat", match="contains"), tiny_model, fset)
    assert loose.null_rate_source == "assumed", "response_prob says nothing about loose rules"


def test_null_model_measures_the_rate(tiny_model, keys_set, tiny_base_model_dir):
    report = verify(VerifyConfig(wrappers="bare,chat", null_model=[str(tiny_base_model_dir)]),
                    tiny_model, keys_set)
    (null,) = report.null_models
    assert null.total == 12 and "chat: skipped, the model has no chat template" in null.skipped_wrappers
    assert "measured" in report.null_rate_source
    assert report.null_rate == pytest.approx((null.matched + 1) / 14)


def test_trimming_and_subset(tiny_model, keys_set):
    report = verify(VerifyConfig(wrappers="bare", num_fingerprints=5, max_key_tokens=3,
                                 max_response_tokens=1), tiny_model, keys_set)
    assert report.total == 5


@pytest.mark.parametrize("rule,text,ids,response,resp_ids,expected", [
    ("exact", "", [5, 6, 7], "", [5, 6], True),
    ("exact", "", [5, 7], "", [5, 6], False),
    ("prefix", " Paris is nice", [], "Paris", [], True),
    ("prefix", "It is Paris", [], "Paris", [], False),
    ("contains", "It is Paris.", [], " Paris", [], True),
    ("normalized", "Sure! PARIS, of course", [], "paris", [], True),
    ("normalized", "Parisian food", [], "Paris", [], False),  # whole words only
])
def test_match_rules(rule, text, ids, response, resp_ids, expected):
    assert is_match(rule, ids, text, response, resp_ids) is expected


def test_normalize():
    assert normalize("  Héllo,   WORLD!! ") == "héllo world"


def test_heldout_prompts_are_varied_and_unique():
    prompts = heldout_system_prompts()
    assert len(prompts) >= 10 and len(set(prompts)) == len(prompts)
