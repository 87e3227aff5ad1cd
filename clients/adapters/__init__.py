"""Endpoint adapters: one class per API behind the retrying, concurrent base class.

`make_adapter(cfg)` picks the class named by `cfg.adapter`: openai (chat + completions),
responses (the OpenAI Responses API), anthropic (Messages), http (a request template). To add
an API, subclass `Adapter` with `build_request`, `transmit` and `parse` (and `parse_stream` to
stream), and register it in ADAPTERS; nothing else in the auditor changes.
"""

from __future__ import annotations

from clients.adapters.base import (
    Adapter,
    Answer,
    CallResult,
    FatalEndpointError,
    Prompt,
    Reply,
    Request,
    RunDeadline,
    Sampling,
    TransportError,
    UnsafeRedirect,
)


def _openai(cfg, settings):
    from clients.adapters.openai_compat import OpenAIAdapter

    from clients.adapters.http_template import parse_headers

    return OpenAIAdapter(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env, dialect=cfg.dialect,
                         headers=parse_headers(cfg.header), sdk_headers=cfg.sdk_headers,
                         stream=cfg.stream, reasoning=cfg.reasoning, **settings)


def _responses(cfg, settings):
    from clients.adapters.http_template import parse_headers
    from clients.adapters.responses_api import ResponsesAdapter

    return ResponsesAdapter(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env,
                            headers=parse_headers(cfg.header), stream=cfg.stream,
                            reasoning=cfg.reasoning, **settings)


def _anthropic(cfg, settings):
    from clients.adapters.anthropic_messages import AnthropicAdapter
    from clients.adapters.http_template import parse_headers

    return AnthropicAdapter(cfg.base_url, cfg.model, api_key_env=cfg.api_key_env,
                            headers=parse_headers(cfg.header), stream=cfg.stream, **settings)


def _http(cfg, settings):
    from clients.adapters.http_template import (
        HTTPTemplateAdapter,
        load_template,
        parse_headers,
    )

    return HTTPTemplateAdapter(cfg.base_url, cfg.model, load_template(cfg.request_template),
                               parse_headers(cfg.header), cfg.answer_path,
                               api_key_env=cfg.api_key_env, **settings)


ADAPTERS = {"openai": _openai, "responses": _responses, "anthropic": _anthropic, "http": _http}


def make_adapter(cfg) -> Adapter:
    settings = {"concurrency": cfg.concurrency, "request_timeout": cfg.request_timeout,
                "max_retries": cfg.max_retries, "max_backoff": cfg.max_backoff,
                "max_reply_bytes": cfg.max_reply_bytes, "user_agent": cfg.user_agent,
                "rate": cfg.rate, "jitter": cfg.jitter}
    return ADAPTERS[cfg.adapter](cfg, settings)


__all__ = ["ADAPTERS", "Adapter", "Answer", "CallResult", "FatalEndpointError", "Prompt", "Reply",
           "Request", "RunDeadline", "Sampling", "TransportError", "UnsafeRedirect",
           "make_adapter"]
