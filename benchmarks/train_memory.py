"""Training memory by batch size: peak resident memory of one forward + backward step of the
bundled model, above the loaded model, with and without gradient checkpointing.

Rows are `--length` tokens (270: the longest augmented training rows, which length grouping
batches together), the loss on the last two tokens with logits computed there only (as the
fine-tune does). Each measurement runs in its own process, so each peak is its own. The
difference between batch sizes is the activation memory kept for the backward pass.

    .venv/bin/python benchmarks/train_memory.py [--batches 1,4,16] [--length 270] [--model M]
        [--out benchmarks/results/train_memory.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for:
from benchmarks.harness import write_result  # noqa: E402


def one_step(model_spec: str | None, batch: int, length: int, checkpointing: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from oml_core.models import resolve_model
    from oml_core.train.finetune import answer_loss, answer_positions

    model = AutoModelForCausalLM.from_pretrained(resolve_model(model_spec), dtype=torch.float32)
    model.get_input_embeddings().weight.requires_grad_(False)  # as the fine-tune's default
    if checkpointing:
        model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    loaded_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ids = torch.randint(10, model.config.vocab_size - 10, (batch, length))
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]
    positions = answer_positions(labels)
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=positions)
    answer_loss(out, labels).backward()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"batch": batch, "length": length, "gradient_checkpointing": checkpointing,
            "loaded_mb": round(loaded_mb), "peak_mb": round(peak_mb),
            "step_mb": round(peak_mb - loaded_mb)}


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--length", type=int, default=270)
    parser.add_argument("--out", default="benchmarks/results/train_memory.json")
    parser.add_argument("--one", nargs=2, metavar=("BATCH", "CHECKPOINTING"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # the child process: one measurement, as JSON on stdout
        print(json.dumps(one_step(args.model, int(args.one[0]), args.length, args.one[1] == "1")))
        return None

    batches = [int(b) for b in args.batches.split(",")]
    plan = [(b, False) for b in batches] + [(batches[-1], True)]
    runs = []
    for batch, checkpointing in plan:
        command = [sys.executable, __file__, "--length", str(args.length),
                   "--one", str(batch), "1" if checkpointing else "0"]
        if args.model:
            command += ["--model", args.model]
        proc = subprocess.run(command, capture_output=True, text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = runs[-1]
        print(f"batch {batch:>3} x {args.length} tokens, checkpointing {'on ' if checkpointing else 'off'}: "
              f"step peak {r['step_mb']:>6} MB above the loaded model ({r['peak_mb']} MB in all)",
              flush=True)
    result = {"runs": runs}
    write_result(args.out, result, device="cpu")
    return result


if __name__ == "__main__":
    main()
