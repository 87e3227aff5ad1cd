"""Sampled decoding (oml_core.inference.sample): the nucleus is transformers' top-p set, picks
follow the renormalised nucleus, and results depend on the seed only, never on batching."""

from __future__ import annotations

import pytest
import torch

from oml_core.config import GenerateConfig
from oml_core.generate import generate_set
from oml_core.inference import greedy, nucleus, nucleus_pick, sample
from oml_core.verify.wrappers import build_wrappers


@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])  # flat (nucleus of thousands) to peaked
@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.95, 0.999, 1.0])
def test_nucleus_is_the_transformers_top_p_set(scale, top_p):
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.randn(24, 5000, generator=torch.Generator().manual_seed(7)) * scale
    probs = torch.softmax(logits, dim=-1)
    top, ids = nucleus(probs, top_p)
    ours = torch.zeros_like(logits, dtype=torch.bool).scatter(1, ids, top > 0)
    kept = (TopPLogitsWarper(top_p)(None, logits.clone()) > float("-inf") if top_p < 1
            else torch.ones_like(ours))
    # the two may only disagree on a token whose mass above it is top_p to float32 rounding
    # (transformers sums thousands of small probabilities in float32, ascending)
    for row, token in (ours != kept).nonzero().tolist():
        mass_above = probs[row][probs[row] > probs[row, token]].double().sum().item()
        assert mass_above == pytest.approx(top_p, abs=1e-6)
    assert (ours != kept).sum() <= 3 and ours.sum(-1).min() >= 1


def test_picks_follow_the_renormalised_nucleus():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).repeat(40_000, 1)
    draws = torch.rand(len(probs), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    picks = nucleus_pick(probs, 0.9, draws)  # nucleus: 0.5, 0.3, 0.15 (0.95 > 0.9 before 0.05)
    freq = torch.bincount(picks, minlength=4).double() / len(picks)
    assert freq[0] == 0
    assert freq[1:].tolist() == pytest.approx([0.5 / 0.95, 0.15 / 0.95, 0.3 / 0.95], abs=0.01)
    # the extreme draws stay inside the nucleus
    edge = nucleus_pick(probs[:2], 0.9, torch.tensor([0.0, 1 - 1e-16], dtype=torch.float64))
    assert edge.tolist() == [1, 2]


@pytest.fixture(scope="module")
def prompts(tiny_model):
    fset = generate_set(GenerateConfig(strategy="random_word", num_fingerprints=10, key_length=6,
                                       seed=3), tiny_model)
    wrappers, _ = build_wrappers(["bare", "chat", "system"], 2, True)
    return [w.render(tiny_model.tokenizer, fp.key) for fp in fset.fingerprints for w in wrappers]


def test_sampling_depends_on_the_seed_only(tiny_model, prompts):
    runs = [sample(tiny_model, prompts, 6, batch_size, temperature=1.3, top_p=0.9, seed=5,
                   stop_at_eos=False) for batch_size in (64, 7, 1)]
    assert runs[0] == runs[1] == runs[2]
    assert all(len(row) == 6 for row in runs[0])
    # the same prompt twice in one call: two independent draws (robustness samples this way)
    twice = sample(tiny_model, prompts[:1] * 2, 6, 64, temperature=1.3, top_p=0.9, seed=5,
                   stop_at_eos=False)
    assert twice[0] == runs[0][0] and twice[1] != twice[0]
    other = sample(tiny_model, prompts, 6, 64, temperature=1.3, top_p=0.9, seed=6,
                   stop_at_eos=False)
    assert other != runs[0]


def test_sampling_reads_the_models_logits(tiny_model, prompts):
    """Near zero temperature the nucleus is the top token: sampling must decode greedily."""
    cold = sample(tiny_model, prompts, 5, 16, temperature=1e-4, top_p=0.5, seed=1, stop_at_eos=False)
    assert cold == greedy(tiny_model, prompts, 5, 16, stop_at_eos=False)


def test_sampling_refuses_a_temperature_of_zero(tiny_model, prompts):
    with pytest.raises(ValueError, match="temperature must be above 0"):
        sample(tiny_model, prompts, 2, 8, temperature=0)
