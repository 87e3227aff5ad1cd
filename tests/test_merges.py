"""The merge formulas (oml_core/evaluate/merges.py) on hand-checkable tensors, and against
mergekit itself on tiny saved Llama models when mergekit is installed (`pip install
'oml[merges]'`; part of the `dev` extra, so CI runs the comparison)."""

from __future__ import annotations

import math

import pytest
import torch

from oml_core.evaluate import merges


def _t(*values):
    return torch.tensor(values, dtype=torch.float32)


# --- linear -----------------------------------------------------------------------------------
def test_linear_is_the_weighted_average_and_keeps_dtypes():
    a = {"w": _t(1, 2), "h": torch.tensor([1.0, 3.0], dtype=torch.bfloat16), "n": torch.tensor([7])}
    b = {"w": _t(3, 6), "h": torch.tensor([3.0, 5.0], dtype=torch.bfloat16), "n": torch.tensor([9])}
    out = merges.linear([a, b], [0.25, 0.75])
    assert torch.equal(out["w"], _t(2.5, 5.0))
    assert out["h"].dtype == torch.bfloat16 and torch.equal(out["h"].float(), _t(2.5, 4.5))
    assert torch.equal(out["n"], torch.tensor([7]))  # not floating point: the first model's
    # normalize (the default) divides by the weights' sum; without it the sum is taken as is
    assert torch.equal(merges.linear([a, b], [1, 3])["w"], _t(2.5, 5.0))
    assert torch.equal(merges.linear([a, b], [1, 1], normalize=False)["w"], _t(4, 8))
    with pytest.raises(ValueError, match="sum to 0"):
        merges.linear([a, b], [1, -1])


def test_shapes_and_names_must_line_up():
    with pytest.raises(ValueError, match="shape"):
        merges.linear([{"w": _t(1, 2)}, {"w": _t(1, 2, 3)}], [1, 1])
    with pytest.raises(ValueError, match="differ"):
        merges.linear([{"w": _t(1)}, {"v": _t(1)}], [1, 1])
    with pytest.raises(ValueError, match="2 weights for 3"):
        merges.linear([{"w": _t(1)}] * 3, [1, 1])


# --- SLERP ------------------------------------------------------------------------------------
def test_slerp_follows_the_arc_between_orthogonal_vectors():
    half = math.sqrt(0.5)
    out = merges.slerp_tensor(0.5, _t(1, 0), _t(0, 1))
    assert torch.allclose(out, _t(half, half))  # on the unit circle; linear would give (.5, .5)
    assert torch.allclose(merges.slerp_tensor(0.0, _t(1, 0), _t(0, 1)), _t(1, 0))
    assert torch.allclose(merges.slerp_tensor(1.0, _t(1, 0), _t(0, 1)), _t(0, 1))
    # a third of the way: angle pi/6 from the first vector
    third = merges.slerp_tensor(1 / 3, _t(1, 0), _t(0, 1))
    assert torch.allclose(third, _t(math.cos(math.pi / 6), math.sin(math.pi / 6)))
    # the norms scale the result, the angle comes from the directions
    assert torch.allclose(merges.slerp_tensor(0.5, _t(2, 0), _t(0, 2)), _t(2 * half, 2 * half))
    # a matrix is interpolated as one flat vector
    m = merges.slerp_tensor(0.5, torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert m.shape == (1, 2) and torch.allclose(m, torch.tensor([[half, half]]))


def test_slerp_falls_back_to_linear_when_nearly_colinear():
    assert torch.allclose(merges.slerp_tensor(0.5, _t(1, 0), _t(2, 0)), _t(1.5, 0))
    assert torch.allclose(merges.slerp_tensor(0.5, _t(1, 0), _t(-1, 0)), _t(0, 0))  # opposite
    # a zero vector has no direction: its norm counts as 1, so cos = 0 and the arc is a quarter
    # circle (mergekit does the same)
    zero = merges.slerp_tensor(0.25, _t(0, 0), _t(4, 4))
    assert torch.allclose(zero, math.sin(math.pi / 8) * _t(4, 4))
    close = _t(1, 0.01)  # cos = 0.99995 > 0.9995
    assert torch.allclose(merges.slerp_tensor(0.5, _t(1, 0), close), (_t(1, 0) + close) / 2)
    out = merges.slerp({"w": _t(1, 0)}, {"w": _t(0, 1)}, t=0.5)
    assert torch.allclose(out["w"], _t(math.sqrt(0.5), math.sqrt(0.5)))


# --- TIES -------------------------------------------------------------------------------------
def test_magnitude_trim_keeps_the_largest_entries():
    delta = _t(0.1, -3, 2, -0.5)
    assert torch.equal(merges.magnitude_trim(delta, 0.5), _t(0, -3, 2, 0))
    assert torch.equal(merges.magnitude_trim(delta, 0.1), _t(0, -3, 0, 0))  # at least one
    assert torch.equal(merges.magnitude_trim(delta, 1.0), delta)
    assert torch.equal(merges.magnitude_trim(delta, 0.0), _t(0, 0, 0, 0))


def test_ties_elects_signs_and_averages_the_agreeing_entries():
    base = {"w": _t(10, 10, 10)}
    a = {"w": _t(11, 8, 10.5)}   # delta  1, -2, 0.5
    b = {"w": _t(7, 11, 10.5)}   # delta -3,  1, 0.5
    # weighted sums -2, -1, 1 elect -, -, +; entry 0: only b agrees, 1: only a, 2: both
    out = merges.ties(base, [a, b], [1, 1])
    assert torch.allclose(out["w"], _t(10 - 3, 10 - 2, 10 + 0.5))
    # the normalised disjoint mean does not depend on the weights' scale
    assert torch.allclose(merges.ties(base, [a, b], [0.5, 0.5])["w"], out["w"])
    # unequal weights: weighted sums -1.2, -0.1, 0.4; entry 2 = (0.3 * 0.5 + 0.5 * 0.5) / 0.8
    uneven = merges.ties(base, [a, b], [0.3, 0.5])["w"]
    assert torch.allclose(uneven, _t(10 - 3, 10 - 2, 10.5))
    # without normalize: the weighted sum over the agreeing models
    assert torch.allclose(merges.ties(base, [a, b], [1, 1], normalize=False)["w"], _t(7, 8, 11))
    # lambda scales the merged task vector
    assert torch.allclose(merges.ties(base, [a, b], [1, 1], lam=0.5)["w"], _t(8.5, 9, 10.25))


def test_ties_trims_each_task_vector_before_the_election():
    base = {"w": torch.zeros(4)}
    a = {"w": _t(4, -1, 0.5, -2)}  # density 0.5 keeps 4 and -2
    b = {"w": _t(-1, 3, 0.2, 1.5)}  # keeps 3 and 1.5
    out = merges.ties(base, [a, b], [1, 1], density=0.5)
    # trimmed: a = (4, 0, 0, -2), b = (0, 3, 0, 1.5); sums 4, 3, 0, -0.5 elect +, +, +, -
    # entry 2: both zero, no model agrees, stays at the base; entry 3: only a agrees
    assert torch.allclose(out["w"], _t(4, 3, 0, -2))
    # per-model densities: a keeps only 4; b whole: sums 3, 3, 0.2, 1.5 elect + everywhere
    out = merges.ties(base, [a, b], [1, 1], density=[0.25, 1.0])
    assert torch.allclose(out["w"], _t(4, 3, 0.2, 1.5))


def test_a_zero_sign_sum_elects_plus():
    base = {"w": _t(0)}
    out = merges.ties(base, [{"w": _t(1)}, {"w": _t(-1)}], [1, 1])
    assert torch.equal(out["w"], _t(1))


# --- DARE -------------------------------------------------------------------------------------
def test_dare_drop_keeps_a_density_share_and_rescales_by_one_over_density():
    delta = torch.linspace(1, 2, 20_000)
    gen = torch.Generator().manual_seed(3)
    out = merges.dare_drop(delta, 0.3, gen)
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.3) < 0.02
    assert torch.allclose(out[kept], delta[kept] / 0.3)
    again = merges.dare_drop(delta, 0.3, torch.Generator().manual_seed(3))
    assert torch.equal(out, again)  # seeded
    # unbiased: the mean over the tensor stays close to the undropped mean
    assert abs(float(out.mean()) - float(delta.mean())) < 0.05
    assert torch.equal(merges.dare_drop(delta, 1.0, gen), delta)
    assert not merges.dare_drop(delta, 0.0, gen).any()


def test_rescale_survivors_by_hand():
    delta, keep = _t(1, -2, 3, -4), torch.tensor([True, False, True, False])
    assert torch.equal(merges.rescale_survivors(delta, keep, 0.5), _t(2, 0, 6, 0))
    # mergekit's L1 rescale: |delta|_1 = 10, kept 4, so x 2.5
    assert torch.equal(merges.rescale_survivors(delta, keep, 0.5, "l1"), _t(2.5, 0, 7.5, 0))
    assert torch.equal(merges.rescale_survivors(delta, keep, 0.5, None), _t(1, 0, 3, 0))


def test_dare_at_full_density_is_task_arithmetic_or_unnormalised_ties():
    torch.manual_seed(0)
    base = {"w": torch.randn(64)}
    models = [{"w": base["w"] + torch.randn(64)} for _ in range(2)]
    weights = [0.4, 0.7]
    linear = merges.dare_linear(base, models, weights, density=1.0)
    expected = base["w"] + 0.4 * (models[0]["w"] - base["w"]) + 0.7 * (models[1]["w"] - base["w"])
    assert torch.allclose(linear["w"], expected)
    assert torch.allclose(merges.task_arithmetic(base, models, weights)["w"], expected)
    ties = merges.dare_ties(base, models, weights, density=1.0)
    assert torch.allclose(ties["w"], merges.ties(base, models, weights, normalize=False)["w"])


def test_dare_masks_are_seeded_per_tensor_and_model():
    torch.manual_seed(1)
    base = {"a": torch.zeros(1000), "b": torch.zeros(1000)}
    model = {"a": torch.ones(1000), "b": torch.ones(1000)}
    one = merges.dare_linear(base, [model], [1.0], density=0.5, seed=7)
    assert torch.equal(one["a"], merges.dare_linear(base, [model], [1.0], density=0.5, seed=7)["a"])
    assert not torch.equal(one["a"], merges.dare_linear(base, [model], [1.0], 0.5, seed=8)["a"])
    assert not torch.equal(one["a"], one["b"])  # each tensor draws its own mask
    assert set(one["a"].unique().tolist()) <= {0.0, 2.0}
    # dare_ties with two models that agree everywhere: where both survive 2 + 2, one 2, none 0
    two = merges.dare_ties(base, [model, model], [1.0, 1.0], density=0.5, seed=7)
    assert set(two["a"].unique().tolist()) <= {0.0, 2.0, 4.0}
    assert abs(float((two["a"] == 0).float().mean()) - 0.25) < 0.06


# --- mergekit itself --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny random Llama base and two fine-tune-like children (base + noise), as folders."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("merge_models")
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    base = LlamaForCausalLM(config)
    folders = {"base": root / "base", "a": root / "a", "b": root / "b"}
    base.save_pretrained(folders["base"])
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        child = LlamaForCausalLM(config)
        child.load_state_dict({k: v + 0.02 * torch.randn_like(v) for k, v in base.state_dict().items()})
        child.save_pretrained(folders[name])
    states = {name: load_file(str(folder / "model.safetensors")) for name, folder in folders.items()}
    return root, {k: str(v) for k, v in folders.items()}, states


def _mergekit(root, name, config):
    pytest.importorskip("mergekit")
    return merges.run_mergekit(config, root / f"out-{name}", seed=0)


def _assert_close(mk: dict, ours: dict, atol=1e-6):
    assert set(mk) == set(ours)
    for name in mk:
        assert torch.allclose(mk[name].float(), ours[name].float(), rtol=1e-5, atol=atol), name


def test_mergekit_linear_and_slerp_agree_with_ours(saved):
    root, f, s = saved
    mk = _mergekit(root, "linear", merges.mergekit_config("linear", [f["a"], f["base"]], [0.7, 0.3]))
    _assert_close(mk, merges.linear([s["a"], s["base"]], [0.7, 0.3]))
    # slerp from the first model (mergekit's base_model, t = 0) to the other
    mk = _mergekit(root, "slerp", merges.mergekit_config("slerp", [f["base"]], base=f["a"], t=0.3))
    _assert_close(mk, merges.slerp(s["a"], s["base"], 0.3))
    assert not torch.allclose(mk["model.norm.weight"], s["a"]["model.norm.weight"])


def test_mergekit_ties_agrees_with_ours(saved):
    root, f, s = saved
    for density in (0.5, 1.0):
        config = merges.mergekit_config("ties", [f["a"], f["b"]], [0.6, 0.4], base=f["base"],
                                        density=density)
        mk = _mergekit(root, f"ties-{density}", config)
        _assert_close(mk, merges.ties(s["base"], [s["a"], s["b"]], [0.6, 0.4], density))


def test_mergekit_dare_agrees_with_ours(saved):
    """DARE's masks are random (mergekit draws from torch's global generator), so: at density 1
    the rest of the method must agree exactly; at density 0.5 with one model, mergekit's own
    mask (read off its output) put through our rescaling must give its output, and the masks
    of both keep about half of each tensor."""
    root, f, s = saved
    for method in ("dare_ties", "dare_linear"):
        config = merges.mergekit_config(method, [f["a"], f["b"]], [0.6, 0.4], base=f["base"],
                                        density=1.0)
        mk = _mergekit(root, f"{method}-1", config)
        ours = merges.dare(s["base"], [s["a"], s["b"]], [0.6, 0.4], 1.0,
                           consensus=method == "dare_ties")
        _assert_close(mk, ours)
    config = merges.mergekit_config("dare_linear", [f["a"]], [1.0], base=f["base"], density=0.5)
    mk = _mergekit(root, "dare-0.5", config)
    ours = merges.dare_linear(s["base"], [s["a"]], [1.0], 0.5, seed=0, rescale="l1")
    for name, merged in mk.items():
        delta = s["a"][name] - s["base"][name]
        keep = merged != s["base"][name]
        expected = s["base"][name] + merges.rescale_survivors(delta, keep, 0.5, "l1")
        assert torch.allclose(merged, expected, atol=1e-6), name
        if delta.numel() >= 4096:
            theirs_kept, ours_kept = float(keep.float().mean()), float(
                (ours[name] != s["base"][name]).float().mean())
            assert abs(theirs_kept - 0.5) < 0.05 and abs(ours_kept - 0.5) < 0.05, name


def test_mergekit_config_shapes():
    config = merges.mergekit_config("dare_ties", ["fp", "child"], [0.5, 0.5], base="base",
                                    density=0.5)
    assert config["base_model"] == "base" and config["merge_method"] == "dare_ties"
    assert config["models"][0] == {"model": "base"}
    assert config["models"][1] == {"model": "fp", "parameters": {"weight": 0.5, "density": 0.5}}
    assert "base_model" not in merges.mergekit_config("linear", ["a", "b"], [0.5, 0.5])
    with pytest.raises(ValueError, match="not one of"):
        merges.mergekit_config("frankenmerge", ["a"], [1.0])
    with pytest.raises(ValueError, match="slerp takes"):
        merges.mergekit_config("slerp", ["a", "b"], base="c", t=0.5)


def test_merged_weights_may_omit_tied_tensors_only():
    from transformers import LlamaConfig, LlamaForCausalLM

    from oml_core.evaluate.robustness import with_weights
    from oml_core.models import LoadedModel

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    loaded = LoadedModel(model=model, tokenizer=None, name="tiny", path="", device="cpu")
    state = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    merged = with_weights(loaded, state, "merged")  # mergekit writes no lm_head when tied
    assert torch.equal(merged.model.lm_head.weight, torch.full_like(model.lm_head.weight, 0.5))
    assert not torch.equal(model.model.norm.weight, merged.model.model.norm.weight)  # a copy
    del state["model.norm.weight"]
    with pytest.raises(ValueError, match="1 tensors missing"):
        with_weights(loaded, state, "merged")
