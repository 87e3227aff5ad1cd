"""Make a fingerprint set: keys by one strategy, responses by another (docs/design.md#generation).

| strategy                | keys                                  | responses                    |
|-------------------------|---------------------------------------|------------------------------|
| english                 | English text from the key model       | a window of another text     |
| random_word             | random words                          | random words                 |
| english_random_response | English text                          | random words (stored)        |
| perinucleus             | English text                          | just outside the nucleus     |

`--keys-file` replaces the keys of any strategy with custom ones. Lengths are exact in tokens
of the target tokenizer; the set holds exactly the number asked for; the same seed, model and
settings give the same set.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from oml_core import commitment
from oml_core.config import GenerateConfig
from oml_core.errors import OMLInputError
from oml_core.fingerprints import Fingerprint, FingerprintSet, load_keys
from oml_core.generate.english import english_texts
from oml_core.generate.perinucleus import context_wrapper, perinucleus_responses
from oml_core.generate.result import GenerateResult
from oml_core.generate.words import WordSampler
from oml_core.models import LoadedModel, load_model
from oml_core.settings import validate


def tokenizer_info(loaded: LoadedModel) -> dict:
    """Identify the tokenizer the lengths are counted in (name, size, vocabulary hash)."""
    vocab = loaded.tokenizer.get_vocab()
    digest = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()
    return {"name_or_path": loaded.path, "vocab_size": len(vocab), "vocab_sha256": digest}


def _custom_keys(path: str, tokenizer, count: int, length: int) -> list[str]:
    """The first `count` distinct keys of the file, each cut to `length` tokens."""
    keys: dict[str, None] = {}  # insertion-ordered set: thousands of keys stay linear
    for key in load_keys(path):
        ids = tokenizer(key, add_special_tokens=False)["input_ids"]
        keys[tokenizer.decode(ids[:length]).strip() if len(ids) > length else key] = None
        if len(keys) == count:
            return list(keys)
    raise OMLInputError(f"{path} holds {len(keys)} distinct keys but {count} fingerprints were "
                        "asked for; pass a smaller --num-fingerprints or add keys")


def _random_texts(sampler: WordSampler, rng: random.Random, count: int, length: int,
                  distinct: bool) -> list[str]:
    texts: list[str] = []
    seen: set[str] = set()
    for _ in range(count * 50):
        text = sampler.sample(rng, length)
        if not distinct or text not in seen:
            texts.append(text)
            seen.add(text)
        if len(texts) == count:
            return texts
    raise OMLInputError(f"could not draw {count} distinct random-word keys of {length} tokens; "
                        "use longer keys or fewer fingerprints")


def generate_set(cfg: GenerateConfig, loaded: LoadedModel | None = None) -> FingerprintSet:
    validate(cfg)
    loaded = loaded or load_model(cfg.model, cfg.device, cfg.dtype)
    tokenizer, n = loaded.tokenizer, cfg.num_fingerprints
    rng = random.Random(f"oml:{cfg.seed}")
    needs_english = cfg.strategy != "random_word" and (cfg.strategy == "english" or not cfg.keys_file)
    text_model = loaded
    if needs_english and cfg.key_model and cfg.key_model != cfg.model:
        text_model = load_model(cfg.key_model, cfg.device, cfg.dtype)

    sampler = WordSampler(tokenizer) if cfg.strategy in ("random_word", "english_random_response") else None
    if cfg.keys_file:
        keys = _custom_keys(cfg.keys_file, tokenizer, n, cfg.key_length)
    elif cfg.strategy == "random_word":
        keys = _random_texts(sampler, rng, n, cfg.key_length, distinct=True)
    else:
        keys = english_texts(text_model, tokenizer, n, cfg.key_length, cfg.seed, cfg.batch_size,
                             window="start", desc="keys")

    probs: list[float | None] = [None] * n
    if cfg.strategy == "english":
        responses = english_texts(text_model, tokenizer, n, cfg.response_length, cfg.seed + 1,
                                  cfg.batch_size, window="random", desc="responses")
    elif cfg.strategy in ("random_word", "english_random_response"):
        responses = _random_texts(sampler, rng, n, cfg.response_length, distinct=False)
    else:
        picks = perinucleus_responses(loaded, keys, cfg.response_length, cfg.perinucleus_threshold,
                                      cfg.perinucleus_k, cfg.context, cfg.seed, cfg.batch_size)
        responses = [pick.response for pick in picks]
        probs = [pick.response_prob for pick in picks]

    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "device", "batch_size")}
    settings["model"] = loaded.name
    if cfg.strategy == "perinucleus":  # record what auto resolved to
        settings["context"] = context_wrapper(cfg.context, loaded.has_chat_template).kind.replace(
            "bare", "raw")
    return FingerprintSet(
        fingerprints=[Fingerprint(id=f"fp-{i:05d}", key=key, response=response,
                                  response_prob=prob, salt=commitment.new_salt())
                      for i, (key, response, prob) in enumerate(zip(keys, responses, probs))],
        strategy=cfg.strategy, generation=settings, tokenizer=tokenizer_info(loaded))


def generate(cfg: GenerateConfig, out: Path, loaded: LoadedModel | None = None,
             claim: Callable[[Path], Path] | None = None) -> GenerateResult:
    """Make the set, write it to `out`, and describe it. `claim(out)` is asked again just
    before writing (generation takes a while; the caller may refuse a file that appeared
    meanwhile) and returns the path to write."""
    started = time.time()
    fset = generate_set(cfg, loaded)
    out = claim(out) if claim else out
    fset.save(out)
    probs = [p for p in fset.response_probs if p is not None]
    return GenerateResult(path=str(out), count=len(fset), strategy=fset.strategy,
                          commitment_root=fset.manifest().root,
                          mean_response_prob=sum(probs) / len(probs) if probs else None,
                          model=cfg.model or "bundled", seconds=round(time.time() - started, 2))
