"""Experiment: keep only the largest weight changes of a finished run (per tensor, the top
`keep` share of |trained - base|; the rest reset to base), then verify and compare behaviour.
Tests whether the utility loss comes from many small Adam updates (docs/results.md).

    .venv/bin/python experiments/delta_sparsity_sweep.py --run runs/demo/run --keep 0.02 0.1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from oml_core.config import VerifyConfig
from oml_core.evaluate.utility import compare_behaviour
from oml_core.fingerprints import load_fingerprints
from oml_core.models import load_model
from oml_core.runs import RunFolder
from oml_core.verify import verify

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for:
from benchmarks.harness import write_result  # noqa: E402


def sparsified(trained: dict, base: dict, keep: float) -> dict:
    out = {}
    for name, tensor in trained.items():
        delta = tensor - base[name]
        if keep < 1 and delta.numel() > 1:
            cut = delta.abs().flatten().float().kthvalue(max(1, int(delta.numel() * (1 - keep)))).values
            delta = torch.where(delta.abs() > cut, delta, torch.zeros_like(delta))
        out[name] = base[name] + delta
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--keep", type=float, nargs="+", default=[0.02, 0.1])
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    args = parser.parse_args(argv)
    record = RunFolder(Path(args.run)).record()
    fset = load_fingerprints(f"{args.run}/fingerprints.json")
    base, tuned = load_model(record.base_model, "cpu"), load_model(f"{args.run}/model", "cpu")
    trained = {k: v.clone() for k, v in tuned.model.state_dict().items()}
    rows = []
    for keep in args.keep:
        tuned.model.load_state_dict(sparsified(trained, base.model.state_dict(), keep))
        report = verify(VerifyConfig(wrappers=["bare", "chat", "system"], num_system_prompts=4), tuned,
                        fset).model_dump(mode="json")
        utility = compare_behaviour(tuned, base, fset, chat=True).dump()
        rows.append({"keep": keep, "matched": report["matched"],
                     "per_wrapper": {k: v["matched"] for k, v in report["wrappers"].items()},
                     "first_token_agreement": utility["first_token_agreement"],
                     "leaks": utility["answers_starting_with_a_fingerprint_response"],
                     "perplexity_change": utility["perplexity_change"]})
        print(json.dumps(rows[-1]), flush=True)
    result = {"run": args.run, "rows": rows}
    if args.out:
        write_result(args.out, result, device="cpu")
    return result


if __name__ == "__main__":
    main()
