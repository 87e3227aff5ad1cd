"""Time to 100% memorised: our trainer vs OML 1.0's recipe, same fingerprints, same machine.

One run, both arms in the same process, on the same fingerprint set. "Memorised" is the same
test for both: teacher-forced greedy reproduces every response token for every key, under the
bare chat template and under one fixed augmented draw. Times count training only (model
loading, benign-answer generation and the checks themselves are excluded from both).

The predecessor's recipe (docs/training.md): DeepSpeed ZeRO-2 with the optimizer offloaded to CPU; per-device
batch 8 with gradient accumulation so that one optimizer step covers all N fingerprints (one
step per epoch); every batch padded to the next power of two; EOS after the response; lr 1e-5,
warm-up then linear decay, weight decay 1e-4; no benign rows; per-epoch weight averaging with
OML 1.0's default strength (0; `--oml1-lambda` to change); up to 30 epochs, checked after
each one. It stops early once memorised or after `--oml1-max-seconds` of training.

Ours: `oml fingerprint` with the project's defaults (benign self-distillation, augmentation,
length-grouped batches, ZeRO-2 without offload). Afterwards both models are verified with the
held-out wrappers and compared with the base model off the keys, so the speed is compared at
known fingerprint and utility results.

    .venv/bin/python benchmarks/train_time_to_memorise.py [--num-fingerprints 128] [--model M]
        [--oml1-max-seconds S] [--work-dir DIR] [--out benchmarks/results/train_time_to_memorise.json]

Rerun with the same --work-dir to reuse its fingerprint set and, when finished, our arm.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

from oml_core.config import FingerprintConfig, GenerateConfig
from oml_core.evaluate.after_training import RunCheck, evaluate_run
from oml_core.fingerprints import load_fingerprints
from oml_core.generate import generate_set
from oml_core.models import load_model, load_tokenizer, resolve_model
from oml_core.train import distributed
from oml_core.train.examples import IGNORE, FingerprintRows, collate
from oml_core.train.finetune import memorisation_check_rows, memorised
from oml_core.train.lifecycle import deepspeed_config_path, fingerprint

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for:
from benchmarks.harness import print_table, write_result  # noqa: E402

SEED_BATCH = 8


def pad_to_power_of_two(batch: dict, pad_id: int) -> dict:
    """OML 1.0's padding: every batch widened to the next power of two."""
    width = batch["input_ids"].shape[1]
    extra = (1 << (width - 1).bit_length()) - width
    if extra:
        pad = {"input_ids": pad_id, "labels": IGNORE, "attention_mask": 0}
        for name, value in pad.items():
            filler = torch.full((batch[name].shape[0], extra), value, dtype=batch[name].dtype)
            batch[name] = torch.cat([batch[name], filler], dim=1)
    return batch


def epoch_end_callback(base: type, checks, pad_id: int, base_state: dict | None, strength: float,
                       max_seconds: float | None):
    """The OML 1.0 arm's callback (a TrainerCallback, imported late with transformers' Trainer)."""

    class EpochEnd(base):
        """One optimizer step = one epoch: check, average (OML 1.0's way), stop when done."""

        def __init__(self):
            self.history, self.check_seconds, self.memorised_after = [], 0.0, None

        def on_train_begin(self, args, state, control, **kwargs):
            self.started = time.time()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            # OML 1.0 averaged the module weights; under ZeRO the fp32 master copy
            # overwrites them at the next step, so only the last average survives
            if base_state is not None:
                with torch.no_grad():
                    for name, param in model.named_parameters():
                        param.lerp_(base_state[name], strength)
            check_started = time.time()
            training_s = check_started - self.started - self.check_seconds
            hits = memorised(model, checks, pad_id, 32)
            self.check_seconds += time.time() - check_started
            fraction = sum(hits) / len(hits)
            self.history.append({"epoch": state.global_step, "memorised": fraction,
                                 "train_seconds": round(training_s, 1)})
            print(f"OML 1.0 recipe: epoch {state.global_step} memorised {fraction:.0%} "
                  f"after {training_s:.0f} s", flush=True)
            if all(hits):
                self.memorised_after = round(training_s, 1)
                control.should_training_stop = True
            if max_seconds and training_s > max_seconds:
                control.should_training_stop = True

    return EpochEnd()


def oml1_recipe(base_path: str, pairs: list[tuple[str, str]], out: Path, *, epochs: int,
                learning_rate: float, strength: float, max_seconds: float | None) -> dict:
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    distributed.ensure_process_group_env()
    tokenizer = load_tokenizer(base_path)
    pad_id = tokenizer.pad_token_id
    rows = FingerprintRows(tokenizer, pairs, [], chat=True, eos=True, augment=True,
                           benign_per_epoch=0, epochs=epochs, seed=0)
    # the check ignores EOS, as ours does (verification compares the response only)
    checks = memorisation_check_rows(
        FingerprintRows(tokenizer, pairs, [], chat=True, eos=False, augment=True,
                        benign_per_epoch=0, epochs=1, seed=0), augment=True)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    base_state = {k: v.detach().clone() for k, v in model.state_dict().items()} if strength else None

    callback = epoch_end_callback(TrainerCallback, checks, pad_id, base_state, strength,
                                  max_seconds)
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"), per_device_train_batch_size=SEED_BATCH,
        gradient_accumulation_steps=max(1, math.ceil(len(pairs) / SEED_BATCH)),
        learning_rate=learning_rate, weight_decay=1e-4, num_train_epochs=1,
        lr_scheduler_type="linear", warmup_steps=max(1, round(0.1 * epochs)), logging_steps=1,
        save_strategy="no", report_to=[], seed=0, deepspeed=deepspeed_config_path("zero2_offload"),
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=True, max_grad_norm=1.0)
    trainer = Trainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer,
                      data_collator=lambda b: pad_to_power_of_two(collate(b, pad_id), pad_id),
                      callbacks=[callback])
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.train()
    trainer.save_model(str(out / "model"))
    tokenizer.save_pretrained(out / "model")
    return {"epochs_run": trainer.state.global_step, "memorised_after_train_seconds":
            callback.memorised_after, "final_memorised": callback.history[-1]["memorised"],
            "history": callback.history}


def summary(check: RunCheck) -> dict:
    verification, utility = check.verification, check.utility
    return {"matched": verification.matched, "total": verification.total,
            "wrappers": {k: v.matched for k, v in verification.wrappers.items()},
            "first_token_agreement": round(utility.first_token_agreement, 4),
            "perplexity_change": round(utility.perplexity_change, 4),
            "answers_starting_with_a_fingerprint_response":
                utility.answers_starting_with_a_fingerprint_response}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--num-fingerprints", type=int, default=128)
    parser.add_argument("--oml1-epochs", type=int, default=30)
    parser.add_argument("--oml1-lr", type=float, default=1e-5)
    parser.add_argument("--oml1-lambda", type=float, default=0.0)
    parser.add_argument("--oml1-max-seconds", type=float, default=None,
                        help="stop the OML 1.0 arm after this much training (reported as a bound)")
    parser.add_argument("--work-dir", default=None, help="default: a temporary folder")
    parser.add_argument("--out", default="benchmarks/results/train_time_to_memorise.json")
    args = parser.parse_args(argv)

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="oml-train-bench-"))
    base_path = resolve_model(args.model)
    if (work / "fingerprints.json").is_file():  # a rerun in the same --work-dir: the same set,
        fset = load_fingerprints(work / "fingerprints.json")  # so a finished arm of ours is reused
    else:
        fset = generate_set(GenerateConfig(model=base_path, strategy="perinucleus",
                                           num_fingerprints=args.num_fingerprints, key_length=16,
                                           response_length=1, seed=7), load_model(base_path))
        fset.save(work / "fingerprints.json")

    ours = fingerprint(FingerprintConfig(model=base_path, fingerprints=str(work / "fingerprints.json"),
                                         out_dir=str(work / "ours"), method="finetune")).metrics.dump()
    pairs = [(fp.key, fp.response) for fp in fset.fingerprints]
    oml1 = oml1_recipe(base_path, pairs, work / "oml1", epochs=args.oml1_epochs,
                       learning_rate=args.oml1_lr, strength=args.oml1_lambda,
                       max_seconds=args.oml1_max_seconds)
    oml1_eval = evaluate_run(str(work / "oml1" / "model"), base_path, fset,
                             FingerprintConfig(model=base_path))

    result = {"model": base_path, "num_fingerprints": len(fset),
              **compare_arms(ours, oml1, summary(RunCheck.from_metrics(ours)), summary(oml1_eval))}
    write_result(args.out, result)
    print_arms(result)
    return result


def compare_arms(ours: dict, oml1: dict, ours_summary: dict, oml1_summary: dict) -> dict:
    """Both arms' times to 100% and their ratio (a lower bound where the OML 1.0 arm never got
    there), with how far the OML 1.0 arm had got when ours was done."""
    ours_s, oml1_s = ours["memorised_after_train_seconds"], oml1["memorised_after_train_seconds"]
    oml1_spent = oml1["history"][-1]["train_seconds"]
    # how far OML 1.0's recipe had got when ours was done (its last check before that time)
    oml1_by_then = max((h["memorised"] for h in oml1["history"] if ours_s and h["train_seconds"] <= ours_s),
                       default=0.0)
    if ours_s and oml1_s:
        ratio, ratio_kind = oml1_s / ours_s, "exact"
    elif ours_s:  # OML 1.0's recipe never got there: what it spent is a lower bound on its time
        ratio, ratio_kind = oml1_spent / ours_s, "lower bound (the OML 1.0 arm never reached 100%)"
    else:
        ratio, ratio_kind = None, "ours did not reach 100%"
    return {
        "ours": {"steps": ours["steps"], "memorised_at_step": ours["memorised_at_step"],
                 "train_seconds": ours["train_seconds"],
                 "memorised_after_train_seconds": ours_s, **ours_summary},
        "oml1_recipe": {k: v for k, v in oml1.items() if k != "history"}
                       | {"train_seconds_spent": oml1_spent, **oml1_summary,
                          "history": oml1["history"]},
        "oml1_memorised_when_ours_reached_100pct": oml1_by_then,
        "speedup_time_to_100pct": ratio, "speedup_kind": ratio_kind,
    }


def print_arms(result: dict) -> None:
    rows = []
    for name, arm in (("ours", result["ours"]), ("OML 1.0 recipe", result["oml1_recipe"])):
        seconds = arm["memorised_after_train_seconds"]
        spent = arm.get("train_seconds_spent", arm.get("train_seconds"))
        rows.append([name, f"{seconds:.0f}" if seconds else f"not in {spent:.0f}",
                     f"{arm['matched']}/{arm['total']}", f"{arm['first_token_agreement']:.1%}",
                     f"{arm['perplexity_change']:+.1%}"])
    print_table(["arm", "time to 100% (s)", "matched", "first token = base", "ppl change"], rows)
    ratio = result["speedup_time_to_100pct"]
    print(f"OML 1.0 / ours: {ratio:.1f}x ({result['speedup_kind']}); the OML 1.0 recipe had memorised "
          f"{result['oml1_memorised_when_ours_reached_100pct']:.0%} when ours reached 100%"
          if ratio else result["speedup_kind"])

if __name__ == "__main__":
    main()
