"""The work behind the lifecycle tools (generate, verify, jobs, listings, commitment), as plain
methods returning the schemas' models; `oml_mcp.server` only registers them.

Each method (1) checks its arguments (paths confined to the workspace, settings through the
engine's configs), (2) calls one engine function, in-process for short work (generate, verify;
with progress notifications) or as a detached job for fingerprinting and evaluation, and
(3) returns a small model that never holds a fingerprint key or response, except
`reveal_fingerprint` when explicitly confirmed.
"""

# no `from __future__ import annotations`: the SDK evaluates the methods' annotations (which
# name MAX_LISTED) to build the tools' schemas
import dataclasses
import logging
import os
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import anyio
from mcp.server.mcpserver import Context
from pydantic import Field, StrictBool

from oml_core import progress
from oml_core.config import (
    DEEPSPEED_CONFIGS,
    EvalConfig,
    FingerprintConfig,
    GenerateConfig,
    VerifyConfig,
)
from oml_core.errors import OMLInputError
from oml_core.files import atomic_write_json
from oml_mcp import listings
from oml_mcp.jobs import JobStore
from oml_mcp.paths import Workspace
from oml_core.commitment import CommitmentResult, RevealResult
from oml_core.generate.result import GenerateResult
from oml_core.settings import comma_list, validate
from oml_core.verify.result import VerifyResult
from oml_mcp.schemas import (
    CancelResult,
    FingerprintSetList,
    JobList,
    JobResult,
    JobStarted,
    JobStatus,
    RunList,
    config_defaults,
)

log = logging.getLogger("oml_mcp")

MAX_LISTED = 200            # list tools stop here (results stay small)
MAX_LEAVES_SHOWN = 100
PROGRESS_EVERY_S = 0.5      # at most two progress notifications a second

# One in-process model job at a time: models are large, the CPU is shared, and the engine's
# progress listener is process-wide.
_ENGINE_LOCK = threading.Lock()


class LifecycleTools:
    """One workspace's tools; each public method is one MCP tool of the same name."""

    def __init__(self, ws: Workspace, jobs: JobStore):
        self.ws, self.jobs = ws, jobs
        self.sets_dir = ws.home / "fingerprints"
        self.runs_dir = ws.home / "runs"
        self.reports_dir = ws.home / "reports"

    # -- in-process work -------------------------------------------------------------------
    async def generate_fingerprints(self, ctx: Context, **values) -> GenerateResult:
        ws = self.ws
        values.update(model=ws.model_location(values.get("model")),
                      key_model=ws.model_location(values.get("key_model"), "key_model"),
                      keys_file=ws.optional_path(values.get("keys_file"), "keys_file"))
        out = ws.output(values.get("out") or self.sets_dir / (
            f"{values['strategy']}-{values['num_fingerprints']}-seed{values['seed']}-{_stamp()}"
            ".json"), "out")
        values["out"] = str(new_file(out, "out"))
        if values["keys_file"]:
            values["keys_file"] = str(values["keys_file"])
        cfg = _config_from(GenerateConfig, values)
        from oml_core.generate import generate

        # the path is checked again before writing: generating took a while
        return await run_engine(ctx, "generate", lambda: generate(
            cfg, out, claim=lambda path: new_file(ws.output(path, "out"), "out")))

    async def verify_model(self, ctx: Context, **values) -> VerifyResult:
        ws = self.ws
        values.update(model=ws.model_location(values.get("model")),
                      fingerprints=str(ws.path(values["fingerprints"], "fingerprints")),
                      null_model=[ws.model_location(m, "null_model") or "bundled"
                                  for m in values.get("null_model") or []])
        if values.get("null_file"):
            values["null_file"] = str(ws.path(values["null_file"], "null_file"))
        cfg = _config_from(VerifyConfig, values)
        report_name = f"verify-{_stamp()}.json"
        ws.output(self.reports_dir / report_name, "report")  # refuse a linked-out reports/ up front
        from oml_core.verify import verify

        started = time.time()
        report = await run_engine(ctx, "verify", lambda: verify(cfg))
        report_path = new_file(ws.output(self.reports_dir / report_name, "report"), "report")
        atomic_write_json(report_path, report.model_dump(mode="json"))
        return VerifyResult.of(report, str(report_path), round(time.time() - started, 2))

    # -- background jobs -------------------------------------------------------------------
    def start_job(self, kind: str, config_cls, cfg, writes: Path, argv: list[str],
                  skip: tuple[str, ...], completed_codes: tuple[int, ...] = (0,)) -> dict:
        """Start `oml ARGV [settings that differ from the defaults] --json` as a detached job
        that writes folder `writes` (one job per folder at a time); `completed_codes`: the
        command's exit codes that mean it finished its work."""
        busy = self.jobs.active_run_dirs().get(str(writes))
        if busy:
            raise OMLInputError(f"job {busy} is already writing {writes}; wait for it, cancel "
                                "it, or pass another folder")
        command = [sys.executable, "-P", "-m", "oml_core.cli", *argv,
                   *_flags(config_cls, dataclasses.asdict(cfg), skip=skip), "--json"]
        env = {**os.environ, "OML_HOME": str(self.ws.home), "OML_PROGRESS": "0",
               "PYTHONUNBUFFERED": "1"}
        defaults = config_defaults(config_cls)
        settings = {k: v for k, v in dataclasses.asdict(cfg).items() if v != defaults[k]}
        return self.jobs.start(kind, command, args=settings, run_dir=str(writes), env=env,
                               cwd=self.ws.home, completed_codes=completed_codes)

    def start_fingerprinting(self, **values) -> JobStarted:
        ws = self.ws
        values.update(model=ws.model_location(values.get("model")),
                      fingerprints=str(ws.path(values["fingerprints"], "fingerprints")))
        if values.get("start_from"):
            values["start_from"] = str(ws.path(values["start_from"], "start_from"))
        if values.get("deepspeed") not in DEEPSPEED_CONFIGS:
            if not str(values.get("deepspeed")).endswith(".json"):
                raise OMLInputError(f"deepspeed {values.get('deepspeed')!r} is not one of "
                                    f"{', '.join(DEEPSPEED_CONFIGS)} or a .json config file")
            values["deepspeed"] = str(ws.path(values["deepspeed"], "deepspeed"))
        out_dir = ws.output(values.get("out_dir") or
                            self.runs_dir / f"{Path(values['fingerprints']).stem}-{_stamp()}",
                            "out_dir")
        values["out_dir"] = str(out_dir)
        cfg = _config_from(FingerprintConfig, values)
        _check_fingerprinting(cfg, out_dir)
        status = self.start_job("fingerprint", FingerprintConfig, cfg, out_dir, [
            "fingerprint", "--fingerprints", cfg.fingerprints, "--out-dir", cfg.out_dir],
            skip=("fingerprints", "out_dir"))
        return JobStarted(**status, next_step=(
            f"poll job_status with job_id {status['job_id']} every 10-60 s; when it is "
            "completed, call job_result, then verify_model on the run's model/ folder"))

    def start_evaluation(self, **values) -> JobStarted:
        from oml_core.evaluate.context import open_run
        from oml_core.evaluate.false_positives import NAMED_NULL_MODELS

        ws = self.ws
        run_dir = ws.path(values["run"], "run")
        values.update(run=str(run_dir), model=ws.model_location(
            values.get("model") or _recorded_base_model(ws, run_dir),
            "model" if values.get("model") else "the run's base_model (run.json)"))
        out = ws.output(values.get("out") or run_dir / "eval", "out")
        values["out"] = str(out)
        values["null_models"] = [
            name if name in NAMED_NULL_MODELS else str(ws.path(name, "null_models"))
            for name in values.get("null_models") or []]
        cfg = _config_from(EvalConfig, values)
        if "robustness" in cfg.parts:
            from oml_core.evaluate.robustness import check_settings

            check_settings(cfg)
        open_run(cfg)  # fail now on a folder that is not a finished run
        status = self.start_job("eval", EvalConfig, cfg, out,
                                ["eval", "--run", cfg.run, "--out", cfg.out], skip=("run", "out"))
        return JobStarted(**status, next_step=(
            f"poll job_status with job_id {status['job_id']} every 30-120 s (phase names the part "
            "being measured, step/total_steps count parts); when completed, call job_result for "
            "the headline numbers; the full report is eval.md / eval.html in the out folder"))

    def job_status(self, job_id: Annotated[str, Field(
            description="id from start_fingerprinting, start_evaluation, start_audit or "
                        "list_jobs")]) -> JobStatus:
        return JobStatus(**self.jobs.status(job_id))

    def list_jobs(self, limit: Annotated[int, Field(description="at most this many, newest first",
                                                    ge=1, le=MAX_LISTED)] = 20) -> JobList:
        found, total, problems = self.jobs.list(limit)
        return JobList(jobs=[JobStatus(**j) for j in found], total=total, problems=problems)

    def job_result(self, job_id: Annotated[str, Field(description="id of a finished job")],
                   ) -> JobResult:
        result = self.jobs.result(job_id)
        if result.get("output") and self.jobs.status(job_id).get("kind") == "eval":
            result["output"] = _eval_output(result["output"])
        return JobResult(**result)

    def cancel_job(self, job_id: Annotated[str, Field(description="id of the job to stop")],
                   grace_seconds: Annotated[float, Field(
                       description="seconds to let training stop at its next step before the "
                                   "job's processes are killed", ge=0, le=50)] = 20.0,
                   ) -> CancelResult:
        return CancelResult(**self.jobs.cancel(job_id, grace_seconds))

    # -- listings --------------------------------------------------------------------------
    def list_fingerprint_sets(self, folder: Annotated[str | None, Field(
            description="folder to list (not recursive); default OML_HOME/fingerprints")] = None,
                              ) -> FingerprintSetList:
        where = (self.ws.path(folder, "folder") if folder else
                 listings.confined_folder(self.ws, self.sets_dir, "folder"))
        if folder and not where.is_dir():
            raise OMLInputError(f"folder {where} is not an existing folder")
        return listings.list_sets(self.ws, where, MAX_LISTED)

    def list_runs(self) -> RunList:
        # runs started into a root outside OML_HOME/runs are found through their jobs
        run_dirs = [j["run_dir"] for j in self.jobs.list(MAX_LISTED)[0]
                    if j.get("run_dir") and j["kind"] != "audit"]
        return listings.list_runs(self.ws, self.runs_dir, run_dirs, MAX_LISTED)

    # -- commitment and reveal -------------------------------------------------------------
    def show_commitment(
            self, fingerprints: Annotated[str, Field(description="path of the set file")],
            out: Annotated[str | None, Field(description="also write the full public manifest to "
                                                         "this NEW file")] = None,
    ) -> CommitmentResult:
        from oml_core.fingerprints import load_fingerprints

        path = self.ws.path(fingerprints, "fingerprints")
        target = new_file(self.ws.output(out, "out"), "out") if out else None
        manifest = load_fingerprints(path).manifest()
        if target:
            atomic_write_json(target, manifest.model_dump(mode="json"))
        return CommitmentResult.of(manifest, str(path), MAX_LEAVES_SHOWN,
                                   str(target) if target else None)

    def reveal_fingerprint(
            self, fingerprints: Annotated[str, Field(description="path of the set file")],
            fingerprint_id: Annotated[str, Field(description="id of the pair, e.g. fp-00003")],
            confirm_reveal: Annotated[StrictBool, Field(
                description="must be JSON true: the user explicitly asked to disclose this "
                            "pair")] = False,
            out: Annotated[str | None, Field(description="also write the reveal to this NEW "
                                                         "file")] = None,
    ) -> RevealResult:
        if confirm_reveal is not True:
            raise OMLInputError(
                "revealing discloses a secret key and response for good; call again with "
                "confirm_reveal=true only if the user explicitly asked to reveal this pair")
        from oml_core.fingerprints import load_fingerprints

        path = self.ws.path(fingerprints, "fingerprints")
        target = new_file(self.ws.output(out, "out"), "out") if out else None
        reveal = load_fingerprints(path).reveal(fingerprint_id)
        if target:
            atomic_write_json(target, reveal.model_dump(mode="json"))
        log.info("revealed fingerprint %s of %s on request", fingerprint_id, path)
        return RevealResult(**reveal.model_dump(), written_to=str(target) if target else None)


# --- helpers ----------------------------------------------------------------------------------
def _eval_output(output: dict) -> dict:
    """An eval job's output (`oml eval --json`) read through the engine's EvalSummary model,
    so the result has that model's fields; an output it cannot read is returned as it is."""
    from pydantic import ValidationError

    from oml_core.evaluate.eval_result import EvalSummary

    try:
        return EvalSummary.model_validate(output).dump()
    except ValidationError:
        return output



async def run_engine(ctx: Context, label: str, work):
    """Run blocking engine work in a thread, forwarding its progress bars as notifications.

    Progress must only grow, and the engine shows several bars one after another (keys, then
    responses; the model, then null models), so each bar's count is added to the earlier ones.
    """
    await ctx.report_progress(0, None, f"{label}: loading the model")

    def in_thread():
        with _ENGINE_LOCK:
            seen = {"desc": None, "offset": 0, "total": 0, "sent": 0.0}

            def listener(desc: str, done: int, total: int) -> None:
                if desc != seen["desc"]:
                    seen["offset"] += seen["total"]
                    seen.update(desc=desc, total=total)
                now = time.monotonic()
                if done < total and now - seen["sent"] < PROGRESS_EVERY_S:
                    return
                seen["sent"] = now
                try:
                    anyio.from_thread.run(ctx.report_progress, seen["offset"] + done, None,
                                          f"{label}: {desc} {done}/{total}")
                except Exception as exc:  # noqa: BLE001 - a client that went away must not stop the engine
                    log.debug("progress notification not sent (%s)", type(exc).__name__)

            progress.set_listener(listener)
            try:
                return work()
            finally:
                progress.set_listener(None)

    return await anyio.to_thread.run_sync(in_thread)


def new_file(path: Path, what: str) -> Path:
    """Refuse to replace anything: a fingerprint set is a secret the user may still need."""
    if path.is_dir():
        raise OMLInputError(f"{what} {path} is a folder; pass a file path")
    if path.exists():
        raise OMLInputError(f"{what} {path} already exists; choose another file name (existing "
                            "files are never replaced over MCP)")
    if any(parent.exists() and not parent.is_dir() for parent in path.parents):
        raise OMLInputError(f"a parent of {what} {path} is a file, not a folder; pass another path")
    return path


def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def _config_from(config_cls, values: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(config_cls)}
    cfg = config_cls(**{k: v for k, v in values.items() if k in names})
    validate(cfg)
    return cfg


def _check_fingerprinting(cfg: FingerprintConfig, out_dir: Path) -> None:
    """Fail now, not minutes later in the worker, on what can be checked cheaply."""
    from oml_core.fingerprints import load_fingerprints
    from oml_core.models import resolve_model
    from oml_core.train.lifecycle import check_settings, check_start_matches_base

    check_settings(cfg)  # the same checks as the worker's, before it starts
    load_fingerprints(cfg.fingerprints)
    if cfg.model:
        resolve_model(cfg.model)
    if cfg.start_from:  # (resolving the bundled model may convert it once: only when needed)
        check_start_matches_base(cfg.start_from, resolve_model(cfg.model))
    if out_dir.exists() and not out_dir.is_dir():
        raise OMLInputError(f"out_dir {out_dir} is a file; pass a folder path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "run.json").exists():
        raise OMLInputError(f"out_dir {out_dir} is not empty and is not an OML run; pass a "
                            "new or empty folder")


def _flags(config_cls, values: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    """CLI flags for the settings that differ from the config's defaults."""
    defaults = config_defaults(config_cls)
    comma_lists = {f.name for f in dataclasses.fields(config_cls) if comma_list(config_cls, f)}
    argv: list[str] = []
    for name, value in values.items():
        if name in skip or name not in defaults or value == defaults[name] or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
        elif name in comma_lists:  # '' for an empty list
            argv += [flag, ",".join(map(str, value))]
        elif isinstance(value, list):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def _recorded_base_model(ws: Workspace, run_dir: Path) -> str | None:
    """The base model a run's run.json names, for an evaluation that names none: a file in the
    workspace, so it goes through the same confinement as a model argument (else the engine
    would load whatever it names)."""
    info = listings.read_doc(ws, run_dir, "run.json")
    base = info.get("base_model")
    if base is not None and not isinstance(base, str):
        raise OMLInputError(f"run {run_dir}: run.json's base_model is not a model name; pass "
                            "model explicitly")
    return base or None
