"""First-answer-token agreement with the base model on the training vs the held-out prompts.

If a fingerprinted model agrees with its base on the benign prompts it was trained on but not
on held-out ones, the anchor does not generalise (more varied prompts would help); if it
disagrees on both alike, the anchor is too weak within the training budget (more anchor signal
per step would help).

    .venv/bin/python experiments/first_token_agreement_by_split.py --model runs/demo/run/model
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from oml_core.inference import next_token_probs
from oml_core.models import load_model, resolve_model
from oml_core.train.benign import benign_prompts
from oml_core.train.examples import render_prompt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for:
from benchmarks.harness import write_result  # noqa: E402


def first_token_probs(loaded, split: str) -> torch.Tensor:
    prompts = [render_prompt(loaded.tokenizer, p, True) for p in benign_prompts(split)]
    out = None
    for rows, probs in next_token_probs(loaded, prompts, 32):
        if out is None:
            out = torch.empty((len(prompts), probs.shape[1]))
        out[rows] = probs
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the fingerprinted model folder")
    parser.add_argument("--base", default=None, help="default: the bundled model")
    parser.add_argument("--out", default=None, help="JSON file for the result")
    args = parser.parse_args(argv)
    base, tuned = load_model(resolve_model(args.base), "cpu"), load_model(args.model, "cpu")
    result = {}
    for split in ("train", "heldout"):
        p_base, p_tuned = first_token_probs(base, split), first_token_probs(tuned, split)
        kl = (p_base * (p_base.clamp_min(1e-12).log() - p_tuned.clamp_min(1e-12).log())).sum(-1)
        result[split] = {"prompts": len(p_base),
                         "agreement": float((p_base.argmax(-1) == p_tuned.argmax(-1)).float().mean()),
                         "kl": float(kl.mean())}
    print(json.dumps(result, indent=2))
    if args.out:
        write_result(args.out, result, device="cpu")
    return result


if __name__ == "__main__":
    main()
