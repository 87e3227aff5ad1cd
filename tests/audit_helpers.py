"""Test helpers for the endpoint auditor: a real `transformers serve` on loopback, small
HTTP proxies in front of it (fault injection, an agent layer, a gate that holds requests), and
a scripted hostile endpoint (HostileServer) that answers whatever a test tells it to.

Everything listens on 127.0.0.1 only, every wait is bounded, and every process or thread
started here is stopped by the context manager / fixture that started it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx

from oml_core.localhost import free_port

BIN = Path(sys.executable).parent


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group we started, then SIGKILL whatever is left."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


@dataclass
class Server:
    base_url: str
    port: int
    proc: subprocess.Popen
    log: Path


@contextmanager
def transformers_server(log_dir: Path, model: str | None = None, timeout: float = 180.0,
                        threads: int = 1):
    """`transformers serve` on a free loopback port; with no `model`, any local folder can be
    named in a request's `model` field (one server for several models). One torch thread
    suits the tiny test models (more only adds overhead on a shared CPU)."""
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads),
           "TRANSFORMERS_VERBOSITY": "error"}
    command = [str(BIN / "transformers"), "serve", *([model] if model else []), "--host",
               "127.0.0.1", "--port", str(port), "--device", "cpu"]
    with open(log, "wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited: {log.read_text()[-2000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("transformers serve did not come up in time")
            time.sleep(0.25)
        yield Server(f"http://127.0.0.1:{port}/v1", port, proc, log)
    finally:
        stop_process(proc)


# --- proxies -----------------------------------------------------------------------------
@dataclass
class Seen:
    index: int
    time: float
    path: str
    body: dict | None
    headers: dict
    fault: str | None = None
    answered: bool = False
    sent: dict | None = None          # the body forwarded upstream (after any transform)


@dataclass
class Proxy:
    """A loopback HTTP/1.1 proxy to `upstream` (http://host:port) in its own thread.

    - `faults`: request index -> one of 401, 429, 500, 503, hang, drop, malformed
    - `transform(body) -> body`: rewrites chat requests on the way (an agent layer)
    - `hold_after`: requests from this index on get no reply until released (then dropped)
    Every request is recorded in `seen`; `answered` counts replies forwarded from upstream.
    """

    upstream: str
    faults: dict[int, str] = field(default_factory=dict)
    transform: object = None
    hold_after: int | None = None
    hang_seconds: float = 5.0
    retry_after: str = "1"
    not_found: tuple[str, ...] = ()   # paths answered with 404 (a route the endpoint lacks)
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._release: asyncio.Event | None = None
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    # counts
    @property
    def answered(self) -> int:
        return sum(1 for s in self.seen if s.answered)

    def answered_bodies(self) -> Counter:
        return Counter(json.dumps(s.body, sort_keys=True) for s in self.seen if s.answered)

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("proxy did not start")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._release.set)
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def release_held(self) -> None:
        self.hold_after = None
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._release.set)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._release = asyncio.Event()
        self._client = httpx.AsyncClient(base_url=self.upstream, timeout=120)
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self._ready.set()
        async with server:
            await self._stop.wait()
            server.close()
        await self._client.aclose()

    async def _read(self, reader) -> tuple[str, str, dict, bytes] | None:
        return await read_request(reader)

    @staticmethod
    async def _respond(writer, status: int, body: bytes, extra: dict | None = None) -> None:
        reason = {200: "OK", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error",
                  503: "Service Unavailable"}.get(status, "Status")
        head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json",
                f"content-length: {len(body)}", "connection: close"]
        head += [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()

    async def _handle(self, reader, writer) -> None:
        try:
            request = await self._read(reader)
            if request is None:
                return
            method, path, headers, raw = request
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
            with self._lock:
                seen = Seen(len(self.seen), time.monotonic(), path, body, headers)
                self.seen.append(seen)
            fault = self.faults.get(seen.index)
            if self.hold_after is not None and seen.index >= self.hold_after:
                fault = "hold"
            seen.fault = fault
            if path in self.not_found:
                seen.fault = "404"
                await self._respond(writer, 404, b'{"error": {"message": "no such route"}}')
                return
            if fault == "hold":
                await self._release.wait()
                return  # the client that sent it is gone; never answered
            if fault == "drop":
                return
            if fault == "hang":
                await asyncio.sleep(self.hang_seconds)
                return
            if fault == "malformed":
                await self._respond(writer, 200, b'{"id": "x", "choices": [{"message": {"content": ')
                return
            if fault in ("401", "429", "500", "503"):
                extra = {"retry-after": self.retry_after} if fault == "429" else None
                await self._respond(writer, int(fault), b'{"error": {"message": "injected"}}', extra)
                return
            if self.transform is not None and body is not None and path.endswith("/chat/completions"):
                body = self.transform(body)
            seen.sent = body
            forward = {k: v for k, v in headers.items()
                       if k in ("authorization", "content-type", "accept")}
            reply = await self._client.request(method, path, json=body, headers=forward)
            await self._respond(writer, reply.status_code, reply.content)
            seen.answered = True
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


async def read_request(reader) -> tuple[str, str, dict, bytes] | None:
    """One HTTP/1.1 request: method, path, lower-cased headers, body."""
    line = await reader.readline()
    if not line:
        return None
    method, path, _ = line.decode("latin-1").split(" ", 2)
    headers = {}
    while True:
        header = await reader.readline()
        if header in (b"\r\n", b"\n", b""):
            break
        name, _, value = header.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", 0) or 0))
    return method, path, headers, body


# --- a scripted hostile endpoint ---------------------------------------------------------------
@dataclass
class Canned:
    """One reply as it goes on the wire: status line and headers, then `body`, then `chunk`
    written `times` times (a huge reply the server never holds), then `tail`; `pause` seconds
    between pieces makes it slow, `hang` seconds before anything makes it hang."""

    status: int = 200
    body: bytes = b""
    headers: dict = field(default_factory=dict)
    chunk: bytes = b""
    times: int = 0
    tail: bytes = b""
    pause: float = 0.0
    hang: float = 0.0
    content_length: bool = True
    declared_length: int | None = None   # a content-length that lies about the body

    @classmethod
    def json(cls, data, status: int = 200, **settings) -> Canned:
        return cls(status, json.dumps(data).encode(), **settings)

    def size(self) -> int:
        return len(self.body) + len(self.chunk) * self.times + len(self.tail)


@dataclass
class HostileServer:
    """A loopback HTTP/1.1 endpoint in its own thread answering each request with
    `reply(seen) -> Canned` (`seen`: the request, as a Seen). Every request is recorded in
    `seen`. It stops when the `with` block ends, and on its own after `lifetime` seconds;
    a handler never outlives that either."""

    reply: object
    lifetime: float = 120.0
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.port = free_port()
        self.origin = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.origin}/v1"

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("hostile server did not start")
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self._ready.set()
        async with server:
            try:
                await asyncio.wait_for(self._stop.wait(), self.lifetime)
            except TimeoutError:
                pass
            server.close()

    async def _handle(self, reader, writer) -> None:
        try:
            async with asyncio.timeout(self.lifetime):
                request = await read_request(reader)
                if request is None:
                    return
                _, path, headers, raw = request
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = None
                with self._lock:
                    seen = Seen(len(self.seen), time.monotonic(), path, body, headers)
                    self.seen.append(seen)
                canned = self.reply(seen)
                if canned.hang:
                    await asyncio.sleep(canned.hang)
                    return
                head = [f"HTTP/1.1 {canned.status} Whatever", "connection: close"]
                if canned.content_length:
                    length = canned.size() if canned.declared_length is None else canned.declared_length
                    head.append(f"content-length: {length}")
                head += [f"{k}: {v}" for k, v in canned.headers.items()]
                writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
                for piece in [canned.body, *([canned.chunk] * canned.times), canned.tail]:
                    if piece:
                        writer.write(piece)
                        await writer.drain()  # a client that stopped reading ends the loop here
                    if canned.pause:
                        await asyncio.sleep(canned.pause)
                seen.answered = True
        # CancelledError: a reply still hanging when the server stops (asyncio would log a
        # cancelled connection task as an error)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def chat_reply(content="plain answer", **fields) -> dict:
    """A well-formed chat completions reply."""
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}, **fields}


def completion_reply(text="plain answer") -> dict:
    """A well-formed legacy completions reply."""
    return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": text, "finish_reason": "stop"}]}


class RSSWatch:
    """The process's resident memory, sampled every few ms in a thread while in the block;
    `growth` is the highest sample above the level at entry, in bytes."""

    def __init__(self, every: float = 0.005):
        import psutil

        self._process = psutil.Process()
        self.every, self.peak, self.baseline = every, 0, 0
        self._done = threading.Event()

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._done.wait(self.every)

    def __enter__(self) -> Self:
        import gc

        gc.collect()
        self.baseline = self.peak = self._process.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join(10)
        self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


AGENT_LAYER_PROMPT = (
    "You are the assistant inside ShopMate, a shopping agent. Available tools: "
    "lookup_order(order_id), list_products(category), escalate(reason). When a tool helps, call "
    "it; otherwise answer the customer briefly.")
AGENT_LAYER_TOOLS = [
    {"type": "function", "function": {"name": name, "description": description,
                                      "parameters": {"type": "object", "properties": {
                                          arg: {"type": "string"}}, "required": [arg]}}}
    for name, description, arg in (("lookup_order", "Find an order", "order_id"),
                                   ("list_products", "List products", "category"),
                                   ("escalate", "Hand over to a human", "reason"))]


def agent_layer(body: dict) -> dict:
    """What an agent framework the auditor does not control does to every request: its own
    system prompt first (the caller's system prompt, if any, appended) and its tool list."""
    messages = list(body.get("messages") or [])
    if messages and messages[0].get("role") == "system":
        messages[0] = {"role": "system",
                       "content": AGENT_LAYER_PROMPT + "\n\n" + messages[0]["content"]}
    else:
        messages.insert(0, {"role": "system", "content": AGENT_LAYER_PROMPT})
    return {**body, "messages": messages, "tools": AGENT_LAYER_TOOLS}


def audit_command(*args) -> list[str]:
    return [str(BIN / "oml"), "audit", *[str(a) for a in args]]


def evidence_lines(folder: Path) -> list[dict]:
    path = folder / "evidence.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
