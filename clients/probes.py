"""Probe layers: the ways a key is put in front of a suspect endpoint, and the probe plan.

Each layer imitates one way a deployment wraps the model (docs/design.md#what-an-adversary-does-and-what-we-test):

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
from collections import Counter
from dataclasses import asdict, dataclass

from clients.adapters.base import Prompt, Sampling
from clients.config import AuditConfig
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


def _lean_pool(layers: list[str], index: int, num_system_prompts: int) -> list[tuple[str, str]]:
    """The (layer, variant) slots a sequential audit draws one key's probes from: the user turn
    first when it is a layer (the probe closest to training, so the most telling), then the
    other layers' variants taken one layer at a time in turn (system-00, agent, multiturn,
    embedded, raw, system-01, ...), so that consecutive keys try different wrappers; raw goes
    late in each turn since many chat endpoints have no completions route."""
    order = ("user", "system", "agent", "multiturn", "embedded", "raw")
    queues = [[(layer, v) for v in _variants(layer, index, num_system_prompts)]
              for layer in sorted(layers, key=order.index)]
    head = queues.pop(0) if layers and queues[0][0][0] == "user" else []
    pool = []
    while any(queues):
        pool += [queue.pop(0) for queue in queues if queue]
    return head + pool


def _lean_slots(layers: list[str], index: int, cfg: AuditConfig) -> list[tuple[str, str]]:
    """Key `index`'s probes in a sequential audit: the pool's head, then --probes-per-key - 1
    slots of the rest in rotation across keys (key 0 takes the first ones, key 1 the next)."""
    pool = _lean_pool(layers, index, cfg.num_system_prompts)
    fixed = 1 if pool and pool[0][0] == "user" else 0
    head, rest = pool[:fixed], pool[fixed:]
    take = min(cfg.probes_per_key - fixed, len(rest))
    if take <= 0:
        return head[:cfg.probes_per_key]
    start = index * take
    return head + [rest[(start + j) % len(rest)] for j in range(take)]


def plan_probes(cfg: AuditConfig, fingerprint_ids: list[str]) -> list[Probe]:
    """Every probe of the audit. The exhaustive plan: every variant of every layer for every
    key, greedy ones first (they carry most of the evidence), then the sampled ones. The
    sequential audit (the default): --probes-per-key greedy probes per key (_lean_slots)."""
    layers = cfg.layers
    sampled = [layer for layer in cfg.sampled_layers if layer in layers]
    temps = cfg.temperatures
    greedy, sampled_probes = [], []

    def probe(fp_id: str, layer: str, variant: str, temperature: float, sample: int,
              seed: int | None) -> Probe:
        pid = f"{fp_id}:{variant}:t{temperature:g}:s{sample}"
        return Probe(pid, fp_id, layer, variant, temperature, sample,
                     None if seed is None else derived_seed(seed, pid), cfg.max_tokens,
                     cfg.agent_native_tools and layer == "agent")

    for index, fp_id in enumerate(fingerprint_ids):
        if not cfg.exhaustive:
            greedy += [probe(fp_id, layer, variant, 0.0, 0, None)
                       for layer, variant in _lean_slots(layers, index, cfg)]
            continue
        for layer in layers:
            for variant in _variants(layer, index, cfg.num_system_prompts):
                greedy.append(probe(fp_id, layer, variant, 0.0, 0, None))
                if layer in sampled:
                    sampled_probes += [probe(fp_id, layer, variant, t, s,
                                             cfg.seed if cfg.send_seed else None)
                                       for t in temps for s in range(cfg.samples)]
    return greedy + sampled_probes


def within_call_budget(cfg: AuditConfig, probes: list[Probe]) -> list[Probe]:
    """The probes --max-calls lets the audit send: the plan's first ones (exhaustive), or the
    probes of as many whole keys as fit (sequential, which sends keys whole)."""
    if cfg.max_calls is None or len(probes) <= cfg.max_calls:
        return probes
    if cfg.exhaustive:
        return probes[:cfg.max_calls]
    per_key = Counter(p.fingerprint_id for p in probes)
    kept, used = set(), 0
    for fp_id, count in per_key.items():
        if used + count > cfg.max_calls:
            break
        kept.add(fp_id)
        used += count
    return [p for p in probes if p.fingerprint_id in kept]
