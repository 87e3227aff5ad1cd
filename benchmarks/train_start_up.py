"""Training start-up: seconds until the first batch's row indices are known, with our
length-grouped sampler (lengths read one mega-batch at a time) vs `transformers`'
LengthGroupedSampler (every row's length read first).

The rows are the fine-tune's real index space: N random-word fingerprints, augmented (each
row rendered afresh under a training system prompt and template), plus as many benign rows
(the default benign fraction of 0.5; their answers here are a placeholder token, which
does not change the cost: benign rows are rendered once, before training), times
`max_epochs` (40). Both ways run in one process. Prints a table and writes JSON.

    .venv/bin/python benchmarks/train_start_up.py [--sizes 1024,8192] [--model M]
        [--out benchmarks/results/train_start_up.json]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from oml_core.config import GenerateConfig
from oml_core.generate import generate_set
from oml_core.models import load_model
from oml_core.train.benign import benign_prompts
from oml_core.train.examples import FingerprintRows, Row, render_prompt
from oml_core.train.sampler import LengthGroupedAsItGoes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for:
from benchmarks.harness import timed, write_result  # noqa: E402

BATCH, MAX_EPOCHS = 16, 40


def first_batch_seconds(make_sampler) -> float:
    torch.manual_seed(0)

    def first_batch():
        order = iter(make_sampler())
        return [next(order) for _ in range(BATCH)]

    first, seconds = timed(first_batch)
    assert len(first) == BATCH
    return seconds


def main(argv: list[str] | None = None) -> dict:
    from transformers.trainer_pt_utils import LengthGroupedSampler

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--sizes", default="1024,8192")
    parser.add_argument("--out", default="benchmarks/results/train_start_up.json")
    args = parser.parse_args(argv)

    loaded = load_model(args.model, "cpu")
    tok, chat = loaded.tokenizer, loaded.has_chat_template
    benign = [Row(render_prompt(tok, prompt, chat), [tok.eos_token_id])
              for prompt in benign_prompts("train")]
    runs = []
    for n in (int(part) for part in args.sizes.split(",")):
        fset = generate_set(GenerateConfig(strategy="random_word", num_fingerprints=n,
                                           key_length=16, seed=0), loaded)
        rows = FingerprintRows(tok, [(fp.key, fp.response) for fp in fset.fingerprints], benign,
                               chat=chat, eos=True, augment=True, benign_per_epoch=n,
                               epochs=MAX_EPOCHS, seed=0)
        ours = first_batch_seconds(lambda: LengthGroupedAsItGoes(rows, BATCH))
        theirs = first_batch_seconds(lambda: LengthGroupedSampler(BATCH, dataset=rows))
        runs.append({"n": n, "rows": len(rows), "ours_s": round(ours, 2),
                     "transformers_s": round(theirs, 1), "ratio": round(theirs / ours, 1)})
        print(f"N = {n:>6}: {len(rows):>9,} rows; first batch after {ours:.2f} s (ours) vs "
              f"{theirs:.1f} s (transformers): {theirs / ours:.0f}x", flush=True)
    result = {"model": loaded.name, "batch_size": BATCH, "max_epochs": MAX_EPOCHS, "runs": runs}
    write_result(args.out, result, device="cpu")
    return result


if __name__ == "__main__":
    main()
