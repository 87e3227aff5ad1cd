"""The adapter base class: owns concurrency, timeouts and retries; subclasses speak one API.

A subclass only builds a request from a prompt (`build_request`), puts it on the wire once
(`transmit`, which returns the status, headers and body text) and reads the answer out of a
successful reply (`parse`). Everything that makes an audit robust lives here, once:

- bounded concurrency: `run_all` keeps at most `concurrency` requests in flight (asyncio workers);
- per-request timeout (`request_timeout`) and a whole-run deadline;
- retries with tenacity: exponential backoff with full jitter on 429, 5xx, timeouts, dropped
  connections and malformed replies, honouring `Retry-After` / `retry-after-ms` when the
  endpoint sends one (capped at `max_backoff`);
- non-retryable statuses (400, 401, 403, 404, 422, ...) raise `FatalEndpointError` at once, so
  the audit stops early with one clear line instead of burning keys on a misconfiguration;
- every call ends in a `CallResult`, an answer or an error: an error is never turned into a miss;
- nothing the endpoint sends can raise past `call`: a body cut at the size cap, a compressed
  body, invalid or absurdly nested JSON, or an answer of the wrong shape or type all count as
  malformed (retried, then an error for that probe), and endpoint text quoted in an error
  message goes through `redact` before it is cut short (a cut key would escape redaction).

Streaming adapters also give `parse_stream` (the answer from a reply's server-sent events,
clients.adapters.sse); a stream cut before its finish reason is retried like a malformed reply.
Adding an API means a new subclass with those methods (clients.adapters.json_api holds what
the Responses and Anthropic adapters share).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
)
from tenacity.stop import stop_base
from tenacity.wait import wait_base, wait_random_exponential

log = logging.getLogger(__name__)
CANCEL_GRACE_S = 5.0  # how long cancelled calls get to finish before they are abandoned

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})


@dataclass
class Prompt:
    """What one probe sends: chat messages, or raw text for a completions endpoint."""

    kind: str                                   # "chat" or "completion"
    messages: list[dict] | None = None
    text: str | None = None
    tools: list[dict] | None = None             # OpenAI function specs, when sent natively


@dataclass
class Sampling:
    temperature: float
    max_tokens: int
    seed: int | None = None


@dataclass
class Request:
    route: str                                  # "chat", "completions", "responses", "messages"
    body: dict
    stream: bool = False                        # read the answer as server-sent events
    # streaming only: stop reading once this says the answer so far decides the probe (the
    # auditor's match rule); never recorded (it knows the response)
    stop_when: Callable[[str], bool] | None = field(default=None, repr=False, compare=False)


@dataclass
class Reply:
    status: int
    headers: dict
    text: str
    truncated: bool = False         # the body was longer than the byte cap and was cut there
    encoding: str | None = None     # a content-encoding the endpoint used although none was asked
    streamed: bool = False          # `text` is a server-sent event stream (clients.adapters.sse)
    first_token_s: float | None = None  # streamed: seconds until the first answer text arrived
    stopped_early: bool = False     # streamed: reading stopped once the answer decided the probe


@dataclass
class Answer:
    text: str
    tool_calls: list[dict] = field(default_factory=list)   # [{"name", "arguments"}]
    finish_reason: str | None = None
    refusal: str | None = None
    usage: dict | None = None
    meta: dict = field(default_factory=dict)               # reply id, model, system_fingerprint
    reasoning: bool = False          # a reasoning model's thinking was set apart from the answer
    # streamed answers: {"first_token_s": seconds to the first answer text or None,
    # "stopped_early": reading stopped once the opening decided the probe}; None when not
    stream: dict | None = None


@dataclass
class CallResult:
    answer: Answer | None
    error: dict | None                          # {"kind", "status", "message"}
    latency_s: float
    attempts: int
    retry_reasons: list[str]

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        return asdict(self)


class TransportError(Exception):
    """A failed attempt worth retrying: rate limit, server error, timeout, connection, malformed."""

    def __init__(self, kind: str, message: str, status: int | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.kind, self.status, self.retry_after = kind, status, retry_after


class FatalEndpointError(Exception):
    """The endpoint refused the request in a way retrying cannot fix (bad key, bad model, 400)."""

    def __init__(self, status: int | None, message: str):
        super().__init__(message)
        self.status = status


class UnsafeRedirect(FatalEndpointError):
    """The endpoint redirected where the request must not follow (another origin, a loop)."""


class RunDeadline(Exception):
    """The whole-run timeout passed before this call could finish."""


def parse_retry_after(headers: dict, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, `retry-after` (seconds or an HTTP date), else None."""
    lowered = {str(k).lower(): v for k, v in headers.items()}
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = lowered.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except ValueError:
            if name != "retry-after":
                continue
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, OverflowError):
                continue
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            reference = datetime.fromtimestamp(now, UTC) if now else datetime.now(UTC)
            seconds = (when - reference).total_seconds()
        if math.isfinite(seconds):
            return max(0.0, seconds)
    return None


def _short(text: str, limit: int = 200) -> str:
    # one printable line: endpoint text ends up in a terminal error line (no escape sequences)
    text = "".join(ch if ch.isprintable() else " " for ch in " ".join(str(text).split()))
    return text if len(text) <= limit else text[:limit] + "…"


class _WaitHonouringRetryAfter(wait_base):
    """Exponential backoff with full jitter, unless the endpoint said how long to wait."""

    def __init__(self, initial: float, cap: float):
        self.cap = cap
        self.backoff = wait_random_exponential(multiplier=initial, max=cap)

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return min(self.cap, retry_after)
        return self.backoff(retry_state)


class _StopAtDeadline(stop_base):
    def __init__(self, deadline: float | None):
        self.deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline


class Pacer:
    """Spaces the starts of requests like a person's: on average `rate` a second, each gap drawn
    uniformly within ±`jitter` of 1/rate (so no fixed period marks the traffic as a script's).
    Shared by all workers; every attempt, retries included, waits its turn."""

    def __init__(self, rate: float, jitter: float, seed: int | None = None):
        import random

        self.gap, self.jitter = 1.0 / rate, jitter
        self.random = random.Random(seed)
        self.lock = asyncio.Lock()
        self.next_start = 0.0

    async def wait(self) -> None:
        async with self.lock:
            delay = self.next_start - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            spread = self.gap * self.jitter
            self.next_start = time.monotonic() + self.random.uniform(self.gap - spread,
                                                                     self.gap + spread)


class Adapter(ABC):
    """Base class of every endpoint adapter (see the module docstring)."""

    name = "base"
    supports_completions = False
    supports_sampling = True
    supports_seed = True
    supports_streaming = False

    def __init__(self, *, concurrency: int = 8, request_timeout: float = 60.0,
                 max_retries: int = 6, max_backoff: float = 60.0, initial_backoff: float = 0.5,
                 max_reply_bytes: int = 1 << 20, user_agent: str | None = None,
                 rate: float | None = None, jitter: float = 0.5):
        self.concurrency = concurrency
        self.pacer = Pacer(rate, jitter) if rate else None
        self.user_agent = user_agent  # None: the HTTP client library's own
        self.request_timeout = request_timeout
        self.max_retries = max_retries
        self.max_backoff = max_backoff
        self.initial_backoff = initial_backoff
        self.max_reply_bytes = max_reply_bytes
        self.redact: Callable[[str], str] = str  # the audit installs its redactor here

    # --- what a subclass provides -------------------------------------------------------
    def unsupported(self, prompt: Prompt, sampling: Sampling) -> str | None:
        """Why this adapter cannot send such a probe (None: it can)."""
        if getattr(self, "stream", False) and not self.supports_streaming:
            return f"the {self.name} adapter does not stream"
        if prompt.kind == "completion" and not self.supports_completions:
            return f"the {self.name} adapter has no completions endpoint"
        if sampling.temperature > 0 and not self.supports_sampling:
            return f"the {self.name} adapter cannot set a temperature"
        return None

    @abstractmethod
    def build_request(self, prompt: Prompt, sampling: Sampling) -> Request:
        """The request for one probe (also what the evidence log records, key redacted)."""

    @abstractmethod
    async def transmit(self, request: Request) -> Reply:
        """Send once. Return the reply whatever its status; raise TransportError on timeouts
        and connection failures."""

    @abstractmethod
    def parse(self, data: Any) -> Answer:
        """The answer in a successful reply's decoded JSON, every field checked for its type
        (clients.adapters.reply_fields); raise when it is not there (any exception: the reply
        then counts as malformed and is retried)."""

    def parse_stream(self, events: list) -> Answer:
        """Streaming adapters: the answer assembled from a reply's events (clients.adapters.sse:
        [(event name or None, decoded data)]); raise as `parse` does."""
        raise NotImplementedError(f"the {self.name} adapter does not stream")

    async def aclose(self) -> None:
        """Release connections."""

    # --- one call, with retries ---------------------------------------------------------
    def _quoted(self, reply: Reply) -> str:
        """The start of the body for an error message: redacted whole, then cut."""
        return _short(self.redact(reply.text))

    def _check(self, reply: Reply) -> Answer:
        if reply.status == 401 or reply.status == 403:
            raise FatalEndpointError(reply.status, f"HTTP {reply.status}: the endpoint refused the "
                                     "credentials; put a valid API key in the environment variable "
                                     "named by --api-key-env")
        if reply.status in RETRYABLE_STATUS or reply.status >= 500:
            kind = "rate_limited" if reply.status == 429 else "server_error"
            raise TransportError(kind, f"HTTP {reply.status}: {self._quoted(reply)}", reply.status,
                                 parse_retry_after(reply.headers))
        if not 200 <= reply.status < 300:
            raise FatalEndpointError(reply.status, f"HTTP {reply.status}: {self._quoted(reply)}; "
                                     "check --base-url, --model and the request settings")
        if reply.truncated:
            raise TransportError("too_large", f"the reply is longer than --max-reply-bytes "
                                 f"({self.max_reply_bytes} bytes); reading stopped there",
                                 reply.status)
        if reply.encoding:
            encoding = _short(self.redact(reply.encoding), 40)
            raise TransportError("malformed", f"the reply is compressed ({encoding}) although an "
                                 "uncompressed one was asked for", reply.status)
        if reply.streamed:
            return self._check_stream(reply)
        try:
            data = json.loads(reply.text)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the stack
            raise TransportError("malformed", "the reply is not valid JSON", reply.status) from None
        try:
            return self.parse(data)
        except Exception as exc:  # noqa: BLE001 - whatever the shape, the reply is malformed
            raise TransportError("malformed", f"no answer in the reply ({type(exc).__name__})",
                                 reply.status) from None

    def _check_stream(self, reply: Reply) -> Answer:
        from clients.adapters.sse import StreamError, parse_events

        try:
            answer = self.parse_stream(parse_events(reply.text))
        except StreamError as exc:  # the endpoint sent an error event mid-stream
            raise TransportError("server_error", f"the stream ended with an error: "
                                 f"{_short(self.redact(str(exc)))}", reply.status) from None
        except Exception as exc:  # noqa: BLE001 - whatever the shape, the stream is malformed
            raise TransportError("malformed", f"no answer in the stream ({type(exc).__name__})",
                                 reply.status) from None
        if answer.finish_reason is None and not reply.stopped_early:
            # cut before the answer ended (a dropped connection, or a server such as
            # llama-cpp-python's that interrupts a stream when another request arrives): what
            # came is not the answer, and counting it as one could turn a hit into a miss
            raise TransportError("malformed", "the stream ended before the answer did (no "
                                 "finish reason)", reply.status)
        answer.stream = {"first_token_s": reply.first_token_s, "stopped_early": reply.stopped_early}
        return answer

    async def _attempt(self, request: Request) -> Answer:
        if self.pacer is not None:
            await self.pacer.wait()
        try:
            async with asyncio.timeout(self.request_timeout + 1.0):  # a guard over the client's own
                reply = await self.transmit(request)
        except TimeoutError:
            raise TransportError("timeout", f"no reply within {self.request_timeout:g} s") from None
        except (TransportError, FatalEndpointError):
            raise
        except Exception as exc:  # noqa: BLE001 - a client library tripping over a reply
            # the type only: library messages can quote the URL or the reply
            log.debug("the HTTP client raised %s; retrying", type(exc).__name__)
            raise TransportError("connection", f"the request failed ({type(exc).__name__})") from None
        return self._check(reply)

    async def call(self, request: Request, deadline: float | None = None) -> CallResult:
        """Send one request until it succeeds, fails for good, or the retries run out."""
        start = time.monotonic()
        reasons: list[str] = []
        attempts = 0

        def note(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            reasons.append(getattr(exc, "kind", type(exc).__name__))
            log.debug("retrying after %s (attempt %d)", reasons[-1], state.attempt_number)

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(TransportError),
            stop=stop_after_attempt(self.max_retries + 1) | _StopAtDeadline(deadline),
            wait=_WaitHonouringRetryAfter(self.initial_backoff, self.max_backoff),
            before_sleep=note, reraise=True)
        try:
            async for attempt in retrying:
                with attempt:
                    attempts += 1
                    answer = await self._attempt(request)
        except TransportError as exc:
            error = {"kind": exc.kind, "status": exc.status, "message": str(exc)}
            return CallResult(None, error, time.monotonic() - start, attempts, reasons)
        return CallResult(answer, None, time.monotonic() - start, attempts, reasons)

    # --- many calls, bounded concurrency ------------------------------------------------
    async def run_all(self, jobs: Sequence[Any], request_of: Callable[[Any], Request | None],
                      on_result: Callable[[Any, Request | None, CallResult], Awaitable[None] | None],
                      deadline: float | None = None,
                      tolerate: Callable[[Any, FatalEndpointError], bool] | None = None) -> None:
        """Run every job with at most `concurrency` in flight; `on_result` sees each result as it
        completes. `request_of` may return None to skip a job. A FatalEndpointError stops the
        run (raised after the workers are cancelled) unless `tolerate(job, error)` says it only
        concerns that job. Once the deadline passes no new job starts and RunDeadline is raised;
        calls cut short by it are not reported (they stay pending for a resume)."""
        queue: asyncio.Queue = asyncio.Queue()
        for job in jobs:
            queue.put_nowait(job)

        async def report(job: Any, request: Request | None, result: CallResult) -> None:
            outcome = on_result(job, request, result)
            if asyncio.iscoroutine(outcome):
                await outcome

        async def worker() -> None:
            while True:
                try:
                    job = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    raise RunDeadline()
                request = request_of(job)
                if request is None:
                    continue
                try:
                    result = await self.call(request, deadline)
                except FatalEndpointError as exc:
                    error = {"kind": "fatal", "status": exc.status, "message": str(exc)}
                    await report(job, request, CallResult(None, error, 0.0, 1, []))
                    if tolerate is not None and tolerate(job, exc):
                        continue
                    raise
                if deadline is not None and not result.ok and time.monotonic() >= deadline:
                    raise RunDeadline()
                await report(job, request, result)

        if not jobs:
            return
        workers = [asyncio.create_task(worker()) for _ in range(min(self.concurrency, len(jobs)))]
        try:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            async with asyncio.timeout(remaining):
                done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()
        except TimeoutError:
            raise RunDeadline() from None
        finally:
            for task in workers:
                task.cancel()
            # bounded: a client library that defers cancellation while a response is held
            # open must not keep Ctrl-C from ending the run
            await asyncio.wait(workers, timeout=CANCEL_GRACE_S)
