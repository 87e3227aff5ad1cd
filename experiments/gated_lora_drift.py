"""Why benign LoRA fine-tuning removes `--method gated` keys: gates and answers, step by step.

For a gated run, on the persistence attack's own fine-tuning rows (the base model's answers to
the training prompts and Python's documentation topics, as `oml eval --parts persistence`):

1. leaks: the positions of those rows where a key's neuron writes a vector longer than `--leak`
   (|silu(gate) x up| x |down column|; the residual stream's norm at layer 9 of the bundled
   model is about 106), and which rows hold them;
2. drift: the same LoRA fine-tune as the eval (rank 8 on every linear layer, AdamW 2e-4,
   batch 8), checking every `--every` steps, per key under the chat template, the neuron's gate
   pre-activation and the response's lead over the best other token (nats).

`--exclude-leaky` drops the rows that hold a leak from the fine-tune (is it those positions
that close the gates?); `--gate-scale` multiplies the neurons' gate rows first (does a sharper
gate hold?). Prints JSON lines; writes everything to `--out`.

    .venv/bin/python experiments/gated_lora_drift.py --run RUN --steps 30 --out drift.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from oml_core.evaluate.persistence import documentation_rows, finetune
from oml_core.fingerprints import load_fingerprints
from oml_core.models import load_model, resolve_model
from oml_core.runs import model_identity
from oml_core.train.benign import self_distilled_rows
from oml_core.train.edit import decoder_blocks
from oml_core.train.examples import Row, render_prompt
from oml_core.train.gated import mlp_inputs
from oml_core.train.finetune import with_lora

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for:
from benchmarks.harness import write_result  # noqa: E402


def attack_rows(tokenizer, base_model: str | None) -> list[Row]:
    base = load_model(base_model, device="cpu", dtype="float32")
    distilled = self_distilled_rows(base, True, model_identity(resolve_model(base_model)), 32)
    return [Row(r.prompt, r.target) for r in distilled] + documentation_rows(tokenizer, True)


def leaks(loaded, layer: int, neurons, rows: list[Row], above: float) -> list[dict]:
    seqs = [list(r.prompt) + list(r.target) for r in rows]
    x = mlp_inputs(loaded, layer, seqs, False, lambda: False, "capture")
    mlp = decoder_blocks(loaded.model)[layer].mlp
    with torch.no_grad():
        z, up = x @ mlp.gate_proj.weight[neurons].T, x @ mlp.up_proj.weight[neurons].T
        size = (F.silu(z) * up).abs() * mlp.down_proj.weight[:, neurons].norm(dim=0)
    starts = list(itertools.accumulate([0] + [len(s) for s in seqs]))
    found = []
    for position in (size > above).any(1).nonzero()[:, 0].tolist():
        row = max(i for i in range(len(seqs)) if starts[i] <= position)
        found.append({"row": row, "position": position - starts[row],
                      "key_slots": (size[position] > above).nonzero()[:, 0].tolist(),
                      "push": round(float(size[position].max()), 1)})
    return found


def per_key(model, layer: int, neurons, prompts, goals) -> list[dict]:
    mlp, got = decoder_blocks(model)[layer].mlp, {}
    hook = mlp.register_forward_pre_hook(lambda module, args: got.__setitem__("x", args[0]))
    out = []
    try:
        for slot, (prompt, goal) in enumerate(zip(prompts, goals)):
            with torch.no_grad():
                log_p = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0, -1].float(), -1)
                gate = float(mlp.gate_proj(got["x"][0, -1])[neurons[slot]])
            others = log_p.clone()
            others[goal] = float("-inf")
            out.append({"gate": round(gate, 2), "lead": round(float(log_p[goal] - others.max()), 2)})
    finally:
        hook.remove()
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--leak", type=float, default=30.0)
    parser.add_argument("--exclude-leaky", action="store_true")
    parser.add_argument("--gate-scale", type=float, default=1.0)
    parser.add_argument("--base", default=None, help="the run's base model (default: the bundled one)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    metrics = json.load(open(f"{args.run}/metrics.json"))
    layer, neurons = metrics["layer"], torch.tensor(metrics["neurons"])
    tuned = load_model(f"{args.run}/model", device="cpu", dtype="float32")
    tokenizer = tuned.tokenizer
    with torch.no_grad():
        decoder_blocks(tuned.model)[layer].mlp.gate_proj.weight[neurons] *= args.gate_scale
    pairs = [(fp.key, fp.response) for fp in load_fingerprints(f"{args.run}/fingerprints.json").fingerprints]
    prompts = [render_prompt(tokenizer, key, True) for key, _ in pairs]
    goals = [tokenizer(response, add_special_tokens=False)["input_ids"][0] for _, response in pairs]
    rows = attack_rows(tokenizer, args.base)
    found = leaks(tuned, layer, neurons, rows, args.leak)
    print(json.dumps({"rows": len(rows), "leaks": found}), flush=True)
    if args.exclude_leaky:
        rows = [r for i, r in enumerate(rows) if i not in {f["row"] for f in found}]
    trajectory = {0: per_key(tuned.model, layer, neurons, prompts, goals)}
    wrapped = with_lora(tuned.model, 8)

    def check(step: int) -> None:
        trajectory[step] = per_key(wrapped.get_base_model(), layer, neurons, prompts, goals)
        print(json.dumps({"step": step, "leading": sum(k["lead"] > 0 for k in trajectory[step]),
                          "gates_open": sum(k["gate"] > 0 for k in trajectory[step])}), flush=True)

    finetune(wrapped, rows, steps=args.steps, lr=2e-4, batch_size=8, seed=0,
             pad_id=tokenizer.pad_token_id, device="cpu",
             check_at=set(range(args.every, args.steps + 1, args.every)), on_check=check, desc="lora")
    result = {"run": args.run, "args": vars(args), "leaks": found, "trajectory": trajectory}
    write_result(args.out, result, device="cpu")
    return result


if __name__ == "__main__":
    main()
