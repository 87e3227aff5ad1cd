"""Anthropic Messages (`POST {base}/messages`): Anthropic's API and the servers and gateways
that copy its wire format.

The probe's system prompt goes in the top-level `system` field (Messages has no system role),
its turns in `messages`; the API key in `x-api-key` with `anthropic-version`; the agent
layer's native tools as `{"name", "description", "input_schema"}`. The reply's `content` is a
list of blocks: the answer is its text blocks joined, `tool_use` blocks are tool calls,
`thinking` / `redacted_thinking` blocks are set apart (a reasoning model's). `stop_reason`
becomes the finish reason (`max_tokens` is `length`). Streamed: `content_block_delta` events
carry `text_delta`s, `message_delta` the stop reason and output tokens, `error` events fail
the attempt (an `overloaded_error` is retried like HTTP 529).

Messages takes temperatures in [0, 1]; a probe sampled above 1 cannot be sent here.
"""

from __future__ import annotations

import json
from typing import Any

from clients.adapters import reply_fields as fields
from clients.adapters.base import Answer, Prompt, Request, Sampling
from clients.adapters.json_api import JSONAPIAdapter
from clients.adapters.reasoning import split_thinking
from clients.adapters.sse import StreamError, error_in

API_VERSION = "2023-06-01"
STOP_REASONS = {"max_tokens": "length", "end_turn": "stop", "stop_sequence": "stop",
                "tool_use": "tool_calls"}
THINKING_BLOCKS = ("thinking", "redacted_thinking")


def _tool(spec: dict) -> dict:
    function = spec.get("function", spec)
    return {"name": function.get("name"), "description": function.get("description", ""),
            "input_schema": function.get("parameters", {"type": "object"})}


class AnthropicAdapter(JSONAPIAdapter):
    name = "anthropic"
    paths = {"messages": "messages"}
    supports_seed = False

    def __init__(self, base_url: str, model: str, api_key_env: str = "ANTHROPIC_API_KEY",
                 **settings):
        super().__init__(base_url, model, api_key_env, **settings)
        self.headers.setdefault("anthropic-version", API_VERSION)  # --header may pin another

    def credential_headers(self, api_key: str) -> dict[str, str]:
        return {"x-api-key": api_key}

    def unsupported(self, prompt: Prompt, sampling: Sampling) -> str | None:
        if sampling.temperature > 1:
            return "Anthropic Messages takes temperatures in [0, 1]"
        return super().unsupported(prompt, sampling)

    def build_request(self, prompt: Prompt, sampling: Sampling) -> Request:
        messages = list(prompt.messages or [])
        body: dict[str, Any] = {"model": self.model, "max_tokens": sampling.max_tokens,
                                "temperature": sampling.temperature}
        system = [m["content"] for m in messages if m.get("role") == "system"]
        if system:
            body["system"] = "\n\n".join(system)
        body["messages"] = [{"role": m["role"], "content": m["content"]} for m in messages
                            if m.get("role") != "system"]
        if prompt.tools:
            body["tools"] = [_tool(t) for t in prompt.tools]
        return Request("messages", body, stream=self.stream)

    def parse(self, data: Any) -> Answer:
        if not isinstance(data, dict):
            raise TypeError("the reply is not a JSON object")
        blocks = data.get("content")
        if not isinstance(blocks, list):
            raise TypeError("the reply has no content list")
        texts, calls, thought = [], [], False
        for block in blocks:
            if not isinstance(block, dict):
                raise TypeError("a content block is not an object")
            kind = block.get("type")
            if kind == "text":
                texts.append(fields.optional_text(block.get("text"), "a text block") or "")
            elif kind == "tool_use":
                calls.append({"name": fields.optional_text(block.get("name"), "a tool name"),
                              "arguments": json.dumps(block.get("input"), ensure_ascii=False)})
            elif kind in THINKING_BLOCKS:
                thought = True
        answer, inline, _ = split_thinking("".join(texts))
        return Answer(text=answer, tool_calls=calls, finish_reason=self._stop(data.get("stop_reason")),
                      usage=self._usage(data.get("usage")), meta=fields.reply_meta(data),
                      reasoning=thought or inline)

    @staticmethod
    def _stop(reason: Any) -> str | None:
        reason = fields.finish_reason(reason)
        return STOP_REASONS.get(reason, reason)

    @staticmethod
    def _usage(usage: Any) -> dict | None:
        usage = usage if isinstance(usage, dict) else {}
        counts = {"prompt_tokens": usage.get("input_tokens"),
                  "completion_tokens": usage.get("output_tokens")}
        if all(type(v) is int for v in counts.values()):
            counts["total_tokens"] = counts["prompt_tokens"] + counts["completion_tokens"]
        return fields.token_usage(counts)

    def delta_of(self, name, data) -> str:
        delta = data.get("delta") if data.get("type", name) == "content_block_delta" else None
        return delta.get("text", "") if isinstance(delta, dict) and delta.get("type") == "text_delta" else ""

    def parse_stream(self, events: list) -> Answer:
        """The message assembled from its events: message_start (id, model, input tokens),
        content blocks (text deltas; tool input as JSON deltas; thinking set apart),
        message_delta (stop reason, output tokens)."""
        message: dict = {}
        blocks: dict[int, dict] = {}
        for name, data in events:
            if not isinstance(data, dict):
                continue
            kind = data.get("type", name)
            text = error_in(name, data)
            if text is not None:
                raise StreamError(text)
            if kind == "message_start":
                message = dict(data.get("message") or {})
            elif kind == "content_block_start":
                blocks[data["index"]] = {**data["content_block"], "partial": ""}
            elif kind == "content_block_delta":
                block, delta = blocks[data["index"]], data["delta"]
                if delta.get("type") == "text_delta":
                    block["text"] = block.get("text", "") + delta["text"]
                elif delta.get("type") == "input_json_delta":
                    block["partial"] += delta.get("partial_json", "")
            elif kind == "message_delta":
                message["stop_reason"] = (data.get("delta") or {}).get("stop_reason")
                usage = dict(message.get("usage") or {})
                usage.update({k: v for k, v in (data.get("usage") or {}).items()})
                message["usage"] = usage
        if not message and not blocks:
            raise TypeError("the stream holds no message")
        content = []
        for _, block in sorted(blocks.items()):
            partial = block.pop("partial")
            if block.get("type") == "tool_use" and partial:
                block["input"] = json.loads(partial)
            content.append(block)
        return self.parse({**message, "content": content})
