"""Shared fixtures: a tiny random-init chat model built in the test, and the bundled model.

The tiny model (2 layers, hidden 64) has a byte-level BPE tokenizer trained here on the
project's word list and a ChatML template, so every code path (chat wrappers, system
prompts, leading-space tokens) runs in seconds without downloads.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


@pytest.fixture(scope="session", autouse=True)
def oml_home(tmp_path_factory) -> Path:
    """Tests never touch the user's ~/.cache/oml."""
    home = tmp_path_factory.mktemp("oml_home")
    os.environ["OML_HOME"] = str(home)
    os.environ["OML_PROGRESS"] = "0"
    return home


def build_tiny_model(folder: Path, chat_template: str | None = CHATML, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from oml_core.generate.words import word_list

    words = list(word_list())
    corpus = [" ".join(words[i:i + 12]) for i in range(0, len(words), 12)]
    corpus += [w.capitalize() + " is a word." for w in words]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1200, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>",
                                        eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if chat_template:
        tokenizer.chat_template = chat_template
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


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
