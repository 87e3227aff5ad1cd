"""Training step: logits at labelled positions only (ours) vs at every position (the default).

`oml fingerprint` asks the model for logits only where a token is labelled (`logits_to_keep`
with a [batch, length] mask; `oml_core.train.finetune.answer_loss`). The default way projects
every position onto the vocabulary and upcasts all of it for the loss. Same model, same
batches (the demo's kind of rows: 16-token keys with 1-token responses under augmented
wrappers, and self-distilled benign answers, half and half, batches of 16 grouped by length),
forward + backward + loss in both arms, alternated batch by batch; the losses and gradients
must agree (checked on every batch).

    .venv/bin/python benchmarks/train_step_logits.py [--batches 12] [--model M]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

from oml_core.generate.words import word_list
from oml_core.models import load_model, resolve_model
from oml_core.runs import model_identity
from oml_core.train.benign import self_distilled_rows
from oml_core.train.examples import FingerprintRows, collate
from oml_core.train.finetune import answer_loss, answer_positions

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for:
from benchmarks.harness import timed, write_result  # noqa: E402


def batches(loaded, count: int, batch_size: int) -> list[dict]:
    rng, words = random.Random(0), word_list()
    pairs = [(" ".join(rng.choices(words, k=16)), " " + rng.choice(words)) for _ in range(64)]
    benign = self_distilled_rows(loaded, True, model_identity(loaded.path))
    rows = FingerprintRows(loaded.tokenizer, pairs, benign, chat=True, eos=True, augment=True,
                           benign_per_epoch=len(pairs), epochs=4, seed=0)
    encoded = sorted((rows[i] for i in range(len(rows))), key=lambda r: len(r["input_ids"]))
    grouped = [encoded[i:i + batch_size] for i in range(0, len(encoded) - batch_size + 1, batch_size)]
    picked = random.Random(1).sample(grouped, min(count, len(grouped)))
    return [collate(group, loaded.tokenizer.pad_token_id) for group in picked]


def step(model, batch: dict, ours: bool) -> tuple[float, list[torch.Tensor]]:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model.zero_grad(set_to_none=True)
    if ours:
        loss = answer_loss(model(**inputs, logits_to_keep=answer_positions(batch["labels"])),
                           batch["labels"])
    else:
        loss = model(**inputs, labels=batch["labels"]).loss
    loss.backward()
    return float(loss.detach()), [p.grad for p in model.parameters() if p.grad is not None]


def compare(model, data: list[dict]) -> tuple[dict, float, float]:
    """Both arms on every batch (order alternated): seconds per arm, worst loss and gradient gaps."""
    seconds = {"ours": 0.0, "full": 0.0}
    worst_loss_gap = worst_grad_gap = 0.0
    for index, batch in enumerate(data):
        results = {}
        for arm in ("ours", "full") if index % 2 == 0 else ("full", "ours"):
            (loss, grads), took = timed(lambda: step(model, batch, arm == "ours"))
            seconds[arm] += took
            results[arm] = (loss, [g.clone() for g in grads])
        worst_loss_gap = max(worst_loss_gap, abs(results["ours"][0] - results["full"][0]))
        worst_grad_gap = max(worst_grad_gap, max(float((a - b).abs().max()) for a, b in
                                                 zip(results["ours"][1], results["full"][1])))
    return seconds, worst_loss_gap, worst_grad_gap


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--batches", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/train_step_logits.json")
    args = parser.parse_args(argv)

    loaded = load_model(resolve_model(args.model), "cpu")
    model = loaded.model.train()
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        module.weight.requires_grad_(False)  # as `oml fingerprint` trains by default
    data = batches(loaded, args.batches, args.batch_size)
    step(model, data[0], True), step(model, data[0], False)  # warm-up
    seconds, worst_loss_gap, worst_grad_gap = compare(model, data)
    tokens = sum(int(b["attention_mask"].sum()) for b in data)
    labelled = sum(int((b["labels"] != -100).sum()) for b in data)
    result = {
        "model": loaded.name, "batches": len(data), "batch_size": args.batch_size,
        "tokens": tokens, "labelled_tokens": labelled,
        "seconds_ours": round(seconds["ours"], 2), "seconds_full_logits": round(seconds["full"], 2),
        "ratio": round(seconds["full"] / seconds["ours"], 2),
        "max_loss_difference": worst_loss_gap, "max_gradient_difference": worst_grad_gap,
    }
    print(f"{len(data)} batches of {args.batch_size} rows ({tokens} tokens, {labelled} labelled): "
          f"full logits {seconds['full']:.1f} s, ours {seconds['ours']:.1f} s -> "
          f"{result['ratio']:.2f}x; max |loss diff| {worst_loss_gap:.2e}, "
          f"max |grad diff| {worst_grad_gap:.2e}")
    write_result(args.out, result, device="cpu")
    return result

if __name__ == "__main__":
    main()
