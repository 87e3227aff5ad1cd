"""Measure the forgetting regularizer on a finished run: for each lambda, average the run's
final weights with the base (saved = lerp(trained, base, lambda)), then verify and compare
behaviour off the keys. This is how the default lambda was chosen (docs/training.md).

    .venv/bin/python experiments/regularizer_sweep.py --run runs/demo/run --lambdas 0 0.1 0.2 0.3 0.5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from oml_core.config import FingerprintConfig, VerifyConfig
from oml_core.evaluate.utility import compare_behaviour
from oml_core.fingerprints import load_fingerprints
from oml_core.models import load_model
from oml_core.runs import RunFolder
from oml_core.train.regularizer import average_with_base
from oml_core.verify import verify

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for:
from benchmarks.harness import write_result  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0, 0.1, 0.2, 0.3, 0.5])
    parser.add_argument("--out", default="experiments/results/regularizer_sweep.json")
    args = parser.parse_args(argv)

    run = Path(args.run)
    record = RunFolder(run).record()
    cfg = FingerprintConfig(**record.config)
    fset = load_fingerprints(run / "fingerprints.json")
    base = load_model(record.base_model, "cpu")
    tuned = load_model(str(run / "model"), "cpu")
    trained_state = {k: v.clone() for k, v in tuned.model.state_dict().items()}
    base_state = base.model.state_dict()
    rows = []
    for strength in args.lambdas:
        tuned.model.load_state_dict(average_with_base(trained_state, base_state, strength))
        report = verify(VerifyConfig(wrappers=["bare", "chat", "system"], num_system_prompts=4), tuned,
                        fset).model_dump(mode="json")
        utility = compare_behaviour(tuned, base, fset, chat=cfg.format != "raw").dump()
        rows.append({"lambda": strength, "matched": report["matched"],
                     "per_wrapper": {k: v["matched"] for k, v in report["wrappers"].items()},
                     "first_token_agreement": utility["first_token_agreement"],
                     "leaks": utility["answers_starting_with_a_fingerprint_response"],
                     "perplexity_change": utility["perplexity_change"],
                     "near_miss": {k: v["fired"] for k, v in utility["near_miss_keys"].items()}})
        print(json.dumps(rows[-1]), flush=True)
    result = {"run": str(run), "config": record.config, "rows": rows}
    write_result(args.out, result, device="cpu")
    return result


if __name__ == "__main__":
    main()
