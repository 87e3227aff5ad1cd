"""Random-word text, exact in tokens of the target tokenizer.

The word list is the project's own (`oml_core/data/words.txt`, built by
`scripts/build_wordlist.py`). Words that are one token with a leading space in the target
tokenizer are preferred, so a string of n such words is exactly n tokens and reads cleanly.
"""

from __future__ import annotations

import random
from functools import cache
from importlib import resources

from oml_core.errors import OMLInputError


@cache
def word_list() -> tuple[str, ...]:
    text = resources.files("oml_core.data").joinpath("words.txt").read_text("utf-8")
    return tuple(w for w in text.split() if w)


class WordSampler:
    """Draws random word strings of an exact token length for one tokenizer."""

    MIN_SINGLE_TOKEN_WORDS = 200
    MAX_TRIES = 200

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        count = lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        single = [w for w in word_list() if count(" " + w) == 1]
        self.single_token = len(single) >= self.MIN_SINGLE_TOKEN_WORDS
        self.words = single if self.single_token else list(word_list())
        # a text's first word has no leading space; prefer words that are one token that way too
        first = [w for w in self.words if count(w) == 1]
        self.first_words = first if len(first) >= 20 else self.words

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _draw(self, rng: random.Random, num_tokens: int) -> str:
        words = [rng.choice(self.first_words)]
        ids = self._ids(words[0])
        while len(ids) < num_tokens:
            words.append(rng.choice(self.words))
            ids += self._ids(" " + words[-1])
        return " ".join(words) if len(ids) == num_tokens else self.tokenizer.decode(ids[:num_tokens])

    def sample(self, rng: random.Random, num_tokens: int) -> str:
        """A string of random words that re-tokenizes to exactly `num_tokens` tokens."""
        for _ in range(self.MAX_TRIES):
            text = self._draw(rng, num_tokens)
            if len(self._ids(text)) == num_tokens and text == text.strip():
                return text
        raise OMLInputError(f"could not draw random words of exactly {num_tokens} tokens with "
                            "this tokenizer; try another length")
