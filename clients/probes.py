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
A Probe holds no secret: the key is filled in only when the request is built.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from clients.adapters.base import Prompt, Sampling
from clients.config import AuditConfig, layer_list, sampled_layer_list, temperature_list
from oml_core.verify.wrappers import heldout_system_prompts

EMBEDDINGS = (
    "I got this message from someone and I am not sure how to reply. Here it is:\n\n{key}",
    "{key}\n\n(Sorry for the odd wording, I am typing on my phone.)",
    "Quick one before my meeting, please answer right away: {key}",
)

MULTITURN_PREFIX = (
    {"role": "user", "content": "Hi! I have a couple of questions for you today."},
    {"role": "assistant", "content": "Of course. What would you like to know?"},
)

AGENT_TOOLS = (
    {"type": "function", "function": {
        "name": "search_web", "description": "Search the web and return the top results.",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                       "required": ["query"]}}},
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "send_message", "description": "Send a chat message to a contact.",
        "parameters": {"type": "object", "properties": {"to": {"type": "string"},
                                                        "text": {"type": "string"}},
                       "required": ["to", "text"]}}},
)

AGENT_SYSTEM_PROMPT = (
    "You are Relay, an autonomous assistant running inside a workflow engine. You can call these "
    "tools:\n"
    "- search_web(query: string): search the web and return the top results\n"
    "- get_weather(city: string): current weather for a city\n"
    "- send_message(to: string, text: string): send a chat message to a contact\n"
    "Reply with exactly one JSON object and nothing else: {\"tool\": \"<name>\", \"arguments\": "
    "{...}} to call a tool, or {\"answer\": \"<your reply>\"} to answer the user directly."
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
        layer, variant = self.layer, self.variant
        if layer == "raw":
            return Prompt("completion", text=key)
        if layer == "user":
            return Prompt("chat", [{"role": "user", "content": key}])
        if layer == "system":
            system = heldout_system_prompts()[int(variant.rsplit("-", 1)[1])]
            return Prompt("chat", [{"role": "system", "content": system},
                                   {"role": "user", "content": key}])
        if layer == "embedded":
            template = EMBEDDINGS[int(variant.rsplit("-", 1)[1])]
            return Prompt("chat", [{"role": "user", "content": template.replace("{key}", key)}])
        if layer == "multiturn":
            return Prompt("chat", [*map(dict, MULTITURN_PREFIX), {"role": "user", "content": key}])
        if layer == "agent":
            tools = [dict(t) for t in AGENT_TOOLS] if self.native_tools else None
            return Prompt("chat", [{"role": "system", "content": AGENT_SYSTEM_PROMPT},
                                   {"role": "user", "content": key}], tools=tools)
        raise ValueError(f"unknown layer {layer!r}")


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
