"""Benign rows by self-distillation: the base model's own answers to ordinary prompts.

Mixed into training, they pin the model's behaviour off the keys to what it was: without
them, a small model trained on fingerprints alone starts answering everyday questions with
fingerprint words (docs/design.md#writing-fingerprints-in). Answers are generated once per (base model, prompt set, length)
and cached under $OML_HOME/benign/.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import resources

from oml_core import progress
from oml_core.files import atomic_write_json, oml_home
from oml_core.inference import greedy, next_token_probs
from oml_core.train.examples import Row, render_prompt

ANSWER_TOKENS = 48
SOFT_TOP_K = 64  # first-token targets keep the base's 64 likeliest tokens (most of the mass)


@cache
def benign_prompts(split: str = "train") -> tuple[str, ...]:
    name = {"train": "benign_prompts_train.json", "heldout": "benign_prompts_heldout.json"}[split]
    data = json.loads(resources.files("oml_core.data").joinpath(name).read_text("utf-8"))
    return tuple(data["prompts"])


def first_token_targets(base, rendered: list[list[int]], batch_size: int):
    """The base model's top-SOFT_TOP_K first-answer-token ids and renormalised probabilities."""
    ids: list[list[int]] = [[] for _ in rendered]
    probs: list[list[float]] = [[] for _ in rendered]
    for rows, dist in next_token_probs(base, rendered, batch_size):
        top = dist.topk(SOFT_TOP_K, dim=-1)
        mass = top.values / top.values.sum(-1, keepdim=True)
        for row, index in enumerate(rows):
            ids[index], probs[index] = top.indices[row].tolist(), mass[row].tolist()
    return ids, probs


def self_distilled_rows(base, chat: bool, identity: dict, batch_size: int = 32,
                        answer_tokens: int = ANSWER_TOKENS) -> list[Row]:
    """Rows (prompt, the base model's greedy answer, its first-token distribution) for every
    training benign prompt."""
    prompts = benign_prompts("train")
    tokenizer = base.tokenizer
    rendered = [render_prompt(tokenizer, p, chat) for p in prompts]
    tag = hashlib.sha256(json.dumps({"model": identity, "prompts": prompts, "chat": chat,
                                     "tokens": answer_tokens, "soft": SOFT_TOP_K},
                                    sort_keys=True).encode()).hexdigest()[:16]
    cache_file = oml_home() / "benign" / f"{tag}.json"
    try:
        cached = json.loads(cache_file.read_text())
        answers, soft_ids, soft_probs = cached["answers"], cached["soft_ids"], cached["soft_probs"]
    except (OSError, ValueError, KeyError):
        with progress.bar("benign answers", len(rendered)) as advance:
            answers = greedy(base, rendered, answer_tokens, batch_size, progress=advance)
        soft_ids, soft_probs = first_token_targets(base, rendered, batch_size)
        atomic_write_json(cache_file, {"answers": answers, "soft_ids": soft_ids,
                                       "soft_probs": soft_probs})
    return [Row(prompt, answer, tuple(ids), tuple(ps))
            for prompt, answer, ids, ps in zip(rendered, answers, soft_ids, soft_probs) if answer]
