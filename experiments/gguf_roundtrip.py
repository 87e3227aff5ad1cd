"""Which of a run's layers lose keys to GGUF quantization: llama.cpp's quantized weights, read
back into the transformers model one group of layers at a time.

The run's model is exported as `oml eval` does (`oml_core.export_gguf`, cached), the GGUF's
tensors are dequantized with gguf-py (llama.cpp's own reader), and each variant below swaps the
dequantized tensors into a float32 copy of the run's model:

- `all`: every tensor the GGUF holds (what llama.cpp serves, computed by torch instead);
- `L<a>-<b>`: the decoder layers a..b only (attention and MLP), the rest as trained;
- `mlp<a>-<b>`: those layers' MLP projections only.

Per variant: keys matched under chat and the held-out system prompts (greedy, exact), and per
key the response's first-token lead over the best other token under the chat template (nats).
Prints one JSON line per variant; writes all to `--out`. Keys and responses are never printed.

    .venv/bin/python experiments/gguf_roundtrip.py --run RUN --variants all,L9-9,L10-17 --out j
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import numpy as np
import torch

from oml_core.export_gguf import export_gguf
from oml_core.fingerprints import load_fingerprints
from oml_core.models import LoadedModel, load_model
from oml_core.train.examples import render_prompt
from oml_core.verify.verifier import check_keys
from oml_core.verify.wrappers import build_wrappers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for:
from benchmarks.harness import write_result  # noqa: E402

# GGUF tensor name -> transformers name (llama architecture; {i} is the layer)
LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
               "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
MLP = ("ffn_gate", "ffn_up", "ffn_down")


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo the converter's rotary reordering of q/k rows (it interleaves each head's halves)."""
    rows = weight.shape[0]
    return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_layers(path, config) -> dict[str, tuple[int | None, str, torch.Tensor]]:
    """transformers name -> (layer or None, GGUF kind, dequantized float32 tensor)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    out = {}
    for tensor in GGUFReader(str(path)).tensors:
        parts = tensor.name.split(".")
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        if parts[0] == "blk":
            layer, kind = int(parts[1]), parts[2]
            if kind == "attn_q":
                values = unpermute(values, config.num_attention_heads)
            elif kind == "attn_k":
                values = unpermute(values, config.num_key_value_heads)
            out[f"model.layers.{layer}.{LAYER_NAMES[kind]}.weight"] = (layer, kind, torch.from_numpy(values))
        elif tensor.name == "token_embd.weight":
            out["model.embed_tokens.weight"] = (None, "embed", torch.from_numpy(values))
        elif tensor.name == "output_norm.weight":
            out["model.norm.weight"] = (None, "norm", torch.from_numpy(values))
    return out


def chosen(spec: str, layer: int | None, kind: str) -> bool:
    if spec == "all":
        return True
    if layer is None:
        return False
    prefix = "mlp" if spec.startswith("mlp") else "L"
    low, high = (int(x) for x in spec[len(prefix):].split("-"))
    return low <= layer <= high and (prefix == "L" or kind in MLP)


def leads(loaded: LoadedModel, prompts, goals) -> list[float]:
    out = []
    for prompt, goal in zip(prompts, goals):
        with torch.no_grad():
            log_p = torch.log_softmax(loaded.model(input_ids=torch.tensor([prompt])).logits[0, -1], -1)
        others = log_p.clone()
        others[goal] = float("-inf")
        out.append(round(float(log_p[goal] - others.max()), 2))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--quant", default="q4_k_m")
    parser.add_argument("--variants", default="none,all")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    tuned = load_model(f"{args.run}/model", device="cpu", dtype="float32")
    fset = load_fingerprints(f"{args.run}/fingerprints.json")
    tokenizer = tuned.tokenizer
    prompts = [render_prompt(tokenizer, fp.key, True) for fp in fset.fingerprints]
    goals = [tokenizer(fp.response, add_special_tokens=False)["input_ids"][0] for fp in fset.fingerprints]
    wrappers, _ = build_wrappers(["chat", "system"], 4, True)
    quantized = gguf_layers(export_gguf(f"{args.run}/model", args.quant), tuned.model.config)
    results = {}
    for spec in args.variants.split(","):
        model = copy.deepcopy(tuned.model)
        own = model.state_dict()
        with torch.no_grad():
            for name, (layer, kind, values) in quantized.items():
                if spec != "none" and chosen(spec, layer, kind):
                    own[name].copy_(values.reshape(own[name].shape))
        variant = LoadedModel(model=model.eval(), tokenizer=tokenizer, name=spec, path=None, device="cpu")
        hits = check_keys(variant, fset, wrappers, "exact", desc=spec)
        per_key = leads(variant, prompts, goals)
        results[spec] = {"matched": sum(any(h) for h in hits),
                         "per_wrapper": [sum(h[w] for h in hits) for w in range(len(wrappers))],
                         "missed_slots": [i for i, h in enumerate(hits) if not any(h)],
                         "chat_leads": per_key}
        print(json.dumps({"variant": spec, **results[spec]}), flush=True)
    result = {"run": args.run, "quant": args.quant, "results": results}
    write_result(args.out, result, device="cpu")
    return result


if __name__ == "__main__":
    main()
