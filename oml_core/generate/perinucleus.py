"""Perinucleus responses: a first token just outside the model's own nucleus.

For each key, the model being fingerprinted gives a next-token distribution p. Sorted by
probability, the nucleus is the smallest top set whose mass reaches the threshold t; the
candidates are the tokens ranked right after it. One of the first k candidates that is a real
word is drawn; if the window holds none, it widens. The response is that token, optionally
followed by greedy continuation tokens. `response_prob` = p(first token): the chance the
base model itself would say it, which the evidence step uses as a null rate.

Why: a token the model already finds plausible is cheap to learn (little utility damage, so
many fingerprints fit), yet unlikely enough that an unrelated model rarely emits it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from oml_core import progress
from oml_core.errors import OMLInputError
from oml_core.inference import greedy, next_token_probs
from oml_core.verify.wrappers import Wrapper

MAX_SCAN = 2000  # how far past the nucleus to look for word tokens before giving up


@dataclass
class PerinucleusPick:
    response: str
    response_prob: float
    token_id: int          # the chosen first token
    rank: int              # 0-based rank of the chosen token in the sorted distribution
    nucleus_size: int      # tokens inside the t-nucleus


def is_word_token(text: str) -> bool:
    """Alphanumeric word of two or more characters (an optional leading space allowed)."""
    word = text[1:] if text.startswith(" ") else text
    return len(word) >= 2 and word.isalnum()


def context_wrapper(context: str, has_chat_template: bool) -> Wrapper:
    """How the key is presented when scoring it: as a chat user turn or as raw text."""
    if context == "auto":
        context = "chat" if has_chat_template else "raw"
    if context == "chat":
        if not has_chat_template:
            raise OMLInputError("--context chat needs a model with a chat template; "
                                "use --context raw (or auto)")
        return Wrapper("chat", "chat")
    return Wrapper("bare", "bare")


def choose(probs, threshold: float, k: int, rng: random.Random, decode) -> PerinucleusPick:
    """Pick a first token for one key from its next-token distribution (a 1-D tensor)."""
    import torch

    sorted_probs, order = torch.sort(probs, descending=True)
    cumulative = torch.cumsum(sorted_probs, dim=0)
    # j = first rank where the cumulative mass reaches t; the nucleus is ranks 0..j.
    j = int(torch.searchsorted(cumulative, torch.tensor(threshold, dtype=cumulative.dtype)))
    j = min(j, len(order) - 1)
    candidates: list[int] = []
    for rank in range(j + 1, min(len(order), j + 1 + MAX_SCAN)):
        if is_word_token(decode(int(order[rank]))):
            candidates.append(rank)
            if len(candidates) == k:
                break
    if not candidates:
        raise OMLInputError(
            "no word token found just outside the nucleus for a key; lower "
            "--perinucleus-threshold or use other keys")
    rank = rng.choice(candidates)
    token = int(order[rank])
    return PerinucleusPick(decode(token), float(sorted_probs[rank]), token, rank, j + 1)


def round_trip_prefix(tokenizer, ids: list[int]) -> str:
    """Text of the longest prefix of `ids` that re-tokenizes to exactly those ids.

    Special tokens (the model ending its reply) end the response; a decoded text that
    tokenizes differently would make "exact tokens" matching test something else.
    """
    special = set(tokenizer.all_special_ids)
    cut = next((i for i, token in enumerate(ids) if token in special), len(ids))
    for end in range(cut, 1, -1):
        text = tokenizer.decode(ids[:end])
        if tokenizer(text, add_special_tokens=False)["input_ids"] == ids[:end]:
            return text
    return tokenizer.decode(ids[:1])


def perinucleus_responses(loaded, keys: list[str], response_length: int, threshold: float,
                          k: int, context: str, seed: int, batch_size: int) -> list[PerinucleusPick]:
    """One perinucleus response per key, scored by `loaded` (the model to fingerprint)."""
    tokenizer = loaded.tokenizer
    wrapper = context_wrapper(context, loaded.has_chat_template)
    prompts = [wrapper.render(tokenizer, key) for key in keys]
    picks: list[PerinucleusPick | None] = [None] * len(keys)
    decode = lambda token: tokenizer.decode([token])  # noqa: E731
    with progress.bar("perinucleus", len(keys)) as advance:
        for rows, probs in next_token_probs(loaded, prompts, batch_size, progress=advance):
            for row, index in enumerate(rows):
                rng = random.Random(f"perinucleus:{seed}:{index}")
                picks[index] = choose(probs[row], threshold, k, rng, decode)
    if response_length > 1:
        extended = [prompt + [pick.token_id] for prompt, pick in zip(prompts, picks)]
        tails = greedy(loaded, extended, response_length - 1, batch_size)
        for pick, tail in zip(picks, tails):
            pick.response = round_trip_prefix(tokenizer, [pick.token_id] + tail)
    return picks  # type: ignore[return-value]
