"""Any JSON chat API, described by a request template, over httpx.

The template is a JSON body. String values may contain placeholders:
  $KEY          the text of the last user message (the key, or the key inside a longer message)
  $SYSTEM       the system prompt ("" when the probe has none)
  $MESSAGES     as a whole value: the OpenAI-style message list (system/user/assistant turns)
  $MODEL        --model
  $TEMPERATURE, $MAX_TOKENS, $SEED   as whole values: numbers (SEED: null when not sampling)
Headers come from `--header 'Name: value'`; `$API_KEY` in a header value is replaced, at send
time only, by the key in the environment variable named by --api-key-env. The answer is read
from the reply at a dotted path (`choices.0.message.content`, `output.text`, ...).

Which probe layers a template can express follows from its placeholders: system prompts need
$SYSTEM or $MESSAGES, a multi-turn conversation needs $MESSAGES, sampling needs $TEMPERATURE.

Requests go through clients.adapters.http_client (a byte cap per reply, no compressed bodies,
redirects only within the URL's origin: a custom header such as `X-Api-Key: $API_KEY` would
otherwise follow a redirect to any host).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

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
from oml_core.errors import OMLInputError

log = logging.getLogger(__name__)

WHOLE_VALUES = ("$MESSAGES", "$TEMPERATURE", "$MAX_TOKENS", "$SEED")


def load_template(spec: str) -> Any:
    """The template from inline JSON or a file path."""
    text = spec
    if not spec.lstrip().startswith(("{", "[")):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise OMLInputError(f"--request-template {spec!r} is neither JSON nor a file; pass a "
                                "JSON body with $KEY or a path to one")
        text = path.read_text(encoding="utf-8")
    try:
        template = json.loads(text)
    except ValueError as exc:
        raise OMLInputError(f"--request-template is not valid JSON ({exc}); fix the template") from None
    if "$KEY" not in json.dumps(template) and "$MESSAGES" not in json.dumps(template):
        raise OMLInputError("--request-template has no $KEY or $MESSAGES placeholder; put $KEY where "
                            "the user message goes")
    return template


def parse_headers(lines: list[str]) -> dict[str, str]:
    headers = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise OMLInputError(f"--header {name.strip()!r}…: use the form 'Name: value'")
        headers[name.strip()] = value.strip()
    return headers


def json_path(data: Any, path: str) -> Any:
    """Follow a dotted path; integer parts index lists. Raises KeyError/IndexError/TypeError."""
    for part in path.split("."):
        if isinstance(data, list):
            data = data[int(part)]
        elif isinstance(data, dict):
            data = data[part]
        else:
            raise TypeError(f"cannot follow {part!r} into a {type(data).__name__}")
    return data


class HTTPTemplateAdapter(Adapter):
    name = "http"
    supports_completions = False

    def __init__(self, base_url: str, model: str, template: Any, headers: dict[str, str],
                 answer_path: str, api_key_env: str = "OPENAI_API_KEY", **settings):
        super().__init__(**settings)
        self.url, self.model, self.template = base_url, model, template
        self.answer_path = answer_path
        self.api_key_env = api_key_env
        self._headers = {"content-type": "application/json", **headers}
        text = json.dumps(template)
        self.has = {p: p in text for p in ("$SYSTEM", "$MESSAGES", "$TEMPERATURE", "$SEED")}
        self.supports_sampling = self.has["$TEMPERATURE"]
        self.supports_seed = self.has["$SEED"]
        self.client = capped_client(base_url, self.max_reply_bytes, self.request_timeout,
                                    self.concurrency, redact=lambda text: self.redact(text),
                                    user_agent=self.user_agent)

    def unsupported(self, prompt: Prompt, sampling: Sampling) -> str | None:
        reason = super().unsupported(prompt, sampling)
        if reason or self.has["$MESSAGES"] or prompt.kind != "chat":
            return reason
        roles = [m["role"] for m in prompt.messages]
        if "assistant" in roles:
            return "the request template has no $MESSAGES for a multi-turn conversation"
        if "system" in roles and not self.has["$SYSTEM"]:
            return "the request template has no $SYSTEM or $MESSAGES for a system prompt"
        return None

    def _fill(self, node: Any, values: dict[str, Any]) -> Any:
        if isinstance(node, dict):
            return {k: self._fill(v, values) for k, v in node.items()}
        if isinstance(node, list):
            return [self._fill(v, values) for v in node]
        if isinstance(node, str):
            if node in WHOLE_VALUES:
                return values[node]
            for name in ("$SYSTEM", "$MODEL", "$KEY"):  # $KEY last: a key may contain a '$'
                node = node.replace(name, str(values[name]))
        return node

    def build_request(self, prompt: Prompt, sampling: Sampling) -> Request:
        messages = prompt.messages or []
        system = next((m["content"] for m in messages if m["role"] == "system"), "")
        user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        values = {"$KEY": user, "$SYSTEM": system, "$MESSAGES": messages, "$MODEL": self.model,
                  "$TEMPERATURE": sampling.temperature, "$MAX_TOKENS": sampling.max_tokens,
                  "$SEED": sampling.seed}
        return Request("chat", self._fill(self.template, values))

    async def transmit(self, request: Request) -> Reply:
        import httpx

        api_key = os.environ.get(self.api_key_env, "")
        headers = {k: v.replace("$API_KEY", api_key) for k, v in self._headers.items()}
        try:
            response = await self.client.post(self.url, json=request.body, headers=headers)
        except httpx.TimeoutException:
            raise TransportError("timeout", f"no reply within {self.request_timeout:g} s") from None
        except httpx.TooManyRedirects:
            raise redirect_loop() from None
        except httpx.HTTPError as exc:
            raise TransportError("connection", f"connection failed ({type(exc).__name__})") from None
        return reply_of(response)

    def parse(self, data: Any) -> Answer:
        text = fields.optional_text(json_path(data, self.answer_path), "the value at --answer-path")
        usage = fields.token_usage(data.get("usage")) if isinstance(data, dict) else None
        return Answer(text=text or "", usage=usage)

    async def aclose(self) -> None:
        await self.client.aclose()
