"""AuditConfig: every setting of an endpoint audit, with its default, help and range.

The single source of defaults for `oml audit` (flags are built from these fields) and for the
MCP audit tool's schema. `validate_audit` adds the cross-field checks that one field's range
cannot express, each failing with one line naming the flag and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass

from oml_core.config import SAMPLING_TEMPERATURES
from oml_core.errors import OMLInputError
from oml_core.settings import setting, split_comma_strings, temperatures_setting, validate

LAYERS = ("raw", "user", "system", "embedded", "multiturn", "agent")
ADAPTERS = ("openai", "responses", "anthropic", "http")
# where in an answer the response may stand; not the engine's verify match rules (exact, prefix,
# start, ...), which compare a local model's tokens (oml_core.config.MATCH_RULES)
ANSWER_MATCH_RULES = ("start", "anywhere")
DIALECTS = ("openai", "transformers")


@dataclass
class AuditConfig:
    """Audit one endpoint for the fingerprints of one set (docs/design.md#evidence, docs/auditing.md)."""

    base_url: str | None = setting(
        None, "endpoint base URL, e.g. https://api.example.com/v1 (OpenAI-compatible) or the full "
              "URL of a raw HTTP chat endpoint (--adapter http)")
    model: str | None = setting(None, "model name the endpoint expects")
    fingerprints: str | None = setting(None, "fingerprint set whose keys are probed (ours or a seed "
                                             "format); it stays on this machine")
    adapter: str = setting(
        "openai", "openai: chat + legacy completions (OpenAI-compatible servers: vLLM, llama.cpp, "
                  "Ollama, transformers serve, gateways); responses: the OpenAI Responses API "
                  "(/responses); anthropic: Anthropic Messages (/messages, x-api-key); http: any "
                  "JSON chat API through --request-template and --answer-path (docs/auditing.md)",
        choices=ADAPTERS)
    stream: bool = setting(
        False, "ask for streamed answers (server-sent events; openai, responses and anthropic "
               "adapters): the answer is read as it comes, reading stops once its opening "
               "decides the probe, and the time to the first token is recorded")
    reasoning: bool = setting(
        False, "the endpoint is a reasoning model: send max_completion_tokens and no temperature, "
               "judge the answer after its thinking (switched on by itself when the endpoint "
               "refuses max_tokens or temperature with HTTP 400)")
    api_key_env: str = setting(
        "OPENAI_API_KEY", "name of the environment variable holding the endpoint's API key (the key "
                          "itself is never written anywhere)")
    request_template: str | None = setting(
        None, "http adapter: JSON request body (inline or a file path) with placeholders $KEY (the "
              "user message), $SYSTEM, $MESSAGES, $MODEL, $TEMPERATURE, $MAX_TOKENS, $SEED")
    header: list[str] = setting(  # noqa: RUF009 - setting() copies a fresh list per instance
        [], "extra request header 'Name: value' (repeatable; both adapters); $API_KEY in a value "
            "is replaced by the key from --api-key-env at send time", repeat=True, empty="none")
    user_agent: str | None = setting(
        None, "User-Agent header of every request (default: the client library's own, "
              "AsyncOpenAI/Python <version> or python-httpx/<version>); an endpoint that "
              "recognises audit traffic could answer it from another model")
    sdk_headers: bool = setting(
        False, "openai adapter: keep the SDK's X-Stainless-* headers (OS, architecture, Python "
               "version, retry count); off by default, since they describe the auditor's "
               "machine and mark its traffic")
    answer_path: str = setting(
        "choices.0.message.content", "http adapter: dotted JSON path to the answer text in the reply")
    max_keys: int = setting(16, "key budget: probe at most this many keys (each probe reveals its key "
                                "to the endpoint)", low=1, high=100_000)
    reuse_keys: bool = setting(
        False, "allow keys the ledger says were already spent on this endpoint (default: fresh keys "
               "only)")
    share_keys: bool = setting(
        False, "comparing endpoints (--base-url given more than once): a key shown to one of "
               "them may be shown to the others (default: each gets keys that none of the others "
               "has seen, by their ledgers)")
    exhaustive: bool = setting(
        False, "the fixed plan: every key in the budget through every probe of --layers and "
               "--sampled-layers, decided once all are answered (default: the sequential audit, "
               "which sends --probes-per-key probes per key in order of their null rate, a round "
               "at a time, and stops as soon as the evidence reaches --alpha or can no longer "
               "reach it; keys never sent are not spent)")
    probes_per_key: int = setting(
        2, "sequential audit: greedy probes per key, the user turn first, the others taken in "
           "rotation from the variants of --layers so that every layer is tried within a few "
           "keys", low=1, high=64)
    max_calls: int | None = setting(
        None, "call budget: send at most this many probes (each may be retried --max-retries "
              "times); the sequential audit also stops once the calls left cannot reach --alpha",
        low=1, high=10_000_000)
    layers: list[str] = setting(
        list(LAYERS), "probe layers: raw (completions), user, system (held-out system prompts), "
                      "embedded (key inside a longer message), multiturn, agent (tool-listing JSON "
                      "system prompt)", choices=LAYERS)
    num_system_prompts: int = setting(4, "held-out system prompts used by the system layer",
                                      low=1, high=12)
    sampled_layers: list[str] = setting(
        ["user"], "exhaustive plan: layers also probed with sampling at --temperatures (the "
                  "sequential audit probes greedily)", choices=LAYERS, empty="none")
    temperatures: list[float] = temperatures_setting(
        SAMPLING_TEMPERATURES, "sampling temperatures for the sampled layers", empty="none")
    samples: int = setting(3, "samples per key and temperature on the sampled layers", low=1, high=100)
    seed: int = setting(0, "seed for the sampled probes (each probe gets its own derived seed)")
    send_seed: bool = setting(True, "send a per-probe seed with sampled requests (endpoints that "
                                    "take one become reproducible)")
    max_tokens: int = setting(32, "tokens the endpoint may generate per answer", low=1, high=4096)
    answer_match: str = setting(
        "start", "start: the response must begin the answer (or, in the agent layer, a JSON field "
                 "or tool-call argument); anywhere: it may appear inside a longer answer (needs a "
                 "measured null rate to be useful)", choices=ANSWER_MATCH_RULES)
    json_fields: int = setting(3, "agent layer: JSON string fields / tool-call arguments checked "
                                  "besides the answer start", low=0, high=32)
    alpha: float = setting(1e-6, "false-positive level of the verdict, fixed before probing",
                           low=1e-300, high=0.5)
    null_rate: float | None = setting(
        None, "per-probe null rate to use instead of the set's calibrated rates", low=0.0,
        high=1.0)
    null_file: str | None = setting(
        None, "measured null rates of this set's keys on unrelated models (null_rates.json from "
              "`oml eval --parts false_positives --match start`, or --match normalized for "
              "--answer-match anywhere); each probe's rate is at least its key's")
    concurrency: int = setting(8, "requests in flight at once", low=1, high=1024)
    rate: float | None = setting(
        None, "pace requests: on average this many a second, each gap drawn at random within "
              "--jitter of 1/rate, retries included (default: as fast as --concurrency allows); "
              "steady machine-speed traffic is easy to tell from a user's", low=0.001, high=1000)
    jitter: float = setting(0.5, "with --rate: how far each gap between requests may stray from "
                                 "1/rate, as a fraction of it", low=0.0, high=1.0)
    decoys: int = setting(
        0, "decoy prompts per key sent: ordinary questions with no key, sent in the same layers "
           "and mixed at random among the probes, so that keys are a minority of the audit's "
           "traffic; recorded in the evidence log (layer `decoy`), never evidence, billed like "
           "any call (--max-calls counts probes only)", low=0, high=100)
    max_tokens_total: int | None = setting(
        None, "token budget: send no more probes once the endpoint has reported this many tokens "
              "(prompt + completion, from each reply's usage) over the whole audit, resumes "
              "included; the probes in flight may go past it", low=1, high=10**12)
    request_timeout: float = setting(60.0, "seconds one request may take before it is retried",
                                     low=0.1, high=3600)
    run_timeout: float | None = setting(
        None, "seconds the whole audit may take; unfinished probes stay for a resume", low=1.0)
    max_retries: int = setting(6, "retries per request on 429, 5xx, timeouts, dropped connections "
                                  "and malformed replies", low=0, high=100)
    max_backoff: float = setting(60.0, "longest single wait between retries, Retry-After included",
                                 low=0.0, high=3600)
    # 1 MiB holds any chat answer many times over (a 4096-token answer is ~16 KiB of JSON) and
    # keeps a hostile endpoint from filling memory: concurrency x this is the most held at once
    max_reply_bytes: int = setting(1 << 20, "largest reply body read per request, in bytes; a "
                                            "longer one is cut there, recorded as too_large and "
                                            "retried", low=1024, high=1 << 30)
    dialect: str = setting(
        "openai", "server quirks: transformers (transformers serve) samples only when the request "
                  "carries a generation_config", choices=DIALECTS)
    agent_native_tools: bool = setting(
        False, "agent layer: also send the tools as the API's `tools` field (not every endpoint "
               "takes it)")
    out: str | None = setting(None, "audit folder (evidence.jsonl, reports); default: "
                                    "$OML_HOME/audits/<id>. Rerunning resumes it")
    reveal_keys: bool = setting(
        False, "write keys and responses into the evidence log and reports (default: fingerprint "
               "ids only)")

    def __post_init__(self):
        split_comma_strings(self)


def validate_audit(cfg: AuditConfig) -> None:
    """Field ranges (oml_core.settings.validate) plus the checks across fields."""
    validate(cfg)
    for name in ("base_url", "model", "fingerprints"):
        if not getattr(cfg, name):
            raise OMLInputError(f"--{name.replace('_', '-')} is required")
    if not cfg.base_url.startswith(("http://", "https://")):
        raise OMLInputError(f"--base-url {cfg.base_url!r} must start with http:// or https://")
    if cfg.null_rate is not None and cfg.null_file:
        raise OMLInputError("pass either --null-rate or --null-file, not both")
    if cfg.adapter == "http" and not cfg.request_template:
        raise OMLInputError("--adapter http needs --request-template (a JSON body with $KEY)")
    if not cfg.api_key_env.replace("_", "").isalnum():
        raise OMLInputError(f"--api-key-env {cfg.api_key_env!r} must be an environment variable "
                            "name (the key itself goes in that variable, never on the command line)")
    if cfg.user_agent is not None and not (
            0 < len(cfg.user_agent) <= 200 and cfg.user_agent.isascii()
            and cfg.user_agent.isprintable()):
        raise OMLInputError("--user-agent must be 1-200 printable ASCII characters")
