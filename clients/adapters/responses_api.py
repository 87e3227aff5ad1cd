"""The OpenAI Responses API (`POST {base}/responses`): OpenAI, Azure, `transformers serve`, and
gateways that speak it.

A probe's system prompt becomes `instructions`, its turns the `input` list; the agent layer's
native tools are sent in the Responses shape (`{"type": "function", "name", "parameters"}`).
The reply's `output` is a list of items of several types: reasoning items are skipped, the
answer is the first `message` item's `output_text` parts, `function_call` items are tool
calls. Streamed, the answer comes from `response.output_text.delta` events and the final
`response.completed` (or `response.incomplete`) event carries the whole response.
"""

from __future__ import annotations

import json
from typing import Any

from clients.adapters import reply_fields as fields
from clients.adapters.base import Answer, Prompt, Reply, Request, Sampling
from clients.adapters.json_api import JSONAPIAdapter
from clients.adapters.reasoning import (
    reasoning_body,
    refuses_sampling_parameters,
    split_thinking,
)
from clients.adapters.sse import StreamError, error_in

FINISHED_EVENTS = ("response.completed", "response.incomplete")
FAILED_EVENTS = ("response.failed", "error")


def _tool(spec: dict) -> dict:
    """An OpenAI chat tool spec in the Responses API's flat shape."""
    function = spec.get("function", spec)
    return {"type": "function", "name": function.get("name"),
            "description": function.get("description", ""),
            "parameters": function.get("parameters", {})}


class ResponsesAdapter(JSONAPIAdapter):
    name = "responses"
    paths = {"responses": "responses"}

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 reasoning: bool = False, **settings):
        super().__init__(base_url, model, api_key_env, **settings)
        self.reasoning = reasoning

    def build_request(self, prompt: Prompt, sampling: Sampling) -> Request:
        messages = list(prompt.messages or [])
        body: dict[str, Any] = {"model": self.model, "max_output_tokens": sampling.max_tokens}
        if messages and messages[0].get("role") == "system":
            body["instructions"] = messages.pop(0)["content"]
        body["input"] = [{"role": m["role"], "content": m["content"]} for m in messages]
        if prompt.tools:
            body["tools"] = [_tool(t) for t in prompt.tools]
        if not self.reasoning:
            body["temperature"] = sampling.temperature
        return Request("responses", body, stream=self.stream)

    async def transmit(self, request: Request) -> Reply:
        reply = await self.send(request, request.body)
        if refuses_sampling_parameters(reply.status, reply.text) and "temperature" in request.body:
            self.reasoning = True  # build_request leaves the temperature out from now on
            reply = await self.send(request, reasoning_body(request.body, "max_output_tokens"))
        return reply

    def parse(self, data: Any) -> Answer:
        if not isinstance(data, dict):
            raise TypeError("the reply is not a JSON object")
        output = data.get("output")
        if not isinstance(output, list):
            raise TypeError("the reply has no output list")
        text, calls, thought = None, [], False
        for item in output:
            if not isinstance(item, dict):
                raise TypeError("an output item is not an object")
            kind = item.get("type")
            if kind == "reasoning":
                thought = True
            elif kind == "function_call":
                calls.append({"name": fields.optional_text(item.get("name"), "a tool call's name"),
                              "arguments": fields.optional_text(
                                  item.get("arguments") if not isinstance(item.get("arguments"), (dict, list))
                                  else json.dumps(item["arguments"], ensure_ascii=False),
                                  "a tool call's arguments")})
            elif kind == "message" and text is None:
                parts = item.get("content")
                if not isinstance(parts, list):
                    raise TypeError("a message item has no content list")
                text = "".join(fields.optional_text(part.get("text"), "output text") or ""
                               for part in parts
                               if isinstance(part, dict) and part.get("type") == "output_text")
        if text is None and not calls:
            raise TypeError("the output holds no message and no tool call")
        answer, inline, _ = split_thinking(text or "")
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        counts = fields.token_usage({"prompt_tokens": usage.get("input_tokens"),
                                     "completion_tokens": usage.get("output_tokens"),
                                     "total_tokens": usage.get("total_tokens")})
        details = data.get("incomplete_details")
        finish = ("length" if isinstance(details, dict)
                  and details.get("reason") == "max_output_tokens"
                  else fields.finish_reason(data.get("status")))
        return Answer(text=answer, tool_calls=calls, finish_reason=finish, usage=counts,
                      meta=fields.reply_meta(data), reasoning=thought or inline)

    def delta_of(self, name, data) -> str:
        kind = data.get("type", name)
        return data["delta"] if kind == "response.output_text.delta" else ""

    def parse_stream(self, events: list) -> Answer:
        """The final event's whole response; a stream cut before it (stopped early, or by the
        server) gives the answer assembled from its text deltas."""
        deltas = []
        for name, data in events:
            if not isinstance(data, dict):
                continue
            kind = data.get("type", name)
            message = error_in(name, data)
            if kind in FAILED_EVENTS or message is not None:
                response = data.get("response") if isinstance(data.get("response"), dict) else {}
                error = response.get("error") if isinstance(response.get("error"), dict) else {}
                raise StreamError(error.get("message") or message or kind)
            if kind in FINISHED_EVENTS and isinstance(data.get("response"), dict):
                return self.parse(data["response"])
            if kind == "response.output_text.delta":
                deltas.append(fields.optional_text(data.get("delta"), "output text") or "")
        if not any(isinstance(data, dict) for _, data in events):
            raise TypeError("the stream holds no event")
        answer, thought, _ = split_thinking("".join(deltas))
        return Answer(text=answer, reasoning=thought)
