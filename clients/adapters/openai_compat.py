"""OpenAI-compatible endpoints (OpenAI, vLLM, llama.cpp, TGI, `transformers serve`, ...).

Chat completions for every chat layer, legacy completions for the raw layer, both through the
official `openai` SDK with its own retries switched off (the base class owns retries). The SDK
sends through our httpx client (clients.adapters.http_client: a byte cap per reply, no
compressed bodies, redirects only within the endpoint's origin). The reply body is read as
text and decoded here, every field checked for its type (clients.adapters.reply_fields), so a
malformed reply is seen as one (and retried) rather than half-parsed.
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
from clients.adapters.http_client import capped_client, redirect_loop, reply_of

log = logging.getLogger(__name__)


class OpenAIAdapter(Adapter):
    name = "openai"
    supports_completions = True

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 dialect: str = "openai", headers: dict[str, str] | None = None,
                 sdk_headers: bool = False, **settings):
        super().__init__(**settings)
        import openai

        self._openai = openai
        self.model = model
        self.dialect = dialect
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
        if prompt.kind == "completion":
            return Request("completions", {**body, "prompt": prompt.text})
        body["messages"] = prompt.messages
        if prompt.tools:
            body["tools"] = prompt.tools
        return Request("chat", body)

    async def transmit(self, request: Request) -> Reply:
        openai = self._openai
        body = dict(request.body)
        standard = ("model", "max_tokens", "temperature", "seed", "prompt", "messages", "tools")
        extra = {k: body.pop(k) for k in list(body) if k not in standard}
        endpoint = (self.client.completions if request.route == "completions"
                    else self.client.chat.completions)
        api_key = os.environ.get(self.api_key_env, "")
        headers = {k: v.replace("$API_KEY", api_key) for k, v in self.headers.items()}
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
            return Answer(text=fields.optional_text(message.get("content"), "content") or "",
                          tool_calls=fields.tool_calls(message.get("tool_calls")),
                          refusal=fields.optional_text(message.get("refusal"), "refusal"), **side)
        text = fields.optional_text(choice["text"], "completion text")
        if text is None:
            raise TypeError("the completion text is null")
        return Answer(text=text, **side)

    async def aclose(self) -> None:
        await self.client.close()  # closes self.http too
