"""OpenAI-compatible endpoints (OpenAI, vLLM, llama.cpp, TGI, `transformers serve`, ...).

Chat completions for every chat layer, legacy completions for the raw layer, both through the
official `openai` SDK with its own retries switched off (the base class owns retries). The SDK
sends through our httpx client (clients.adapters.http_client: a byte cap per reply, no
compressed bodies, redirects only within the endpoint's origin). The reply body is read as
text and decoded here, every field checked for its type (clients.adapters.reply_fields), so a
malformed reply is seen as one (and retried) rather than half-parsed.

With --stream, requests ask for server-sent events (`stream: true`, usage in the last chunk)
and go out through the same httpx client directly, so the answer can be read as it comes and
the read stopped once the probe is decided (clients.adapters.sse). Reasoning models
(clients.adapters.reasoning): --reasoning, or the first 400 naming max_tokens or temperature,
switches every later request to `max_completion_tokens` and no temperature; a leading
`<think>` block and `reasoning_content` are set apart from the answer.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import httpx

from clients.adapters import reply_fields as fields
from clients.adapters.base import (
    Adapter,
    Answer,
    Prompt,
    Reply,
    Request,
    Sampling,
    TransportError,
)
from clients.adapters.http_client import capped_client, post_json, redirect_loop, reply_of
from clients.adapters.reasoning import (
    decided_after_thinking,
    reasoning_body,
    refuses_sampling_parameters,
    split_thinking,
)
from clients.adapters.sse import StreamError, error_in

log = logging.getLogger(__name__)


class OpenAIAdapter(Adapter):
    name = "openai"
    supports_completions = True
    supports_streaming = True

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 dialect: str = "openai", headers: dict[str, str] | None = None,
                 sdk_headers: bool = False, stream: bool = False, reasoning: bool = False,
                 **settings):
        super().__init__(**settings)
        import openai

        self._openai = openai
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.dialect = dialect
        self.stream, self.reasoning = stream, reasoning
        api_key = os.environ.get(api_key_env)
        if not api_key:
            log.info("no API key in $%s; sending requests without one", api_key_env)
        self.api_key_env = api_key_env
        self.headers = dict(headers or {})  # --header; $API_KEY filled in at send time
        self.http = capped_client(base_url, self.max_reply_bytes, self.request_timeout,
                                  self.concurrency, redact=lambda text: self.redact(text),
                                  user_agent=self.user_agent, sdk_headers=sdk_headers)
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "unset",
                                         max_retries=0, timeout=self.request_timeout,
                                         http_client=self.http,
                                         default_headers={"accept-encoding": "identity"})

    def build_request(self, prompt: Prompt, sampling: Sampling) -> Request:
        body: dict[str, Any] = {"model": self.model, "max_tokens": sampling.max_tokens,
                                "temperature": sampling.temperature}
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if self.dialect == "transformers" and sampling.temperature > 0:
            # transformers serve samples only when the request carries a generation config
            body["generation_config"] = json.dumps({
                "do_sample": True, "temperature": sampling.temperature,
                "max_new_tokens": sampling.max_tokens})
        if self.reasoning:
            body = reasoning_body(body)
        if prompt.kind == "completion":
            return Request("completions", {**body, "prompt": prompt.text}, stream=self.stream)
        body["messages"] = prompt.messages
        if prompt.tools:
            body["tools"] = prompt.tools
        return Request("chat", body, stream=self.stream)

    async def transmit(self, request: Request) -> Reply:
        reply = await self._send(request)
        if (refuses_sampling_parameters(reply.status, reply.text)
                and ("max_tokens" in request.body or "temperature" in request.body)):
            # a reasoning model: every later request is built for one (build_request), and this
            # one (and any sent before the switch) goes again at once
            if not self.reasoning:
                log.warning("the endpoint refused max_tokens/temperature (HTTP 400): treating it "
                            "as a reasoning model from now on (max_completion_tokens, no "
                            "temperature)")
            self.reasoning = True
            reply = await self._send(Request(request.route, reasoning_body(request.body),
                                             request.stream, request.stop_when))
        return reply

    def _headers(self) -> dict[str, str]:
        api_key = os.environ.get(self.api_key_env, "")
        return {k: v.replace("$API_KEY", api_key) for k, v in self.headers.items()}

    async def _send(self, request: Request) -> Reply:
        if request.stream:
            api_key = os.environ.get(self.api_key_env)
            headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
            path = "completions" if request.route == "completions" else "chat/completions"
            body = {**request.body, "stream": True, "stream_options": {"include_usage": True}}
            return await post_json(self.http, f"{self.base_url}/{path}", body,
                                   {**headers, **self._headers()}, stream=True,
                                   delta_of=self._delta, stop_when=decided_after_thinking(
                                       request.stop_when))
        openai = self._openai
        body = dict(request.body)
        standard = ("model", "max_tokens", "max_completion_tokens", "temperature", "seed",
                    "prompt", "messages", "tools")
        extra = {k: body.pop(k) for k in list(body) if k not in standard}
        endpoint = (self.client.completions if request.route == "completions"
                    else self.client.chat.completions)
        headers = self._headers()
        try:
            raw = await endpoint.with_raw_response.create(**body, extra_body=extra or None,
                                                          extra_headers=headers or None)
        except openai.APITimeoutError:
            raise TransportError("timeout", f"no reply within {self.request_timeout:g} s") from None
        except openai.APIConnectionError as exc:
            if isinstance(exc.__cause__, httpx.TooManyRedirects):
                raise redirect_loop() from None
            raise TransportError("connection", f"connection failed ({type(exc.__cause__).__name__})"
                                 if exc.__cause__ else "connection failed") from None
        except openai.APIStatusError as exc:
            return reply_of(exc.response)
        return reply_of(raw.http_response)

    def parse(self, data: Any) -> Answer:
        if not isinstance(data, dict):
            raise TypeError("the reply is not a JSON object")
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise TypeError("the reply has no list of choices")
        choice = choices[0]
        side = {"finish_reason": fields.finish_reason(choice.get("finish_reason")),
                "usage": fields.token_usage(data.get("usage")), "meta": fields.reply_meta(data)}
        if "message" in choice:
            message = choice["message"]
            if not isinstance(message, dict):
                raise TypeError("the choice's message is not an object")
            text, thought, _ = split_thinking(
                fields.optional_text(message.get("content"), "content") or "")
            apart = any(message.get(k) for k in ("reasoning_content", "reasoning"))
            return Answer(text=text, tool_calls=fields.tool_calls(message.get("tool_calls")),
                          refusal=fields.optional_text(message.get("refusal"), "refusal"),
                          reasoning=thought or apart, **side)
        text = fields.optional_text(choice["text"], "completion text")
        if text is None:
            raise TypeError("the completion text is null")
        return Answer(text=text, **side)

    @staticmethod
    def _delta(name, data) -> str:
        """The answer text one chunk adds (chat delta content or completion text)."""
        try:
            choice = data["choices"][0]
            piece = choice["delta"].get("content") if "delta" in choice else choice.get("text")
        except (KeyError, IndexError, TypeError, AttributeError):
            return ""
        return piece if isinstance(piece, str) else ""

    def parse_stream(self, events: list) -> Answer:
        """Chunks joined: content (or completion text), tool calls by index, the last
        finish_reason, the usage chunk; reasoning deltas set apart."""
        text, calls, finish, usage, meta, apart = [], {}, None, None, {}, False
        if not any(isinstance(data, dict) and "choices" in data for _, data in events):
            raise TypeError("the stream holds no chunk")
        for name, data in events:
            message = error_in(name, data)
            if message is not None:
                raise StreamError(message)
            if not isinstance(data, dict):
                continue  # [DONE]
            meta = meta or fields.reply_meta(data)
            usage = fields.token_usage(data.get("usage")) or usage
            for choice in data.get("choices") or []:
                if not isinstance(choice, dict):
                    raise TypeError("a chunk's choice is not an object")
                finish = fields.finish_reason(choice.get("finish_reason")) or finish
                delta = choice.get("delta", {"content": choice.get("text")})
                if not isinstance(delta, dict):
                    raise TypeError("a chunk's delta is not an object")
                text.append(fields.optional_text(delta.get("content"), "content") or "")
                apart = apart or any(delta.get(k) for k in ("reasoning_content", "reasoning"))
                for call in delta.get("tool_calls") or []:
                    if not isinstance(call, dict):
                        raise TypeError("a tool call delta is not an object")
                    slot = calls.setdefault(call.get("index", len(calls)), {"name": "", "arguments": ""})
                    function = call.get("function") or {}
                    slot["name"] += fields.optional_text(function.get("name"), "a tool name") or ""
                    slot["arguments"] += fields.optional_text(function.get("arguments"),
                                                              "tool arguments") or ""
        answer, thought, _ = split_thinking("".join(text))
        return Answer(text=answer, tool_calls=[calls[i] for i in sorted(calls, key=str)],
                      finish_reason=finish, usage=usage, meta=meta, reasoning=thought or apart)

    async def aclose(self) -> None:
        await self.client.close()  # closes self.http too
