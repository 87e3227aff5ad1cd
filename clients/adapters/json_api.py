"""The shared half of adapters that speak a JSON API directly over httpx (Responses, Messages).

Such a subclass names the path of each route, its credential headers and its request and reply
shapes; this class owns the client (clients.adapters.http_client: byte cap, no compressed
bodies, redirects only within the origin), the `--header` values (with `$API_KEY` filled in at
send time only) and sending, whole or streamed (clients.adapters.sse).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from clients.adapters.base import Adapter, Reply, Request
from clients.adapters.http_client import capped_client, post_json
from clients.adapters.reasoning import decided_after_thinking

log = logging.getLogger(__name__)


class JSONAPIAdapter(Adapter):
    supports_streaming = True
    paths: dict[str, str] = {}  # route -> path under --base-url

    def __init__(self, base_url: str, model: str, api_key_env: str,
                 headers: dict[str, str] | None = None, stream: bool = False, **settings):
        super().__init__(**settings)
        self.base_url, self.model, self.stream = base_url.rstrip("/"), model, stream
        self.api_key_env = api_key_env
        if not os.environ.get(api_key_env):
            log.info("no API key in $%s; sending requests without one", api_key_env)
        self.headers = dict(headers or {})
        self.http = capped_client(base_url, self.max_reply_bytes, self.request_timeout,
                                  self.concurrency, redact=lambda text: self.redact(text),
                                  user_agent=self.user_agent)

    def credential_headers(self, api_key: str) -> dict[str, str]:
        """The headers that carry the API key (only called with one)."""
        return {"authorization": f"Bearer {api_key}"}

    def delta_of(self, name: str | None, data: Any) -> str:
        """The answer text one streamed event adds ("" for any other event)."""
        return ""

    async def send(self, request: Request, body: dict) -> Reply:
        api_key = os.environ.get(self.api_key_env, "")
        headers = self.credential_headers(api_key) if api_key else {}
        headers.update({k: v.replace("$API_KEY", api_key) for k, v in self.headers.items()})
        if request.stream:
            body = {**body, "stream": True}
        return await post_json(self.http, f"{self.base_url}/{self.paths[request.route]}", body,
                               headers, stream=request.stream, delta_of=self._safe_delta,
                               stop_when=decided_after_thinking(request.stop_when))

    async def transmit(self, request: Request) -> Reply:
        return await self.send(request, request.body)

    def _safe_delta(self, name, data) -> str:
        try:
            piece = self.delta_of(name, data)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError):
            return ""  # the shape is judged once the stream is read (parse_stream)
        return piece if isinstance(piece, str) else ""

    async def aclose(self) -> None:
        await self.http.aclose()
