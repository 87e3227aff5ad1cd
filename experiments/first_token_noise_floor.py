"""How much of the first-answer-token disagreement is the measure's own noise floor?

The base model's greedy opener is often a near tie, so any change to the weights flips some of
them. This measures the agreement of the *unchanged* base model with itself under changes
nobody would call a different model (bf16 and fp16 weights, int8 dynamic quantization, a
random perturbation of every weight at 0.1% of its scale), on the same 132 held-out prompts
`oml fingerprint` and `oml eval` score, plus how close the base model's top two openers are.

    .venv/bin/python experiments/first_token_noise_floor.py
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from oml_core.evaluate.robustness import quantize_int8
from oml_core.evaluate.utility import first_token_distributions
from oml_core.models import LoadedModel, load_model, resolve_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for:
from benchmarks.harness import write_result  # noqa: E402


def _variant(loaded: LoadedModel, name: str) -> LoadedModel:
    model = copy.deepcopy(loaded.model)
    if name in ("bfloat16", "float16"):
        model = model.to(getattr(torch, name))
    elif name == "int8":
        return quantize_int8(loaded)[0]
    elif name.startswith("noise"):
        scale = float(name.removeprefix("noise"))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn(param.shape, generator=generator) * param.abs().mean() * scale)
    return LoadedModel(model=model.eval(), tokenizer=loaded.tokenizer, name=f"{loaded.name} ({name})",
                       path=loaded.path, device="cpu")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the bundled model")
    parser.add_argument("--variants", nargs="+", default=["bfloat16", "float16", "int8", "noise0.001"])
    parser.add_argument("--out", default="experiments/results/first_token_noise_floor.json")
    args = parser.parse_args(argv)

    base = load_model(resolve_model(args.model), "cpu")
    ref = first_token_distributions(base, chat=True, batch_size=32)
    top2 = ref.topk(2, dim=-1).values
    gaps = (top2[:, 0] - top2[:, 1])
    result = {"model": base.name, "prompts": len(ref),
              "top_prob_median": float(top2[:, 0].median()),
              "top2_gap_below": {str(t): float((gaps < t).float().mean()) for t in (0.01, 0.02, 0.05, 0.1)},
              "variants": {}}
    for name in args.variants:
        probs = first_token_distributions(_variant(base, name), chat=True, batch_size=32).float()
        same = (probs.argmax(-1) == ref.argmax(-1)).float().mean()
        kl = (ref * (ref.clamp_min(1e-12).log() - probs.clamp_min(1e-12).log())).sum(-1).mean()
        result["variants"][name] = {"first_token_agreement": float(same), "first_token_kl": float(kl)}
        print(f"{name:>12}: first token = fp32 base's in {float(same):.1%}, KL {float(kl):.4f}")
    print(f"base top-token probability median {result['top_prob_median']:.2f}; top-2 gap below "
          + ", ".join(f"{t}: {v:.0%}" for t, v in result["top2_gap_below"].items()))
    write_result(args.out, result, device="cpu")
    return result


if __name__ == "__main__":
    main()
