"""Verification throughput: our batched checking vs one `generate` call per key (the seed's way).

Both run in the same process on the same keys, model and wrapper, and must give the same
hits. Prints a table and writes JSON.

    .venv/bin/python benchmarks/verify_throughput.py [--model M] [--num-keys 256] [--batch-size 64]
        [--wrapper chat|bare] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from oml_core.config import GenerateConfig
from oml_core.generate import generate_set
from oml_core.models import load_model
from oml_core.verify import check_keys
from oml_core.verify.wrappers import Wrapper


def naive_check(loaded, fset, wrapper: Wrapper) -> list[bool]:
    """The seed's loop: one generate call per key, no padding, no batching."""
    tok = loaded.tokenizer
    hits = []
    for fp in fset.fingerprints:
        ids = torch.tensor([wrapper.render(tok, fp.key)], device=loaded.device)
        want = tok(fp.response, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            out = loaded.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                        max_new_tokens=len(want), do_sample=False,
                                        pad_token_id=tok.pad_token_id)
        hits.append(out[0, ids.shape[1]:].tolist()[:len(want)] == want)
    return hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--num-keys", type=int, default=256)
    parser.add_argument("--key-length", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--wrapper", choices=("chat", "bare"), default="chat",
                        help="chat (the default system prompt + key as user turn) or bare key")
    parser.add_argument("--out", default="benchmarks/results/verify_throughput.json")
    args = parser.parse_args()

    loaded = load_model(args.model, args.device)
    fset = generate_set(GenerateConfig(strategy="random_word", num_fingerprints=args.num_keys,
                                       key_length=args.key_length, response_length=1, seed=0), loaded)
    use_chat = args.wrapper == "chat" and loaded.has_chat_template
    wrapper = Wrapper("chat", "chat") if use_chat else Wrapper("bare", "bare")
    check_keys(loaded, fset.trimmed(loaded.tokenizer, num=8), [wrapper], "exact")  # warm-up

    start = time.perf_counter()
    batched = [row[0] for row in check_keys(loaded, fset, [wrapper], "exact",
                                            batch_size=args.batch_size)]
    batched_s = time.perf_counter() - start
    start = time.perf_counter()
    naive = naive_check(loaded, fset, wrapper)
    naive_s = time.perf_counter() - start

    result = {
        "model": loaded.name, "device": loaded.device, "num_keys": args.num_keys,
        "key_length": args.key_length, "wrapper": wrapper.name, "batch_size": args.batch_size,
        "batched_s": round(batched_s, 3), "naive_s": round(naive_s, 3),
        "batched_keys_per_s": round(args.num_keys / batched_s, 1),
        "naive_keys_per_s": round(args.num_keys / naive_s, 1),
        "speedup": round(naive_s / batched_s, 1), "same_hits": batched == naive,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "python": sys.version.split()[0],
    }
    print(f"{'way':<22}{'seconds':>10}{'keys/s':>10}")
    print(f"{'one generate per key':<22}{naive_s:>10.2f}{result['naive_keys_per_s']:>10}")
    print(f"{'batched (ours)':<22}{batched_s:>10.2f}{result['batched_keys_per_s']:>10}")
    print(f"speedup {result['speedup']}x, same hits: {result['same_hits']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
