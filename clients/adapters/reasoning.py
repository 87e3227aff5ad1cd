"""Reasoning models: answers that think first, and requests they accept.

A reasoning model (o-series, DeepSeek-R1 and its distillations, Qwen3 in thinking mode) either
returns its thinking apart from the answer (a `reasoning` output item, a `thinking` content
block, a `reasoning_content` field: the adapters skip those) or inline, as a leading
`<think>...</think>` block in the text (stripped here). The answer the match rule judges is
what follows the thinking; an answer that is all thinking (cut by the token limit inside it)
is empty, a miss, never a hit on words the model only thought.

Such endpoints also refuse `max_tokens` and `temperature` (HTTP 400 naming the parameter):
with --reasoning, or on the first such 400, requests carry `max_completion_tokens` and no
temperature (the probe is then whatever the endpoint's default decoding gives, recorded as
such in each request of the evidence log).
"""

from __future__ import annotations

from collections.abc import Callable

OPEN, CLOSE = "<think>", "</think>"
REFUSED_PARAMETERS = ("max_tokens", "temperature")


def split_thinking(text: str) -> tuple[str, bool, bool]:
    """(the answer after a leading think block, whether there was one, whether it is still open)."""
    stripped = text.lstrip()
    if not stripped.startswith(OPEN):
        if OPEN.startswith(stripped) and stripped:  # "<thi": maybe a think block beginning
            return "", False, True
        return text, False, False
    end = stripped.find(CLOSE)
    if end < 0:
        return "", True, True
    return stripped[end + len(CLOSE):].lstrip(), True, False


def decided_after_thinking(stop_when: Callable[[str], bool] | None) -> Callable[[str], bool] | None:
    """`stop_when` judged on the answer after the thinking, never while it is still open."""
    if stop_when is None:
        return None

    def decided(text: str) -> bool:
        answer, _, still_open = split_thinking(text)
        return not still_open and bool(answer) and stop_when(answer)

    return decided


def refuses_sampling_parameters(status: int, body: str) -> bool:
    """A 400 whose body names max_tokens or temperature: a reasoning model's refusal."""
    return status == 400 and any(name in body for name in REFUSED_PARAMETERS)


def reasoning_body(body: dict, tokens_field: str = "max_completion_tokens") -> dict:
    """The request body as a reasoning endpoint takes it: the token limit under
    `tokens_field`, no temperature, no sampling config."""
    out = {k: v for k, v in body.items()
           if k not in ("temperature", "generation_config", "max_tokens", "seed")}
    limit = body.get("max_tokens", body.get(tokens_field))
    if limit is not None:
        out[tokens_field] = limit
    return out
