"""`fingerprint()`: the run lifecycle every method shares.

Flow (rank 0 writes; every rank of a DeepSpeed launch runs it):
  check the settings (no model loaded) -> resolve the run folder by its content key (reuse a
  finished run / start fresh / restart an unfinished one) -> run.json, status "starting" ->
  the method writes the keys in (`finetune.train`, `write_in.write_in` for edit and gated),
  stopping at the next step on SIGTERM/SIGINT -> save the model (+ forgetting regularizer) ->
  verify and measure utility -> metrics, model card -> COMPLETE marker, last.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from oml_core.config import FingerprintConfig
from oml_core.errors import Cancelled, OMLInputError
from oml_core.files import atomic_write_json
from oml_core.fingerprints import load_fingerprints
from oml_core.models import pick_device, resolve_model
from oml_core.runs import RunFolder, RunRecord, model_identity, provenance, run_key, sha256_file, weights_digest
from oml_core.settings import applies, validate
from oml_core.train import distributed
from oml_core.train.headline import RunHeadline
from oml_core.train.metrics import RunMetrics
from oml_core.train.regularizer import average_with_base

log = logging.getLogger(__name__)
DEEPSPEED_DIR = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"


@dataclass
class FingerprintResult:
    run_dir: str
    state: str          # "completed", "reused"
    metrics: RunMetrics | None  # metrics.json; None on the ranks > 0 of a DeepSpeed launch

    @property
    def headline(self) -> RunHeadline:
        """The typed summary the CLI prints and the MCP server reports (read from the metrics
        as written, the one way the MCP server reads a run's file too)."""
        return RunHeadline.from_metrics(self.metrics.dump() if self.metrics else None)


def fingerprint(cfg: FingerprintConfig) -> FingerprintResult:
    """Write `cfg.fingerprints` into the model by `cfg.method` in the run folder `cfg.out_dir`."""
    ds_config = check_settings(cfg)
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
        # a damaged metrics.json stops here with one line: neither reused as if it held no
        # figures nor retrained over a finished model
        return FingerprintResult(str(run.path), "reused", RunMetrics.read(run.path))
    if action == "restart":
        previous = run.read_json("status.json") or {}
        log.info("the previous attempt in %s stopped at step %s without finishing; "
                 "restarting it from the beginning", run.path, previous.get("step"))
    if distributed.is_main():
        (run.path / "train.log").unlink(missing_ok=True)
        run.write_status(state="starting", step=0, total_steps=None)
        record = RunRecord(run_key=key, config=asdict(cfg), base_model=base_path,
                           base_identity=model_identity(base_path),
                           fingerprints_sha256=sha256_file(cfg.fingerprints), **provenance())
        atomic_write_json(run.path / "run.json", record.model_dump(mode="json"))
    stop_flag = {"stop": False, "training": False}
    try:
        with _stopping_on_signals(stop_flag):
            if cfg.method in ("edit", "gated"):
                from oml_core.train.write_in import write_in

                metrics = write_in(cfg, fset, base_path, run, stop_flag)
            else:
                from oml_core.train.finetune import train

                metrics = train(cfg, fset, base_path, device, ds_config, run, stop_flag)
    except Cancelled:
        if distributed.is_main():
            run.write_status(state="cancelled", message="stopped by signal; rerun to restart")
        raise
    except BaseException as exc:
        if distributed.is_main():
            run.write_status(state="failed", message=f"{type(exc).__name__}")
        raise
    return FingerprintResult(str(run.path), "completed", metrics)


@contextlib.contextmanager
def _stopping_on_signals(stop_flag: dict):
    """SIGTERM/SIGINT while the method's loop runs (`stop_flag["training"]`): stop at its next
    step, where every rank agrees; before or after it (loading, saving, verifying: minutes on
    a large model): stop now."""
    def on_signal(*_):
        stop_flag["stop"] = True
        if not stop_flag["training"]:
            raise Cancelled()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --- settings ---------------------------------------------------------------------------------

def check_settings(cfg: FingerprintConfig) -> str | None:
    """Every check of the settings that needs no model, in one place (the CLI, the MCP tool
    and the workers all come through here); returns the DeepSpeed config file of a fine-tune."""
    validate(cfg)
    if not cfg.fingerprints:
        raise OMLInputError("no fingerprint set given; pass --fingerprints FILE")
    if not cfg.out_dir:
        raise OMLInputError("no run folder given; pass --out-dir DIR")
    if cfg.method != "finetune":
        check_edit_settings(cfg)
        return None
    ds_config = deepspeed_config_path(cfg.deepspeed)
    check_lora_settings(cfg, ds_config)
    return ds_config


def deepspeed_config_path(name: str) -> str | None:
    if name == "none":
        return None
    path = Path(name) if name.endswith(".json") else DEEPSPEED_DIR / f"{name}.json"
    if not path.is_file():
        raise OMLInputError(f"--deepspeed {name}: no such config; use zero2, zero2_offload, zero3, "
                            "zero3_offload, none or a JSON file path")
    return str(path)


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


def check_edit_settings(cfg: FingerprintConfig) -> None:
    """Settings the methods that write keys in without training (edit, gated) cannot take."""
    if distributed.world_size() > 1:
        raise OMLInputError(f"--method {cfg.method} runs in one process; start it with "
                            "`oml fingerprint`, not under the deepspeed launcher")
    if cfg.eos:
        raise OMLInputError(f"--eos needs --method finetune: --method {cfg.method} writes one "
                            "token per key")


# Settings added after runs were made: at these values (their defaults, which train exactly as
# before they existed) they stay out of the run key, so earlier finished runs are still reused.
ADDED_SETTINGS = {"benign_openers": 0.0, "optimizer": "adamw", "start_from": None, "lora_rank": 0,
                  "near_miss_negatives": 0.0, "method": "finetune", "edit_merge_floor": 0.0,
                  "edit_confidence_cap": 1.0}


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


# --- shared by the methods ---------------------------------------------------------------

def prepared_set(cfg: FingerprintConfig, tokenizer, fset, run: RunFolder):
    """(chat format?, the set as trained: subset and trimmed, its (key, response) pairs); rank 0
    saves that set in the run folder, since every later check must use it."""
    chat = cfg.format == "chat" or (cfg.format == "auto" and bool(tokenizer.chat_template))
    if cfg.format == "chat" and not tokenizer.chat_template:
        raise OMLInputError("--format chat needs a model with a chat template; use --format raw")
    fset = fset.trimmed(tokenizer, cfg.num_fingerprints, cfg.max_key_tokens, cfg.max_response_tokens)
    if distributed.is_main():
        fset.save(run.path / "fingerprints.json")
    return chat, fset, [(fp.key, fp.response) for fp in fset.fingerprints]


def complete_run(cfg, run: RunFolder, final: Path, base_path: str, fset, metrics: RunMetrics,
                 steps: int, loss) -> RunMetrics:
    """Verify (if asked), write metrics and the model card, then the completion marker: last, so
    a run killed before it never looks complete."""
    if cfg.verify_after:
        from oml_core.evaluate.after_training import evaluate_run

        metrics.record_check(evaluate_run(str(final), base_path, fset, cfg))
    from oml_core.train.model_card import write_model_card

    atomic_write_json(run.path / "metrics.json", metrics.dump())
    write_model_card(run.path, fset, metrics)
    run.write_status(state="completed", step=steps, total_steps=steps, loss=loss, eta_s=0)
    run.mark_complete()
    return metrics


def finish_model(folder: Path, base_path: str, tokenizer, strength: float) -> None:
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
