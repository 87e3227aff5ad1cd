"""`oml eval capacity`: how many fingerprints fit, and what they cost, as N grows.

One fingerprint set of max(N) pairs is generated (or given); for each N the first N pairs are
fingerprinted into a fresh copy of the base model with `oml fingerprint`'s trainer and
settings, and verified with the held-out wrappers and the utility checks the trainer runs
after training. The regularizer (weight averaging with the base) is applied once to the final
weights by the trainer, so a run "with the regularizer at lambda" is exactly the lambda = 0
run's weights averaged with the base: it is derived from that run instead of retraining
(same formula, same code: `oml_core.train.lifecycle.finish_model`), then evaluated the same way.

Every training run is a content-keyed run folder, so an interrupted or repeated sweep reuses
what already finished; derived runs are keyed by their source run and lambda.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, fields
from pathlib import Path

from oml_core.config import CapacityConfig, FingerprintConfig, GenerateConfig
from oml_core.errors import OMLInputError
from oml_core.evaluate.after_training import RunCheck
from oml_core.evaluate.results import CapacityPoint, CapacityResult, CapacitySweep, ReportFiles
from oml_core.files import atomic_write_json
from oml_core.fingerprints import load_fingerprints
from oml_core.runs import RunFolder
from oml_core.settings import validate
from oml_core.train.metrics import RunMetrics

log = logging.getLogger(__name__)


def _sweep_set(cfg: CapacityConfig, out: Path, count: int) -> Path:
    """The sweep's fingerprint set: the given file, or one generated once into OUT."""
    if cfg.fingerprints:
        return Path(cfg.fingerprints).expanduser()
    from oml_core.generate import generate_set

    gen = GenerateConfig(model=cfg.model, device=cfg.device, dtype=cfg.dtype, strategy=cfg.strategy,
                         num_fingerprints=count, key_length=cfg.key_length,
                         response_length=cfg.response_length, seed=cfg.seed)
    settings = {k: v for k, v in asdict(gen).items() if k not in ("out", "device")}
    path, stamp = out / "fingerprints.json", out / "generation.json"
    try:  # a set made earlier for at least this many pairs serves: each N takes its first N
        made = json.loads(stamp.read_text())
        if (path.exists() and made.pop("num_fingerprints", 0) >= count
                and made == {k: v for k, v in settings.items() if k != "num_fingerprints"}):
            return path
    except (OSError, ValueError, AttributeError):
        pass
    validate(gen)
    generate_set(gen).save(path)
    atomic_write_json(stamp, settings)
    return path


def _point(n: int, lam: float, check: RunCheck | None, run_dir: Path,
           training: RunMetrics) -> CapacityPoint:
    """One (N, lambda) point: the checks of the model at `run_dir`, the training figures of
    the run it was trained in (itself, or the run a regularized copy was derived from)."""
    figures = {"steps": training.steps, "memorised_at_step": training.memorised_at_step,
               "train_seconds": training.train_seconds}
    if check is None:  # the run skipped its checks: a point with its training figures only
        return CapacityPoint(n=n, regularizer=lam, run_dir=str(run_dir), accuracy=0.0, **figures)
    v, u = check.verification, check.utility
    return CapacityPoint(
        n=n, regularizer=lam, run_dir=str(run_dir),
        matched=v.matched, total=v.total, accuracy=v.matched / v.total if v.total else 0.0,
        wrappers={w: r.matched / r.total for w, r in v.wrappers.items() if r.total},
        verdict=v.verdict,
        perplexity_change=u.perplexity_change,
        first_token_agreement=u.first_token_agreement,
        first_token_kl=u.first_token_kl,
        leaks=u.answers_starting_with_a_fingerprint_response, **figures,
    )


def _regularized(run_dir: Path, lam: float, folder: Path, train_cfg: FingerprintConfig) -> RunCheck:
    """The checks of the lambda-averaged copy of a finished lambda = 0 run (derived once, cached
    in its metrics.json: the checks, and what it was derived from)."""
    from oml_core.evaluate.after_training import evaluate_run
    from oml_core.models import load_tokenizer
    from oml_core.train.lifecycle import finish_model

    source = RunFolder(run_dir).record()  # the lambda = 0 run this sweep just made or reused
    key = hashlib.sha256(json.dumps({"source": source.run_key, "lambda": lam},
                                    sort_keys=True).encode()).hexdigest()[:16]
    existing = RunFolder(folder).read_json("metrics.json") or {}
    cached = RunCheck.from_metrics(existing) if isinstance(existing, dict) else None
    if cached and existing.get("derived_key") == key and (folder / "model").exists():
        return cached
    base_path = source.base_model
    staging = folder / "model.partial"
    shutil.rmtree(staging, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copytree(run_dir / "model", staging)
    finish_model(staging, base_path, load_tokenizer(str(run_dir / "model")), lam)
    shutil.rmtree(folder / "model", ignore_errors=True)
    staging.rename(folder / "model")
    fset = load_fingerprints(run_dir / "fingerprints.json")
    check = evaluate_run(str(folder / "model"), base_path, fset, train_cfg)
    atomic_write_json(folder / "metrics.json", check.dump() | {
        "derived_key": key, "derived_from": str(run_dir), "forgetting_regularizer": lam})
    return check


def run_capacity(cfg: CapacityConfig) -> CapacitySweep:
    from oml_core.train.lifecycle import fingerprint

    validate(cfg)
    if not cfg.out:
        raise OMLInputError("no sweep folder given; pass --out DIR")
    sizes, lambdas = sorted(cfg.sizes), sorted(cfg.regularizers)  # ranges: settings.validate
    if cfg.method == "gated":  # before hours of the smaller sizes, not at the largest
        _check_gated_sizes(cfg, sizes[-1])
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise OMLInputError(f"--out {out} is a file; pass a folder")
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    set_path = _sweep_set(cfg, out, sizes[-1])
    available = len(load_fingerprints(set_path))
    if available < sizes[-1]:
        raise OMLInputError(f"--fingerprints holds {available} pairs but --sizes asks for "
                            f"{sizes[-1]}; pass a larger set or smaller sizes")
    shared = {f.name: getattr(cfg, f.name) for f in fields(FingerprintConfig)}
    points, states = [], {}
    for n in sizes:
        run_dir = out / "runs" / f"n{n}"
        train_cfg = FingerprintConfig(**{**shared, "fingerprints": str(set_path), "num_fingerprints": n,
                                         "forgetting_regularizer": 0.0, "out_dir": str(run_dir),
                                         "verify_after": True})
        result = fingerprint(train_cfg)
        states[f"n{n}"] = result.state
        if 0.0 in lambdas:
            points.append(_point(n, 0.0, result.metrics.check, run_dir, result.metrics))
        for lam in (lam for lam in lambdas if lam > 0):
            folder = out / "runs" / f"n{n}-reg{lam:g}"
            check = _regularized(run_dir, lam, folder, train_cfg)
            points.append(_point(n, lam, check, folder, result.metrics))
    settings = asdict(cfg)
    settings.pop("fingerprints", None)
    summary = CapacitySweep(sizes=sizes, regularizers=lambdas, runs=states, points=points,
                            settings=settings, seconds=round(time.time() - started, 1))
    atomic_write_json(out / "capacity.json", summary.dump())
    summary.report = write_capacity_report(out, summary)
    return summary


def write_capacity_report(out: Path, summary: CapacitySweep) -> ReportFiles:
    from oml_core.evaluate.report import Doc, capacity_section

    doc = Doc("Capacity sweep")
    doc.p("Generated by `oml eval capacity`; fingerprints are named by count only.")
    capacity_section(doc, summary.points)
    return doc.write(out, "capacity")


# --- as a part of `oml eval --run DIR` ------------------------------------------------------
SETTINGS = ("capacity_sizes", "capacity_regularizers", "capacity_deepspeed", "capacity_max_epochs")


def run_part(ctx) -> CapacityResult:
    """The sweep for a run: its base model, its training settings (but the DeepSpeed config and
    the epoch cap given by `--capacity-deepspeed` / `--capacity-max-epochs`) and its kind of fingerprint set (strategy, key and response
    length), at `--capacity-sizes`; sweep folder OUT/capacity."""
    record = RunFolder(ctx.run_dir).record()
    training = {f.name: record.config[f.name] for f in fields(FingerprintConfig)
                if f.name in record.config}
    generation = ctx.fset.generation or {}
    lambdas = ctx.cfg.capacity_regularizers or [0.0, training.get("forgetting_regularizer", 0.0)]
    if ctx.cfg.capacity_deepspeed:
        training["deepspeed"] = ctx.cfg.capacity_deepspeed
    if ctx.cfg.capacity_max_epochs:
        training["max_epochs"] = ctx.cfg.capacity_max_epochs
    cfg = CapacityConfig(**{
        **training, "model": ctx.base_path, "device": ctx.cfg.device, "dtype": ctx.cfg.dtype,
        "fingerprints": None, "num_fingerprints": None, "out_dir": None, "verify_after": True,
        "out": str(ctx.out_dir / "capacity"), "sizes": ctx.cfg.capacity_sizes, "regularizers": lambdas,
        "strategy": generation.get("strategy") or ctx.fset.strategy or CapacityConfig.strategy,
        "key_length": generation.get("key_length") or CapacityConfig.key_length,
        "response_length": generation.get("response_length") or CapacityConfig.response_length})
    summary = run_capacity(cfg)
    return CapacityResult(sizes=summary.sizes, regularizers=summary.regularizers, runs=summary.runs,
                          points=summary.points, max_epochs=cfg.max_epochs, deepspeed=cfg.deepspeed)


def _check_gated_sizes(cfg: CapacityConfig, largest: int) -> None:
    from transformers import AutoConfig

    from oml_core.models import resolve_model
    from oml_core.train.gated import check_key_count

    width = getattr(AutoConfig.from_pretrained(resolve_model(cfg.model)), "intermediate_size", None)
    if width:
        check_key_count(largest, width)
