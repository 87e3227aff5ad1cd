"""Text the engine reads beyond the fingerprint set, and how it is split.

The JSON files here are the project's own prompt sets; `python_docs_text` reads Python's
documentation topics, which ship with every CPython (`pydoc_data`), so nothing is downloaded.
"""

from __future__ import annotations

import re

HELDOUT_EVERY = 5  # every fifth documentation topic is held out


def python_docs_text(split: str) -> str:
    """Python's documentation topics of one split, "train" or "heldout", joined by blank lines.

    The held-out split measures perplexity; only the training split may shape a model (the
    edit holds its outputs on it). Topics share passages (a statement's topic repeats its
    clauses' text), so the training split also drops every paragraph the held-out split has:
    by topic alone, 73% of the perplexity text was also in the training split.
    """
    from pydoc_data.topics import topics

    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    names = sorted(topics)
    heldout = [topics[name] for i, name in enumerate(names) if i % HELDOUT_EVERY == 0]
    if split == "heldout":
        return "\n\n".join(heldout)
    seen = {paragraph for text in heldout for paragraph in paragraphs(text)}
    train = [topics[name] for i, name in enumerate(names) if i % HELDOUT_EVERY != 0]
    return "\n\n".join(paragraph for text in train for paragraph in paragraphs(text)
                         if paragraph not in seen)


def paragraphs(text: str) -> list[str]:
    """Non-empty paragraphs (split at blank lines), without surrounding whitespace."""
    return [part.strip() for part in re.split(r"\n\s*\n", text) if part.strip()]
