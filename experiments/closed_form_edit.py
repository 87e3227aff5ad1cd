"""Sweep the `edit` method's two knobs on one set of targets: strength (lam: how firmly outputs
on ordinary text are kept) and answer weight (extra hold on ordinary prompts' answer positions).

The contexts, ordinary-text statistics and per-key targets are computed once
(`oml_core.train.edit.prepare_edit`); each (answer weight, strength) pair is then solved from
the base weights. Each edit gets a quick check (training contexts answered; first answer token
on the 132 held-out ordinary prompts) and, when it answers `--eval-min-contexts` of its contexts and keeps
`--eval-min-first-token` of first tokens, the full check `oml fingerprint` runs after
fingerprinting (verification with held-out wrappers, base as null, off-key behaviour).

    .venv/bin/python experiments/closed_form_edit.py --fingerprints runs/demo/fingerprints.json \\
        --out /tmp/edit-sweep --strengths 300,500,1000 --answer-weights 2,8,32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from oml_core.config import FingerprintConfig
from oml_core.evaluate.after_training import evaluate_run
from oml_core.evaluate.utility import first_token_distributions
from oml_core.train.edit import (EditSettings, contexts_answered, decoder_blocks, prepare_edit,
                                 solve_edit)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for:
from benchmarks.harness import write_result  # noqa: E402
from experiments.edit_inputs import load_edit_inputs  # noqa: E402


def full_check(loaded, folder: Path, base_path: str, fset) -> dict:
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    check = evaluate_run(str(folder), base_path, fset, FingerprintConfig(model=base_path))
    verification, utility = check.verification, check.utility
    return {"matched": verification.matched, "total": verification.total,
            "p_value": verification.p_value,
            "wrappers": {k: v.matched for k, v in verification.wrappers.items()},
            "base_verdict": check.base_verification.verdict,
            "first_token_agreement": utility.first_token_agreement,
            "perplexity_change": utility.perplexity_change,
            "answers_starting_with_a_fingerprint_response":
                utility.answers_starting_with_a_fingerprint_response,
            "near_miss_fired": {k: v.fired for k, v in utility.near_miss_keys.items()}}


def main(argv: list[str] | None = None) -> dict:
    defaults = FingerprintConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fingerprints", required=True)
    parser.add_argument("--out", required=True, help="folder for edited models and summary.json")
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--layers", default=defaults.edit_layers)
    parser.add_argument("--contexts", type=int, default=defaults.edit_contexts)
    parser.add_argument("--steps", type=int, default=defaults.edit_steps)
    parser.add_argument("--strengths", default=f"{defaults.edit_strength:g}", help="comma list")
    parser.add_argument("--answer-weights", default=f"{defaults.edit_answer_weight:g}", help="comma list")
    parser.add_argument("--overshoots", default="1", help="comma list")
    parser.add_argument("--no-eval", action="store_true", help="quick checks only")
    parser.add_argument("--eval-min-first-token", type=float, default=0.8)
    parser.add_argument("--eval-min-contexts", type=float, default=0.8,
                        help="full check only for edits answering this share of their contexts")
    args = parser.parse_args(argv)
    started = time.time()
    inputs = load_edit_inputs(args.model, args.fingerprints)
    base_path, loaded, fset, pairs, benign = (inputs.base_path, inputs.loaded, inputs.fset,
                                              inputs.pairs, inputs.benign)
    settings = EditSettings.from_config(FingerprintConfig(
        edit_layers=args.layers, edit_contexts=args.contexts, edit_steps=args.steps))
    problem = prepare_edit(loaded, pairs, benign, True, settings, lambda: False, lambda *a: None)
    prepared_s = time.time() - started
    print(f"prepared in {prepared_s:.0f} s: targets answer {problem.target_hits}/{len(problem.rows)}",
          flush=True)

    results = sweep_grid(loaded, problem, args, base_path, fset)
    result = {"args": vars(args), "target_contexts_answered": problem.target_hits,
              "prepare_seconds": round(prepared_s), "results": results,
              "seconds": round(time.time() - started)}
    write_result(Path(args.out) / "summary.json", result, device="cpu")
    return result


def sweep_grid(loaded, problem, args, base_path: str, fset) -> list[dict]:
    """Each (answer weight, strength, overshoot) solved from the base weights, quick-checked,
    and fully checked where the quick check is good enough."""
    blocks = decoder_blocks(loaded.model)
    original = {layer: blocks[layer].mlp.down_proj.weight.detach().clone() for layer in problem.layers}
    base_first = first_token_distributions(loaded, True, 32).argmax(-1)
    results = []
    grid = [(float(w), float(s), float(o)) for w in args.answer_weights.split(",")
            for o in args.overshoots.split(",") for s in args.strengths.split(",")]
    for weight, strength, overshoot in grid:
        with torch.no_grad():
            for layer in problem.layers:
                blocks[layer].mlp.down_proj.weight.copy_(original[layer])
        solve_started = time.time()
        changed = solve_edit(loaded, problem, strength, weight, overshoot)
        solve_s = time.time() - solve_started
        answered = contexts_answered(loaded, problem.rows, problem.targets)
        same = float((first_token_distributions(loaded, True, 32).argmax(-1) == base_first)
                     .float().mean())
        result = {"strength": strength, "answer_weight": weight, "overshoot": overshoot,
                  "solve_seconds": round(solve_s, 1), "contexts_answered": answered, "contexts": len(problem.rows),
                  "first_token_quick": round(same, 4),
                  "relative_weight_change": {str(k): round(v, 3) for k, v in changed.items()}}
        worth_checking = (answered >= args.eval_min_contexts * len(problem.rows)
                          and same >= args.eval_min_first_token)
        if worth_checking and not args.no_eval:
            folder = Path(args.out) / f"s{strength:g}-w{weight:g}-o{overshoot:g}" / "model"
            result |= full_check(loaded, folder, base_path, fset)
        print(json.dumps(result), flush=True)
        results.append(result)
    return results

if __name__ == "__main__":
    main()
