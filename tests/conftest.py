"""Shared fixtures: a tiny random-init chat model built in the test, and the bundled model.

The tiny model (2 layers, hidden 64) has a byte-level BPE tokenizer trained here on the
project's word list and a ChatML template, so every code path (chat wrappers, system
prompts, leading-space tokens) runs in seconds without downloads.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks.harness import CHATML, tiny_model as tiny_model_folder


@pytest.fixture(scope="session", autouse=True)
def oml_home(tmp_path_factory) -> Path:
    """Tests never touch the user's ~/.cache/oml."""
    home = tmp_path_factory.mktemp("oml_home")
    os.environ["OML_HOME"] = str(home)
    os.environ["OML_PROGRESS"] = "0"
    return home


def build_tiny_model(folder: Path, chat_template: str | None = CHATML, seed: int = 0) -> Path:
    return tiny_model_folder(folder, chat_template, seed)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_chat_model"))


@pytest.fixture(scope="session")
def tiny_base_model_dir(tmp_path_factory) -> Path:
    """Same shape, other weights, no chat template: an 'unrelated' base model."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_base_model"), chat_template=None, seed=1)


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    from oml_core.models import load_model

    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def sharp_tiny_model(tiny_model):
    """The tiny chat model with its output logits scaled 30x: a few likely first tokens per
    context, as a trained model has, instead of a random model's near-uniform spread (for
    null-rate tests, where the answers' spread is what is measured)."""
    import copy

    import torch

    from oml_core.models import LoadedModel

    model = copy.deepcopy(tiny_model.model)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)
    return LoadedModel(model=model, tokenizer=tiny_model.tokenizer, name="tiny-sharp",
                       path="(tiny model, logits x30)", device=tiny_model.device)


@pytest.fixture(scope="session")
def bundled_model():
    """The real SmolLM2-135M-Instruct (converted once per test session)."""
    from oml_core.models import load_model

    return load_model(None, device="cpu")


# Files in OML 1.0's formats with our own text (tests/fixtures/make_oml1_fixtures.py); the
# reference samples in ../shared are read too where that folder exists (test_fingerprints; that
# folder names them after the "seed" project, OML 1.0).
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "oml1-format"
SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "seed-format"
