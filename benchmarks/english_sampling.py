"""English key sampling: our decoding loop vs `transformers`' `generate` (our previous way).

Both sample the same prompts ("Write a paragraph ... starting with the word X") with the same
settings (temperature 0.9, top-p 0.95, `key length + 24` new tokens, batch size), in the same
process. Different random streams give different texts, so instead of equal outputs the table
checks the texts are as usable: the share of rows that yield an exact key window. Prints a
table and writes JSON.

    .venv/bin/python benchmarks/english_sampling.py [--model M] [--rows 256] [--batch-size 32]
        [--key-length 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

from oml_core.generate.english import _prompt, exact_window
from oml_core.generate.words import word_list
from oml_core.inference import cut_after_eos, eos_set, length_batches, left_pad, sample
from oml_core.models import load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for:
from benchmarks.harness import print_table, timed, write_result  # noqa: E402

TEMPERATURE, TOP_P = 0.9, 0.95


def transformers_sampling(loaded, prompts, max_new: int, batch_size: int, seed: int):
    """The previous way: `generate(do_sample=True)` per length-sorted batch."""
    model, tok = loaded.model, loaded.tokenizer
    stop_ids = eos_set(model, True)
    out = [None] * len(prompts)
    for batch_no, rows in enumerate(length_batches(prompts, batch_size)):
        ids, mask = left_pad([prompts[i] for i in rows], tok.pad_token_id, loaded.device)
        torch.manual_seed(seed * 1_000_003 + batch_no)
        with torch.inference_mode():
            new = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                 do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=0,
                                 pad_token_id=tok.pad_token_id)[:, ids.shape[1]:]
        for row, i in enumerate(rows):
            out[i] = cut_after_eos(new[row].tolist(), stop_ids)
    return out


def usable(loaded, prefixes, outputs, length: int) -> float:
    """Share of rows whose text starts with an exact `length`-token key (english.py's test)."""
    tok, good = loaded.tokenizer, 0
    for prefix, out in zip(prefixes, outputs):
        text = (prefix + tok.decode(out, skip_special_tokens=True)).strip()
        good += exact_window(tok, tok(text, add_special_tokens=False)["input_ids"], 0, length) is not None
    return good / len(outputs)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--key-length", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="benchmarks/results/english_sampling.json")
    args = parser.parse_args(argv)

    loaded = load_model(args.model, args.device)
    rng = random.Random(0)
    prompts, prefixes = zip(*(_prompt(loaded, rng.choice(word_list())) for _ in range(args.rows)))
    prompts, max_new = list(prompts), args.key_length + 24
    sample(loaded, prompts[:4], 2, 4, temperature=TEMPERATURE, top_p=TOP_P)  # warm-up

    timings, outputs = {}, {}
    for name, run in (("ours", lambda: sample(loaded, prompts, max_new, args.batch_size,
                                              temperature=TEMPERATURE, top_p=TOP_P, seed=1)),
                      ("transformers", lambda: transformers_sampling(loaded, prompts, max_new,
                                                                     args.batch_size, seed=1))):
        outputs[name], timings[name] = timed(run)

    result = {
        "model": loaded.name, "device": loaded.device, "rows": args.rows,
        "key_length": args.key_length, "max_new_tokens": max_new, "batch_size": args.batch_size,
        "temperature": TEMPERATURE, "top_p": TOP_P,
        **{f"{name}_s": round(s, 2) for name, s in timings.items()},
        **{f"{name}_rows_per_s": round(args.rows / s, 2) for name, s in timings.items()},
        **{f"{name}_mean_new_tokens": round(sum(map(len, o)) / len(o), 1)
           for name, o in outputs.items()},
        **{f"{name}_usable_share": round(usable(loaded, prefixes, o, args.key_length), 3)
           for name, o in outputs.items()},
        "speedup": round(timings["transformers"] / timings["ours"], 2),
    }
    print_table(["way", "seconds", "rows/s", "new tokens", "usable"],
                [[name, f"{timings[name]:.2f}", result[name + "_rows_per_s"],
                  result[name + "_mean_new_tokens"], result[name + "_usable_share"]]
                 for name in ("transformers", "ours")])
    print(f"speedup {result['speedup']}x")
    write_result(args.out, result, device=str(loaded.device))
    return result


if __name__ == "__main__":
    main()
