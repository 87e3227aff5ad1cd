"""Experiment: write fingerprints in with a closed-form, locality-preserving edit instead of
fine-tuning, and measure whether the model stays the base model off the keys.

Why: fine-tuning moves weights that every prompt uses, and the first answer token of ordinary
prompts is fragile (docs/results.md). A least-squares edit can be told what to leave alone.
The method follows the idea of "mass-editing" language models (MEMIT): it is written here
from that description, for keys whose response is one token.

1. Contexts: each key under the bare chat template and under `--contexts` draws from the
   training augmentation (system prompts and user templates).
2. Target: per key, a vector delta added to the residual stream at the answer position (the
   last prompt token) after the last edited layer, optimised so that every context of that key
   answers with the response. Positions before the last do not depend on delta (causal
   attention), so each step runs one token per context against a cached prefix.
3. Edit: for each edited layer in turn, the MLP down-projection W gets
       dW = R^T K (lam * C + K^T K)^-1
   where K holds the down-projection inputs at the contexts' answer positions, R the part of
   the remaining residual change this layer takes on, and C the second moment of its inputs on
   ordinary text (every position of the base model's own answers and of Python's docs, training
   split) plus `--answer-weight` times the moment at ordinary prompts' answer positions, the
   place where the first answer token is decided. lam trades hitting the targets against
   changing outputs on ordinary inputs; several values are tried from one set of targets.
4. Each edit gets a quick check (training contexts answered, first answer token on the
   held-out ordinary prompts) and, when it answers 80% of the training contexts and keeps
   `--eval-min-first-token` of first tokens, the full check run after fingerprinting
   (`evaluate_run`: verification with held-out wrappers, base as null, off-key behaviour).

    .venv/bin/python benchmarks/closed_form_edit.py --fingerprints runs/demo/fingerprints.json \\
        --out /tmp/edit [--layers 4,5,6,7,8] [--lams 1e3,1e4,1e5]

Llama-style models (model.model.layers[i].mlp.down_proj) and one-token responses only.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from oml_core.config import FingerprintConfig
from oml_core.evaluate.after_training import evaluate_run
from oml_core.evaluate.utility import first_token_distributions
from oml_core.fingerprints import load_fingerprints
from oml_core.models import load_model, resolve_model
from oml_core.runs import model_identity
from oml_core.train.benign import benign_prompts, self_distilled_rows
from oml_core.train.examples import render_prompt, training_augmentation


class _Stop(Exception):
    """Raised by a hook once the layers that matter have run."""


def key_contexts(tokenizer, fset, per_key: int):
    """Rendered prompts (bare chat + wrapped draws), the key index and target id of each."""
    systems, templates = training_augmentation()
    rows, owner, targets = [], [], []
    for i, fp in enumerate(fset.fingerprints):
        response = tokenizer(fp.response, add_special_tokens=False)["input_ids"]
        if len(response) != 1:
            sys.exit("this experiment handles one-token responses only; generate with "
                     "--response-length 1")
        rng = random.Random(f"edit:{i}")
        rows.append(render_prompt(tokenizer, fp.key, True))
        rows += [render_prompt(tokenizer, fp.key, True, rng.choice(systems), rng.choice(templates))
                 for _ in range(per_key)]
        owner += [i] * (per_key + 1)
        targets += [response[0]] * (per_key + 1)
    return rows, owner, targets


def _run_up_to(model, seqs, layers, upto, on_input, on_residual=None) -> None:
    """Run each sequence through layer `upto` only, calling on_input(layer, x) with each edit
    layer's down-projection input and on_residual(h) with the residual stream after `upto`."""
    blocks = model.model.layers

    def see_input(layer):
        def hook(module, args):  # returns None: a pre-hook's return value replaces the input
            on_input(layer, args[0][0])
        return hook

    def stop(module, args, out):
        if on_residual is not None:
            on_residual((out[0] if isinstance(out, tuple) else out)[0])
        raise _Stop

    hooks = [blocks[layer].mlp.down_proj.register_forward_pre_hook(see_input(layer)) for layer in layers]
    hooks.append(blocks[upto].register_forward_hook(stop))
    try:
        with torch.no_grad():
            for seq in seqs:
                try:
                    model(input_ids=torch.tensor([seq]))
                except _Stop:
                    pass
    finally:
        for hook in hooks:
            hook.remove()


def answer_position_states(model, rows, layers, upto):
    """Per row, at its last position: each edit layer's down-projection input, and the residual
    stream after layer `upto`."""
    inputs = {layer: [] for layer in layers}
    residual = []
    _run_up_to(model, rows, layers, upto, lambda layer, x: inputs[layer].append(x[-1].clone()),
               lambda h: residual.append(h[-1].clone()))
    return {layer: torch.stack(v) for layer, v in inputs.items()}, torch.stack(residual)


def ordinary_sequences(loaded, base_path: str, max_tokens: int) -> list[list[int]]:
    """The base model's own answers to the training benign prompts (prompt + answer) and the
    training split of Python's docs, shuffled, up to `max_tokens`."""
    from pydoc_data.topics import topics

    tokenizer = loaded.tokenizer
    seqs = [row.prompt + row.target for row in self_distilled_rows(loaded, True, model_identity(base_path))]
    names = sorted(topics)
    text = "\n\n".join(topics[name] for i, name in enumerate(names) if i % 5 != 0)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    seqs += [ids[i:i + 256] for i in range(0, len(ids) - 256, 256)]
    random.Random(0).shuffle(seqs)
    kept, total = [], 0
    for seq in seqs:
        if total >= max_tokens:
            break
        kept.append(seq)
        total += len(seq)
    return kept


def second_moments(model, seqs, layers, upto) -> dict:
    """E[x x^T] of each edit layer's down-projection input over every position of `seqs`."""
    width = model.model.layers[layers[0]].mlp.down_proj.in_features
    sums = {layer: torch.zeros(width, width, dtype=torch.float64) for layer in layers}

    def accumulate(layer, x):
        x = x.double()
        sums[layer].add_(x.T @ x)

    _run_up_to(model, seqs, layers, upto, accumulate)
    count = sum(len(seq) for seq in seqs)
    return {layer: (total / count).float() for layer, total in sums.items()}


def target_deltas(model, rows, owner, targets, last: int, steps: int, lr: float, decay: float,
                  start_residual):
    """One vector per key, added after layer `last` at the answer position, that makes every
    context of the key answer with its target. Returns the best one seen (most contexts
    answered, then lowest loss)."""
    from transformers import DynamicCache

    blocks = model.model.layers
    caches, lengths = [], []
    with torch.no_grad():  # everything before the answer position is fixed
        for row in rows:
            cache = DynamicCache()
            model(input_ids=torch.tensor([row[:-1]]), past_key_values=cache, use_cache=True)
            caches.append(cache)
            lengths.append(len(row) - 1)
    scale = start_residual.norm(dim=1).mean()
    delta = torch.zeros(max(owner) + 1, start_residual.shape[1], requires_grad=True)
    optimiser = torch.optim.Adam([delta], lr=lr * float(scale) / start_residual.shape[1] ** 0.5)
    current = {}

    def add_delta(module, args, out):
        hidden = (out[0] if isinstance(out, tuple) else out).clone()
        hidden[0, -1] = hidden[0, -1] + delta[current["key"]]
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    best = (-1, float("inf"), None)
    hook = blocks[last].register_forward_hook(add_delta)
    try:
        for step in range(steps):
            optimiser.zero_grad()
            total, hits = 0.0, 0
            for j, row in enumerate(rows):
                current["key"] = owner[j]
                logits = model(input_ids=torch.tensor([[row[-1]]]), past_key_values=caches[j],
                               use_cache=True, position_ids=torch.tensor([[lengths[j]]])).logits[0, -1]
                caches[j].crop(-1)  # the answer position comes off the cache again, and the
                for layer in caches[j].layers:  # kept prefix must not stay tied to this graph
                    layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
                loss = torch.nn.functional.cross_entropy(logits[None], torch.tensor([targets[j]]))
                (loss / len(rows)).backward()
                total += float(loss.detach())
                hits += int(logits.argmax() == targets[j])
            if (hits, -total) > (best[0], -best[1]):
                best = (hits, total, delta.detach().clone())
            print(f"target step {step}: mean loss {total / len(rows):.3f}, "
                  f"{hits}/{len(rows)} contexts answered, |delta|/|h| "
                  f"{float(delta.norm(dim=1).mean() / scale):.2f}", flush=True)
            if hits == len(rows) and total / len(rows) < 0.1:
                break
            (decay * (delta.norm(dim=1) ** 2).sum() / scale ** 2).backward()
            optimiser.step()
    finally:
        hook.remove()
    return best[2], best[0]


def apply_edit(model, rows, layers, last, goal, moments, lam: float) -> None:
    """Spread the residual change `goal - current` over the layers' down-projections."""
    blocks = model.model.layers
    for index, layer in enumerate(layers):
        keys, now = answer_position_states(model, rows, layers, last)
        k = keys[layer]                                       # contexts x d_in
        share = (goal - now) / (len(layers) - index)          # contexts x d_model
        change = torch.linalg.solve(lam * moments[layer] + k.T @ k, k.T @ share).T
        with torch.no_grad():
            blocks[layer].mlp.down_proj.weight += change


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fingerprints", required=True)
    parser.add_argument("--out", required=True, help="folder for edited models and summary.json")
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--layers", default="4,5,6,7,8", help="layers whose MLP is edited")
    parser.add_argument("--contexts", type=int, default=8, help="wrapped contexts per key, besides bare chat")
    parser.add_argument("--lams", default="1e3,1e4,1e5", help="strengths of the ordinary-text term to try")
    parser.add_argument("--answer-weight", type=float, default=2.0,
                        help="weight of ordinary prompts' answer positions in the second moment")
    parser.add_argument("--target-steps", type=int, default=40)
    parser.add_argument("--target-lr", type=float, default=0.1, help="Adam step, as a fraction of |h|")
    parser.add_argument("--target-decay", type=float, default=0.5)
    parser.add_argument("--stat-tokens", type=int, default=60000)
    parser.add_argument("--no-eval", action="store_true", help="quick checks only")
    parser.add_argument("--eval-min-first-token", type=float, default=0.8,
                        help="full check only for edits whose quick first-token agreement reaches this")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.time()

    base_path = resolve_model(args.model)
    loaded = load_model(base_path, "cpu", "float32")
    model, tokenizer = loaded.model, loaded.tokenizer
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    layers = sorted(int(x) for x in args.layers.split(","))
    last = layers[-1]
    fset = load_fingerprints(args.fingerprints)
    rows, owner, targets = key_contexts(tokenizer, fset, args.contexts)

    moments = second_moments(model, ordinary_sequences(loaded, base_path, args.stat_tokens), layers, last)
    answers, _ = answer_position_states(model, [render_prompt(tokenizer, q, True)
                                                for q in benign_prompts("train")], layers, last)
    for layer in layers:
        moments[layer] += args.answer_weight * answers[layer].T @ answers[layer] / answers[layer].shape[0]
    print(f"second moments done ({time.time() - started:.0f} s)", flush=True)

    _, start_residual = answer_position_states(model, rows, layers, last)
    delta, delta_hits = target_deltas(model, rows, owner, targets, last, args.target_steps,
                                      args.target_lr, args.target_decay, start_residual)
    goal = start_residual + delta[owner]
    print(f"targets: {delta_hits}/{len(rows)} contexts answered ({time.time() - started:.0f} s)", flush=True)

    original = {layer: model.model.layers[layer].mlp.down_proj.weight.detach().clone() for layer in layers}
    base_first = first_token_distributions(loaded, True, 32).argmax(-1)
    results = []
    for lam in (float(x) for x in args.lams.split(",")):
        with torch.no_grad():
            for layer in layers:
                model.model.layers[layer].mlp.down_proj.weight.copy_(original[layer])
        apply_edit(model, rows, layers, last, goal, moments, lam)
        with torch.no_grad():  # whole forwards, as verification runs them
            answered = sum(int(model(input_ids=torch.tensor([r])).logits[0, -1].argmax() == t)
                           for r, t in zip(rows, targets))
        same_first = (first_token_distributions(loaded, True, 32).argmax(-1) == base_first).float().mean()
        result = {"lam": lam, "training_contexts_answered": answered, "training_contexts": len(rows),
                  "first_token_quick": round(float(same_first), 4),
                  "relative_weight_change": {layer: round(float(
                      (model.model.layers[layer].mlp.down_proj.weight - original[layer]).norm()
                      / original[layer].norm()), 4) for layer in layers}}
        print(json.dumps(result), flush=True)
        if not args.no_eval and answered >= 0.8 * len(rows) and same_first >= args.eval_min_first_token:
            folder = Path(args.out) / f"lam{lam:g}" / "model"
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            check = evaluate_run(str(folder), base_path, fset, FingerprintConfig(model=base_path))
            verification, utility = check["verification"], check["utility"]
            result |= {"matched": verification["matched"], "total": verification["total"],
                       "p_value": verification["p_value"],
                       "wrappers": {k: v["matched"] for k, v in verification["wrappers"].items()},
                       "base_verdict": check["base_verification"].get("verdict"),
                       "first_token_agreement": utility["first_token_agreement"],
                       "first_token_agreement_where_base_is_confident":
                           utility["first_token_agreement_where_base_is_confident"],
                       "perplexity_change": utility["perplexity_change"],
                       "answers_starting_with_a_fingerprint_response":
                           utility["answers_starting_with_a_fingerprint_response"],
                       "near_miss_fired": {k: v["fired"] for k, v in utility["near_miss_keys"].items()}}
            print(json.dumps(result), flush=True)
        results.append(result)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "summary.json").write_text(json.dumps(
        {"args": vars(args), "target_contexts_answered": delta_hits, "results": results,
         "seconds": round(time.time() - started)}, indent=2))
    print(f"wrote {Path(args.out) / 'summary.json'} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    main()
