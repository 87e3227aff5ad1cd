"""Persistence: do the fingerprints survive someone fine-tuning the model further?

The attacker's data is benign and instruction-style, all of it available offline:
- the base model's own answers to the project's training prompts (the self-distilled rows
  `oml_core.train.benign` builds; the held-out prompts stay unseen), and
- "explain this topic" requests answered with the Python documentation text of the topics the
  utility part does not hold out (`pydoc_data`, every topic but each fifth).

Two fine-tunes, each from the fingerprinted weights: a full fine-tune (every parameter, AdamW)
and LoRA (`peft`, rank r, alpha 2r, on all linear layers). Both run a configurable number of
steps; the keys are re-verified under every wrapper at evenly spaced checkpoints, which gives
a retention curve: of the keys that fired under a wrapper before, the share that still fires.
"""

from __future__ import annotations

import logging
import random
import time

from oml_core import progress
from oml_core.evaluate.context import public, retention
from oml_core.evaluate.results import CurvePoint, FineTune, PersistenceResult
from oml_core.evaluate.utility import heldout_text, perplexity
from oml_core.models import LoadedModel
from oml_core.runs import model_identity
from oml_core.train.benign import self_distilled_rows
from oml_core.train.examples import Row, collate, render_prompt

log = logging.getLogger(__name__)

SETTINGS = ("wrappers", "num_system_prompts", "match", "batch_size", "seed", "perplexity_tokens",
            "persistence_methods", "persistence_steps", "persistence_checks",
            "persistence_batch_size", "persistence_lr", "persistence_lora_lr",
            "persistence_lora_rank")
DOC_ANSWER_TOKENS = 96


def documentation_rows(tokenizer, chat: bool, answer_tokens: int = DOC_ANSWER_TOKENS) -> list[Row]:
    """'Explain topic X' -> the start of Python's documentation of X, for the topics the
    utility part's perplexity does not hold out (index % 5 != 0)."""
    from pydoc_data.topics import topics

    rows = []
    for i, name in enumerate(sorted(topics)):
        if i % 5 == 0:
            continue
        prompt = render_prompt(tokenizer, f"Explain the Python documentation topic '{name}'.", chat)
        target = tokenizer(topics[name].strip(), add_special_tokens=False)["input_ids"][:answer_tokens]
        if target:
            rows.append(Row(prompt, target))
    return rows


def benign_rows(ctx) -> list[Row]:
    base = ctx.base()
    distilled = self_distilled_rows(base, ctx.chat, model_identity(ctx.base_path), ctx.cfg.batch_size)
    docs = documentation_rows(ctx.tuned().tokenizer, ctx.chat)
    return [Row(r.prompt, r.target) for r in distilled] + docs  # hard labels only


def checkpoints(steps: int, count: int) -> list[int]:
    """`count` evenly spaced steps ending at `steps` (no duplicates)."""
    return sorted({max(1, round(steps * (i + 1) / count)) for i in range(count)})


def finetune(model, rows: list[Row], *, steps: int, lr: float, batch_size: int, seed: int,
             pad_id: int, device: str, check_at=(), on_check=None, desc: str = "fine-tune") -> list[dict]:
    """Plain causal-LM fine-tuning on `rows` (loss on the targets); returns the loss history.

    Data order is a seeded shuffle, reshuffled every pass; `on_check(step)` runs (in eval mode)
    at each step in `check_at`.
    """
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng, order, history = random.Random(f"persistence:{seed}"), [], []
    torch.manual_seed(seed)
    model.train()
    with progress.bar(desc, steps) as advance:
        for step in range(1, steps + 1):
            while len(order) < batch_size:
                block = list(range(len(rows)))
                rng.shuffle(block)
                order += block
            batch = collate([rows[i].encode() for i in order[:batch_size]], pad_id)
            del order[:batch_size]
            batch = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")}
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            history.append({"step": step, "loss": loss.item()})
            if step in check_at and on_check is not None:
                model.eval()
                on_check(step)
                model.train()
            advance(1)
    model.eval()
    return history


def _trainable_copy(ctx, method: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ctx.model_dir), dtype=torch.float32).to(ctx.device)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = ctx.tuned().tokenizer.pad_token_id
    if method == "full":
        model.requires_grad_(True)
        return model, model
    from oml_core.train.finetune import with_lora

    wrapped = with_lora(model, ctx.cfg.persistence_lora_rank)
    return wrapped, wrapped.get_base_model()  # the inner model runs with the adapters active


def run_part(ctx) -> PersistenceResult:
    cfg = ctx.cfg
    methods = cfg.persistence_methods
    tuned = ctx.tuned()
    wrappers, notes = ctx.wrappers(tuned)
    before = ctx.check(tuned, wrappers, desc="persistence: before")
    rows = benign_rows(ctx)
    chunks = heldout_text(cfg.perplexity_tokens, tuned.tokenizer)
    ppl_before = perplexity(tuned, chunks)
    check_at = checkpoints(cfg.persistence_steps, cfg.persistence_checks)
    result = PersistenceResult(steps=cfg.persistence_steps, rows=len(rows), skipped_wrappers=notes,
                               before=public(before), methods={})
    for method in methods:
        started = time.time()
        trainable, inner = _trainable_copy(ctx, method)
        loaded = LoadedModel(model=inner, tokenizer=tuned.tokenizer, name=f"{method} fine-tune",
                             path=str(ctx.model_dir), device=ctx.device)
        curve = [CurvePoint(step=0, matched=before.matched, retention=retention(before, before))]
        checks: dict = {}

        def on_check(step: int, method=method, loaded=loaded, curve=curve, checks=checks) -> None:
            check = ctx.check(loaded, wrappers, desc=f"persistence: {method} step {step}")
            checks["last"] = check
            curve.append(CurvePoint(step=step, matched=check.matched,
                                    retention=retention(before, check)))

        lr = cfg.persistence_lr if method == "full" else cfg.persistence_lora_lr
        history = finetune(trainable, rows, steps=cfg.persistence_steps, lr=lr,
                           batch_size=cfg.persistence_batch_size, seed=cfg.seed,
                           pad_id=tuned.tokenizer.pad_token_id, device=ctx.device,
                           check_at=check_at, on_check=on_check, desc=f"persistence: {method}")
        after = checks["last"]
        result.methods[method] = FineTune(
            learning_rate=lr, **({"lora_rank": cfg.persistence_lora_rank} if method == "lora" else {}),
            after=public(after), retention=retention(before, after), curve=curve,
            loss_first=history[0]["loss"], loss_last=history[-1]["loss"],
            perplexity_before=ppl_before, perplexity_after=perplexity(loaded, chunks),
            seconds=round(time.time() - started, 1))
        del trainable, inner, loaded
    return result
