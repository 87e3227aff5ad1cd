"""Match rules: does a model's continuation count as producing the fingerprint response?

- exact:      the generated token ids start with the response's token ids (the seed's rule)
- prefix:     the decoded text starts with the response (leading whitespace ignored)
- contains:   the response text appears anywhere in the decoded text
- normalized: after Unicode NFKC, case folding and punctuation/space collapsing, the response
              appears in the text as whole words (for answers wrapped in chatter)

Looser rules catch more wrapped answers but raise the chance an unrelated model matches, so
the evidence step must use a null rate measured with the same rule.
"""

from __future__ import annotations

import re
import unicodedata

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_NON_WORD.sub(" ", text).split())


def is_match(rule: str, generated_ids: list[int], generated_text: str,
             response: str, response_ids: list[int]) -> bool:
    if rule == "exact":
        return len(response_ids) > 0 and generated_ids[:len(response_ids)] == response_ids
    if rule == "prefix":
        wanted = response.strip()
        return bool(wanted) and generated_text.lstrip().startswith(wanted)
    if rule == "contains":
        wanted = response.strip()
        return bool(wanted) and wanted in generated_text
    if rule == "normalized":
        wanted = normalize(response)
        return bool(wanted) and f" {wanted} " in f" {normalize(generated_text)} "
    raise ValueError(f"unknown match rule {rule!r}")
