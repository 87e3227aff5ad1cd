"""English text from a model: keys and responses that read as natural language.

A model continues a prompt asking for a paragraph that starts with a random seed word (chat
models) or simply continues that word (base models). Texts are sampled in batches with a
seeded RNG. A key is the first `length` tokens of a text in the *target* tokenizer; a
response is a window of `length` tokens at a random offset. Windows whose decoded text does
not re-tokenize to the same tokens are rejected, so every length is exact.
"""

from __future__ import annotations

import random

from oml_core import progress
from oml_core.errors import OMLInputError
from oml_core.generate.words import word_list
from oml_core.inference import sample
from oml_core.verify.wrappers import chat_ids

MAX_ROUNDS = 6


def _prompt(loaded, word: str) -> tuple[list[int], str]:
    """Prompt ids and the text the output should be prefixed with."""
    tokenizer = loaded.tokenizer
    if loaded.has_chat_template:
        ask = f'Write a paragraph of plain prose starting with the word "{word.capitalize()}".'
        return chat_ids(tokenizer, [{"role": "user", "content": ask}]), ""
    start = word.capitalize()
    return tokenizer(start)["input_ids"], start


def exact_window(tokenizer, ids: list[int], start: int, length: int) -> str | None:
    """The decoded window ids[start:start+length] if it round-trips exactly, else None."""
    window = ids[start:start + length]
    if len(window) < length:
        return None
    text = tokenizer.decode(window)
    if not any(c.isalnum() for c in text) or text != text.rstrip() or "\n" in text:
        return None
    if tokenizer(text, add_special_tokens=False)["input_ids"] != window:
        return None
    if start > 0:  # a window inside the text must hold whole words
        after = tokenizer.decode(ids[start + length:start + length + 1])
        if not (text.startswith(" ") and text[1:2].isalnum()) or after[:1].isalnum():
            return None
    return text


def english_texts(text_model, target_tokenizer, count: int, length: int, seed: int,
                  batch_size: int, *, window: str, desc: str) -> list[str]:
    """`count` distinct English strings of exactly `length` target tokens.

    window="start" takes the first tokens (keys); "random" takes a random window (responses).
    """
    rng = random.Random(f"english:{seed}:{window}")
    words = word_list()
    results: list[str] = []
    seen: set[str] = set()
    with progress.bar(desc, count) as advance:
        for round_no in range(MAX_ROUNDS):
            need = count - len(results)
            if need <= 0:
                break
            # a margin for rejected texts (~5% of rows on SmolLM2); a short round tops up
            rows = need + max(4, need // 8)
            prompts, prefixes = zip(*(_prompt(text_model, rng.choice(words)) for _ in range(rows)))
            # accepted texts are counted only after all of a round's rows are sampled: a bar
            # of its own shows the sampling (minutes for thousands of keys on a CPU)
            with progress.bar(f"{desc}: sampling round {round_no + 1}", rows) as sampled:
                outputs = sample(text_model, list(prompts), length + 24, batch_size,
                                 temperature=0.9, top_p=0.95, seed=rng.randrange(2**31),
                                 progress=sampled)
            for prefix, out in zip(prefixes, outputs):
                text = (prefix + text_model.tokenizer.decode(out, skip_special_tokens=True)).strip()
                ids = target_tokenizer(text, add_special_tokens=False)["input_ids"]
                last = len(ids) - length
                if last < 0:
                    continue
                starts = [0] if window == "start" else rng.sample(range(last + 1), min(8, last + 1))
                for start in starts:
                    piece = exact_window(target_tokenizer, ids, start, length)
                    if piece and piece not in seen and len(results) < count:
                        seen.add(piece)
                        results.append(piece)
                        advance(1)
                        break
    if len(results) < count:
        raise OMLInputError(
            f"could only produce {len(results)} of {count} distinct English texts of {length} "
            "tokens; ask for fewer fingerprints or shorter lengths, or use --strategy random_word")
    return results
