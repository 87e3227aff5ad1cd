"""Helpers for the `oml eval` tests: a tiny fingerprinted run (seconds) and small eval settings."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest

from oml_core.config import EvalConfig, FingerprintConfig, GenerateConfig
from oml_core.evaluate.context import open_run
from oml_core.generate import generate_set
from oml_core.models import load_model
from oml_core.train.lifecycle import fingerprint

NUM = 16


def make_tiny_run(tiny_model_dir: Path, tmp_path_factory, num: int = NUM) -> Path:
    """Fingerprint `num` random-word pairs into the tiny chat model (chat format, no benign rows).

    Embeddings and output head train too: frozen at their random init, the tiny model's logits
    stay so small that even memorised responses have probability ~0.005 (argmax, not confident),
    unlike any real model."""
    folder = tmp_path_factory.getbasetemp() / f"eval_tiny_run_{num}"  # shared by the test modules
    folder.mkdir(exist_ok=True)
    fp_file = folder / "set.json"
    if (folder / "run" / "COMPLETE").exists():
        return folder / "run"
    loaded = load_model(str(tiny_model_dir), device="cpu")
    generate_set(GenerateConfig(strategy="random_word", num_fingerprints=num, key_length=8,
                                response_length=2, seed=4), loaded).save(fp_file)
    run = folder / "run"
    fingerprint(FingerprintConfig(model=str(tiny_model_dir), fingerprints=str(fp_file), out_dir=str(run),
                                  method="finetune",
                                  learning_rate=1e-2, augment=False, benign_fraction=0.0,
                                  max_epochs=150, batch_size=16, extra_steps=6, deepspeed="none",
                                  train_embeddings=True, verify_after=False))
    return run


def eval_cfg(run: Path, out: Path | None = None, **overrides) -> EvalConfig:
    """Settings small enough for the tiny model to run every part in seconds."""
    settings = {"run": str(run), "out": str(out) if out else None, "device": "cpu",
                "num_system_prompts": 2, "batch_size": 64, "perplexity_tokens": 1024,
                "persistence_steps": 4, "persistence_checks": 2, "persistence_batch_size": 8,
                "null_models": ["base", "random"], "samples": 3, "capacity_sizes": [4, 8],
                "merge_derivative_steps": 4}
    return EvalConfig(**{**settings, **overrides})


def context(run: Path, out: Path | None = None, **overrides):
    return open_run(eval_cfg(run, out, **overrides))


def secrets_of(run: Path) -> list[str]:
    rows = json.loads((run / "fingerprints.json").read_text())["fingerprints"]
    return [r["key"] for r in rows] + [r["response"] for r in rows]


def text_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file() and p.suffix in (".json", ".md", ".html")]


@contextmanager
def short_benign_answers(tokens: int = 8):
    """The persistence part's self-distilled rows with 8-token answers instead of 48 (the tiny
    base model writes noise either way; this keeps its one-off generation to a second)."""
    from oml_core.evaluate import persistence
    from oml_core.train.benign import self_distilled_rows

    def short(base, chat, identity, batch_size=32, answer_tokens=tokens):
        return self_distilled_rows(base, chat, identity, batch_size, answer_tokens=tokens)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(persistence, "self_distilled_rows", short)
        yield


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run op by op; with a second thread on a busy 2-core machine every op waits on
    the other core (measured: a tiny training step 3.1 s with 2 threads, 0.045 s with 1)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def leaked(text: str, secrets: list[str]) -> list[str]:
    """Secrets that appear in `text` as whole words (a 2-token random response such as 'out s'
    is a substring of ordinary words like 'held-out system', which says nothing)."""
    import re

    return [s for s in secrets if re.search(r"(?<!\w)" + re.escape(s.strip()) + r"(?!\w)", text)]
