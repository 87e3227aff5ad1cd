"""OpenAI-compatible endpoints (OpenAI, vLLM, llama.cpp, TGI, `transformers serve`, ...).

Chat completions for every chat layer, legacy completions for the raw layer, both through the
official `openai` SDK with its own retries switched off (the base class owns retries). The
reply body is read as text and decoded here, so a malformed reply is seen as one (and retried)
rather than half-parsed.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from clients.adapters.base import (
    Adapter,
    Answer,
    Prompt,
    Reply,
    Request,
    Sampling,
    TransportError,
)

log = logging.getLogger(__name__)


class OpenAIAdapter(Adapter):
    name = "openai"
    supports_completions = True

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
                 dialect: str = "openai", **settings):
        super().__init__(**settings)
        import openai

        self._openai = openai
        self.model = model
        self.dialect = dialect
        api_key = os.environ.get(api_key_env)
        if not api_key:
            log.info("no API key in $%s; sending requests without one", api_key_env)
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key or "unset",
                                         max_retries=0, timeout=self.request_timeout)

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
        try:
            raw = await endpoint.with_raw_response.create(**body, extra_body=extra or None)
        except openai.APITimeoutError:
            raise TransportError("timeout", f"no reply within {self.request_timeout:g} s") from None
        except openai.APIConnectionError as exc:
            raise TransportError("connection", f"connection failed ({type(exc.__cause__).__name__})"
                                 if exc.__cause__ else "connection failed") from None
        except openai.APIStatusError as exc:
            response = exc.response
            return Reply(response.status_code, dict(response.headers), _text(response))
        return Reply(raw.status_code, dict(raw.headers), raw.text)

    def parse(self, data: Any) -> Answer:
        choice = data["choices"][0]
        meta = {k: data.get(k) for k in ("id", "model", "system_fingerprint") if data.get(k)}
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
        if "message" in choice:
            message = choice["message"]
            calls = [{"name": (c.get("function") or {}).get("name"),
                      "arguments": (c.get("function") or {}).get("arguments")}
                     for c in message.get("tool_calls") or []]
            return Answer(text=message.get("content") or "", tool_calls=calls,
                          finish_reason=choice.get("finish_reason"), refusal=message.get("refusal"),
                          usage=usage, meta=meta)
        text = choice["text"]
        if not isinstance(text, str):
            raise TypeError("completion text is not a string")
        return Answer(text=text, finish_reason=choice.get("finish_reason"), usage=usage, meta=meta)

    async def aclose(self) -> None:
        await self.client.close()


def _text(response) -> str:
    try:
        return response.text
    except Exception:  # noqa: BLE001 - a body that cannot be read is still an error reply
        return ""
