"""The httpx client both adapters send through, made safe against what an endpoint sends back.

A suspect endpoint controls its replies, and httpx's defaults hand it the auditor's resources:
bodies are read whole (a 100 MB reply is 100 MB of memory, more once decompressed) and
redirects are followed to any host with the request body (the fingerprint key) and every
header httpx does not know to be a credential (an `X-Api-Key: $API_KEY`). So the client built
here:

- reads at most `max_bytes` of each body (a longer one is cut there and marked truncated, and
  its connection closed unread), whatever the status;
- asks for an uncompressed body and never decodes one (a small gzip can expand to gigabytes):
  a compressed reply stays opaque bytes, marked with its encoding, and counts as malformed;
- follows redirects only within the origin (scheme, host, port) of --base-url; a redirect
  anywhere else raises UnsafeRedirect before a byte goes there;
- keeps no cookies;
- sends the User-Agent the user chose and none of the openai SDK's telemetry headers.

It is httpx's own client otherwise (proxy settings from the environment still apply); the cap
is a response hook that swaps the body stream before httpx reads it. What the cap and the
encoding check found travels in `response.extensions[REPLY_INFO]`.
"""

from __future__ import annotations

from collections.abc import Callable
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

from clients.adapters.base import Reply, UnsafeRedirect

REPLY_INFO = "oml_reply"   # response.extensions entry: {"truncated": bool, "encoding": str | None}
MAX_REDIRECTS = 5
SDK_HEADER_PREFIX = "x-stainless-"  # the openai SDK's telemetry headers
_REMOVED = "oml_removed_headers"    # request.extensions entry: the SDK headers not sent
_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin(url: httpx.URL) -> tuple[str, str, int | None]:
    scheme = url.scheme.lower()
    return scheme, url.host.lower(), url.port or _DEFAULT_PORTS.get(scheme)


def _shown(target: tuple[str, str, int | None], redact: Callable[[str], str]) -> str:
    scheme, host, port = target
    shown = redact(f"{scheme}://{host}:{port}")  # redacted whole, then cut: a cut key would pass
    return "".join(ch if ch.isprintable() else "?" for ch in shown)[:120]


class _CappedStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, max_bytes: int, info: dict):
        self.inner, self.max_bytes, self.info = inner, max_bytes, info

    async def __aiter__(self):
        room = self.max_bytes
        async for chunk in self.inner:
            if len(chunk) > room:
                if room:
                    yield chunk[:room]
                self.info["truncated"] = True
                return  # the rest is never read; closing the stream drops the connection
            room -= len(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self.inner.aclose()


def capped_client(base_url: str, max_bytes: int, timeout: float, max_connections: int,
                  redact: Callable[[str], str] = str, user_agent: str | None = None,
                  sdk_headers: bool = False) -> httpx.AsyncClient:
    """An AsyncClient that reads at most `max_bytes` per reply and stays on base_url's origin;
    `redact` cleans endpoint text quoted in its errors. Every request leaves with `user_agent`
    (None: the client library's own) and, unless `sdk_headers`, without the openai SDK's
    X-Stainless-* headers (OS, architecture, Python version, retry count), which tell the
    endpoint about the auditor's machine and mark the traffic as one client's."""
    home = origin(httpx.URL(base_url))

    async def plain_headers(request: httpx.Request) -> None:
        if not sdk_headers:
            removed = {name: request.headers[name] for name in request.headers
                       if name.lower().startswith(SDK_HEADER_PREFIX)}
            for name in removed:
                del request.headers[name]
            # the SDK reads some of them back from response.request (whether the caller asked
            # for the raw response): they are put back there once the reply is in, unsent
            request.extensions = {**request.extensions, _REMOVED: removed}
        if user_agent is not None:
            request.headers["user-agent"] = user_agent

    async def restore_sdk_headers(response: httpx.Response) -> None:
        response.request.headers.update(response.request.extensions.get(_REMOVED) or {})

    async def cap_body(response: httpx.Response) -> None:
        # response hooks run before httpx reads the body, so the stream can still be swapped
        encoding = response.headers.get("content-encoding", "").strip().lower()
        info = {"truncated": False, "encoding": None if encoding in ("", "identity") else encoding}
        if "content-encoding" in response.headers:
            del response.headers["content-encoding"]  # httpx then passes the bytes through
        response.stream = _CappedStream(response.stream, max_bytes, info)
        response.extensions = {**response.extensions, REPLY_INFO: info}

    async def refuse_foreign_redirect(response: httpx.Response) -> None:
        if not response.has_redirect_location:
            return
        try:
            target = origin(response.request.url.join(response.headers["location"]))
        except (httpx.InvalidURL, ValueError, TypeError):
            target = None
        if target != home:
            where = _shown(target, redact) if target else "an unreadable location"
            raise UnsafeRedirect(
                response.status_code,
                f"HTTP {response.status_code}: the endpoint redirects to {where}, another origin "
                "than --base-url; the request was not sent there (it carries the fingerprint key "
                "and the API key); if that is the real endpoint, pass its URL as --base-url")

    return httpx.AsyncClient(
        timeout=timeout, limits=httpx.Limits(max_connections=max_connections),
        follow_redirects=True, max_redirects=MAX_REDIRECTS,
        headers={"accept-encoding": "identity"},
        # no cookie is kept: an audit has no session, and cookies would let the endpoint tie
        # the probes of one audit together
        cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])),
        event_hooks={"request": [plain_headers],
                     "response": [restore_sdk_headers, cap_body, refuse_foreign_redirect]})


def redirect_loop(status: int | None = None) -> UnsafeRedirect:
    return UnsafeRedirect(status, f"the endpoint redirected more than {MAX_REDIRECTS} times within "
                                  "its own host; pass the URL it finally answers at as --base-url")


def reply_of(response: httpx.Response) -> Reply:
    """The Reply for a response whose (capped) body has been read."""
    info = response.extensions.get(REPLY_INFO) or {}
    try:
        body = response.content
    except httpx.ResponseNotRead:
        body = b""
    # JSON on the wire is UTF-8 (RFC 8259); a declared charset would let the endpoint pick a
    # codec, and undecodable bytes become U+FFFD instead of an exception
    return Reply(response.status_code, dict(response.headers), body.decode("utf-8", "replace"),
                 truncated=bool(info.get("truncated")), encoding=info.get("encoding"))


async def post_json(http: httpx.AsyncClient, url: str, body: dict, headers: dict, *,
                    stream: bool = False, delta_of=None, stop_when=None) -> Reply:
    """POST `body` and return the Reply; with `stream`, a server-sent event reply is read as it
    comes (clients.adapters.sse.read_stream: `delta_of` gives each event's answer text,
    `stop_when` ends the read once the probe is decided). An error status, or a server that
    answers a streamed request with one JSON body, gives the ordinary Reply. Timeouts and
    connection failures raise TransportError."""
    from clients.adapters.base import TransportError
    from clients.adapters.sse import read_stream

    try:
        async with http.stream("POST", url, json=body, headers=headers) as response:
            kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
            if not (stream and 200 <= response.status_code < 300 and kind == "text/event-stream"):
                await response.aread()
                return reply_of(response)
            text, first, stopped = await read_stream(response, delta_of, stop_when)
            info = response.extensions.get(REPLY_INFO) or {}
            return Reply(response.status_code, dict(response.headers), text,
                         truncated=bool(info.get("truncated")), encoding=info.get("encoding"),
                         streamed=True, first_token_s=first, stopped_early=stopped)
    except httpx.TimeoutException:
        raise TransportError("timeout", "no reply in time") from None
    except httpx.TooManyRedirects:
        raise redirect_loop() from None
    except httpx.HTTPError as exc:
        raise TransportError("connection", f"connection failed ({type(exc).__name__})") from None
