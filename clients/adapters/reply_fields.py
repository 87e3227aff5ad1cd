"""Type checks for the fields read out of a reply, shared by the adapters' `parse`.

Everything in a reply comes from the suspect, so each field the audit keeps is checked for the
type and shape it must have. The answer itself (text, refusal, tool calls) must have the right
type or the reply is malformed (these raise TypeError, which the base class turns into a
retried malformed reply). Side fields (usage, finish_reason, id/model/system_fingerprint) are
kept only in their expected shape and dropped otherwise: an endpoint that echoes the request
or its headers into them must not get the key or the API key into the evidence, and a wrong
side field says nothing about the answer.
"""

from __future__ import annotations

import json
import re
from typing import Any

USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")
META_FIELDS = ("id", "model", "system_fingerprint")
MAX_META_CHARS = 200
_FINISH_REASON = re.compile(r"[a-z][a-z0-9_]{0,31}")   # stop, length, tool_calls, content_filter
_MAX_TOKENS_COUNT = 2**53


def clean_text(value: str) -> str:
    """The string with lone surrogates (valid JSON escapes, not encodable text) made U+FFFD."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


def optional_text(value: Any, what: str) -> str | None:
    """A string or null; anything else makes the reply malformed."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{what} is a {type(value).__name__}, not text")
    return clean_text(value)


def tool_calls(value: Any) -> list[dict]:
    """OpenAI tool calls as [{"name", "arguments"}] (arguments as text)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise TypeError("tool_calls is not a list")
    calls = []
    for call in value:
        if not isinstance(call, dict):
            raise TypeError("a tool call is not an object")
        function = call.get("function")
        if function is None:
            function = {}
        if not isinstance(function, dict):
            raise TypeError("a tool call's function is not an object")
        arguments = function.get("arguments")
        if isinstance(arguments, (dict, list)):  # some servers send the arguments decoded
            arguments = json.dumps(arguments, ensure_ascii=False)
        calls.append({"name": optional_text(function.get("name"), "a tool call's name"),
                      "arguments": optional_text(arguments, "a tool call's arguments")})
    return calls


def token_usage(value: Any) -> dict | None:
    """The token counts, as non-negative integers; nothing else from the usage object."""
    if not isinstance(value, dict):
        return None
    kept = {name: value[name] for name in USAGE_FIELDS
            if type(value.get(name)) is int and 0 <= value[name] < _MAX_TOKENS_COUNT}
    return kept or None


def finish_reason(value: Any) -> str | None:
    """A short lower-case word such as `stop` or `length`; anything else is dropped."""
    if isinstance(value, str) and _FINISH_REASON.fullmatch(value):
        return value
    return None


def reply_meta(data: dict) -> dict:
    """The reply's id, model and system_fingerprint when they are short strings."""
    return {name: clean_text(data[name]) for name in META_FIELDS
            if isinstance(data.get(name), str) and 0 < len(data[name]) <= MAX_META_CHARS}
