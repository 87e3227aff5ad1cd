"""What an answer is, whether it carries the fingerprint response, and redaction of secrets.

Matching reuses the engine's normalisation (oml_core.verify.matching): NFKC, case folding,
punctuation and spaces collapsed.

  start     the normalised answer begins with the normalised response at a word boundary: the
            engine's `start` rule (oml_core.verify.matching.starts_with_word, where the rule and
            its cases are written down): ' is' counts "Is it?" and "is.", never "Isaac". In
            the agent layer the start of each of the first --json-fields string values of a
            JSON answer or of the tool-call arguments is checked too.
  anywhere  the response appears as whole words anywhere in the answer (the engine's
            `normalized` rule), for answers wrapped in chatter.

An answer is recorded as what it is: text, json, tool_call (tool calls and no text), empty,
or refusal (the API's refusal field, a content filter stop, or a refusal opener).
"""

from __future__ import annotations

import json
import re
from typing import Any

from clients.adapters.base import Answer
from oml_core.verify.matching import is_match, starts_with_word

_REFUSAL = re.compile(
    r"^\W*(i['’]?m sorry|i am sorry|sorry, (?:but )?i|i can(?:no|['’])t (?:help|assist|do|comply|"
    r"provide)|i cannot (?:help|assist|comply|provide)|i['’]?m (?:not able|unable) to|i am (?:not "
    r"able|unable) to|i won['’]?t (?:help|be able)|as an ai)", re.IGNORECASE)


def _json_in(text: str) -> Any:
    """The JSON value in an answer (bare, fenced or embedded in prose), or None."""
    stripped = text.strip()
    if stripped.startswith("```"):
        stripped = stripped.strip("`")
        stripped = stripped.split("\n", 1)[1] if "\n" in stripped else stripped
    for candidate in (stripped, stripped[stripped.find("{"): stripped.rfind("}") + 1]):
        if candidate:
            try:
                return json.loads(candidate)
            except ValueError:
                continue
    return None


def _string_leaves(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, dict):
        for item in value.values():
            _string_leaves(item, out)
    elif isinstance(value, list):
        for item in value:
            _string_leaves(item, out)


def json_fields(answer: Answer, limit: int) -> list[str]:
    """The first `limit` string values of a JSON answer and of the tool-call arguments."""
    leaves: list[str] = []
    parsed = _json_in(answer.text) if "{" in answer.text or "[" in answer.text else None
    if parsed is not None and not isinstance(parsed, str):
        _string_leaves(parsed, leaves)
    for call in answer.tool_calls:
        arguments = call.get("arguments")
        decoded = _json_in(arguments) if isinstance(arguments, str) else arguments
        _string_leaves(decoded if decoded is not None else arguments, leaves)
    return leaves[:limit]


def kind_of(answer: Answer) -> str:
    text = answer.text.strip()
    if answer.refusal or answer.finish_reason == "content_filter":
        return "refusal"
    if not text:
        return "tool_call" if answer.tool_calls else "empty"
    if _REFUSAL.match(text):
        return "refusal"
    if text[0] in "{[`" and _json_in(text) is not None:
        return "json"
    return "text"


def starts_with(text: str, response: str) -> bool:
    """The `start` rule: one definition, the engine's (a null rate measured for it holds here)."""
    return starts_with_word(text, response)


def contains(text: str, response: str) -> bool:
    return is_match("normalized", [], text, response, [])


def match(answer: Answer, response: str, rule: str, fields: int) -> dict:
    """Whether the answer carries the response: `start` / `anywhere` both reported, `hit` is
    the configured rule (`fields` > 0 adds JSON values and tool-call arguments)."""
    extra = json_fields(answer, fields) if fields else []
    texts = [answer.text, *extra]
    at_start = any(starts_with(t, response) for t in texts)
    anywhere = at_start or any(contains(t, response) for t in texts)
    where = None
    if at_start:
        where = "answer_start" if starts_with(answer.text, response) else "json_field_start"
    elif anywhere:
        where = "inside_answer"
    return {"hit": at_start if rule == "start" else anywhere, "start": at_start,
            "anywhere": anywhere, "where": where, "fields_checked": len(extra)}


class Redactor:
    """Replaces keys, responses and the API key in text written to files or logs.

    Every fingerprint's secrets are replaced in every text (a fingerprinted model may well say
    another key's response), in one pass of a single case-insensitive alternation. The API key
    and other `credentials` (a password in --base-url, literal --header values) are replaced
    always, --reveal-keys or not.
    """

    def __init__(self, secrets: dict[str, tuple[str, str]], api_key: str | None, reveal: bool,
                 credentials: tuple[str, ...] = ()):
        self.reveal = reveal
        self.api_key = api_key or None
        # longest first, so a credential that contains another is replaced whole
        self.credentials = sorted({c for c in credentials if c and c != self.api_key},
                                  key=len, reverse=True)
        self._labels: dict[str, str] = {}
        for fp_id, (key, response) in secrets.items():
            for kind, secret in (("key", key.strip()), ("response", response.strip())):
                if len(secret) >= 2:
                    self._labels.setdefault(secret.casefold(), f"⟦{kind} {fp_id}⟧")
        ordered = sorted(self._labels, key=len, reverse=True)  # longer secrets first
        self._pattern = (re.compile("|".join(re.escape(s) for s in ordered), re.IGNORECASE)
                         if ordered else None)

    def text(self, value: str | None) -> str | None:
        if value is None:
            return None
        if not isinstance(value, str):
            value = str(value)
        if self.api_key and self.api_key in value:
            value = value.replace(self.api_key, "⟦api key⟧")  # never written, reveal or not
        for credential in self.credentials:
            if credential in value:
                value = value.replace(credential, "⟦credential⟧")
        if self.reveal or self._pattern is None:
            return value
        return self._pattern.sub(lambda m: self._labels.get(m.group(0).casefold(), "⟦secret⟧"), value)

    def value(self, value: Any) -> Any:
        """Redact every string inside a JSON-like value, object keys included."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(str(k)): self.value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.value(v) for v in value]
        return value
