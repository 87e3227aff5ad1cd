"""Match rules: does a model's continuation count as producing the fingerprint response?

- exact:      the generated token ids start with the response's token ids (OML 1.0's rule)
- prefix:     the decoded text starts with the response (leading whitespace ignored) and does
              not continue its last word (the word boundary below, on the raw text)
- start:      the normalised text starts with the normalised response, at a word boundary
              (the auditor's default rule, `oml audit --match start`)
- contains:   the response text appears anywhere in the decoded text
- normalized: after Unicode NFKC, case folding and punctuation/space collapsing, the response
              appears in the text as whole words (for answers wrapped in chatter)

The word boundary of `prefix` and `start`: the answer counts only if it does not go on with a
letter or digit right after the response. Without it, a response ' is' would count every
answer opening "Isaac..." and ' to' every "Tomorrow...", events far likelier than the
response itself, so no null rate for the response would hold. Precisely, for `start`:
normalize(answer) == normalize(response), or normalize(answer) begins with
normalize(response) + " ". Consequences, by design:
- punctuation inside or at the end of the response is ignored, as normalisation always did:
  ' Paris,' counts "Paris is nice" and "paris!"; it never counts "Parisian";
- a response that is itself part of a word (' escri', a one-token response cut from
  'describe') counts only answers whose word ends there: "Escri." counts, "Escribe" does not.
  A fingerprinted model that goes on to complete the word is then missed by that key; sets
  meant for text audits should use whole-word responses or be trained to stop after the
  response (`oml fingerprint --eos`).
`prefix` is the case- and punctuation-sensitive form: the stripped text starts with the
stripped response and, when the response ends with a letter or digit, the next character (if
any) is not a letter or digit. Whatever `prefix` counts, `start` counts too, so a rate measured
for `start` bounds `prefix` as well.

Looser rules catch more wrapped answers but raise the chance an unrelated model matches, so
the evidence step must use a null rate measured with the same rule.
"""

from __future__ import annotations

import re
import unicodedata

_NON_WORD = re.compile(r"[\W_]+", re.UNICODE)

# The answer-opening event of a partial answer, for measuring how likely a rule is to count an
# answer that has only begun (oml_core.calibrate): COUNTED whatever comes next, NOT_COUNTED
# whatever comes next, or OPEN (the next tokens decide).
COUNTED, NOT_COUNTED, OPEN = "counted", "not_counted", "open"


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_NON_WORD.sub(" ", text).split())


def starts_with_word(text: str, response: str) -> bool:
    """The `start` rule: the normalised text opens with the normalised response, at a word
    boundary (see the module docstring)."""
    wanted = normalize(response)
    if not wanted:
        return False
    seen = normalize(text)
    return seen == wanted or seen.startswith(wanted + " ")


def ends_word(piece: str) -> bool:
    """Whether an answer going on with `piece` right after the response leaves the response a
    whole word for `prefix` and `start`: the piece opens with neither a letter nor a digit (nor
    half a character)."""
    return bool(piece) and not piece[0].isalnum() and piece[0] != "\ufffd"


def _prefix_at_boundary(text: str, response: str) -> bool:
    wanted = response.strip()
    if not wanted:
        return False
    seen = text.lstrip()
    if not seen.startswith(wanted):
        return False
    after = seen[len(wanted):len(wanted) + 1]
    return not (wanted[-1].isalnum() and after.isalnum())


def start_state(partial: str, response: str, finished: bool = False) -> str:
    """What the `start` rule will say of an answer that so far reads `partial`.

    COUNTED or NOT_COUNTED when no continuation can change the verdict, OPEN when the next
    characters decide (nothing but punctuation or spaces yet, a beginning of the response, the
    whole response with no boundary after it yet, or a character cut in the middle of its
    bytes). With `finished` (the answer ended here) the verdict is final.
    """
    closed = bool(_NON_WORD.search(partial[-1:]))
    return opening_state(normalize(partial), closed, partial.endswith("\ufffd"),
                         normalize(response), finished)


def opening_state(seen: str, closed: bool, cut: bool, wanted: str, finished: bool = False) -> str:
    """`start_state` on an answer's beginning given as its normalised text `seen`, whether its
    last character is a separator (`closed`: the last word has ended) and whether it ends
    inside a character (`cut`); `wanted` is the normalised response. oml_core.calibrate builds
    these token by token, so both use this one statement of the rule."""
    if not wanted:
        return NOT_COUNTED
    if finished:
        return COUNTED if seen == wanted or seen.startswith(wanted + " ") else NOT_COUNTED
    if cut:
        return OPEN  # the next token completes the character
    if seen.startswith(wanted + " "):
        return COUNTED
    if seen == wanted:
        return COUNTED if closed else OPEN
    if not seen:
        return OPEN
    if closed:  # the next word starts anew
        return OPEN if wanted.startswith(seen + " ") else NOT_COUNTED
    return OPEN if wanted.startswith(seen) else NOT_COUNTED


def is_match(rule: str, generated_ids: list[int], generated_text: str,
             response: str, response_ids: list[int]) -> bool:
    if rule == "exact":
        return len(response_ids) > 0 and generated_ids[:len(response_ids)] == response_ids
    if rule == "prefix":
        return _prefix_at_boundary(generated_text, response)
    if rule == "start":
        return starts_with_word(generated_text, response)
    if rule == "contains":
        wanted = response.strip()
        return bool(wanted) and wanted in generated_text
    if rule == "normalized":
        wanted = normalize(response)
        return bool(wanted) and f" {wanted} " in f" {normalize(generated_text)} "
    raise ValueError(f"unknown match rule {rule!r}")
