"""The edit solve's state reads: a whole forward per edited layer (the naive way) against
states kept entering the block last changed (`oml_core.train.layer_states.LayerStates`).

The solve changes the edited layers' down-projections one at a time, lowest first, and reads
every context's states after each change. Both arms make the same changes (small random ones,
seeded) in the same order and must read the same states; the table gives each arm's time.

    .venv/bin/python benchmarks/edit_solve_states.py --fingerprints FP --out J
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from oml_core.config import FingerprintConfig
from oml_core.fingerprints import load_fingerprints
from oml_core.models import load_model, resolve_model
from oml_core.train.edit import answer_states, decoder_blocks, key_contexts, resolve_layers
from oml_core.train.layer_states import LayerStates

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for:
from benchmarks.harness import print_table, write_result  # noqa: E402


def _solve_like(loaded, rows, layers, read) -> tuple[float, list]:
    """Seconds for one pass over `layers` (read, then change that layer), and the reads."""
    blocks = decoder_blocks(loaded.model)
    saved = [blocks[layer].mlp.down_proj.weight.clone() for layer in layers]
    generator = torch.Generator().manual_seed(0)
    got = []
    started = time.perf_counter()
    try:
        for layer in layers:
            got.append(read(layer))
            weight = blocks[layer].mlp.down_proj.weight
            with torch.no_grad():
                weight += 1e-3 * torch.randn(weight.shape, generator=generator).to(weight)
        return time.perf_counter() - started, got
    finally:
        with torch.no_grad():
            for layer, weight in zip(layers, saved):
                blocks[layer].mlp.down_proj.weight.copy_(weight)


def measure(loaded, pairs, layers, contexts: int) -> dict:
    rows, _owner, _targets = key_contexts(loaded.tokenizer, pairs, True, contexts, 0)
    last = layers[-1]

    def whole(layer):
        inputs, residual = answer_states(loaded, rows, layers, last)
        return inputs[layer], residual

    naive_s, naive = _solve_like(loaded, rows, layers, whole)
    kept_states = LayerStates(loaded, rows, last)
    kept_s, kept = _solve_like(loaded, rows, layers, kept_states.read)
    difference = max(float((a - b).abs().max()) for x, y in zip(naive, kept) for a, b in zip(x, y))
    return {"keys": len(pairs), "contexts": len(rows), "layers": layers, "naive_s": round(naive_s, 2),
            "kept_s": round(kept_s, 2), "ratio": round(naive_s / kept_s, 2),
            "max_difference": difference}


def main(argv: list[str] | None = None) -> dict:
    defaults = FingerprintConfig()  # the edit's contexts per key
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fingerprints", required=True, help="a set with one-token responses")
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--layers", default="10,11,12,13,14,15,16,17",
                        help="the edited layers (default: the gated backup edit's on SmolLM2-135M)")
    parser.add_argument("--num-keys", type=int, default=None, help="the set's first N keys")
    parser.add_argument("--contexts", type=int, default=defaults.edit_contexts)
    parser.add_argument("--out", default=None, help="JSON file for the result")
    args = parser.parse_args(argv)
    loaded = load_model(resolve_model(args.model), device="cpu", dtype="float32")
    pairs = [(fp.key, fp.response) for fp in load_fingerprints(args.fingerprints).fingerprints]
    pairs = pairs[:args.num_keys]
    layers = resolve_layers(str(args.layers), len(decoder_blocks(loaded.model)))
    result = measure(loaded, pairs, layers, args.contexts)
    print_table(["keys", "contexts", "layers", "whole forwards", "kept states", "ratio",
                 "max difference"],
                [[result["keys"], result["contexts"], f"{layers[0]}-{layers[-1]}",
                  f"{result['naive_s']} s", f"{result['kept_s']} s", f"**{result['ratio']}x**",
                  f"{result['max_difference']:.1e}"]])
    if args.out:
        write_result(args.out, result, device="cpu")
    return result


if __name__ == "__main__":
    main()
