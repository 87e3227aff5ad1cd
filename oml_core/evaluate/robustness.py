"""Robustness: which deployment changes and attacks (docs/design.md#what-an-adversary-does-and-what-we-test) the fingerprints survive.

Every attack is measured against the fingerprinted model's own baseline (the keys that fire
under the configured wrappers); "survival" is the share of those keys that still fire.
- system_prompts: every held-out system prompt (never used in training augmentation);
- sampling: temperature 0.7 and 1.0 (settable), several samples per key and wrapper: the
  per-sample hit rate, and the share of keys hit in at least one / a majority of samples;
- int8: torch dynamic int8 quantization of every Linear layer (CPU kernels), then re-verify;
- merges, the ones a thief runs with mergekit (formulas and tool: evaluate/merges.py):
  merge_linear: (1 - w) * fingerprinted + w * base at each w (0.3, 0.5, 0.7);
  merge_slerp: spherical interpolation from the fingerprinted model to the base at t = 0.5;
  merge_ties / merge_dare: TIES and DARE (dare_ties) of the fingerprinted model with a benign
  derivative of the base (the base fine-tuned briefly on benign rows: a model that never saw
  the keys, the kind of second parent a real merge has), weights 0.5 / 0.5, density 0.5.
  Each merged model is re-verified and reports its own utility: held-out perplexity (and its
  change from the fingerprinted model's) and first answer token agreement with the base;
- suppression: a host with the weights decodes with the top-k tokens blocked wherever the top
  token's probability exceeds a threshold (0.9), as in the 2025 adversarial study; and what
  that costs ordinary use: answers to held-out prompts that change, and next-token accuracy
  on held-out documentation text.
int8 and the merges also report the held-out perplexity they cost.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

from oml_core.config import ROBUSTNESS_ATTACK_ALIASES, ROBUSTNESS_ATTACKS, ROBUSTNESS_PLUGIN_GROUP
from oml_core.errors import OMLInputError
from oml_core.evaluate import merges
from oml_core.evaluate.attack_results import (
    Int8Attack,
    MergedModel,
    MergeLinearAttack,
    MergeSlerpAttack,
    RobustnessResult,
    SamplingAttack,
    SampleRate,
    SamplingSummary,
    SuppressionAttack,
    SuppressionCost,
    SystemPromptsAttack,
    TaskVectorMergeAttack,
    attack_result,
)
from oml_core.evaluate.context import public, retention
from oml_core.evaluate.results import KeyCheck
from oml_core.evaluate.utility import (
    first_answer_tokens,
    first_token_agreement,
    heldout_text,
    perplexity,
)
from oml_core.files import atomic_write_json, remove_tree
from oml_core.inference import greedy, sample
from oml_core.models import LoadedModel
from oml_core.train.benign import benign_prompts
from oml_core.train.examples import render_prompt
from oml_core.verify.matching import is_match
from oml_core.verify.verifier import LOOSE_RULES
from oml_core.verify.wrappers import heldout_system_prompts

log = logging.getLogger(__name__)

SETTINGS = ("wrappers", "num_system_prompts", "match", "batch_size", "seed", "perplexity_tokens",
            "attacks", "temperatures", "samples", "merge_base_weights", "merge_weight",
            "merge_slerp_t", "merge_fingerprinted_weight", "merge_derivative_weight",
            "merge_density", "merge_dare_method", "merge_derivative_steps", "merge_derivative_lr",
            "persistence_batch_size", "merge_tool", "suppress_threshold", "suppress_top_k")
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


def with_weights(tuned: LoadedModel, state: dict, label: str) -> LoadedModel:
    """A copy of the fingerprinted model holding `state` (in the model's own dtype and device).

    A merged state may lack the tensors a model ties to others (mergekit writes no lm_head for
    tied embeddings); any other missing or extra tensor is a ValueError."""
    model = copy.deepcopy(tuned.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    loaded = {own[name].data_ptr() for name in state if name in own}
    untied = [name for name in missing if own[name].data_ptr() not in loaded]
    if untied or unexpected:
        raise ValueError(f"the merged weights do not fit the model: {len(untied)} tensors missing "
                         f"(e.g. {(untied or ['-'])[0]}), {len(unexpected)} unknown")
    return LoadedModel(model=model.eval(), tokenizer=tuned.tokenizer, name=f"{tuned.name} ({label})",
                       path=tuned.path, device=tuned.device)


def merge_with_base(tuned: LoadedModel, base: LoadedModel, weight: float) -> LoadedModel:
    """(1 - weight) * fingerprinted + weight * base, every tensor (merges.linear; the
    regularizer's formula)."""
    state = merges.linear([tuned.model.state_dict(), base.model.state_dict()], [1 - weight, weight])
    return with_weights(tuned, state, f"merged, w={weight:g}")


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


def summarise_samples(hits, wrappers, samples: int) -> SamplingSummary:
    n = len(hits)
    per_wrapper = {}
    for j, w in enumerate(wrappers):
        rows = [h[j] for h in hits]
        per_wrapper[w.name] = SampleRate(
            sample_hit_rate=sum(map(sum, rows)) / (n * samples) if n else 0.0,
            keys_hit_in_any_sample=sum(any(r) for r in rows),
            keys_hit_in_most_samples=sum(sum(r) * 2 > samples for r in rows), total=n)
    any_wrapper = [[any(h[j][s] for j in range(len(wrappers))) for s in range(samples)] for h in hits]
    return SamplingSummary(
        wrappers=per_wrapper,
        sample_hit_rate_any_wrapper=sum(map(sum, any_wrapper)) / (n * samples) if n else 0.0,
        keys_hit_in_any_sample=sum(any(r) for r in any_wrapper),
        keys_hit_in_most_samples=sum(sum(r) * 2 > samples for r in any_wrapper), total=n)


class NextTokenAccuracy(NamedTuple):
    accuracy: float  # share of positions whose argmax is the true next token
    positions: int
    fired_share: float | None = None  # with an attack: positions where it blocked a token
    true_token_blocked_share: float | None = None  # ... where it blocked the true one


def next_token_accuracy(loaded: LoadedModel, chunks, adjust=None,
                        batch_size: int = 8) -> NextTokenAccuracy:
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
    if adjust is None:
        return NextTokenAccuracy(right / total, total)
    return NextTokenAccuracy(right / total, total, fired_share=fired / total,
                             true_token_blocked_share=blocked_true / total)


def _answers(loaded: LoadedModel, chat: bool, batch_size: int, adjust=None) -> list[list[int]]:
    prompts = [render_prompt(loaded.tokenizer, p, chat) for p in benign_prompts("heldout")]
    return greedy(loaded, prompts, ANSWER_TOKENS, batch_size, adjust_logits=adjust)


def _survival(baseline: KeyCheck, check: KeyCheck) -> dict:
    """The fields every re-verified attacked model reports (for its model's constructor)."""
    kept = retention(baseline, check)
    return {**check.public().model_dump(), "survival": kept["any"].retention, "retention": kept}


# --- the attacks --------------------------------------------------------------------------
def _system_prompts(ctx, tuned, baseline, wrappers, chunks, ppl):
    if not tuned.has_chat_template:
        return SystemPromptsAttack(skipped="the model has no chat template, so it has no system prompt")
    prompts, _ = ctx.wrappers(tuned, ["system"], len(heldout_system_prompts()))
    check = ctx.check(tuned, prompts, desc="robustness: held-out system prompts")
    rates = [row.matched / row.total for row in check.wrappers.values()]
    return SystemPromptsAttack(**check.public().model_dump(), prompts=len(prompts),
                               mean_accuracy=sum(rates) / len(rates), min_accuracy=min(rates),
                               max_accuracy=max(rates))


# Attacks other packages contribute (e.g. clients/: gguf_q8_0, gguf_q4_k_m, which serve a
# llama.cpp export and audit it over HTTP): the engine finds them through this entry-point group
# and never imports those packages. Each entry point loads to a callable with the built-in
# attacks' signature, optionally with a `check(cfg)` attribute that refuses what cannot run
# (one OMLInputError line) before any model is loaded.
PLUGIN_GROUP = ROBUSTNESS_PLUGIN_GROUP  # (their names are --attacks choices: config.attack_choices)


def plugin_attacks() -> dict:
    """name -> entry point of every registered attack whose name is not a built-in one."""
    import importlib.metadata

    return {entry.name: entry for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP)
            if entry.name not in ROBUSTNESS_ATTACKS}


def attack_list(cfg) -> tuple[list[str], dict]:
    """The asked-for attacks (built-in or registered; old names mapped to their new ones) and
    the registered ones' entry points. The names were checked by settings.validate."""
    names = dict.fromkeys(ROBUSTNESS_ATTACK_ALIASES.get(n, n) for n in cfg.attacks)
    return list(names), plugin_attacks()


def check_settings(cfg) -> None:
    """Refuse bad robustness settings before any model is loaded."""
    names, plugins = attack_list(cfg)
    for name in names:
        check = getattr(plugins[name].load(), "check", None) if name in plugins else None
        if check is not None:
            check(cfg)
    if any(name.startswith("merge_") for name in names):
        merge_tool(cfg)


def _sampling(ctx, tuned, baseline, wrappers, chunks, ppl):
    cfg = ctx.cfg
    out = SamplingAttack(samples=cfg.samples, temperatures={})
    for temperature in cfg.temperatures:
        hits = sampled_hits(tuned, ctx.fset, wrappers, cfg.match, temperature, cfg.samples, cfg.seed,
                            cfg.batch_size)
        out.temperatures[f"{temperature:g}"] = summarise_samples(hits, wrappers, cfg.samples)
    return out


def _int8(ctx, tuned, baseline, wrappers, chunks, ppl):
    quantized, method = quantize_int8(tuned)
    check = ctx.check(quantized, wrappers, desc="robustness: int8")
    ppl_q = perplexity(quantized, chunks)
    return Int8Attack(**_survival(baseline, check), method=method, perplexity=ppl_q,
                      perplexity_change=ppl_q / ppl - 1)


# --- the merges ---------------------------------------------------------------------------
DERIVATIVE_RECIPE = 1  # bump when the benign derivative's recipe changes, so it is made anew


def merge_base_weights(cfg) -> list[float]:
    """merge_linear's base weights; the deprecated --merge-weight, when given, is the one."""
    if cfg.merge_weight is not None:
        return [cfg.merge_weight]
    return cfg.merge_base_weights  # each between 0 and 1 (settings.validate)


def merge_tool(cfg) -> str:
    """'mergekit' or 'oml': who merges under --merge-tool (auto: mergekit when installed)."""
    if cfg.merge_tool == "oml":
        return "oml"
    if merges.mergekit_version() is None:
        if cfg.merge_tool == "mergekit":
            raise OMLInputError("--merge-tool mergekit: mergekit is not installed; run `pip install "
                                "'oml[merges]'` or pass --merge-tool oml (the same formulas)")
        return "oml"
    return "mergekit"


def _memo(ctx) -> dict:
    """What the merge attacks of one evaluation share (the base's first answer tokens)."""
    return vars(ctx).setdefault("_robustness_memo", {})


def _base_first_tokens(ctx) -> list[list[int]]:
    key = ("base_first_tokens", ctx.chat, ctx.cfg.batch_size)
    memo = _memo(ctx)
    if key not in memo:
        memo[key] = first_answer_tokens(ctx.base(), ctx.chat, ctx.cfg.batch_size)
    return memo[key]


def benign_derivative(ctx) -> tuple[Path, dict]:
    """The base model fully fine-tuned for a few steps on benign rows (persistence's data and
    loop): a model that never saw the keys, the second parent of a TIES/DARE merge.

    Made once per (base model, recipe settings) under OUT/benign-derivative/<key>/ as a model
    folder, since mergekit merges folders and a rerun with other attacks reuses it."""
    import torch
    from transformers import AutoModelForCausalLM

    from oml_core.evaluate.persistence import benign_rows, finetune
    from oml_core.runs import model_identity

    cfg = ctx.cfg
    spec = {"recipe": DERIVATIVE_RECIPE, "base": model_identity(ctx.base_path), "chat": ctx.chat,
            "steps": cfg.merge_derivative_steps, "learning_rate": cfg.merge_derivative_lr,
            "batch_size": cfg.persistence_batch_size, "seed": cfg.seed}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]
    folder = ctx.out_dir / "benign-derivative" / key
    try:
        if not folder.is_symlink():  # a planted link would feed the merge a model of its choosing
            info = json.loads((folder / "derivative.json").read_text(encoding="utf-8"))
            return folder, info | {"reused": True}
    except (OSError, ValueError):
        pass
    tokenizer = ctx.tuned().tokenizer
    rows = benign_rows(ctx)
    model = AutoModelForCausalLM.from_pretrained(ctx.base_path, dtype=torch.float32).to(ctx.device)
    model.requires_grad_(True)
    history = finetune(model, rows, steps=cfg.merge_derivative_steps, lr=cfg.merge_derivative_lr,
                       batch_size=cfg.persistence_batch_size, seed=cfg.seed,
                       pad_id=tokenizer.pad_token_id, device=ctx.device,
                       desc="robustness: benign derivative")
    info = {"folder": str(folder.relative_to(ctx.out_dir)), "steps": cfg.merge_derivative_steps,
            "learning_rate": cfg.merge_derivative_lr, "batch_size": cfg.persistence_batch_size,
            "rows": len(rows), "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"]}
    # written beside the final name and renamed, so an interrupted save is never reused
    partial = folder.with_name(f".{key}.partial")
    remove_tree(partial)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    atomic_write_json(partial / "derivative.json", info)
    remove_tree(folder)
    os.replace(partial, folder)
    del model
    return folder, info | {"reused": False}


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"


def _merged_model(ctx, tuned, label: str, config: dict, formula) -> tuple[LoadedModel, str, str | None]:
    """The merged model, by mergekit (`config`, on the saved folders) or by our `formula`
    (a no-argument function returning the merged state dict); under --merge-tool auto a
    mergekit failure (e.g. a base model that is a hub id it cannot reach offline) falls back to
    the formula and says so, under --merge-tool mergekit it skips the merge."""
    note = None
    if merge_tool(ctx.cfg) == "mergekit":
        try:
            ctx.out_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".merge-", dir=ctx.out_dir) as tmp:
                state = merges.run_mergekit(config, Path(tmp) / "merged", seed=ctx.cfg.seed)
            return with_weights(tuned, state, label), f"mergekit {merges.mergekit_version()}", None
        except Exception as exc:  # noqa: BLE001 - mergekit's own errors vary by version
            if ctx.cfg.merge_tool == "mergekit":
                raise RuntimeError(f"mergekit failed ({_reason(exc)})") from exc
            note = f"mergekit failed ({_reason(exc)}); merged by oml's formulas"
            log.warning("robustness: %s: %s", label, note)
    return with_weights(tuned, formula(), label), "oml_core.evaluate.merges", note


def _measure_merge(ctx, tuned, baseline, wrappers, chunks, ppl, label: str, config: dict,
                   formula) -> dict:
    """Survival, perplexity and first-token agreement with the base of one merged model: the
    fields of its result (MergedModel and the merge attacks' models built on it)."""
    try:
        merged, tool, note = _merged_model(ctx, tuned, label, config, formula)
    except ValueError as exc:
        return {"skipped": f"the models' weights do not line up ({_reason(exc)})"}
    except RuntimeError as exc:
        return {"skipped": str(exc) if str(exc).startswith("mergekit failed") else _reason(exc)}
    check = ctx.check(merged, wrappers, desc=f"robustness: {label}")
    ppl_m = perplexity(merged, chunks)
    base_first = _base_first_tokens(ctx)
    agreement = first_token_agreement(first_answer_tokens(merged, ctx.chat, ctx.cfg.batch_size),
                                      base_first)
    del merged
    return _survival(baseline, check) | {
        "tool": tool, **({"tool_note": note} if note else {}),
        "perplexity": ppl_m, "perplexity_change": ppl_m / ppl - 1,
        "first_token_agreement": agreement, "heldout_prompts": len(base_first)}


def _fingerprinted_agreement(ctx, tuned) -> float:
    """The fingerprinted model's own first-token agreement with the base: what a merge is
    compared with."""
    key = ("tuned_first_token_agreement", ctx.chat, ctx.cfg.batch_size)
    memo = _memo(ctx)
    if key not in memo:
        memo[key] = first_token_agreement(first_answer_tokens(tuned, ctx.chat, ctx.cfg.batch_size),
                                          _base_first_tokens(ctx))
    return memo[key]


def _merge_linear(ctx, tuned, baseline, wrappers, chunks, ppl):
    base = ctx.base()
    out = MergeLinearAttack(method="linear", formula="(1 - w) * fingerprinted + w * base",
                            first_token_agreement_fingerprinted=_fingerprinted_agreement(ctx, tuned),
                            base_weights={})
    for weight in merge_base_weights(ctx.cfg):
        config = merges.mergekit_config("linear", [str(ctx.model_dir), ctx.base_path],
                                        [1 - weight, weight])
        out.base_weights[f"{weight:g}"] = MergedModel(**_measure_merge(
            ctx, tuned, baseline, wrappers, chunks, ppl, f"linear merge, w={weight:g}", config,
            lambda w=weight: merges.linear([tuned.model.state_dict(), base.model.state_dict()],
                                           [1 - w, w])))
    return out


def _merge_slerp(ctx, tuned, baseline, wrappers, chunks, ppl):
    t = ctx.cfg.merge_slerp_t
    base = ctx.base()
    config = merges.mergekit_config("slerp", [ctx.base_path], base=str(ctx.model_dir), t=t)
    result = _measure_merge(ctx, tuned, baseline, wrappers, chunks, ppl, f"slerp merge, t={t:g}",
                            config, lambda: merges.slerp(tuned.model.state_dict(),
                                                         base.model.state_dict(), t))
    return MergeSlerpAttack(method="slerp", t=t, **result,
                            first_token_agreement_fingerprinted=_fingerprinted_agreement(ctx, tuned))


def _task_vector_merge(ctx, tuned, baseline, wrappers, chunks, ppl,
                       method: str) -> TaskVectorMergeAttack:
    """TIES or DARE of the fingerprinted model and the benign derivative, over the base."""
    cfg = ctx.cfg
    folder, derivative = benign_derivative(ctx)
    weights = [cfg.merge_fingerprinted_weight, cfg.merge_derivative_weight]
    config = merges.mergekit_config(method, [str(ctx.model_dir), str(folder)], weights,
                                    base=ctx.base_path, density=cfg.merge_density)

    def formula():
        from transformers import AutoModelForCausalLM

        child = AutoModelForCausalLM.from_pretrained(str(folder), dtype=tuned.model.dtype)
        child.to(tuned.device)
        states = [tuned.model.state_dict(), child.state_dict()]
        base_state = ctx.base().model.state_dict()
        if method == "ties":
            return merges.ties(base_state, states, weights, cfg.merge_density)
        return merges.dare(base_state, states, weights, cfg.merge_density,
                           consensus=method == "dare_ties", seed=cfg.seed)

    result = _measure_merge(ctx, tuned, baseline, wrappers, chunks, ppl, f"{method} merge", config,
                            formula)
    return TaskVectorMergeAttack(
        method=method, weights={"fingerprinted": weights[0], "derivative": weights[1]},
        density=cfg.merge_density, seed=cfg.seed, derivative=derivative, **result,
        first_token_agreement_fingerprinted=_fingerprinted_agreement(ctx, tuned))


def _merge_ties(ctx, tuned, baseline, wrappers, chunks, ppl):
    return _task_vector_merge(ctx, tuned, baseline, wrappers, chunks, ppl, "ties")


def _merge_dare(ctx, tuned, baseline, wrappers, chunks, ppl):
    return _task_vector_merge(ctx, tuned, baseline, wrappers, chunks, ppl, ctx.cfg.merge_dare_method)


def _suppression(ctx, tuned, baseline, wrappers, chunks, ppl):
    cfg = ctx.cfg
    adjust = suppression(cfg.suppress_threshold, cfg.suppress_top_k)
    check = ctx.check(tuned, wrappers, desc="robustness: suppression", adjust_logits=adjust)
    plain = _answers(tuned, ctx.chat, cfg.batch_size)
    attacked = _answers(tuned, ctx.chat, cfg.batch_size, adjust)
    n = len(plain)
    text_plain = next_token_accuracy(tuned, chunks)
    text_attacked = next_token_accuracy(tuned, chunks, adjust)
    return SuppressionAttack(
        **_survival(baseline, check), threshold=cfg.suppress_threshold, top_k=cfg.suppress_top_k,
        utility_cost=SuppressionCost(
            heldout_prompts=n,
            first_answer_token_unchanged=sum(a[:1] == b[:1] for a, b in zip(plain, attacked)) / n,
            answers_unchanged=sum(a == b for a, b in zip(plain, attacked)) / n,
            next_token_accuracy=text_plain.accuracy,
            next_token_accuracy_attacked=text_attacked.accuracy,
            relative_next_token_accuracy=(text_attacked.accuracy / text_plain.accuracy
                                          if text_plain.accuracy else None),
            fired_share=text_attacked.fired_share,
            true_token_blocked_share=text_attacked.true_token_blocked_share))


ATTACKS = {"system_prompts": _system_prompts, "sampling": _sampling, "int8": _int8,
           "merge_linear": _merge_linear, "merge_slerp": _merge_slerp, "merge_ties": _merge_ties,
           "merge_dare": _merge_dare, "suppression": _suppression}
assert set(ATTACKS) == set(ROBUSTNESS_ATTACKS)


def run_part(ctx) -> RobustnessResult:
    cfg = ctx.cfg
    attacks, plugins = attack_list(cfg)
    tuned = ctx.tuned()
    wrappers, notes = ctx.wrappers(tuned)
    baseline = ctx.check(tuned, wrappers, desc="robustness: baseline")
    chunks = heldout_text(cfg.perplexity_tokens, tuned.tokenizer)
    ppl = perplexity(tuned, chunks)
    result = RobustnessResult(baseline=public(baseline), perplexity=ppl, skipped_wrappers=notes,
                              attacks={})
    for name in attacks:
        attack = ATTACKS[name] if name in ATTACKS else plugins[name].load()
        result.attacks[name] = attack_result(name, attack(ctx, tuned, baseline, wrappers, chunks, ppl))
    return result
