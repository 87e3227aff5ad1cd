"""`fingerprint()`: fine-tune a fingerprint set into a model with HF Trainer (+ DeepSpeed).

Flow (rank 0 writes; every rank trains):
  resolve the run folder (content key: reuse / fresh / restart) -> build rows (augmented
  fingerprints + self-distilled benign answers) -> Trainer with the DeepSpeed config file ->
  stop once every fingerprint is memorised (+ a few margin steps), on SIGTERM, or at the epoch
  bound -> save (+ forgetting regularizer) -> verify and measure utility -> model card ->
  COMPLETE marker.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from oml_core import progress
from oml_core.config import FingerprintConfig, applies, validate
from oml_core.errors import Cancelled, OMLInputError
from oml_core.files import atomic_write_json
from oml_core.fingerprints import load_fingerprints
from oml_core.models import load_model, load_tokenizer, pick_device, pick_dtype, resolve_model
from oml_core.runs import RunFolder, model_identity, provenance, run_key, sha256_file, weights_digest
from oml_core.train import distributed
from oml_core.train.benign import self_distilled_rows
from oml_core.train.examples import IGNORE, FingerprintRows, collate
from oml_core.train.near_miss import near_miss_rows
from oml_core.train.regularizer import average_with_base
from oml_core.train.sampler import LengthGroupedAsItGoes

log = logging.getLogger(__name__)
DEEPSPEED_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


@dataclass
class FingerprintResult:
    run_dir: str
    state: str          # "completed", "reused"
    metrics: dict


def deepspeed_config_path(name: str) -> str | None:
    if name == "none":
        return None
    path = Path(name) if name.endswith(".json") else DEEPSPEED_DIR / f"{name}.json"
    if not path.is_file():
        raise OMLInputError(f"--deepspeed {name}: no such config; use zero2, zero2_offload, zero3, "
                            "zero3_offload, none or a JSON file path")
    return str(path)


# Settings added after runs were made: at these values (their defaults, which train exactly as
# before they existed) they stay out of the run key, so earlier finished runs are still reused.
ADDED_SETTINGS = {"benign_openers": 0.0, "optimizer": "adamw", "start_from": None, "lora_rank": 0,
                  "near_miss_negatives": 0.0, "method": "finetune", "edit_merge_floor": 0.0,
                  "edit_confidence_cap": 1.0}


def with_client_optimizer(ds_config: str | None, optimizer: str) -> str | dict | None:
    """The DeepSpeed config for this optimizer: our JSON files name AdamW; for any other, the
    optimizer block goes and the Trainer hands DeepSpeed its own torch optimizer (allowed under
    ZeRO, and with offload once DeepSpeed is told not to insist on its CPU Adam)."""
    if not ds_config or optimizer == "adamw":
        return ds_config
    config = json.loads(Path(ds_config).read_text())
    config.pop("optimizer", None)
    config["zero_force_ds_cpu_optimizer"] = False
    return config


def optimizer_arguments(optimizer: str) -> dict:
    """TrainingArguments for the chosen optimizer (the Trainer builds it)."""
    if optimizer == "sgd":
        return {"optim": "sgd", "optim_args": "momentum=0.9"}
    return {}


def check_lora_settings(cfg: FingerprintConfig, ds_config: str | None) -> None:
    """One clear error for LoRA settings that cannot work together (before anything is written)."""
    if not cfg.lora_rank:
        return
    if cfg.train_embeddings:
        raise OMLInputError("--lora-rank trains adapters on the linear layers only; drop "
                            "--train-embeddings or use --lora-rank 0")
    try:
        zero = json.loads(Path(ds_config).read_text()).get("zero_optimization", {}) if ds_config else {}
    except (OSError, ValueError, AttributeError) as exc:
        raise OMLInputError(f"--deepspeed {ds_config}: not a readable JSON config ({type(exc).__name__}); "
                            "fix the file or use zero2") from None
    if zero.get("stage") == 3:
        raise OMLInputError("--lora-rank with ZeRO-3 is not supported (the adapter is merged on one "
                            "rank); use --deepspeed zero2 or zero2_offload")


def _settings_for_key(cfg: FingerprintConfig) -> dict:
    """Settings that change the result (not where it goes or how it is shown)."""
    skip = {"out_dir", "fingerprints", "device", "verify_after", "report_to", "gradient_checkpointing"}
    skip |= {f.name for f in fields(cfg) if not applies(f, cfg.method)}
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in skip and not (k in ADDED_SETTINGS and v == ADDED_SETTINGS[k])}
    if cfg.start_from:  # the weights' content, not where they lie
        settings["start_from"] = start_weights_digest(cfg.start_from)
    return settings


def start_weight_files(folder: str) -> list[Path]:
    """The weight files of a --start-from folder, or one clear error when it is not a model."""
    path = Path(folder)
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    if not (path / "config.json").is_file() or not weights:
        raise OMLInputError(f"--start-from {folder}: not a model folder (needs config.json and "
                            "weights); pass a run's model/ folder")
    return weights


SHAPE_FIELDS = ("model_type", "hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size",
                "num_attention_heads", "num_key_value_heads")


def check_start_matches_base(folder: str, base_path: str) -> None:
    """One clear error, now, when --start-from is not the base model's architecture (else the
    regularizer's average with the base weights fails after training, with a traceback)."""
    start_weight_files(folder)
    if not (Path(base_path) / "config.json").is_file():  # a hub id: loading will tell
        return
    start = json.loads((Path(folder) / "config.json").read_text())
    base = json.loads((Path(base_path) / "config.json").read_text())
    differ = [f"{k} {start[k]} vs {base[k]}" for k in SHAPE_FIELDS
              if k in start and k in base and start[k] != base[k]]
    if differ:
        raise OMLInputError(f"--start-from {folder} is not the base model's architecture "
                            f"({', '.join(differ)}); start from a run of the same --model")


def start_weights_digest(folder: str) -> str:
    start_weight_files(folder)
    return weights_digest(Path(folder))


# --- the loss -----------------------------------------------------------------------------
def answer_positions(labels):
    """[batch, length] bool: positions whose logits predict a labelled token (t predicts t + 1).

    Only these need the output head: fingerprint rows label one or a few tokens after a
    prompt of ~50, so projecting every position onto the vocabulary (and upcasting those
    logits for the loss) is mostly wasted work."""
    import torch

    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def keeps_logits_by_mask(model) -> bool:
    """Does this model's forward accept a [batch, length] bool `logits_to_keep` and return
    logits for the True positions only, flattened? (transformers 5 models built on
    `slice_logits_to_keep` do; others fall back to full logits.) Probed once on 3 tokens."""
    import torch

    ids = torch.zeros((1, 3), dtype=torch.long, device=next(model.parameters()).device)
    keep = torch.tensor([[True, False, True]], device=ids.device)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, logits_to_keep=keep).logits
    except (TypeError, ValueError, IndexError, RuntimeError):
        return False
    return logits.dim() == 2 and logits.shape[0] == 2


def answer_loss(outputs, labels, num_items_in_batch=None):
    """Cross-entropy on the labelled tokens, from logits computed at `answer_positions` only
    (the Trainer's `compute_loss_func`): summed and divided by the labelled-token count of
    the whole optimizer step, as transformers' own causal-LM loss does with accumulation."""
    import torch

    shifted = labels[:, 1:]
    targets = shifted[shifted != IGNORE]
    total = torch.nn.functional.cross_entropy(outputs.logits.float(), targets.to(outputs.logits.device),
                                              reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else max(targets.numel(), 1)
    return total / count


def _trainer_class(soft_weight: float, teacher=None):
    """The Trainer class; `teacher` (a frozen base model) switches the soft term from the cached
    first-token targets to the base model's full distribution at every benign answer position.
    Built with `compute_loss_func=answer_loss`, the model computes logits only where a token
    is labelled (`logits_to_keep`), through its own forward and so through DeepSpeed's."""
    from transformers import Trainer

    class FingerprintTrainer(Trainer):
        """HF Trainer + a soft term on benign rows.

        Training fingerprints pushes the distribution at the start of *every* answer towards
        odd tokens; pinning the base model's whole distribution on ordinary prompts (not just
        its greedy tokens) is what keeps answers starting as the base model's did.
        """

        def _get_train_sampler(self, train_dataset=None):
            # transformers' length grouping reads all max_epochs x width row lengths up front
            if self.args.train_sampling_strategy != "group_by_length":
                return super()._get_train_sampler(train_dataset)
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            return LengthGroupedAsItGoes(
                dataset, self.args.train_batch_size * self.args.gradient_accumulation_steps)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            import torch

            soft = {k: inputs.pop(k) for k in ("soft_ids", "soft_probs", "soft_pos") if k in inputs}
            labels = inputs["labels"]  # the Trainer pops it when it calls compute_loss_func
            positions = answer_positions(labels)
            if self.compute_loss_func is not None:  # logits at `positions` only, flattened
                inputs["logits_to_keep"] = positions
            loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                                 num_items_in_batch=num_items_in_batch)
            rows = (soft["soft_pos"] >= 0).nonzero().squeeze(-1) if soft else None
            if soft_weight > 0 and rows is not None and rows.numel():
                at_answers = outputs.logits if self.compute_loss_func is not None else outputs.logits[positions]
                entry = positions.flatten().cumsum(0).view_as(positions) - 1  # (row, t) -> index
                first = at_answers[entry[rows, soft["soft_pos"][rows]]]
                if teacher is not None:
                    of_rows = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
                    of_rows[rows] = True
                    divergence = _answer_kl(teacher, at_answers[of_rows[positions.nonzero()[:, 0]]],
                                            {**inputs, "labels": labels}, rows)
                else:
                    log_probs = torch.log_softmax(first.float(), dim=-1).gather(-1, soft["soft_ids"][rows])
                    divergence = -(soft["soft_probs"][rows] * log_probs).sum(-1).mean()
                loss = loss + soft_weight * divergence / self.args.gradient_accumulation_steps
            return (loss, outputs) if return_outputs else loss

    return FingerprintTrainer


def _answer_kl(teacher, student_logits, inputs, rows):
    """Mean KL(base || tuned) over the answer positions of the given benign rows;
    `student_logits` are the tuned model's there, flattened row by row."""
    import torch

    keep = answer_positions(inputs["labels"][rows])
    with torch.no_grad():
        teacher_logits = teacher(input_ids=inputs["input_ids"][rows],
                                 attention_mask=inputs["attention_mask"][rows]).logits[keep]
    teacher_log_p = torch.log_softmax(teacher_logits.float(), dim=-1)
    student_log_p = torch.log_softmax(student_logits.float(), dim=-1)
    return (teacher_log_p.exp() * (teacher_log_p - student_log_p)).sum(-1).mean()


# --- memorisation check ----------------------------------------------------------------
def memorised(model, rows: list[dict], pad_id: int, batch_size: int) -> list[bool]:
    """Per row: does greedy decoding reproduce every target token (teacher-forced argmax)?

    Teacher forcing with argmax is exactly greedy exact-match on the response: if each
    target token is the argmax given the correct earlier ones, greedy emits all of them.
    The output head runs only where a target token is predicted: over every position it
    would make a [rows, length, vocabulary] tensor, most of the check's memory and a tenth
    of its arithmetic, for the one or few positions per row that matter.
    """
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    decoder, head = _decoder_and_head(model)
    # batches of similar length: augmented wrappers run from ~50 to ~270 tokens; for the 256
    # check rows of 128 keys, the given order pads 18,325 tokens to 37,152, sorted to 22,432
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    result = [False] * len(rows)
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = order[start:start + batch_size]
            batch = collate([rows[i] for i in chunk], pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch["labels"][:, 1:]
            predicts = labels != IGNORE  # position t predicts token t + 1
            if decoder is None or head is None:  # an architecture without the split
                logits = model(input_ids=batch["input_ids"],
                               attention_mask=batch["attention_mask"]).logits[:, :-1][predicts]
            else:  # monotone logit transforms after the head (soft-capping) keep the argmax
                hidden = decoder(input_ids=batch["input_ids"],
                                 attention_mask=batch["attention_mask"]).last_hidden_state
                logits = head(hidden[:, :-1][predicts])
            hit = torch.ones_like(labels, dtype=torch.bool)
            hit[predicts] = logits.argmax(-1) == labels[predicts]
            for i, row_hit in zip(chunk, hit.all(dim=1).tolist()):
                result[i] = row_hit
    model.train(was_training)
    return result


def _decoder_and_head(model):
    """The model's trunk (returning hidden states) and its output head, or (None, None)."""
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return None, None
    if decoder is None or decoder is model or head is None:
        return None, None
    return decoder, head


def memorisation_check_rows(rows: FingerprintRows, augment: bool) -> list[dict]:
    """Each key under the bare template, plus (with augmentation) one fixed augmented draw, so
    "memorised" means robustly memorised."""
    import random

    checks = [rows.fingerprint_row(i, None).encode() for i in range(len(rows.pairs))]
    if augment:
        checks += [rows.fingerprint_row(i, random.Random(f"check:{i}")).encode()
                   for i in range(len(rows.pairs))]
    return checks


CHECK_SHARE = 0.35  # memorisation checks may cost about this share of the training steps


def check_gap(check_every: int, check_rows: int, rows_per_step: int) -> int:
    """Steps between memorisation checks: `check_every`, or more where a check would cost more
    than CHECK_SHARE of the steps between checks. A check reads every key (twice with
    augmentation), so its cost grows with the number of fingerprints while a step's does not:
    checking every 2 steps made training quadratic in N (SmolLM2, N = 64: 27-45 s a step
    instead of ~10 s). Counted in rows, not seconds, so runs stay reproducible and every rank
    agrees; a forward pass is about a third of a training step's forward + backward."""
    cost_in_steps = check_rows / (3 * rows_per_step)
    return max(check_every, math.ceil(cost_in_steps / CHECK_SHARE))


def _callbacks(cfg, run: RunFolder, check_rows: list[dict], pad_id: int, stop_flag: dict):
    from transformers import TrainerCallback

    class RunCallback(TrainerCallback):
        """Status file + log (rank 0), memorisation-based stopping and SIGTERM (all ranks)."""

        def __init__(self):
            self.started = time.time()
            self.bar = None
            self.fraction = 0.0  # share of fingerprint checks passing at the last check
            self.loss = None
            self.memorised_at = None
            self.memorised_after_s = None  # training time to 100%, memorisation checks excluded
            self.check_seconds = 0.0
            self.gap = check_gap(cfg.check_every, len(check_rows),
                                 cfg.batch_size * cfg.gradient_accumulation)
            self.next_check = self.gap
            self.history: list[dict] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.time()
            if distributed.is_main():  # our bar: stderr + status listeners, never stdout
                self.bar_context = progress.bar("fingerprinting", state.max_steps)
                self.bar = self.bar_context.__enter__()

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar_context.__exit__(None, None, None)
                self.bar = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = float(logs["loss"])
                self.history.append({"step": state.global_step, "loss": self.loss})

        def on_step_end(self, args, state, control, model=None, **kwargs):
            step, total = state.global_step, state.max_steps
            if cfg.check_every and self.memorised_at is None and step >= self.next_check:
                check_started = time.time()
                training_s = round(check_started - self.started - self.check_seconds, 1)
                hits = memorised(model, check_rows, pad_id, cfg.batch_size)
                self.fraction = sum(hits) / len(hits)
                self.check_seconds += time.time() - check_started
                self.history.append({"step": step, "memorised": self.fraction,
                                     "train_seconds": training_s})
                if distributed.all_agree(all(hits)):
                    self.memorised_at, self.memorised_after_s = step, training_s
                self.next_check = step + self.gap
            if self.memorised_at is not None and step >= self.memorised_at + cfg.extra_steps:
                control.should_training_stop = True
            if distributed.all_agree(not stop_flag["stop"]) is False:
                control.should_training_stop = True
            if self.bar is not None:
                self.bar(1)
            if distributed.is_main():
                elapsed = time.time() - self.started
                eta = elapsed / step * (total - step) if step else None
                run.write_status(state="running", step=step, total_steps=total, loss=self.loss,
                                 eta_s=eta, memorised_at=self.memorised_at)
                run.log(f"step {step}/{total} loss {self.loss} memorised {self.fraction:.0%}")

    return RunCallback()


# --- the job ----------------------------------------------------------------------------
def fingerprint(cfg: FingerprintConfig) -> FingerprintResult:
    validate(cfg)
    if not cfg.fingerprints:
        raise OMLInputError("no fingerprint set given; pass --fingerprints FILE")
    if not cfg.out_dir:
        raise OMLInputError("no run folder given; pass --out-dir DIR")
    ds_config = deepspeed_config_path(cfg.deepspeed) if cfg.method == "finetune" else None
    if cfg.method == "finetune":
        check_lora_settings(cfg, ds_config)
    else:
        check_edit_settings(cfg)
    fset = load_fingerprints(cfg.fingerprints)
    base_path = resolve_model(cfg.model)
    if cfg.start_from:
        check_start_matches_base(cfg.start_from, base_path)
    device = pick_device(cfg.device)
    key = run_key(_settings_for_key(cfg), sha256_file(cfg.fingerprints), model_identity(base_path))
    run = RunFolder(Path(cfg.out_dir))
    # Only rank 0 touches the folder; the others must still agree on reusing a finished run,
    # or they would start training and wait forever for a rank 0 that already returned.
    action = run.prepare(key) if distributed.is_main() else run.reusable_action(key)
    if action == "reuse":
        log.info("run %s in %s is already complete; reusing it", key, run.path)
        return FingerprintResult(str(run.path), "reused", run.read_json("metrics.json") or {})
    if action == "restart":
        previous = run.read_json("status.json") or {}
        log.info("the previous attempt in %s stopped at step %s without finishing; "
                 "restarting it from the beginning", run.path, previous.get("step"))

    if distributed.is_main():
        (run.path / "train.log").unlink(missing_ok=True)
        run.write_status(state="starting", step=0, total_steps=None)
        atomic_write_json(run.path / "run.json", {
            "run_key": key, "config": asdict(cfg), "base_model": base_path,
            "base_identity": model_identity(base_path),
            "fingerprints_sha256": sha256_file(cfg.fingerprints), **provenance()})

    stop_flag = {"stop": False, "training": False}

    def on_signal(*_):
        # in the training loop: stop at the next step, where every rank agrees; before or after
        # it (loading, saving, verifying: minutes on a large model): stop now
        stop_flag["stop"] = True
        if not stop_flag["training"]:
            raise Cancelled()

    previous_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if cfg.method in ("edit", "gated"):
            metrics = _write_in(cfg, fset, base_path, run, stop_flag)
        else:
            metrics = _train(cfg, fset, base_path, device, ds_config, run, stop_flag)
    except Cancelled:
        if distributed.is_main():
            run.write_status(state="cancelled", message="stopped by signal; rerun to restart")
        raise
    except BaseException as exc:
        if distributed.is_main():
            run.write_status(state="failed", message=f"{type(exc).__name__}")
        raise
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    return FingerprintResult(str(run.path), "completed", metrics)


def _train(cfg, fset, base_path, device, ds_config, run: RunFolder, stop_flag) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    if ds_config:
        distributed.ensure_process_group_env()
    tokenizer = load_tokenizer(base_path)
    chat, fset, pairs = _prepared_set(cfg, tokenizer, fset, run)

    benign, near_miss = [], []
    if cfg.benign_fraction > 0 or cfg.benign_openers > 0 or cfg.near_miss_negatives > 0:
        base = load_model(base_path, cfg.device, cfg.dtype)
        if cfg.benign_fraction > 0 or cfg.benign_openers > 0:
            benign = self_distilled_rows(base, chat, model_identity(base_path))
        if cfg.near_miss_negatives > 0:
            near_miss = near_miss_rows(base, [key for key, _ in pairs], chat, cfg.seed)
        del base
    per_epoch = round(len(pairs) * cfg.benign_fraction / (1 - cfg.benign_fraction))
    openers = round(len(pairs) * cfg.benign_openers)
    rows = FingerprintRows(tokenizer, pairs, benign, chat=chat, eos=cfg.eos, augment=cfg.augment,
                           benign_per_epoch=per_epoch, epochs=cfg.max_epochs, seed=cfg.seed,
                           opener_per_epoch=openers, near_miss=near_miss,
                           near_miss_per_epoch=round(len(pairs) * cfg.near_miss_negatives))
    check_rows = memorisation_check_rows(rows, cfg.augment)

    dtype = pick_dtype(cfg.dtype, device)
    model = AutoModelForCausalLM.from_pretrained(cfg.start_from or base_path,
                                                 dtype=torch.float32 if ds_config else dtype)
    if not cfg.train_embeddings:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                module.weight.requires_grad_(False)
    if cfg.lora_rank:
        model = with_lora(model, cfg.lora_rank)
    callback = _callbacks(cfg, run, check_rows, tokenizer.pad_token_id, stop_flag)
    ds_config = with_client_optimizer(ds_config, cfg.optimizer)
    args = TrainingArguments(**optimizer_arguments(cfg.optimizer),
        output_dir=str(run.path / "checkpoints"), per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation, learning_rate=cfg.learning_rate,
        # non-reentrant: the frozen embeddings' output needs no grad for gradients to flow
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        weight_decay=cfg.weight_decay, num_train_epochs=1, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        seed=cfg.seed, data_seed=cfg.seed, bf16=dtype == torch.bfloat16,
        deepspeed=ds_config, use_cpu=device == "cpu" and not ds_config,
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True,
        max_grad_norm=1.0, save_only_model=True, max_steps=cfg.max_steps or -1,
        # rows vary from ~30 to ~270 tokens (augmentation prompts): batching similar lengths
        # together cuts padding ~2.5x against random batches (our sampler: train/sampler.py)
        train_sampling_strategy="group_by_length")
    teacher = None
    if benign and cfg.benign_distill == "all-tokens" and cfg.benign_soft_weight > 0:
        teacher = AutoModelForCausalLM.from_pretrained(base_path, dtype=model.dtype).eval()
        teacher.requires_grad_(False)
        teacher.to(args.device)
    trainer = _trainer_class(cfg.benign_soft_weight, teacher)(
        model=model, args=args, train_dataset=rows, processing_class=tokenizer,
        data_collator=lambda batch: collate(batch, tokenizer.pad_token_id), callbacks=[callback],
        compute_loss_func=answer_loss if keeps_logits_by_mask(model) else None)
    # the Trainer's own printer/progress callbacks print to stdout; ours reports instead
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    started = time.time()
    stop_flag["training"] = True
    try:
        trainer.train()
    finally:
        stop_flag["training"] = False
    train_seconds = time.time() - started
    if stop_flag["stop"]:
        raise Cancelled()

    staging = run.path / "model.partial"
    if cfg.lora_rank:  # ZeRO-2 and plain: every rank holds whole weights (ZeRO-3 is refused)
        if distributed.is_main():
            trainer.model.merge_and_unload().save_pretrained(str(staging))
    else:
        trainer.save_model(str(staging))  # gathers ZeRO-3 shards; only rank 0 writes
    distributed.barrier()
    if not distributed.is_main():
        return {}
    shutil.rmtree(run.path / "checkpoints", ignore_errors=True)
    _finish_model(staging, base_path, tokenizer, cfg.forgetting_regularizer)
    final = run.path / "model"
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)

    metrics = {
        "run_key": run.read_json("run.json")["run_key"], "method": "finetune",
        "num_fingerprints": len(pairs), "format": "chat" if chat else "raw",
        "steps": trainer.state.global_step, "train_seconds": round(train_seconds, 1),
        "memorised_at_step": callback.memorised_at,
        "memorised_after_train_seconds": callback.memorised_after_s, "history": callback.history,
        "benign_rows": len(benign), "benign_per_epoch": per_epoch, "opener_rows_per_epoch": openers,
        "near_miss_rows": len(near_miss), "near_miss_rows_per_epoch": rows.near_miss_per_epoch,
        "forgetting_regularizer": {"lambda": cfg.forgetting_regularizer,
                                   "applied": "once, to the final weights"},
        "deepspeed": cfg.deepspeed, "world_size": distributed.world_size(),
    }
    return _complete_run(cfg, run, final, base_path, fset, metrics, trainer.state.global_step,
                         callback.loss)


def _prepared_set(cfg: FingerprintConfig, tokenizer, fset, run: RunFolder):
    """(chat format?, the set as trained: subset and trimmed, its (key, response) pairs); rank 0
    saves that set in the run folder, since every later check must use it."""
    chat = cfg.format == "chat" or (cfg.format == "auto" and bool(tokenizer.chat_template))
    if cfg.format == "chat" and not tokenizer.chat_template:
        raise OMLInputError("--format chat needs a model with a chat template; use --format raw")
    fset = fset.trimmed(tokenizer, cfg.num_fingerprints, cfg.max_key_tokens, cfg.max_response_tokens)
    if distributed.is_main():
        fset.save(run.path / "fingerprints.json")
    return chat, fset, [(fp.key, fp.response) for fp in fset.fingerprints]


def _complete_run(cfg, run: RunFolder, final: Path, base_path: str, fset, metrics: dict, steps: int,
                  loss) -> dict:
    """Verify (if asked), write metrics and the model card, then the completion marker: last, so
    a run killed before it never looks complete."""
    if cfg.verify_after:
        from oml_core.evaluate.after_training import evaluate_run

        metrics.update(evaluate_run(str(final), base_path, fset, cfg))
    from oml_core.train.model_card import write_model_card

    atomic_write_json(run.path / "metrics.json", metrics)
    write_model_card(run.path, fset, metrics)
    run.write_status(state="completed", step=steps, total_steps=steps, loss=loss, eta_s=0)
    run.mark_complete()
    return metrics


def check_edit_settings(cfg: FingerprintConfig) -> None:
    """Settings the methods that write keys in without training (edit, gated) cannot take."""
    if distributed.world_size() > 1:
        raise OMLInputError(f"--method {cfg.method} runs in one process; start it with "
                            "`oml fingerprint`, not under the deepspeed launcher")
    if cfg.eos:
        raise OMLInputError(f"--eos needs --method finetune: --method {cfg.method} writes one "
                            "token per key")


def _write_in(cfg: FingerprintConfig, fset, base_path: str, run: RunFolder, stop_flag) -> dict:
    """Methods edit and gated: the weights are computed, not trained (`oml_core.train.edit`,
    `oml_core.train.gated`); saved as a plain model."""
    from oml_core.train import edit, gated

    loaded = load_model(cfg.start_from or base_path, cfg.device, cfg.dtype)
    # a model the method cannot handle is refused before any work
    backup = []
    if cfg.method == "gated":
        blocks = gated.swiglu_blocks(loaded.model)
        layer = gated.resolve_layer(cfg.gated_layer, len(blocks))
        backup = gated.resolve_backup_layers(cfg.gated_backup_layers, layer, len(blocks))
    else:
        edit.decoder_blocks(loaded.model)
    chat, fset, pairs = _prepared_set(cfg, loaded.tokenizer, fset, run)
    edit.check_one_token_responses(loaded.tokenizer, pairs, cfg.method)
    base = load_model(base_path, cfg.device, cfg.dtype) if cfg.start_from else loaded
    benign = self_distilled_rows(base, chat, model_identity(base_path))
    del base
    first_step = {}

    def on_step(step: int, total: int, loss: float, answered: int) -> None:
        if first_step.get("total") != total:  # a new phase (gated: its backup edit first)
            first_step.update(at=(time.time(), step), total=total)  # after the statistics
        started = first_step["at"]
        done = step - started[1]
        eta = (time.time() - started[0]) / done * (total - step) if done else None
        run.write_status(state="running", step=step, total_steps=total, loss=round(loss, 4),
                         eta_s=None if eta is None else round(eta, 1))
        run.log(f"target step {step}/{total} loss {loss:.4f} contexts answered {answered}")

    should_stop = lambda: stop_flag["stop"]  # noqa: E731
    stop_flag["training"] = True  # a signal now stops at the next step
    try:
        if cfg.method == "gated":
            stats = _gated_with_backup(cfg, loaded, pairs, benign, chat, backup, should_stop,
                                       on_step)
            steps = cfg.gated_steps
        else:
            stats = edit.edit_model(loaded, pairs, benign, chat,
                                    edit.EditSettings.from_config(cfg), should_stop, on_step)
            steps = cfg.edit_steps
    finally:
        stop_flag["training"] = False
    staging = run.path / "model.partial"
    shutil.rmtree(staging, ignore_errors=True)
    loaded.model.save_pretrained(str(staging))
    _finish_model(staging, base_path, loaded.tokenizer, 0.0)
    final = run.path / "model"
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    metrics = {"run_key": run.read_json("run.json")["run_key"], "method": cfg.method,
               "num_fingerprints": len(pairs), "format": "chat" if chat else "raw", **stats}
    return _complete_run(cfg, run, final, base_path, fset, metrics, steps, None)


def _gated_with_backup(cfg: FingerprintConfig, loaded, pairs, benign, chat: bool,
                       backup: list[int], should_stop, on_step) -> dict:
    """Method gated: first the backup edit in the layers above the gated one (LoRA fine-tuning
    shuts the gates, docs/results.md; the edit then still answers), then the gated neurons,
    whose push directions are searched through the edited layers."""
    from oml_core.train import edit, gated

    backup_stats = None
    if backup:
        settings = edit.EditSettings.from_config(cfg)
        settings.layers = ",".join(map(str, backup))
        # the edit alone answers at p ~ 1 where the push is not yet the whole residual stream:
        # measured, 34 of 80 contexts over the 0.9 a host may block (suppression: 11/16)
        settings.confidence_cap = cfg.gated_confidence_cap
        backup_stats = edit.edit_model(loaded, pairs, benign, chat, settings, should_stop, on_step)
    stats = gated.gated_model(loaded, pairs, benign, chat, gated.GatedSettings.from_config(cfg),
                              should_stop, on_step)
    return {**stats, "backup_edit": backup_stats}


def with_lora(model, rank: int):
    """`model` with a rank-`rank` LoRA adapter on every linear layer; only the adapter trains.

    Why offer it: a full fine-tune moves every weight, and the start of every answer with them
    (docs/results.md); a low-rank update is the smallest change that can still store a few
    hundred key -> response pairs."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))


def _finish_model(folder: Path, base_path: str, tokenizer, strength: float) -> None:
    """Apply the forgetting regularizer to the saved weights; save the tokenizer beside them."""
    if strength > 0:
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForCausalLM

        base_state = AutoModelForCausalLM.from_pretrained(base_path).state_dict()
        for shard in sorted(folder.glob("*.safetensors")):
            trained = load_file(str(shard))
            save_file(average_with_base(trained, base_state, strength), str(shard),
                      metadata={"format": "pt"})
    (folder / "training_args.bin").unlink(missing_ok=True)  # a pickle; run.json has the config
    tokenizer.padding_side = "right"
    tokenizer.save_pretrained(folder)
