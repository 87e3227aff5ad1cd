"""Verification throughput: our batched checking vs one `generate` call per key (OML 1.0's way).

Both run in the same process on the same keys, model and wrapper, and must give the same
hits. Prints a table and writes JSON.

    .venv/bin/python benchmarks/verify_throughput.py [--model M] [--num-keys 256] [--batch-size 64]
        [--wrapper chat|bare] [--out FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from oml_core.config import GenerateConfig
from oml_core.generate import generate_set
from oml_core.models import load_model
from oml_core.verify import check_keys
from oml_core.verify.wrappers import Wrapper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for:
from benchmarks.harness import print_table, timed, write_result  # noqa: E402


def naive_check(loaded, fset, wrapper: Wrapper) -> list[bool]:
    """OML 1.0's loop: one generate call per key, no padding, no batching."""
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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--num-keys", type=int, default=256)
    parser.add_argument("--key-length", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--wrapper", choices=("chat", "bare"), default="chat",
                        help="chat (the default system prompt + key as user turn) or bare key")
    parser.add_argument("--out", default="benchmarks/results/verify_throughput.json")
    args = parser.parse_args(argv)

    loaded = load_model(args.model, args.device)
    fset = generate_set(GenerateConfig(strategy="random_word", num_fingerprints=args.num_keys,
                                       key_length=args.key_length, response_length=1, seed=0), loaded)
    use_chat = args.wrapper == "chat" and loaded.has_chat_template
    wrapper = Wrapper("chat", "chat") if use_chat else Wrapper("bare", "bare")
    check_keys(loaded, fset.trimmed(loaded.tokenizer, num=8), [wrapper], "exact")  # warm-up

    batched, batched_s = timed(lambda: [row[0] for row in check_keys(
        loaded, fset, [wrapper], "exact", batch_size=args.batch_size)])
    naive, naive_s = timed(lambda: naive_check(loaded, fset, wrapper))
    result = {
        "model": loaded.name, "device": loaded.device, "num_keys": args.num_keys,
        "key_length": args.key_length, "wrapper": wrapper.name, "batch_size": args.batch_size,
        "batched_s": round(batched_s, 3), "naive_s": round(naive_s, 3),
        "batched_keys_per_s": round(args.num_keys / batched_s, 1),
        "naive_keys_per_s": round(args.num_keys / naive_s, 1),
        "speedup": round(naive_s / batched_s, 1), "same_hits": batched == naive,
    }
    print_table(["way", "seconds", "keys/s"],
                [["one generate per key", f"{naive_s:.2f}", result["naive_keys_per_s"]],
                 ["batched (ours)", f"{batched_s:.2f}", result["batched_keys_per_s"]]])
    print(f"speedup {result['speedup']}x, same hits: {result['same_hits']}")
    write_result(args.out, result, device=str(loaded.device))
    return result

if __name__ == "__main__":
    main()
