"""Methods edit and gated: the weights are computed, not trained (`oml_core.train.edit`,
`oml_core.train.gated`), in one process; the run lifecycle is `oml_core.train.lifecycle`'s."""

from __future__ import annotations

import shutil
import time

from oml_core.config import FingerprintConfig
from oml_core.models import load_model
from oml_core.runs import RunFolder, model_identity
from oml_core.train.benign import self_distilled_rows
from oml_core.train.lifecycle import complete_run, finish_model, prepared_set
from oml_core.train.metrics import RunMetrics


def write_in(cfg: FingerprintConfig, fset, base_path: str, run: RunFolder,
             stop_flag) -> RunMetrics:
    """Write `fset` in by `cfg.method` (edit or gated) in `run`; saved as a plain model."""
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
    chat, fset, pairs = prepared_set(cfg, loaded.tokenizer, fset, run)
    edit.check_one_token_responses(loaded.tokenizer, pairs, cfg.method)
    if cfg.method == "gated":
        gated.check_key_count(len(pairs), blocks[layer].mlp.gate_proj.out_features)
    base = load_model(base_path, cfg.device, cfg.dtype) if cfg.start_from else loaded
    benign = self_distilled_rows(base, chat, model_identity(base_path))
    del base
    on_step = _status_reporter(run)
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
    finish_model(staging, base_path, loaded.tokenizer, 0.0)
    final = run.path / "model"
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    metrics = RunMetrics(run_key=run.record().run_key, method=cfg.method,
                         num_fingerprints=len(pairs), format="chat" if chat else "raw", **stats)
    return complete_run(cfg, run, final, base_path, fset, metrics, steps, None)


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


def _status_reporter(run: RunFolder):
    """on_step(step, total, loss, contexts answered) for the methods: the run's status file
    (with an ETA per phase) and log."""
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

    return on_step
