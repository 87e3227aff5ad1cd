"""Experiment: edits whose keys survive a merge. One prepared problem (contexts, statistics,
targets for a merge floor and confidence cap) solved at several (strength, overshoot) pairs;
each gets a quick check: contexts answered at full strength and with the edit scaled to
`--merge-checks` (what a linear merge with the base leaves: 0.5 = averaging with the base),
contexts whose response is over-confident (p > 0.9, what suppression blocks), and the first
answer token on the 132 held-out ordinary prompts.

    .venv/bin/python experiments/merge_robust_edit.py --fingerprints runs/exp/s7.json \\
        --out /tmp/mre --merge-floor 0.5 --confidence-cap 0.85 --strengths 1000 --overshoots 1,1.5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from oml_core.config import FingerprintConfig
from oml_core.evaluate.utility import first_token_distributions
from oml_core.inference import next_token_probs
from oml_core.train import edit
from oml_core.train.edit import CAPTURE_ROWS, EditSettings, decoder_blocks, prepare_edit, solve_edit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for:
from benchmarks.harness import write_result  # noqa: E402
from experiments.edit_inputs import load_edit_inputs  # noqa: E402


@contextmanager
def cached_moments(folder: Path):
    """Keep the ordinary-text statistics between runs of this script (they depend on the
    layers and the text only, not on the keys or the goal): minutes on this CPU each time.
    The engine's function is put back on the way out."""
    compute = edit.second_moments

    def cached(loaded, seqs, layers, upto):
        path = folder / f"moments-{'-'.join(map(str, layers))}-{sum(map(len, seqs))}.pt"
        if path.exists():
            return torch.load(path)
        moments = compute(loaded, seqs, layers, upto)
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(moments, path)
        return moments

    edit.second_moments = cached
    try:
        yield
    finally:
        edit.second_moments = compute


def context_stats(loaded, rows, targets) -> tuple[int, int]:
    """(contexts answering with their target, of those how many with p > 0.9)."""
    hits = confident = 0
    for batch, probs in next_token_probs(loaded, rows, CAPTURE_ROWS):
        for j, i in enumerate(batch):
            if int(probs[j].argmax()) == targets[i]:
                hits += 1
                confident += float(probs[j, targets[i]]) > 0.9
    return hits, confident


def main(argv: list[str] | None = None) -> dict:
    defaults = FingerprintConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fingerprints", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--layers", default=defaults.edit_layers)
    parser.add_argument("--steps", type=int, default=defaults.edit_steps)
    parser.add_argument("--merge-floor", type=float, default=0.0)
    parser.add_argument("--confidence-cap", type=float, default=1.0)
    parser.add_argument("--strengths", default=f"{defaults.edit_strength:g}")
    parser.add_argument("--answer-weights", default=f"{defaults.edit_answer_weight:g}")
    parser.add_argument("--overshoots", default="1")
    parser.add_argument("--merge-checks", default="0.7,0.5,0.3", help="shares of the edit kept")
    parser.add_argument("--save", default="", help="comma list of strength:overshoot to save")
    parser.add_argument("--moments-cache", default="runs/exp/moments")
    parser.add_argument("--plain-solve", action="store_true",
                        help="solve for the whole change only (the floor shapes the targets alone)")
    args = parser.parse_args(argv)
    started = time.time()
    inputs = load_edit_inputs(args.model, args.fingerprints)
    loaded, pairs, benign = inputs.loaded, inputs.pairs, inputs.benign
    settings = EditSettings.from_config(FingerprintConfig(
        edit_layers=args.layers, edit_steps=args.steps, edit_merge_floor=args.merge_floor,
        edit_confidence_cap=args.confidence_cap))
    with cached_moments(Path(args.moments_cache)):
        problem = prepare_edit(loaded, pairs, benign, True, settings, lambda: False,
                               lambda *a: None)
    print(f"prepared in {time.time() - started:.0f} s: targets answer {problem.target_hits}/"
          f"{len(problem.rows)}", flush=True)
    shares = Shares(loaded, problem.layers)
    base_first = first_token_distributions(loaded, True, 32).argmax(-1)
    results = [solve_and_check(loaded, problem, args, shares, base_first, (weight, overshoot, strength))
               for weight in map(float, args.answer_weights.split(","))
               for overshoot in map(float, args.overshoots.split(","))
               for strength in map(float, args.strengths.split(","))]
    result = {"args": vars(args), "target_hits": problem.target_hits, "results": results,
              "seconds": round(time.time() - started)}
    write_result(Path(args.out) / "summary.json", result, device="cpu")
    return result


class Shares:
    """The edited layers' down-projections at base + share x (edited - base)."""

    def __init__(self, loaded, layers):
        self.blocks, self.layers = decoder_blocks(loaded.model), layers
        self.original = {k: self.blocks[k].mlp.down_proj.weight.detach().clone() for k in layers}

    def current(self) -> dict:
        return {k: self.blocks[k].mlp.down_proj.weight.detach().clone() for k in self.layers}

    def set(self, share: float, edited: dict) -> None:
        with torch.no_grad():
            for k in self.layers:
                self.blocks[k].mlp.down_proj.weight.copy_(
                    self.original[k] + share * (edited[k] - self.original[k]))


def solve_and_check(loaded, problem, args, shares: Shares, base_first, knobs) -> dict:
    """One solve from the base weights at `knobs` (answer weight, overshoot, strength), its
    quick checks at full strength and at each `--merge-checks` share; saved when `--save`
    names it."""
    weight, overshoot, strength = knobs
    shares.set(0.0, shares.original)
    changed = solve_edit(loaded, problem, strength, weight, overshoot,
                         0.0 if args.plain_solve else args.merge_floor)
    edited = shares.current()
    hits, confident = context_stats(loaded, problem.rows, problem.targets)
    same = float((first_token_distributions(loaded, True, 32).argmax(-1) == base_first)
                 .float().mean())
    merged = {}
    for share in map(float, args.merge_checks.split(",")):
        shares.set(share, edited)
        merged[f"{share:g}"] = context_stats(loaded, problem.rows, problem.targets)[0]
    shares.set(1.0, edited)
    row = {"strength": strength, "answer_weight": weight, "overshoot": overshoot,
           "contexts": len(problem.rows), "answered": hits, "over_0.9": confident,
           "answered_at_share": merged, "first_token_quick": round(same, 4),
           "relative_weight_change": {str(k): round(v, 3) for k, v in changed.items()}}
    print(json.dumps(row), flush=True)
    if f"{strength:g}:{overshoot:g}" in args.save.split(","):
        folder = Path(args.out) / f"s{strength:g}-o{overshoot:g}-w{weight:g}"
        loaded.model.save_pretrained(folder)
        loaded.tokenizer.save_pretrained(folder)
    return row

if __name__ == "__main__":
    main()
