"""Random-word text, exact in tokens of the target tokenizer.

The word list is the project's own (`oml_core/data/words.txt`, built by
`scripts/build_wordlist.py`). Words that are one token with a leading space in the target
tokenizer are preferred, so a string of n such words is exactly n tokens and reads cleanly.
"""

from __future__ import annotations

import random
from functools import cache
from importlib import resources


@cache
def word_list() -> tuple[str, ...]:
    text = resources.files("oml_core.data").joinpath("words.txt").read_text("utf-8")
    return tuple(w for w in text.split() if w)


class WordSampler:
    """Draws random word strings of an exact token length for one tokenizer."""

    MIN_SINGLE_TOKEN_WORDS = 200

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        single = [w for w in word_list()
                  if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]
        self.single_token = len(single) >= self.MIN_SINGLE_TOKEN_WORDS
        self.words = single if self.single_token else list(word_list())

    def sample(self, rng: random.Random, num_tokens: int) -> str:
        """A string of random words that is exactly `num_tokens` tokens long."""
        if self.single_token:
            text = "".join(" " + rng.choice(self.words) for _ in range(num_tokens))
            return text.lstrip()
        ids: list[int] = []
        while len(ids) < num_tokens:
            ids += self.tokenizer(" " + rng.choice(self.words), add_special_tokens=False)["input_ids"]
        return self.tokenizer.decode(ids[:num_tokens]).lstrip()
