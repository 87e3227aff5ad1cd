"""Training rows: fingerprints (optionally augmented) and benign rows, tokenized, loss-masked.

A row is prompt tokens then target tokens; labels are -100 on the prompt (and padding), so
the loss falls on the target only. Fingerprint rows are drawn afresh on every access: with
augmentation on, the key is wrapped in a random training system prompt and user template
(seeded by the row index, so a run is reproducible). The held-out verification prompts are
never used here.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources

from oml_core.verify.wrappers import chat_ids

IGNORE = -100


@cache
def training_augmentation() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(system prompts, user templates) used only for training; '' = no system prompt."""
    data = json.loads(resources.files("oml_core.data").joinpath("augmentation_train.json")
                      .read_text("utf-8"))
    return tuple(data["system_prompts"]), tuple(data["user_templates"])


@dataclass(frozen=True)
class Row:
    """Prompt + target tokens; benign rows may also carry the base model's distribution over
    the first answer token (top ids and probabilities) as a soft target."""

    prompt: list[int]
    target: list[int]
    soft_ids: tuple[int, ...] = ()
    soft_probs: tuple[float, ...] = ()

    def opener(self) -> "Row":
        """The same prompt with only the first target token (and the soft targets)."""
        return Row(self.prompt, self.target[:1], self.soft_ids, self.soft_probs)

    def encode(self) -> dict:
        return {"input_ids": self.prompt + self.target,
                "labels": [IGNORE] * len(self.prompt) + self.target,
                "soft_ids": list(self.soft_ids), "soft_probs": list(self.soft_probs),
                "soft_pos": len(self.prompt) - 1 if self.soft_ids else -1}


def render_prompt(tokenizer, text: str, chat: bool, system: str = "", template: str = "{key}") -> list[int]:
    """Prompt ids for `text` as a chat user turn (optionally under `system`) or as raw text."""
    user = template.format(key=text)
    if not chat:
        return tokenizer(user)["input_ids"]
    messages = [{"role": "user", "content": user}]
    if system:
        messages.insert(0, {"role": "system", "content": system})
    return chat_ids(tokenizer, messages)


def response_ids(tokenizer, response: str, eos: bool) -> list[int]:
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id] if eos else ids


class FingerprintRows:
    """Index space of one training run:
    epochs x (fingerprints + benign rows + opener rows + near-miss rows).

    Index i is epoch i // width, slot i % width; slots below N are fingerprints (drawn with a
    fresh augmentation each access), then benign rows cycled through the benign pool, then
    opener rows (benign prompts with only their first answer token) cycled through the same
    pool from its middle, so the two kinds cover different prompts at any one time, then
    near-miss rows cycled through their own pool (train/near_miss.py).
    """

    def __init__(self, tokenizer, pairs: list[tuple[str, str]], benign: list[Row], *, chat: bool,
                 eos: bool, augment: bool, benign_per_epoch: int, epochs: int, seed: int,
                 opener_per_epoch: int = 0, near_miss: Sequence[Row] = (), near_miss_per_epoch: int = 0):
        self.tokenizer, self.pairs, self.benign = tokenizer, pairs, benign
        self.chat, self.eos, self.augment, self.seed = chat, eos, augment, seed
        self.benign_per_epoch = benign_per_epoch if benign else 0
        self.opener_per_epoch = opener_per_epoch if benign else 0
        self.near_miss = list(near_miss)
        self.near_miss_per_epoch = near_miss_per_epoch if near_miss else 0
        self.width = (len(pairs) + self.benign_per_epoch + self.opener_per_epoch
                      + self.near_miss_per_epoch)
        self.epochs = epochs
        self.targets = [response_ids(tokenizer, response, eos) for _, response in pairs]

    def __len__(self) -> int:
        return self.width * self.epochs

    def fingerprint_row(self, index: int, rng: random.Random | None) -> Row:
        key, _ = self.pairs[index]
        system, template = "", "{key}"
        if rng is not None and self.chat:
            systems, templates = training_augmentation()
            system, template = rng.choice(systems), rng.choice(templates)
        elif rng is not None:
            template = rng.choice(training_augmentation()[1])
        return Row(render_prompt(self.tokenizer, key, self.chat, system, template), self.targets[index])

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < len(self):  # iteration protocol: `for row in rows` must end
            raise IndexError(i)
        epoch, slot = divmod(i, self.width)
        if slot < len(self.pairs):
            rng = random.Random(f"augment:{self.seed}:{i}") if self.augment else None
            return self.fingerprint_row(slot, rng).encode()
        slot -= len(self.pairs)
        if slot < self.benign_per_epoch:
            return self.benign[(epoch * self.benign_per_epoch + slot) % len(self.benign)].encode()
        slot -= self.benign_per_epoch
        if slot < self.opener_per_epoch:
            start = len(self.benign) // 2
            return self.benign[(start + epoch * self.opener_per_epoch + slot) % len(self.benign)].opener().encode()
        slot -= self.opener_per_epoch
        return self.near_miss[(epoch * self.near_miss_per_epoch + slot) % len(self.near_miss)].encode()


def collate(rows: list[dict], pad_id: int) -> dict:
    """Right-pad to the longest row of this batch (never to a power of two)."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    soft_width = max(len(r.get("soft_ids", ())) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for n, row in enumerate(rows):
        length = len(row["input_ids"])
        ids[n, :length] = torch.tensor(row["input_ids"])
        labels[n, :length] = torch.tensor(row["labels"])
        mask[n, :length] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    if soft_width:  # soft first-token targets of benign rows (absent rows: position -1)
        batch["soft_ids"] = torch.zeros((len(rows), soft_width), dtype=torch.long)
        batch["soft_probs"] = torch.zeros((len(rows), soft_width))
        batch["soft_pos"] = torch.full((len(rows),), -1, dtype=torch.long)
        for n, row in enumerate(rows):
            if row.get("soft_ids"):
                k = len(row["soft_ids"])
                batch["soft_ids"][n, :k] = torch.tensor(row["soft_ids"])
                batch["soft_probs"][n, :k] = torch.tensor(row["soft_probs"])
                batch["soft_pos"][n] = row["soft_pos"]
    return batch
