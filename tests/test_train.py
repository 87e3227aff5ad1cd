"""Fingerprinting by fine-tuning, on the tiny in-test model: memorisation, the DeepSpeed paths
(plain process and two CPU ranks under the launcher), the regularizer's exact formula, run
folders (reuse, kill + rerun, SIGTERM), and no secrets outside the fingerprint file."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from oml_core.config import FingerprintConfig, GenerateConfig
from oml_core.errors import OMLInputError
from oml_core.fingerprints import load_fingerprints
from oml_core.generate import generate_set
from oml_core.train.benign import benign_prompts
from oml_core.train.examples import IGNORE, FingerprintRows, Row, collate, training_augmentation
from oml_core.train.regularizer import average_with_base
from oml_core.train.lifecycle import fingerprint
from oml_core.verify.wrappers import heldout_system_prompts

BIN = Path(sys.executable).parent
FAST = ["--method", "finetune", "--learning-rate", "1e-2", "--no-augment", "--benign-fraction", "0", "--max-epochs", "150",
        "--batch-size", "16", "--extra-steps", "0"]


@pytest.fixture(scope="module")
def fp_file(tiny_model, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("train") / "fp.json"
    generate_set(GenerateConfig(strategy="random_word", num_fingerprints=16, key_length=8,
                                response_length=2, seed=4), tiny_model).save(path)
    return path


def secrets_of(path: Path) -> list[str]:
    rows = json.loads(path.read_text())["fingerprints"]
    return [r["key"] for r in rows] + [r["response"] for r in rows]


def oml(*args, env=None, timeout=600, launcher=None) -> subprocess.CompletedProcess:
    command = (launcher or [str(BIN / "oml")]) + [str(a) for a in args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def tiny_cfg(tiny_model_dir, fp_file, out_dir, **kw) -> FingerprintConfig:
    settings = dict(model=str(tiny_model_dir), fingerprints=str(fp_file), out_dir=str(out_dir),
                    method="finetune",
                    learning_rate=1e-2, augment=False, benign_fraction=0.0, max_epochs=150,
                    batch_size=16, extra_steps=0, deepspeed="none", verify_after=False)
    return FingerprintConfig(**{**settings, **kw})


# --- examples -----------------------------------------------------------------------------
def test_loss_falls_on_the_response_only(tiny_model):
    tok = tiny_model.tokenizer
    rows = FingerprintRows(tok, [("alpha beta gamma", " delta")], [], chat=True, eos=True,
                           augment=False, benign_per_epoch=0, epochs=1, seed=0)
    encoded = rows[0]
    target = tok(" delta", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    labelled = [t for t in encoded["labels"] if t != IGNORE]
    assert labelled == target
    assert encoded["input_ids"][-len(target):] == target
    batch = collate([encoded, Row([1, 2], [3]).encode()], tok.pad_token_id)
    assert batch["labels"][1].tolist()[:3] == [IGNORE, IGNORE, 3]
    assert batch["attention_mask"][1].tolist()[3:] == [0] * (len(encoded["input_ids"]) - 3)


def test_benign_rows_carry_soft_first_token_targets():
    benign = Row([5, 6, 7], [8, 9], soft_ids=(8, 4), soft_probs=(0.75, 0.25)).encode()
    plain = Row([1, 2], [3]).encode()
    batch = collate([plain, benign], pad_id=0)
    assert batch["soft_pos"].tolist() == [-1, 2]  # the position that predicts the first answer token
    assert batch["soft_ids"][1].tolist() == [8, 4]
    assert batch["soft_probs"][1].tolist() == [0.75, 0.25]
    assert batch["labels"][1].tolist() == [IGNORE] * 3 + [8, 9]


def _mixed_rows(count: int = 8) -> list[dict]:
    """Rows of different lengths, one to three labelled tokens, some with soft targets."""
    rows = []
    for i in range(count):
        prompt, target = [10 + i, 11, 12, 13][: 2 + i % 3], [20, 21, 22][: 1 + i % 3]
        soft = ((30, 31), (0.5, 0.5)) if i % 2 else ((), ())
        rows.append(Row(prompt, target, *soft).encode())
    return rows


def test_loss_at_answer_positions_only_equals_the_full_loss(tiny_model_dir):
    """Logits computed only where a token is labelled give transformers' own loss and the
    same gradients."""
    from oml_core.train.finetune import answer_loss, answer_positions, keeps_logits_by_mask
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert keeps_logits_by_mask(model)
    batch = collate(_mixed_rows(), 0)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    full = model(**inputs, labels=batch["labels"]).loss
    full_grads = torch.autograd.grad(full, [p for p in model.parameters() if p.requires_grad])
    keep = answer_positions(batch["labels"])
    assert int(keep.sum()) == int((batch["labels"] != IGNORE).sum())  # one per labelled token
    out = model(**inputs, logits_to_keep=keep)
    assert out.logits.shape[0] == int(keep.sum())
    ours = answer_loss(out, batch["labels"])
    ours_grads = torch.autograd.grad(ours, [p for p in model.parameters() if p.requires_grad])
    assert float(ours.detach()) == pytest.approx(float(full.detach()), rel=1e-6)
    for a, b in zip(ours_grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("teacher", [False, True], ids=["first-token", "all-tokens"])
def test_training_with_answer_position_logits_matches_full_logits(tiny_model_dir, tmp_path, teacher):
    """Same rows, same seed, gradient accumulation 2, the soft term on: the trainer that computes
    logits only at answer positions ends with the weights of the one that computes them all
    (so the loss is normalised the same way across accumulated micro-batches)."""
    from oml_core.train.finetune import FingerprintTrainer, answer_loss
    from transformers import AutoModelForCausalLM, TrainingArguments

    frozen = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval() if teacher else None

    def trained(loss_func):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=3, learning_rate=0.5,
                                 optim="sgd",  # unlike Adam's, SGD's steps show a loss-scale error
                                 report_to=[], use_cpu=True, save_strategy="no", seed=0,
                                 remove_unused_columns=False, disable_tqdm=True, logging_steps=100)
        FingerprintTrainer(soft_weight=5.0, teacher=frozen, model=model, args=args, train_dataset=_mixed_rows(),
                                    data_collator=lambda b: collate(b, 0),
                                    compute_loss_func=loss_func).train()
        return model.state_dict()

    start = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    ours, full = trained(answer_loss), trained(None)
    for name, value in full.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(full[name], start[name]) for name in start)  # training moved it


def test_soft_first_token_loss_pulls_towards_the_base_distribution(tiny_model_dir, tmp_path):
    """Train only on benign rows whose soft target puts all mass on one token: it becomes the
    first answer token (the hard target says otherwise, with weight 1 against 20)."""
    from oml_core.train.finetune import FingerprintTrainer
    from transformers import AutoModelForCausalLM, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = [Row([10 + i, 11, 12], [20, 21], soft_ids=(30,), soft_probs=(1.0,)).encode()
            for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=40,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                             remove_unused_columns=False, disable_tqdm=True, logging_steps=100)
    trainer = FingerprintTrainer(soft_weight=20.0, model=model, args=args, train_dataset=rows,
                                  data_collator=lambda b: collate(b, 0))
    trainer.train()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[10, 11, 12]])).logits[0, -1]
    assert int(logits.argmax()) == 30


def test_all_token_distillation_pulls_every_answer_position_to_the_teacher(tiny_model_dir, tmp_path):
    """With a frozen teacher, the KL term is zero against itself and, trained with a large
    weight against contradicting hard labels, brings the student's answer-position
    distributions closer to the teacher's than hard labels alone do."""
    from oml_core.train.finetune import FingerprintTrainer, _answer_kl, answer_positions
    from transformers import AutoModelForCausalLM, TrainingArguments

    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rows = [Row([10 + i, 11, 12], [20, 21, 22], soft_ids=(1,), soft_probs=(1.0,)).encode()
            for i in range(8)]
    batch = collate(rows, 0)
    everyone = torch.arange(len(rows))
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        at_answers = logits[answer_positions(batch["labels"])]
        assert float(_answer_kl(teacher, at_answers, batch, everyone)) == pytest.approx(0.0, abs=1e-6)

    def trained_kl(teacher_or_none):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8,
                                 max_steps=15, learning_rate=1e-2, report_to=[], use_cpu=True,
                                 save_strategy="no", remove_unused_columns=False,
                                 disable_tqdm=True, logging_steps=100)
        FingerprintTrainer(soft_weight=20.0, teacher=teacher_or_none, model=model, args=args, train_dataset=rows,
                                              data_collator=lambda b: collate(b, 0)).train()
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return float(_answer_kl(teacher, out[answer_positions(batch["labels"])], batch, everyone))

    assert trained_kl(teacher) < 0.5 * trained_kl(None)


def test_opener_rows_are_benign_prompts_with_their_first_answer_token(tiny_model):
    benign = [Row([40 + i, 41], [50 + i, 51, 52], soft_ids=(50 + i, 7), soft_probs=(0.6, 0.4))
              for i in range(10)]
    rows = FingerprintRows(tiny_model.tokenizer, [("k one", " r"), ("k two", " s")], benign,
                           chat=True, eos=False, augment=False, benign_per_epoch=2, epochs=3,
                           seed=0, opener_per_epoch=3)
    assert rows.width == 2 + 2 + 3 and len(rows) == 21
    openers = [rows[epoch * rows.width + 4 + j] for epoch in range(3) for j in range(3)]
    for row in openers:
        labelled = [t for t in row["labels"] if t != IGNORE]
        assert len(labelled) == 1 and labelled[0] == row["soft_ids"][0]  # only the first token
        assert row["soft_pos"] == len(row["input_ids"]) - 2  # it predicts that token
    # they walk through the pool from its middle: 9 different prompts in 3 epochs
    assert len({tuple(r["input_ids"]) for r in openers}) == 9
    full = [rows[epoch * rows.width + 2 + j] for epoch in range(3) for j in range(2)]
    assert all(sum(t != IGNORE for t in r["labels"]) == 3 for r in full)


def test_a_new_setting_at_its_default_keeps_earlier_run_keys(tiny_model_dir, fp_file, tmp_path):
    from oml_core.train.lifecycle import ADDED_SETTINGS, _settings_for_key

    cfg = tiny_cfg(tiny_model_dir, fp_file, tmp_path)
    assert not set(ADDED_SETTINGS) & set(_settings_for_key(cfg))
    cfg.benign_openers = 1.0
    assert _settings_for_key(cfg)["benign_openers"] == 1.0


def test_opener_rows_pin_how_answers_start(tiny_model_dir, fp_file, tmp_path):
    """Trained on fingerprints alone, the tiny model starts every held-out answer with another
    token than before; with one opener row per fingerprint row it keeps most openers (and, on
    a model this small, pays with its fingerprints: the trade-off the setting measures)."""
    def agreement(openers: float) -> float:
        cfg = tiny_cfg(tiny_model_dir, fp_file, tmp_path / f"run{openers}", max_epochs=20,
                       verify_after=True, benign_openers=openers, forgetting_regularizer=0.0)
        metrics = fingerprint(cfg).metrics
        assert metrics.opener_rows_per_epoch == round(16 * openers)
        return metrics.utility.first_token_agreement

    assert agreement(1.0) >= agreement(0.0) + 0.3


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_gradient_checkpointing_trains_to_the_same_weights(tiny_model_dir, fp_file, tmp_path,
                                                           lora_rank):
    """Recomputing activations changes memory, not the result (embeddings frozen, as by
    default: the checkpointed layers' input needs no grad); it is not part of the run key."""
    from oml_core.train.lifecycle import _settings_for_key

    weights = {}
    for checkpointing in (False, True):
        cfg = tiny_cfg(tiny_model_dir, fp_file, tmp_path / str(checkpointing), max_steps=3,
                       gradient_checkpointing=checkpointing, lora_rank=lora_rank,
                       forgetting_regularizer=0.0)
        fingerprint(cfg)
        weights[checkpointing] = load_file(tmp_path / str(checkpointing) / "model" / "model.safetensors")
    start = load_file(Path(tiny_model_dir) / "model.safetensors")
    assert any(not torch.equal(weights[True][k], start[k]) for k in start)
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, rtol=1e-4, atol=1e-6)
    assert "gradient_checkpointing" not in _settings_for_key(cfg)


def weight_changes(run: Path, base: Path) -> torch.Tensor:
    trained, start = load_file(run / "model" / "model.safetensors"), load_file(base / "model.safetensors")
    return torch.cat([(trained[k] - start[k]).abs().flatten() for k in trained
                      if "embed" not in k and "lm_head" not in k])


def test_sgd_moves_weights_by_their_gradient_where_adam_moves_them_all(tiny_model_dir, fp_file,
                                                                       tmp_path):
    """--optimizer sgd memorises too, and its update is concentrated where the loss needs it:
    Adam's first steps move nearly every weight by about the learning rate, so the typical
    weight moves almost as far as the most-moved ones; under SGD the typical one barely moves."""
    spread = {}
    for optimizer, lr in (("adamw", 1e-2), ("sgd", 0.3)):
        cfg = tiny_cfg(tiny_model_dir, fp_file, tmp_path / optimizer, optimizer=optimizer,
                       learning_rate=lr, forgetting_regularizer=0.0)
        metrics = fingerprint(cfg).metrics
        assert metrics.memorised_at_step is not None, optimizer
        changes = weight_changes(tmp_path / optimizer, tiny_model_dir)
        spread[optimizer] = (changes.median() / changes.max()).item()
    assert spread["sgd"] < spread["adamw"] / 5, spread


def test_sgd_runs_under_deepspeed_with_the_optimizer_block_removed(tiny_model_dir, fp_file, tmp_path):
    from oml_core.train.finetune import with_client_optimizer
    from oml_core.train.lifecycle import deepspeed_config_path

    zero2 = deepspeed_config_path("zero2")
    assert with_client_optimizer(zero2, "adamw") == zero2
    config = with_client_optimizer(zero2, "sgd")
    assert "optimizer" not in config and config["zero_optimization"]["stage"] == 2
    run = oml("fingerprint", "--model", tiny_model_dir, "--fingerprints", fp_file, "--out-dir",
              tmp_path / "run", *FAST, "--optimizer", "sgd", "--learning-rate", "0.3",
              "--deepspeed", "zero2", "--no-verify-after", "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["memorised_at_step"] is not None and metrics["deepspeed"] == "zero2"
    run_config = json.loads((tmp_path / "run" / "run.json").read_text())
    assert "sgd" in json.dumps(run_config)


def test_start_from_continues_from_a_runs_weights_and_keys_on_their_content(tiny_model_dir, fp_file,
                                                                            tmp_path):
    first = fingerprint(tiny_cfg(tiny_model_dir, fp_file, tmp_path / "first", forgetting_regularizer=0.0))
    assert first.metrics.memorised_at_step is not None
    start = tmp_path / "first" / "model"
    # one step at a negligible learning rate: the saved weights are the start's, not the base's
    cfg = tiny_cfg(tiny_model_dir, fp_file, tmp_path / "again", start_from=str(start),
                   learning_rate=1e-8, max_steps=1, check_every=0, forgetting_regularizer=0.0)
    fingerprint(cfg)
    saved, started = (load_file(p / "model.safetensors") for p in (tmp_path / "again" / "model", start))
    base = load_file(tiny_model_dir / "model.safetensors")
    moved = [k for k in saved if not torch.equal(started[k], base[k])]
    assert moved and all(torch.allclose(saved[k], started[k], atol=1e-6) for k in moved)

    from oml_core.train.lifecycle import _settings_for_key

    copy = tmp_path / "copy"
    copy.mkdir()
    for item in start.iterdir():
        (copy / item.name).write_bytes(item.read_bytes())
    moved_copy = tiny_cfg(tiny_model_dir, fp_file, tmp_path / "x", start_from=str(copy))
    same = tiny_cfg(tiny_model_dir, fp_file, tmp_path / "x", start_from=str(start))
    assert _settings_for_key(moved_copy) == _settings_for_key(same)  # content, not path
    bad = oml("fingerprint", "--model", tiny_model_dir, "--fingerprints", fp_file, "--out-dir",
              tmp_path / "bad", "--start-from", tmp_path, "--method", "finetune", "--no-verify-after")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "--start-from" in bad.stderr and not (tmp_path / "bad" / "COMPLETE").exists()
    other = tmp_path / "other_shape"  # another architecture: refused before anything is written
    other.mkdir()
    (other / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes())
    shape = json.loads((copy / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**shape, "num_hidden_layers": 7}))
    mismatch = oml("fingerprint", "--model", tiny_model_dir, "--fingerprints", fp_file, "--out-dir",
                   tmp_path / "mismatch", "--start-from", other, "--method", "finetune", "--no-verify-after")
    assert mismatch.returncode == 2 and len(mismatch.stderr.strip().splitlines()) == 1, mismatch.stderr
    assert "num_hidden_layers 7 vs" in mismatch.stderr and not (tmp_path / "mismatch").exists()


def test_lora_memorises_and_saves_a_plain_model_of_low_rank_changes(tiny_model_dir, fp_file,
                                                                    tmp_path):
    """--lora-rank (here under DeepSpeed ZeRO-2) trains adapters only and saves them merged: a
    plain model (no adapter files), whose change to each linear weight has rank at most R."""
    rank = 8  # of 64: the tiny model's width
    run = oml("fingerprint", "--model", tiny_model_dir, "--fingerprints", fp_file, "--out-dir",
              tmp_path / "run", *FAST, "--lora-rank", rank, "--forgetting-regularizer", 0,
              "--deepspeed", "zero2", "--no-verify-after", "--json")
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout)["memorised_at_step"] is not None
    model = tmp_path / "run" / "model"
    assert not list(model.glob("adapter_*"))
    trained, base = load_file(model / "model.safetensors"), load_file(tiny_model_dir / "model.safetensors")
    assert trained.keys() == base.keys()
    linear = [k for k in base if base[k].dim() == 2 and "embed" not in k and "lm_head" not in k]
    # float64 and relative to the largest singular value: a float32 SVD of a change with
    # sigma_1 ~ 5 is only accurate to ~1e-5, and merge rounding adds ~1e-7 (seen: a 9th
    # singular value of 8e-8 counted by a float32 rank at atol 1e-6)
    ranks = [int(torch.linalg.matrix_rank((trained[k] - base[k]).double(), rtol=1e-5)) for k in linear]
    assert max(ranks) <= rank and max(ranks) > 0, ranks
    for k in base:
        if k not in linear:  # norms and embeddings are untouched
            assert torch.equal(trained[k], base[k]), k
    for flags in (["--lora-rank", "4", "--train-embeddings"], ["--lora-rank", "4", "--deepspeed", "zero3"]):
        bad = oml("fingerprint", "--model", tiny_model_dir, "--fingerprints", fp_file, "--out-dir",
                  tmp_path / "bad", *flags, "--method", "finetune", "--no-verify-after")
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
        assert "--lora-rank" in bad.stderr and not (tmp_path / "bad").exists()


def test_near_miss_rows_are_other_changes_than_the_measured_ones_answered_as_the_base(tiny_model,
                                                                                     fp_file):
    """--near-miss-negatives rows: each key changed in ways `oml eval` does not measure, under
    the bare template and a training wrapper, targeted at the base model's own first token;
    they take their slots in every epoch."""
    import random

    from oml_core.evaluate.utility import near_miss_keys
    from oml_core.inference import next_token_probs
    from oml_core.train.near_miss import near_miss_rows, near_miss_variants

    keys = [fp.key for fp in load_fingerprints(fp_file).fingerprints]
    measured = {v for variants in near_miss_keys(keys).values() for v in variants}
    rng = random.Random(0)
    for key in keys:
        variants = near_miss_variants(key, rng)
        assert len(variants) == 3 and key not in variants and not set(variants) & measured
    assert near_miss_variants("two words", rng) == []

    rows = near_miss_rows(tiny_model, keys, chat=True, seed=0)
    assert len(rows) == 2 * 3 * len(keys)
    for indices, dist in next_token_probs(tiny_model, [r.prompt for r in rows], 64):
        for n, i in enumerate(indices):
            assert rows[i].target == [int(dist[n].argmax())] == [rows[i].soft_ids[0]]
    pairs = [(k, " r") for k in keys]
    mixed = FingerprintRows(tiny_model.tokenizer, pairs, [], chat=True, eos=False, augment=False,
                            benign_per_epoch=0, epochs=2, seed=0, near_miss=rows,
                            near_miss_per_epoch=8)
    assert len(mixed) == 2 * (len(keys) + 8)
    prompts = {tuple(r.prompt) for r in rows}
    drawn = [mixed[i] for i in range(len(mixed))]
    from_pool = [r for r in drawn if tuple(r["input_ids"][:-1]) in prompts]
    assert len(from_pool) == 16 and len({tuple(r["input_ids"]) for r in from_pool}) == 16


def test_augmentation_draws_vary_and_are_reproducible(tiny_model):
    rows = FingerprintRows(tiny_model.tokenizer, [("k one two", " r")], [], chat=True, eos=False,
                           augment=True, benign_per_epoch=0, epochs=50, seed=3)
    prompts = {tuple(rows[i]["input_ids"]) for i in range(50)}
    assert len(prompts) > 10
    assert [rows[i] for i in range(5)] == [rows[i] for i in range(5)]


def test_training_and_heldout_sets_are_disjoint():
    systems, templates = training_augmentation()
    assert len(systems) >= 30 and all("{key}" in t for t in templates)
    normalise = lambda s: " ".join(s.lower().split())  # noqa: E731
    assert not {normalise(p) for p in heldout_system_prompts()} & {normalise(p) for p in systems}
    assert not {normalise(p) for p in benign_prompts("train")} & {normalise(p) for p in benign_prompts("heldout")}
    assert len(benign_prompts("heldout")) >= 100


# --- the memorisation check ----------------------------------------------------------------
def test_memorisation_check_equals_argmax_over_full_logits(tiny_model, fp_file):
    """The check runs the output head only at answer positions; it must decide exactly as the
    argmax of the model's full logits does (here on an untrained model: a mix of yes and no,
    with the target token replaced by the argmax for half the rows so some rows pass)."""
    from oml_core.train.finetune import memorised

    model, tok = tiny_model.model, tiny_model.tokenizer
    fset = load_fingerprints(fp_file)
    rows = FingerprintRows(tok, [(fp.key, fp.response) for fp in fset.fingerprints], [], chat=True,
                           eos=False, augment=True, benign_per_epoch=0, epochs=1, seed=0)
    # bare and wrapped rows interleaved: lengths vary, so the check's batching by length
    # reorders them and must put each answer back in its row's place
    checks = [rows.fingerprint_row(i % len(fset), random.Random(i) if i % 3 else None).encode()
              for i in range(2 * len(fset))]
    assert len({len(row["input_ids"]) for row in checks}) > 3
    for n, row in enumerate(checks[::2]):  # make every other row's targets the model's own argmax
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
        for t, label in enumerate(row["labels"]):
            if label != IGNORE:
                row["labels"][t] = row["input_ids"][t] = int(logits[t - 1].argmax())
                with torch.no_grad():
                    logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
    expected = []
    for row in checks:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([row["input_ids"]])).logits[0]
        expected.append(all(int(logits[t - 1].argmax()) == label
                            for t, label in enumerate(row["labels"]) if label != IGNORE))
    got = memorised(model, checks, tok.pad_token_id or 0, batch_size=5)
    assert got == expected and any(got) and not all(got)


def test_checks_grow_further_apart_with_many_fingerprints():
    from oml_core.train.finetune import check_gap

    assert check_gap(2, check_rows=32, rows_per_step=16) == 2      # the demo: 16 keys x 2
    assert check_gap(2, check_rows=512, rows_per_step=16) == 31    # 256 keys: about once an epoch
    assert check_gap(50, check_rows=32, rows_per_step=16) == 50    # never closer than asked


# --- training -----------------------------------------------------------------------------
def test_memorises_every_fingerprint(tiny_model_dir, fp_file, tmp_path):
    result = fingerprint(tiny_cfg(tiny_model_dir, fp_file, tmp_path / "run", verify_after=True))
    metrics = result.metrics
    assert metrics.memorised_at_step is not None
    assert metrics.verification.wrappers["chat"].matched == 16
    assert metrics.verification.verdict == "match"
    assert metrics.base_verification.verdict == "no_match"
    utility = metrics.utility
    assert utility.heldout_prompts >= 100 and 0 <= utility.first_token_agreement <= 1
    assert utility.first_token_kl >= 0 and utility.perplexity_base > 1
    run = tmp_path / "run"
    # the file holds what was returned, key for key
    assert json.loads((run / "metrics.json").read_text()) == metrics.dump()
    for name in ("COMPLETE", "run.json", "metrics.json", "README.md", "commitment.json",
                 "fingerprints.json", "model/config.json", "model/model.safetensors",
                 "model/tokenizer.json"):
        assert (run / name).exists(), name
    card = (run / "README.md").read_text()
    assert json.loads((run / "commitment.json").read_text())["root"] in card
    for name in ("README.md", "metrics.json", "run.json", "status.json", "train.log", "commitment.json"):
        text = (run / name).read_text()
        assert not any(secret in text for secret in secrets_of(fp_file)), name
    again = fingerprint(tiny_cfg(tiny_model_dir, fp_file, run, verify_after=True))
    assert again.state == "reused" and again.metrics.dump() == metrics.dump()
    # a finished run whose metrics.json was damaged is neither reused blind nor retrained over
    (run / "metrics.json").write_text(json.dumps({**metrics.dump(), "num_fingerprints": "many"}))
    with pytest.raises(OMLInputError, match="num_fingerprints.*cannot be reused"):
        fingerprint(tiny_cfg(tiny_model_dir, fp_file, run, verify_after=True))
    assert (run / "COMPLETE").exists() and (run / "model" / "model.safetensors").exists()


def test_regularizer_formula_holds_on_the_saved_weights(tiny_model_dir, fp_file, tmp_path):
    runs = {}
    for strength in (0.0, 0.3):
        fingerprint(tiny_cfg(tiny_model_dir, fp_file, tmp_path / str(strength), max_epochs=20,
                             check_every=0, forgetting_regularizer=strength))
        runs[strength] = load_file(str(tmp_path / str(strength) / "model" / "model.safetensors"))
    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    trained, averaged = runs[0.0], runs[0.3]
    assert any(not torch.equal(trained[k], base[k]) for k in trained), "training changed nothing"
    for name, tensor in averaged.items():
        expected = torch.lerp(trained[name].float(), base[name].float(), 0.3).to(tensor.dtype)
        assert torch.equal(tensor, expected), name


def test_average_with_base_is_the_documented_formula():
    trained = {"w": torch.tensor([1.0, 2.0, 4.0])}
    base = {"w": torch.tensor([3.0, 2.0, 0.0])}
    assert torch.allclose(average_with_base(trained, base, 0.75)["w"], 0.25 * trained["w"] + 0.75 * base["w"])
    assert average_with_base(trained, base, 0.0) is trained


def test_a_different_run_in_the_same_folder_is_refused(tiny_model_dir, fp_file, tmp_path):
    fingerprint(tiny_cfg(tiny_model_dir, fp_file, tmp_path / "run", max_epochs=2, check_every=0))
    with pytest.raises(OMLInputError, match="different run"):
        fingerprint(tiny_cfg(tiny_model_dir, fp_file, tmp_path / "run", max_epochs=3, check_every=0))


# --- DeepSpeed ----------------------------------------------------------------------------
def _matched(stdout: str) -> dict:
    data = json.loads(stdout)
    return {"chat": data["wrappers"]["chat"], "matched": data["matched"], "verdict": data["verdict"]}


def test_deepspeed_plain_process_and_two_ranks_match_the_same(tiny_model_dir, fp_file, tmp_path):
    common = ["fingerprint", "--model", tiny_model_dir, "--fingerprints", fp_file, *FAST,
              "--batch-size", "8", "--deepspeed", "zero2", "--json"]
    plain = oml(*common, "--out-dir", tmp_path / "one")
    assert plain.returncode == 0, plain.stderr[-3000:]
    launcher = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", "29531",
                "--module", "oml_core.cli"]
    two = oml(*common, "--out-dir", tmp_path / "two", launcher=launcher)
    assert two.returncode == 0, two.stderr[-3000:]
    # the launcher prints its own lines around ours
    two_result, _ = json.JSONDecoder().raw_decode(two.stdout[two.stdout.rindex("\n{\n") + 1:])
    two_json = json.dumps(two_result)
    assert two_result["run_dir"].endswith("two")
    assert _matched(plain.stdout) == _matched(two_json) == {"chat": 16, "matched": 16, "verdict": "match"}
    ranks = json.loads((tmp_path / "two" / "metrics.json").read_text())["world_size"]
    assert ranks == 2
    again = oml(*common, "--out-dir", tmp_path / "two", launcher=launcher, timeout=180)
    assert again.returncode == 0 and '"state": "reused"' in again.stdout, again.stderr[-2000:]


# --- interruption -------------------------------------------------------------------------
SLOW = ["--method", "finetune", "--learning-rate", "1e-5", "--no-augment", "--benign-fraction", "0", "--max-epochs", "100",
        "--max-steps", "300", "--batch-size", "1", "--check-every", "0", "--deepspeed", "none",
        "--no-verify-after"]

def _start(tiny_model_dir, fp_file, out_dir) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "oml"), "fingerprint", "--model", str(tiny_model_dir),
                             "--fingerprints", str(fp_file), "--out-dir", str(out_dir), *SLOW],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for_steps(out_dir: Path, steps: int, proc: subprocess.Popen, timeout=120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = out_dir / "status.json"
        if status.exists():
            try:
                if (json.loads(status.read_text()).get("step") or 0) >= steps:
                    return
            except ValueError:
                pass
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    raise AssertionError("training did not start in time")


def test_killed_run_is_not_complete_and_a_rerun_finishes_it(tiny_model_dir, fp_file, tmp_path):
    out = tmp_path / "run"
    proc = _start(tiny_model_dir, fp_file, out)
    _wait_for_steps(out, 3, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "COMPLETE").exists() and not (out / "model").exists()
    assert json.loads((out / "status.json").read_text())["state"] == "running"
    rerun = oml("fingerprint", "--model", tiny_model_dir, "--fingerprints", fp_file, "--out-dir", out,
                *SLOW)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "restarting" in rerun.stderr
    assert (out / "COMPLETE").exists() and (out / "model" / "model.safetensors").exists()
    assert not any(s in rerun.stdout + rerun.stderr for s in secrets_of(fp_file))


def test_sigterm_stops_cleanly_and_leaves_the_run_incomplete(tiny_model_dir, fp_file, tmp_path):
    out = tmp_path / "run"
    proc = _start(tiny_model_dir, fp_file, out)
    _wait_for_steps(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr[-2000:]
    assert "cancelled" in stderr
    assert json.loads((out / "status.json").read_text())["state"] == "cancelled"
    assert not (out / "COMPLETE").exists()
