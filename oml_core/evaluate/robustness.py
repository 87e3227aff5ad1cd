"""Robustness: which deployment changes and attacks (SPEC section 7) the fingerprints survive.

Every attack is measured against the fingerprinted model's own baseline (the keys that fire
under the configured wrappers); "survival" is the share of those keys that still fire.
- system_prompts: every held-out system prompt (never used in training augmentation);
- sampling: temperature 0.7 and 1.0 (settable), several samples per key and wrapper: the
  per-sample hit rate, and the share of keys hit in at least one / a majority of samples;
- int8: torch dynamic int8 quantization of every Linear layer (CPU kernels), then re-verify;
- merge: weights (1 - w) * fingerprinted + w * base (w = 0.5), then re-verify;
- suppression: a host with the weights decodes with the top-k tokens blocked wherever the top
  token's probability exceeds a threshold (0.9), as in the 2025 adversarial study; and what
  that costs ordinary use: answers to held-out prompts that change, and next-token accuracy
  on held-out documentation text.
int8 and merge also report the held-out perplexity they cost.
"""

from __future__ import annotations

import copy
import logging
import warnings

from oml_core.config import ROBUSTNESS_ATTACKS, parse_list
from oml_core.errors import OMLInputError
from oml_core.evaluate.context import public, retention
from oml_core.evaluate.utility import heldout_text, perplexity
from oml_core.inference import greedy, sample
from oml_core.models import LoadedModel
from oml_core.train.benign import benign_prompts
from oml_core.train.examples import render_prompt
from oml_core.train.regularizer import average_with_base
from oml_core.verify.matching import is_match
from oml_core.verify.verifier import LOOSE_RULES
from oml_core.verify.wrappers import heldout_system_prompts

log = logging.getLogger(__name__)

SETTINGS = ("wrappers", "num_system_prompts", "match", "batch_size", "seed", "perplexity_tokens",
            "attacks", "temperatures", "samples", "merge_weight", "suppress_threshold",
            "suppress_top_k")
ANSWER_TOKENS = 24


# --- the attacks' models and decoders --------------------------------------------------------
def quantize_int8(loaded: LoadedModel) -> tuple[LoadedModel, str]:
    """A CPU copy with every nn.Linear replaced by torch's dynamic int8 version."""
    import torch

    model = copy.deepcopy(loaded.model).float().cpu().eval()
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated but still works
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        quantized = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    method = "torch.ao.quantization.quantize_dynamic, qint8, every nn.Linear (CPU kernels)"
    return LoadedModel(model=quantized, tokenizer=loaded.tokenizer, name=f"{loaded.name} (int8)",
                       path=loaded.path, device="cpu"), method


def merge_with_base(tuned: LoadedModel, base: LoadedModel, weight: float) -> LoadedModel:
    """(1 - weight) * fingerprinted + weight * base, every tensor (the regularizer's formula)."""
    state = average_with_base(tuned.model.state_dict(), base.model.state_dict(), weight)
    model = copy.deepcopy(tuned.model)
    model.load_state_dict(state)
    return LoadedModel(model=model.eval(), tokenizer=tuned.tokenizer,
                       name=f"{tuned.name} (merged, w={weight:g})", path=tuned.path,
                       device=tuned.device)


def suppression(threshold: float, top_k: int):
    """Logit rewriter: where the top token's probability exceeds `threshold`, forbid the top_k."""
    import torch

    def adjust(logits):
        probs = torch.softmax(logits.float(), dim=-1)
        top = probs.topk(top_k, dim=-1)
        fire = (top.values[:, :1] > threshold).expand(-1, top_k)
        mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, top.indices, fire)
        return logits.masked_fill(mask, float("-inf"))

    return adjust


# --- measurements -------------------------------------------------------------------------
def sampled_hits(loaded: LoadedModel, fset, wrappers, rule: str, temperature: float, samples: int,
                 seed: int, batch_size: int) -> list[list[list[bool]]]:
    """hits[i][w][s]: did sample s of fingerprint i under wrapper w produce the response."""
    tok = loaded.tokenizer
    response_ids = [tok(fp.response, add_special_tokens=False)["input_ids"] for fp in fset.fingerprints]
    extra = 32 if rule in LOOSE_RULES else 2 if rule == "prefix" else 0
    max_new = max(len(ids) for ids in response_ids) + extra
    prompts = [w.render(tok, fp.key) for fp in fset.fingerprints for w in wrappers]
    from oml_core import progress

    with progress.bar(f"robustness: sampling T={temperature:g}", len(prompts) * samples) as advance:
        outputs = sample(loaded, prompts * samples, max_new, batch_size,
                         temperature=temperature, seed=seed, progress=advance)
    texts = tok.batch_decode(outputs, skip_special_tokens=True)
    width, n = len(wrappers), len(prompts)
    return [[[is_match(rule, outputs[s * n + i * width + w], texts[s * n + i * width + w],
                       fp.response, response_ids[i]) for s in range(samples)]
             for w in range(width)] for i, fp in enumerate(fset.fingerprints)]


def summarise_samples(hits, wrappers, samples: int) -> dict:
    n = len(hits)
    per_wrapper = {}
    for j, w in enumerate(wrappers):
        rows = [h[j] for h in hits]
        per_wrapper[w.name] = {
            "sample_hit_rate": sum(map(sum, rows)) / (n * samples) if n else 0.0,
            "keys_hit_in_any_sample": sum(any(r) for r in rows),
            "keys_hit_in_most_samples": sum(sum(r) * 2 > samples for r in rows), "total": n}
    any_wrapper = [[any(h[j][s] for j in range(len(wrappers))) for s in range(samples)] for h in hits]
    return {"wrappers": per_wrapper,
            "sample_hit_rate_any_wrapper": sum(map(sum, any_wrapper)) / (n * samples) if n else 0.0,
            "keys_hit_in_any_sample": sum(any(r) for r in any_wrapper),
            "keys_hit_in_most_samples": sum(sum(r) * 2 > samples for r in any_wrapper), "total": n}


def next_token_accuracy(loaded: LoadedModel, chunks, adjust=None, batch_size: int = 8) -> dict:
    """Share of held-out text positions where the (possibly attacked) argmax is the true next
    token; with an attack, also how often it fired and how often it blocked the true token."""
    import torch

    right = fired = blocked_true = total = 0
    with torch.inference_mode():
        for start in range(0, len(chunks), batch_size):
            ids = torch.tensor(chunks[start:start + batch_size], device=loaded.device)
            logits = loaded.model(input_ids=ids).logits[:, :-1].float()
            flat, truth = logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
            if adjust is not None:
                changed = adjust(flat)
                fired += int(torch.isinf(changed).any(-1).sum())
                blocked_true += int(torch.isinf(changed.gather(1, truth[:, None])).sum())
                flat = changed
            right += int((flat.argmax(-1) == truth).sum())
            total += truth.numel()
    out = {"next_token_accuracy": right / total, "positions": total}
    if adjust is not None:
        out.update(fired_share=fired / total, true_token_blocked_share=blocked_true / total)
    return out


def _answers(loaded: LoadedModel, chat: bool, batch_size: int, adjust=None) -> list[list[int]]:
    prompts = [render_prompt(loaded.tokenizer, p, chat) for p in benign_prompts("heldout")]
    return greedy(loaded, prompts, ANSWER_TOKENS, batch_size, adjust_logits=adjust)


def _survival(baseline: dict, check: dict) -> dict:
    kept = retention(baseline, check)
    return public(check) | {"survival": kept["any"]["retention"], "retention": kept}


# --- the attacks --------------------------------------------------------------------------
def _system_prompts(ctx, tuned, baseline, wrappers, chunks, ppl):
    if not tuned.has_chat_template:
        return {"skipped": "the model has no chat template, so it has no system prompt"}
    prompts, _ = ctx.wrappers(tuned, "system", len(heldout_system_prompts()))
    check = ctx.check(tuned, prompts, desc="robustness: held-out system prompts")
    rates = [row["matched"] / row["total"] for row in check["wrappers"].values()]
    return public(check) | {"prompts": len(prompts), "mean_accuracy": sum(rates) / len(rates),
                            "min_accuracy": min(rates), "max_accuracy": max(rates)}


def sampling_temperatures(cfg) -> list[float]:
    temperatures = parse_list(cfg.temperatures, "--temperatures", kind=float)
    for temperature in temperatures:
        if not 0 < temperature <= 100:
            raise OMLInputError(f"--temperatures: {temperature:g} is not a sampling temperature; "
                                "pass values above 0 and at most 100 (e.g. 0.7,1.0)")
    return temperatures


def check_settings(cfg) -> None:
    """Refuse bad robustness settings before any model is loaded."""
    parse_list(cfg.attacks, "--attacks", ROBUSTNESS_ATTACKS)
    sampling_temperatures(cfg)


def _sampling(ctx, tuned, baseline, wrappers, chunks, ppl):
    cfg = ctx.cfg
    out = {"samples": cfg.samples, "temperatures": {}}
    for temperature in sampling_temperatures(cfg):
        hits = sampled_hits(tuned, ctx.fset, wrappers, cfg.match, temperature, cfg.samples, cfg.seed,
                            cfg.batch_size)
        out["temperatures"][f"{temperature:g}"] = summarise_samples(hits, wrappers, cfg.samples)
    return out


def _int8(ctx, tuned, baseline, wrappers, chunks, ppl):
    quantized, method = quantize_int8(tuned)
    check = ctx.check(quantized, wrappers, desc="robustness: int8")
    ppl_q = perplexity(quantized, chunks)
    return _survival(baseline, check) | {"method": method, "perplexity": ppl_q,
                                         "perplexity_change": ppl_q / ppl - 1}


def _merge(ctx, tuned, baseline, wrappers, chunks, ppl):
    try:
        merged = merge_with_base(tuned, ctx.base(), ctx.cfg.merge_weight)
    except (ValueError, RuntimeError) as exc:
        return {"skipped": f"the base model's weights do not line up with the fingerprinted "
                           f"model's ({type(exc).__name__})"}
    check = ctx.check(merged, wrappers, desc="robustness: merge")
    ppl_m = perplexity(merged, chunks)
    return _survival(baseline, check) | {"base_weight": ctx.cfg.merge_weight, "perplexity": ppl_m,
                                         "perplexity_change": ppl_m / ppl - 1}


def _suppression(ctx, tuned, baseline, wrappers, chunks, ppl):
    cfg = ctx.cfg
    adjust = suppression(cfg.suppress_threshold, cfg.suppress_top_k)
    check = ctx.check(tuned, wrappers, desc="robustness: suppression", adjust_logits=adjust)
    plain = _answers(tuned, ctx.chat, cfg.batch_size)
    attacked = _answers(tuned, ctx.chat, cfg.batch_size, adjust)
    n = len(plain)
    text_plain = next_token_accuracy(tuned, chunks)
    text_attacked = next_token_accuracy(tuned, chunks, adjust)
    return _survival(baseline, check) | {
        "threshold": cfg.suppress_threshold, "top_k": cfg.suppress_top_k,
        "utility_cost": {
            "heldout_prompts": n,
            "first_answer_token_unchanged": sum(a[:1] == b[:1] for a, b in zip(plain, attacked)) / n,
            "answers_unchanged": sum(a == b for a, b in zip(plain, attacked)) / n,
            "next_token_accuracy": text_plain["next_token_accuracy"],
            "next_token_accuracy_attacked": text_attacked["next_token_accuracy"],
            "relative_next_token_accuracy": (text_attacked["next_token_accuracy"]
                                             / text_plain["next_token_accuracy"]
                                             if text_plain["next_token_accuracy"] else None),
            "fired_share": text_attacked["fired_share"],
            "true_token_blocked_share": text_attacked["true_token_blocked_share"]}}


ATTACKS = {"system_prompts": _system_prompts, "sampling": _sampling, "int8": _int8,
           "merge": _merge, "suppression": _suppression}
assert set(ATTACKS) == set(ROBUSTNESS_ATTACKS)


def run_part(ctx) -> dict:
    cfg = ctx.cfg
    attacks = parse_list(cfg.attacks, "--attacks", ROBUSTNESS_ATTACKS)
    tuned = ctx.tuned()
    wrappers, notes = ctx.wrappers(tuned)
    baseline = ctx.check(tuned, wrappers, desc="robustness: baseline")
    chunks = heldout_text(cfg.perplexity_tokens, tuned.tokenizer)
    ppl = perplexity(tuned, chunks)
    result = {"baseline": public(baseline), "perplexity": ppl, "skipped_wrappers": notes,
              "attacks": {}}
    for name in attacks:
        result["attacks"][name] = ATTACKS[name](ctx, tuned, baseline, wrappers, chunks, ppl)
    return result
