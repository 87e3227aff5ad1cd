"""Server-sent events: reading a streamed reply, and turning its text back into events.

A streamed answer arrives as SSE (`event: name` / `data: {...}` lines, a blank line after
each event). `read_stream` reads it from an httpx response as it comes, hands each event's
data to the adapter's `delta_of` for the answer text it adds, notes when the first text
arrived, and stops reading once `stop_when(answer so far)` says the probe is decided (the
connection is then closed, which also tells the server to stop generating). What was read is
kept as text, the reply's body, so the evidence is the same kind of thing for streamed and
whole replies; `parse_events` reads it back for the adapter's `parse_stream`.

The byte cap of clients.adapters.http_client applies to streams too: a stream that never ends
is cut at --max-reply-bytes and counts as too large.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

DONE = "[DONE]"  # OpenAI's end-of-stream marker (not JSON)
# The answer's opening decides a probe within its first words; past this many characters the
# early stop is no longer tried (each try reads the whole answer so far, so a hostile stream of
# one-character events, all spaces, would otherwise cost quadratic time).
DECIDE_WITHIN_CHARS = 4096


class StreamError(Exception):
    """The endpoint reported an error inside the stream (an `error` event)."""


def _event(name: str | None, lines: list[str]) -> tuple[str | None, Any]:
    data = "\n".join(lines)
    if data == DONE:
        return name, DONE
    return name, json.loads(data)


def parse_events(text: str) -> list[tuple[str | None, Any]]:
    """[(event name or None, decoded data)] of an SSE body; comments and empty events skipped.
    Raises ValueError on data that is not JSON (the stream is then malformed)."""
    events, name, lines = [], None, []
    for line in text.splitlines() + [""]:
        if not line:
            if lines:
                events.append(_event(name, lines))
            name, lines = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            lines.append(line[5:].removeprefix(" "))
    return events


def error_in(name: str | None, data: Any) -> str | None:
    """The message of an error event (OpenAI, Responses and Anthropic streams), else None."""
    if name == "error" or (isinstance(data, dict) and data.get("type") == "error"):
        detail = data.get("error", data) if isinstance(data, dict) else data
        message = detail.get("message") if isinstance(detail, dict) else detail
        return str(message or "error")
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message") or "error")
    return None


async def read_stream(response, delta_of: Callable[[str | None, Any], str],
                      stop_when: Callable[[str], bool] | None) -> tuple[str, float | None, bool]:
    """(the SSE text read, seconds to the first answer text, whether reading stopped early)."""
    started = time.monotonic()
    raw: list[str] = []
    answer, first, name, lines = "", None, None, []
    async for line in response.aiter_lines():
        raw.append(line)
        if line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            lines.append(line[5:].removeprefix(" "))
        elif not line and lines:
            try:
                event = _event(name, lines)
            except ValueError:
                break  # malformed: parse_events raises on it again, and the reply is retried
            name, lines = None, []
            if event[1] == DONE:
                break
            piece = delta_of(*event)
            if piece:
                if first is None:
                    first = time.monotonic() - started
                answer += piece
                if (stop_when is not None and len(answer) <= DECIDE_WITHIN_CHARS
                        and stop_when(answer)):
                    return "\n".join(raw) + "\n", first, True
    return "\n".join(raw) + "\n", first, False
