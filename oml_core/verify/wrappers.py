"""How a key is presented to a model: bare, as a chat user turn, or under a system prompt.

The system prompts here are a held-out set: training augmentation never uses them, so a
fingerprint that fires under them shows robustness to prompts the model has not seen.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources

from oml_core.config import WRAPPER_KINDS
from oml_core.errors import OMLInputError


@cache
def heldout_system_prompts() -> tuple[str, ...]:
    text = resources.files("oml_core.data").joinpath("system_prompts_heldout.json").read_text("utf-8")
    return tuple(json.loads(text)["prompts"])


@dataclass(frozen=True)
class Wrapper:
    name: str                  # "bare", "chat", "system-03"
    kind: str                  # "bare", "chat" or "system"
    system_prompt: str | None = None

    @property
    def context(self) -> str:
        """The probe context (oml_core.probe_contexts) this wrapper renders: its null rates."""
        return {"bare": "raw", "chat": "user"}.get(self.kind, self.name)

    def render(self, tokenizer, key: str) -> list[int]:
        """Token ids of the prompt whose continuation should be the response."""
        if self.kind == "bare":
            return tokenizer(key)["input_ids"]  # with BOS where the tokenizer adds one
        messages = [{"role": "user", "content": key}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return chat_ids(tokenizer, messages)


def chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Render a chat up to the assistant's turn; templates without a system role get it inline."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - jinja templates raise arbitrary errors for system roles
        if messages[0]["role"] != "system":
            raise
        merged = messages[0]["content"] + "\n\n" + messages[1]["content"]
        text = tokenizer.apply_chat_template([{"role": "user", "content": merged}],
                                             tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_wrappers(kinds: Sequence[str], num_system_prompts: int, has_chat_template: bool
                   ) -> tuple[list[Wrapper], list[str]]:
    """The wrappers of `kinds` (bare, chat, system), and notes on the ones this model cannot
    use."""
    unknown = [k for k in kinds if k not in WRAPPER_KINDS]
    if unknown or not kinds or isinstance(kinds, str):
        raise OMLInputError(f"--wrappers {kinds!r}: use a list of {', '.join(WRAPPER_KINDS)}")
    prompts = heldout_system_prompts()
    if num_system_prompts > len(prompts):
        raise OMLInputError(f"--num-system-prompts {num_system_prompts}: only {len(prompts)} "
                            "held-out system prompts exist; ask for fewer")
    wrappers, notes = [], []
    for kind in dict.fromkeys(kinds):
        if kind != "bare" and not has_chat_template:
            notes.append(f"{kind}: skipped, the model has no chat template")
        elif kind == "system":
            wrappers += [Wrapper(f"system-{i:02d}", "system", prompts[i])
                         for i in range(num_system_prompts)]
        else:
            wrappers.append(Wrapper(kind, kind))
    return wrappers, notes
