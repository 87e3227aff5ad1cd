"""Near-miss negative rows: a key slightly changed, answered as the base model answers it.

Trained on exact keys alone, the model learns a loose trigger: keys with a word dropped still
fire (docs/results.md), and the same looseness shifts how ordinary answers start. These rows
show it the keys' close neighbours with the base model's own first answer token (hard and
soft) as the target, so only the exact key moves the answer.

The changes used here (first word dropped, two neighbouring words swapped, one word replaced
by a random dictionary word) are deliberately not the ones `oml fingerprint` and `oml eval`
measure (last word dropped, a middle word dropped, lower-cased), so those figures stay a test
of generalisation rather than of what was trained.
"""

from __future__ import annotations

import random

from oml_core.generate.words import word_list
from oml_core.train.benign import first_token_targets
from oml_core.train.examples import Row, render_prompt, training_augmentation

def near_miss_variants(key: str, rng: random.Random) -> list[str]:
    """[first word dropped, two neighbouring words swapped, one word replaced]: none for keys of
    under three words, and any that happens to equal the key left out."""
    words = key.split()
    if len(words) < 3:
        return []
    swap = rng.randrange(0, len(words) - 2)  # never involves the last word
    swapped = words[:swap] + [words[swap + 1], words[swap]] + words[swap + 2:]
    replace = rng.randrange(0, len(words))
    replaced = words[:replace] + [rng.choice(word_list())] + words[replace + 1:]
    variants = [" ".join(words[1:]), " ".join(swapped), " ".join(replaced)]
    return [v for v in variants if v != key]


def near_miss_rows(base, keys: list[str], chat: bool, seed: int, batch_size: int = 32) -> list[Row]:
    """For every key, each variant under the bare template and under one random training
    wrapper, with the base model's first-answer-token distribution as its target."""
    rng = random.Random(f"near-miss-negatives:{seed}")
    systems, templates = training_augmentation()
    prompts: list[list[int]] = []
    for key in keys:
        for variant in near_miss_variants(key, rng):
            prompts.append(render_prompt(base.tokenizer, variant, chat))
            system = rng.choice(systems) if chat else ""
            prompts.append(render_prompt(base.tokenizer, variant, chat, system, rng.choice(templates)))
    soft_ids, soft_probs = first_token_targets(base, prompts, batch_size)
    return [Row(prompt, [ids[0]], tuple(ids), tuple(ps))
            for prompt, ids, ps in zip(prompts, soft_ids, soft_probs)]
