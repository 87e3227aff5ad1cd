"""Probe layers: the ways a key is put in front of a suspect endpoint, and the probe plan.

Each layer imitates one way a deployment wraps the model (SPEC §7):

  raw        the key alone through the legacy completions endpoint (no chat template)
  user       the key as the whole user turn
  system     the key as the user turn under each of the held-out system prompts (never used in
             training, oml_core.verify.wrappers), one variant per prompt
  embedded   the key inside a longer user message (a sentence before or after it)
  multiturn  the key as the third turn of a conversation that already has an exchange
  agent      the key under an agent-style system prompt that lists tools and asks for JSON or a
             tool call

Every layer is probed greedily (temperature 0); the layers in --sampled-layers are also sampled
at each of --temperatures, --samples times per key, each sample with its own derived seed.
A Probe holds no secret: the key is filled in only when the request is built. Each variant is
a probe context of the engine (oml_core.probe_contexts: the texts live there, so the audit
sends what `oml calibrate` measured), and `rated_contexts` names the answer positions its
match check looks at, for the null rate.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from clients.adapters.base import Prompt, Sampling
from clients.config import AuditConfig, layer_list, sampled_layer_list, temperature_list
from oml_core.probe_contexts import (  # noqa: F401 - re-exported: the probe texts' old home
    AGENT,
    AGENT_FIELD,
    AGENT_SYSTEM_PROMPT,
    AGENT_TOOLS,
    EMBEDDINGS,
    MULTITURN_PREFIX,
    context_messages,
)


@dataclass(frozen=True)
class Probe:
    id: str
    fingerprint_id: str
    layer: str
    variant: str
    temperature: float
    sample: int
    seed: int | None
    max_tokens: int
    native_tools: bool = False

    @property
    def sampling(self) -> Sampling:
        return Sampling(self.temperature, self.max_tokens, self.seed)

    def to_dict(self) -> dict:
        return asdict(self)

    def prompt(self, key: str) -> Prompt:
        """The prompt this probe sends for `key` (a placeholder when describing it)."""
        if self.layer == "raw":
            return Prompt("completion", text=key)
        if self.layer not in ("user", "system", "embedded", "multiturn", "agent"):
            raise ValueError(f"unknown layer {self.layer!r}")
        tools = [dict(t) for t in AGENT_TOOLS] if self.layer == "agent" and self.native_tools else None
        return Prompt("chat", context_messages(self.variant, key), tools=tools)

    def rated_contexts(self, json_fields: int) -> list[str]:
        """The probe context of each answer position the `start` rule checks: the answer's
        opening, and in the agent layer also up to `json_fields` JSON string values (each
        rated where such a value opens, the agent-field context)."""
        if self.layer == "agent":
            return [AGENT] + [AGENT_FIELD] * json_fields
        return [self.variant]


def derived_seed(seed: int, probe_id: str) -> int:
    digest = hashlib.sha256(f"{seed}:{probe_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _variants(layer: str, index: int, num_system_prompts: int) -> list[str]:
    if layer == "system":
        return [f"system-{i:02d}" for i in range(num_system_prompts)]
    if layer == "embedded":
        return [f"embedded-{index % len(EMBEDDINGS)}"]
    return [layer]


def plan_probes(cfg: AuditConfig, fingerprint_ids: list[str]) -> list[Probe]:
    """Every probe of the audit, greedy ones first (they carry most of the evidence)."""
    layers = layer_list(cfg)
    sampled = [layer for layer in sampled_layer_list(cfg) if layer in layers]
    temps = temperature_list(cfg)
    greedy, sampled_probes = [], []

    def probe(fp_id: str, layer: str, variant: str, temperature: float, sample: int,
              seed: int | None) -> Probe:
        pid = f"{fp_id}:{variant}:t{temperature:g}:s{sample}"
        return Probe(pid, fp_id, layer, variant, temperature, sample,
                     None if seed is None else derived_seed(seed, pid), cfg.max_tokens,
                     cfg.agent_native_tools and layer == "agent")

    for index, fp_id in enumerate(fingerprint_ids):
        for layer in layers:
            for variant in _variants(layer, index, cfg.num_system_prompts):
                greedy.append(probe(fp_id, layer, variant, 0.0, 0, None))
                if layer in sampled:
                    sampled_probes += [probe(fp_id, layer, variant, t, s,
                                             cfg.seed if cfg.send_seed else None)
                                       for t in temps for s in range(cfg.samples)]
    return greedy + sampled_probes
