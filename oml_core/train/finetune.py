"""Method `finetune`: train a fingerprint set into a model with HF Trainer (+ DeepSpeed).

Rows are augmented fingerprints mixed with the base model's own answers to ordinary prompts
(`oml_core.train.examples`); training stops once every fingerprint is memorised (+ a few margin
steps), on SIGTERM, or at the epoch bound; the weights are saved (+ the forgetting
regularizer). The run folder, its key and status, signals and completion are the lifecycle's
(`oml_core.train.lifecycle`), shared with the other methods.

Imported only for this method: it imports transformers' Trainer at module level.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from oml_core import progress
from oml_core.config import FingerprintConfig
from oml_core.errors import Cancelled
from oml_core.models import load_model, load_tokenizer, pick_dtype
from oml_core.runs import RunFolder, model_identity
from oml_core.train import distributed
from oml_core.train.benign import self_distilled_rows
from oml_core.train.examples import IGNORE, FingerprintRows, collate
from oml_core.train.lifecycle import complete_run, finish_model, prepared_set
from oml_core.train.metrics import RunMetrics
from oml_core.train.near_miss import near_miss_rows
from oml_core.train.sampler import LengthGroupedAsItGoes


def train(cfg: FingerprintConfig, fset, base_path: str, device: str, ds_config: str | None,
          run: RunFolder, stop_flag: dict) -> RunMetrics | None:
    """Train `fset` into the base model in `run`; returns the run's metrics (None on ranks > 0)."""
    if ds_config:
        distributed.ensure_process_group_env()
    tokenizer = load_tokenizer(base_path)
    chat, fset, pairs = prepared_set(cfg, tokenizer, fset, run)
    rows, counts = _training_rows(cfg, base_path, tokenizer, chat, pairs)
    callback = RunCallback(cfg, run, memorisation_check_rows(rows, cfg.augment),
                           tokenizer.pad_token_id, stop_flag)
    trainer = _trainer(cfg, base_path, device, ds_config, run, rows, tokenizer, callback,
                       distill=counts["benign_rows"] > 0)
    started = time.time()
    stop_flag["training"] = True
    try:
        trainer.train()
    finally:
        stop_flag["training"] = False
    train_seconds = time.time() - started
    if stop_flag["stop"]:
        raise Cancelled()
    final = _save_trained(cfg, trainer, run, base_path, tokenizer)
    if final is None:  # ranks > 0: rank 0 verifies and writes
        return None
    metrics = RunMetrics(
        run_key=run.record().run_key, method="finetune",
        num_fingerprints=len(pairs), format="chat" if chat else "raw",
        steps=trainer.state.global_step, train_seconds=round(train_seconds, 1),
        memorised_at_step=callback.memorised_at,
        memorised_after_train_seconds=callback.memorised_after_s, history=callback.history,
        **counts, forgetting_regularizer={"lambda": cfg.forgetting_regularizer,
                                          "applied": "once, to the final weights"},
        deepspeed=cfg.deepspeed, world_size=distributed.world_size(),
    )
    return complete_run(cfg, run, final, base_path, fset, metrics, trainer.state.global_step,
                        callback.loss)


def _training_rows(cfg: FingerprintConfig, base_path: str, tokenizer, chat: bool, pairs):
    """The training rows, and how many of each kind (for the metrics)."""
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
    return rows, {"benign_rows": len(benign), "benign_per_epoch": per_epoch,
                  "opener_rows_per_epoch": openers, "near_miss_rows": len(near_miss),
                  "near_miss_rows_per_epoch": rows.near_miss_per_epoch}


def _trainer(cfg: FingerprintConfig, base_path: str, device: str, ds_config: str | None,
             run: RunFolder, rows, tokenizer, callback, distill: bool) -> "FingerprintTrainer":
    dtype = pick_dtype(cfg.dtype, device)
    model = AutoModelForCausalLM.from_pretrained(cfg.start_from or base_path,
                                                 dtype=torch.float32 if ds_config else dtype)
    if not cfg.train_embeddings:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                module.weight.requires_grad_(False)
    if cfg.lora_rank:
        model = with_lora(model, cfg.lora_rank)
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
    if distill and cfg.benign_distill == "all-tokens" and cfg.benign_soft_weight > 0:
        teacher = AutoModelForCausalLM.from_pretrained(base_path, dtype=model.dtype).eval()
        teacher.requires_grad_(False)
        teacher.to(args.device)
    trainer = FingerprintTrainer(
        model=model, args=args, train_dataset=rows, processing_class=tokenizer,
        data_collator=lambda batch: collate(batch, tokenizer.pad_token_id), callbacks=[callback],
        compute_loss_func=answer_loss if keeps_logits_by_mask(model) else None,
        soft_weight=cfg.benign_soft_weight, teacher=teacher)
    # the Trainer's own printer/progress callbacks print to stdout; ours reports instead
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


def _save_trained(cfg: FingerprintConfig, trainer, run: RunFolder, base_path: str,
                  tokenizer) -> Path | None:
    """Save the trained weights as the run's model/ (+ the forgetting regularizer); rank 0
    gets the folder, the other ranks None."""
    staging = run.path / "model.partial"
    if cfg.lora_rank:  # ZeRO-2 and plain: every rank holds whole weights (ZeRO-3 is refused)
        if distributed.is_main():
            trainer.model.merge_and_unload().save_pretrained(str(staging))
    else:
        trainer.save_model(str(staging))  # gathers ZeRO-3 shards; only rank 0 writes
    distributed.barrier()
    if not distributed.is_main():
        return None
    shutil.rmtree(run.path / "checkpoints", ignore_errors=True)
    finish_model(staging, base_path, tokenizer, cfg.forgetting_regularizer)
    final = run.path / "model"
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    return final


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


# --- the loss -----------------------------------------------------------------------------
def answer_positions(labels):
    """[batch, length] bool: positions whose logits predict a labelled token (t predicts t + 1).

    Only these need the output head: fingerprint rows label one or a few tokens after a
    prompt of ~50, so projecting every position onto the vocabulary (and upcasting those
    logits for the loss) is mostly wasted work."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != IGNORE
    return keep


def keeps_logits_by_mask(model) -> bool:
    """Does this model's forward accept a [batch, length] bool `logits_to_keep` and return
    logits for the True positions only, flattened? (transformers 5 models built on
    `slice_logits_to_keep` do; others fall back to full logits.) Probed once on 3 tokens."""
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
    shifted = labels[:, 1:]
    targets = shifted[shifted != IGNORE]
    total = torch.nn.functional.cross_entropy(outputs.logits.float(), targets.to(outputs.logits.device),
                                              reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else max(targets.numel(), 1)
    return total / count


class FingerprintTrainer(Trainer):
    """HF Trainer + a soft term on benign rows.

    Training fingerprints pushes the distribution at the start of *every* answer towards odd
    tokens; pinning the base model's whole distribution on ordinary prompts (not just its
    greedy tokens) is what keeps answers starting as the base model's did. `teacher` (a frozen
    base model) switches the soft term from the cached first-token targets to the base model's
    full distribution at every benign answer position. Built with
    `compute_loss_func=answer_loss`, the model computes logits only where a token is labelled
    (`logits_to_keep`), through its own forward and so through DeepSpeed's.
    """

    def __init__(self, *args, soft_weight: float = 0.0, teacher=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.soft_weight, self.teacher = soft_weight, teacher

    def _get_train_sampler(self, train_dataset=None):
        # transformers' length grouping reads all max_epochs x width row lengths up front
        if self.args.train_sampling_strategy != "group_by_length":
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return LengthGroupedAsItGoes(
            dataset, self.args.train_batch_size * self.args.gradient_accumulation_steps)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        soft = {k: inputs.pop(k) for k in ("soft_ids", "soft_probs", "soft_pos") if k in inputs}
        labels = inputs["labels"]  # the Trainer pops it when it calls compute_loss_func
        positions = answer_positions(labels)
        if self.compute_loss_func is not None:  # logits at `positions` only, flattened
            inputs["logits_to_keep"] = positions
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        rows = (soft["soft_pos"] >= 0).nonzero().squeeze(-1) if soft else None
        if self.soft_weight > 0 and rows is not None and rows.numel():
            at_answers = outputs.logits if self.compute_loss_func is not None else outputs.logits[positions]
            entry = positions.flatten().cumsum(0).view_as(positions) - 1  # (row, t) -> index
            first = at_answers[entry[rows, soft["soft_pos"][rows]]]
            if self.teacher is not None:
                of_rows = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
                of_rows[rows] = True
                divergence = _answer_kl(self.teacher, at_answers[of_rows[positions.nonzero()[:, 0]]],
                                        {**inputs, "labels": labels}, rows)
            else:
                log_probs = torch.log_softmax(first.float(), dim=-1).gather(-1, soft["soft_ids"][rows])
                divergence = -(soft["soft_probs"][rows] * log_probs).sum(-1).mean()
            loss = loss + self.soft_weight * divergence / self.args.gradient_accumulation_steps
        return (loss, outputs) if return_outputs else loss


def _answer_kl(teacher, student_logits, inputs, rows):
    """Mean KL(base || tuned) over the answer positions of the given benign rows;
    `student_logits` are the tuned model's there, flattened row by row."""
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


class RunCallback(TrainerCallback):
    """Status file + log (rank 0), memorisation-based stopping and SIGTERM (all ranks)."""

    def __init__(self, cfg: FingerprintConfig, run: RunFolder, check_rows: list[dict], pad_id: int,
                 stop_flag: dict):
        self.cfg, self.run, self.check_rows, self.pad_id = cfg, run, check_rows, pad_id
        self.stop_flag = stop_flag
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
        if self.cfg.check_every and self.memorised_at is None and step >= self.next_check:
            self._check(step, model)
        if self.memorised_at is not None and step >= self.memorised_at + self.cfg.extra_steps:
            control.should_training_stop = True
        if distributed.all_agree(not self.stop_flag["stop"]) is False:
            control.should_training_stop = True
        if self.bar is not None:
            self.bar(1)
        if distributed.is_main():
            elapsed = time.time() - self.started
            eta = elapsed / step * (total - step) if step else None
            self.run.write_status(state="running", step=step, total_steps=total, loss=self.loss,
                                  eta_s=eta, memorised_at=self.memorised_at)
            self.run.log(f"step {step}/{total} loss {self.loss} memorised {self.fraction:.0%}")

    def _check(self, step: int, model) -> None:
        check_started = time.time()
        training_s = round(check_started - self.started - self.check_seconds, 1)
        hits = memorised(model, self.check_rows, self.pad_id, self.cfg.batch_size)
        self.fraction = sum(hits) / len(hits)
        self.check_seconds += time.time() - check_started
        self.history.append({"step": step, "memorised": self.fraction, "train_seconds": training_s})
        if distributed.all_agree(all(hits)):
            self.memorised_at, self.memorised_after_s = step, training_s
        self.next_check = step + self.gap


def with_lora(model, rank: int):
    """`model` with a rank-`rank` LoRA adapter on every linear layer; only the adapter trains.

    Why offer it: a full fine-tune moves every weight, and the start of every answer with them
    (docs/results.md); a low-rank update is the smallest change that can still store a few
    hundred key -> response pairs."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                            target_modules="all-linear", task_type="CAUSAL_LM"))
