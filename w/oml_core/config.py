"""Typed settings for each stage: the single source of defaults.

The CLI builds its flags from these dataclasses, the MCP tools build their schemas from them
and the workers receive them as JSON, so a default lives in exactly one place. Each field
carries its help text and, where it has one, its allowed range or choices; `validate()`
checks them and names the flag and the fix in one line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from oml_core.errors import OMLInputError

STRATEGIES = ("english", "random_word", "english_random_response", "perinucleus")
STRATEGY_ALIASES = {"inverse_nucleus": "perinucleus"}
MATCH_RULES = ("exact", "prefix", "contains", "normalized")
CONTEXTS = ("auto", "chat", "raw")
WRAPPER_KINDS = ("bare", "chat", "system")


def setting(default: Any = None, help: str = "", *, choices=None, low=None, high=None, flag=None):
    """A dataclass field with the metadata the CLI, MCP schemas and `validate` read."""
    meta = {"help": help, "choices": choices, "low": low, "high": high, "flag": flag}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSettings:
    model: str | None = setting(
        None, "local model folder or hub id; default: the bundled SmolLM2-135M-Instruct")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = setting("auto", "auto (bf16 on GPU, fp32 on CPU), float32, bfloat16 or float16",
                         choices=("auto", "float32", "bfloat16", "float16"))


@dataclass
class GenerateConfig(ModelSettings):
    strategy: str = setting(
        "perinucleus", "how keys and responses are made (inverse_nucleus is an alias of perinucleus)",
        choices=STRATEGIES + tuple(STRATEGY_ALIASES))
    num_fingerprints: int = setting(64, "how many fingerprints to make (exactly this many)",
                                    low=1, high=100_000)
    key_length: int = setting(16, "key length in tokens of the target tokenizer", low=1, high=1024)
    response_length: int = setting(1, "response length in tokens of the target tokenizer",
                                   low=1, high=256)
    seed: int = setting(0, "random seed: the same seed, model and settings give the same set")
    keys_file: str | None = setting(
        None, "JSON file of custom keys (a list of strings, or any fingerprint file); "
              "keys are truncated to --key-length tokens")
    key_model: str | None = setting(
        None, "model that writes English keys; default: the target model")
    perinucleus_threshold: float = setting(
        0.8, "perinucleus: nucleus mass t; responses are drawn just outside it", low=0.01, high=0.999)
    perinucleus_k: int = setting(3, "perinucleus: draw among the first k tokens after the nucleus",
                                 low=1, high=1000)
    context: str = setting(
        "auto", "perinucleus: score the key as a chat user turn or as raw text "
                "(auto: chat when the model has a chat template)", choices=CONTEXTS)
    batch_size: int = setting(32, "rows per model call", low=1, high=65536)
    out: str | None = setting(None, "where to write the fingerprint set (JSON)")

    def __post_init__(self):
        self.strategy = STRATEGY_ALIASES.get(self.strategy, self.strategy)


@dataclass
class VerifyConfig(ModelSettings):
    fingerprints: str | None = setting(None, "fingerprint set to check (ours or a seed format)")
    null_model: list = setting(
        [], "unrelated/base model(s) to run the same keys on, to measure the null rate "
            "(repeatable)")
    wrappers: str = setting("bare,chat,system", "comma list of wrappers: bare, chat, system")
    num_system_prompts: int = setting(
        4, "how many held-out system prompts the 'system' wrapper uses", low=1, high=64)
    match: str = setting("exact", "match rule: exact tokens, text prefix, contains, normalized",
                         choices=MATCH_RULES)
    max_new_tokens: int | None = setting(
        None, "tokens to generate per key (default: the response length; +32 for contains/"
              "normalized)", low=1, high=4096)
    num_fingerprints: int | None = setting(None, "check only the first N fingerprints", low=1)
    max_key_tokens: int | None = setting(None, "trim keys to this many tokens (as training did)",
                                         low=1)
    max_response_tokens: int | None = setting(
        None, "trim responses to this many tokens (as training did)", low=1)
    batch_size: int = setting(64, "rows per generate call", low=1, high=65536)
    alpha: float = setting(1e-6, "false-positive level for the verdict", low=1e-300, high=0.5)
    null_rate: float | None = setting(
        None, "per-key null rate to use instead of response_prob / measured rates", low=0.0,
        high=1.0)


def validate(config) -> None:
    """Check every field against its declared choices and range; raise one clear line."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        meta = f.metadata
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        if value is None:
            continue
        if meta.get("choices") and value not in meta["choices"]:
            raise OMLInputError(f"{flag} {value!r} is not one of: {', '.join(meta['choices'])}")
        low, high = meta.get("low"), meta.get("high")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if (low is not None and value < low) or (high is not None and value > high):
                bounds = f"at least {low}" if high is None else f"between {low} and {high}"
                raise OMLInputError(f"{flag} must be {bounds} (got {value})")


def to_dict(config) -> dict:
    return dataclasses.asdict(config)
