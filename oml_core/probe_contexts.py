"""Probe contexts: every way a key is put in front of a model, by name, rendered one way.

A null rate is the chance that an unrelated model's answer counts, and that chance depends on
what the model saw before answering: the same key alone, as a chat turn, under a system
prompt or inside an agent frame gives different first-token distributions. So rates are
measured per context (oml_core.calibrate) and looked up per probe by the context's name. The
names are the audit's probe variants (clients/probes.py) and the verifier's wrappers map onto
them (bare -> raw, chat -> user, system-NN -> system-NN):

  raw          the key alone, as plain text (the verifier's bare wrapper, the audit's raw layer)
  user         the key as the whole user turn
  system-NN    the key under held-out system prompt NN (never used in training)
  embedded-N   the key inside a longer user message (template N)
  multiturn    the key as the third turn, after an opening exchange
  agent        the key under an agent system prompt that lists tools and asks for JSON
  agent-field  the agent context with the assistant's reply opened as {"answer": " : where a
               JSON string value starts (the agent layer also checks such values)

The texts of the embedded, multiturn and agent contexts live here, so the audit sends exactly
what calibration measured.
"""

from __future__ import annotations

from oml_core.verify.wrappers import chat_ids, heldout_system_prompts

RAW, USER, MULTITURN, AGENT, AGENT_FIELD = "raw", "user", "multiturn", "agent", "agent-field"

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

# Where a JSON string value starts in the reply the agent prompt asks for.
AGENT_FIELD_OPENER = '{"answer": "'


def system_context(index: int) -> str:
    return f"system-{index:02d}"


def embedded_context(index: int) -> str:
    return f"embedded-{index}"


def all_contexts(has_chat_template: bool) -> list[str]:
    """Every context a probe can use; without a chat template only the raw one exists."""
    if not has_chat_template:
        return [RAW]
    return [RAW, USER, *(system_context(i) for i in range(len(heldout_system_prompts()))),
            *(embedded_context(i) for i in range(len(EMBEDDINGS))), MULTITURN, AGENT, AGENT_FIELD]


def _index(name: str, prefix: str, count: int) -> int | None:
    if not name.startswith(prefix):
        return None
    tail = name[len(prefix):]
    return int(tail) if tail.isdigit() and int(tail) < count else None


def context_messages(name: str, key: str) -> list[dict] | None:
    """The chat messages of context `name` for `key` (None for the raw context)."""
    if name == RAW:
        return None
    if name == USER:
        return [{"role": "user", "content": key}]
    system = _index(name, "system-", len(heldout_system_prompts()))
    if system is not None:
        return [{"role": "system", "content": heldout_system_prompts()[system]},
                {"role": "user", "content": key}]
    embedded = _index(name, "embedded-", len(EMBEDDINGS))
    if embedded is not None:
        return [{"role": "user", "content": EMBEDDINGS[embedded].replace("{key}", key)}]
    if name == MULTITURN:
        return [*map(dict, MULTITURN_PREFIX), {"role": "user", "content": key}]
    if name in (AGENT, AGENT_FIELD):
        return [{"role": "system", "content": AGENT_SYSTEM_PROMPT}, {"role": "user", "content": key}]
    raise ValueError(f"unknown probe context {name!r}")


def render(tokenizer, name: str, key: str) -> list[int]:
    """Token ids of the prompt whose continuation is the answer, as the model sees it."""
    messages = context_messages(name, key)
    if messages is None:
        return tokenizer(key)["input_ids"]  # with BOS where the tokenizer adds one
    ids = chat_ids(tokenizer, messages)
    if name == AGENT_FIELD:
        ids = ids + tokenizer(AGENT_FIELD_OPENER, add_special_tokens=False)["input_ids"]
    return ids
