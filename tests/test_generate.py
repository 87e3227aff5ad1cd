"""Every generation strategy on the tiny in-test model: exact counts, exact token lengths,
reproducibility from the seed, and the perinucleus property (response outside the nucleus)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import FIXTURES
from oml_core.config import GenerateConfig
from oml_core.errors import OMLInputError
from oml_core.generate import generate_set
from oml_core.generate.perinucleus import choose, context_wrapper, is_word_token
from oml_core.inference import next_token_probs


def _tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _make(tiny_model, **kw):
    return generate_set(GenerateConfig(**{"num_fingerprints": 6, "key_length": 8,
                                          "response_length": 2, "seed": 5, **kw}), tiny_model)


@pytest.mark.parametrize("strategy", ["english", "random_word", "english_random_response",
                                      "perinucleus"])
def test_every_strategy_exact_count_and_lengths(tiny_model, strategy):
    fset = _make(tiny_model, strategy=strategy, response_length=1 if strategy == "perinucleus" else 2)
    tok = tiny_model.tokenizer
    assert len(fset) == 6
    assert len({fp.key for fp in fset.fingerprints}) == 6, "keys must be distinct"
    assert [fp.id for fp in fset.fingerprints] == [f"fp-{i:05d}" for i in range(6)]
    for fp in fset.fingerprints:
        assert _tokens(tok, fp.key) == 8
        if strategy != "perinucleus":
            assert _tokens(tok, fp.response) == 2
        assert fp.salt and len(fp.salt) == 32
    assert fset.strategy == strategy
    assert fset.tokenizer["vocab_size"] == len(tok)
    assert (fset.fingerprints[0].response_prob is not None) == (strategy == "perinucleus")


@pytest.mark.parametrize("strategy", ["english", "random_word", "perinucleus"])
def test_same_seed_same_set_other_seed_other_set(tiny_model, strategy):
    a, b = _make(tiny_model, strategy=strategy), _make(tiny_model, strategy=strategy)
    pairs = lambda s: [(fp.key, fp.response) for fp in s.fingerprints]  # noqa: E731
    assert pairs(a) == pairs(b)
    assert pairs(_make(tiny_model, strategy=strategy, seed=6)) != pairs(a)


def test_key_sampling_reports_progress_while_it_runs(tiny_model):
    """English keys are accepted only after a round's sampling ends: the sampling itself must
    show progress, or thousands of keys sit at 0% for minutes."""
    from oml_core import progress

    events = []
    progress.set_listener(lambda desc, done, total: events.append((desc, done, total)))
    try:
        _make(tiny_model, strategy="perinucleus", response_length=1, batch_size=2)
    finally:
        progress.set_listener(None)
    sampling = [(done, total) for desc, done, total in events if desc.startswith("keys: sampling")]
    assert len(sampling) >= 3 and sampling[-1][0] == sampling[-1][1]  # per batch, to the end
    first_key = next(i for i, event in enumerate(events) if event[0] == "keys")
    assert events.index(("keys: sampling round 1", *sampling[0])) < first_key


def test_alias_inverse_nucleus_is_perinucleus():
    assert GenerateConfig(strategy="inverse_nucleus").strategy == "perinucleus"


def test_perinucleus_response_lies_outside_the_nucleus(tiny_model):
    threshold = 0.8
    fset = _make(tiny_model, strategy="perinucleus", response_length=1, perinucleus_threshold=threshold)
    tok = tiny_model.tokenizer
    wrapper = context_wrapper(fset.generation["context"], tiny_model.has_chat_template)
    prompts = [wrapper.render(tok, fp.key) for fp in fset.fingerprints]
    for rows, probs in next_token_probs(tiny_model, prompts, batch_size=8):
        for row, index in enumerate(rows):
            fp = fset.fingerprints[index]
            token = tok(fp.response, add_special_tokens=False)["input_ids"][0]
            p = float(probs[row, token])
            assert p == pytest.approx(fp.response_prob, rel=1e-4)
            above = float(probs[row][probs[row] > p].sum())
            assert above >= threshold, "a token inside the nucleus was chosen"
            assert is_word_token(fp.response)


def test_perinucleus_multi_token_response(tiny_model):
    fset = _make(tiny_model, strategy="perinucleus", response_length=3)
    for fp in fset.fingerprints:
        ids = tiny_model.tokenizer(fp.response, add_special_tokens=False)["input_ids"]
        assert 1 <= len(ids) <= 3
        assert tiny_model.tokenizer.decode(ids) == fp.response


def test_choose_picks_among_first_k_word_tokens_after_nucleus():
    import random

    vocab = ["aa", "bb", "cc", ",", "dd", "ee", "ff", "gg"]
    probs = torch.tensor([0.5, 0.3, 0.1, 0.04, 0.03, 0.02, 0.007, 0.003])
    decode = lambda i: vocab[i]  # noqa: E731
    seen = {choose(probs, 0.8, 2, random.Random(s), decode).response for s in range(50)}
    # nucleus at t=0.8 is {aa, bb}; after it: cc, ',' (rejected), dd -> first 2 words cc, dd
    assert seen == {"cc", "dd"}


def test_custom_keys_from_seed_file_are_truncated(tiny_model):
    fset = _make(tiny_model, strategy="random_word", keys_file=str(FIXTURES / "custom_keys.json"),
                 num_fingerprints=3, key_length=5)
    originals = json.loads((FIXTURES / "custom_keys.json").read_text())
    for fp, original in zip(fset.fingerprints, originals):
        assert _tokens(tiny_model.tokenizer, fp.key) <= 5
        assert original.startswith(fp.key)


def test_more_keys_than_the_file_has_is_refused(tiny_model):
    count = len(json.loads((FIXTURES / "custom_keys.json").read_text()))
    with pytest.raises(OMLInputError, match="distinct keys"):
        _make(tiny_model, strategy="perinucleus", keys_file=str(FIXTURES / "custom_keys.json"),
              num_fingerprints=count + 1)


def test_chat_context_needs_a_chat_template(tiny_base_model_dir):
    from oml_core.models import load_model

    base = load_model(str(tiny_base_model_dir), device="cpu")
    with pytest.raises(OMLInputError, match="chat template"):
        generate_set(GenerateConfig(strategy="perinucleus", num_fingerprints=2, key_length=4,
                                    context="chat"), base)
    raw = generate_set(GenerateConfig(strategy="perinucleus", num_fingerprints=2, key_length=4,
                                      context="auto"), base)
    assert raw.generation["context"] == "raw"
