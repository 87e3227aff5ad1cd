"""The MCP server: OML engine functions wired to tools and resources, thinly.

Each tool (1) checks its arguments (schemas from the engine's configs, paths confined to the
workspace), (2) calls one engine function, in-process for short work (generate, verify; with
progress notifications) or as a detached job for fine-tuning, evaluation and endpoint audits
(oml_mcp.audit_tools), and (3) returns a small summary that never holds a fingerprint key or
response, except `reveal_fingerprint` when explicitly confirmed. User mistakes become
`is_error` results naming the problem; unexpected failures become a generic message with
the exception type while the traceback goes to stderr.
"""

import dataclasses
import functools
import inspect
import logging
import os
import re
import secrets
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Annotated, Any

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp.types import ToolAnnotations
from pydantic import Field, StrictBool

from oml_core import __version__, progress
from oml_core.config import (
    DEEPSPEED_CONFIGS,
    EVAL_PARTS,
    EvalConfig,
    FingerprintConfig,
    GenerateConfig,
    VerifyConfig,
    parse_list,
    validate,
)
from oml_core.errors import OMLInputError
from oml_core.files import atomic_write_json
from oml_mcp import listings
from oml_mcp.audit_tools import add_audit_tools
from oml_mcp.jobs import JobStore
from oml_mcp.paths import Workspace
from oml_mcp.schemas import (
    CancelResult,
    CommitmentResult,
    FingerprintSetList,
    GenerateResult,
    JobList,
    JobResult,
    JobStarted,
    JobStatus,
    RevealResult,
    RunList,
    VerifyResult,
    config_defaults,
    config_parameters,
)

log = logging.getLogger("oml_mcp")

LOG_TAIL_BYTES = 16_384     # the job-log resource returns at most this much
MAX_LISTED = 200            # list tools stop here (results stay small)
MAX_LEAVES_SHOWN = 100
PROGRESS_EVERY_S = 0.5      # at most two progress notifications a second
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # one folder name, no traversal

INSTRUCTIONS = """\
OML fingerprints LLMs: secret (key, response) pairs are fine-tuned into a model and later
checked to prove the model is yours. Typical flow: generate_fingerprints (makes a secret set
file) -> start_fingerprinting (returns a job id at once; training takes minutes to hours) ->
poll job_status every 10-60 s until completed -> job_result -> verify_model on the run's
model/ folder. show_commitment gives the public commitment to publish. To audit a remote
endpoint: start_audit with plan_only=true shows the keys and calls it would spend; show that
plan to the user, then start_audit (a job: poll job_status) -> audit_result. The API key is
never an argument: api_key_env names the server's variable (OPENAI_API_KEY or OML_AUDIT_*).
Keys and responses are secret: no tool returns them except reveal_fingerprint, only when the
user explicitly asks.
Relative paths are inside OML_HOME; other paths must be inside the configured roots."""

READ_ONLY = ToolAnnotations(read_only_hint=True, open_world_hint=False)
ADDITIVE = ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False)

# One in-process model job at a time: models are large, the CPU is shared, and the engine's
# progress listener is process-wide.
_ENGINE_LOCK = threading.Lock()


# --- wiring helpers ---------------------------------------------------------------------------

def _stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


def _log_crash(tool: str, exc: BaseException) -> None:
    """Where it broke, without the exception's message (it could quote a fingerprint)."""
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error("tool %s failed with %s (message withheld)\n%s", tool, type(exc).__name__, frames)


def _refuse_unknown_arguments(ctx: Context, tool: str, known: set[str]) -> None:
    """A misspelt argument would otherwise be dropped silently and its default used."""
    try:
        given = (ctx.request_context.params or {}).get("arguments") or {}
    except (AttributeError, ValueError):
        return
    unknown = sorted(set(given) - known)
    if unknown:
        takes = ", ".join(sorted(known)) or "no arguments"
        raise ToolError(f"unknown argument(s) {', '.join(unknown)}; {tool} takes: {takes}")


def _register(app: MCPServer, fn, *, name: str, description: str, annotations: ToolAnnotations,
              signature: inspect.Signature | None = None) -> None:
    """Add `fn` as tool `name` behind one guard: unknown arguments, error translation, threads.

    `signature` (keyword parameters + return model) replaces fn's own, for tools whose
    parameters are generated from a config. Sync bodies run in a worker thread so a slow
    disk or a cancel's grace period never blocks the event loop.
    """
    sig = signature or inspect.signature(fn, eval_str=True)
    params = [p for p in sig.parameters.values() if p.name != "ctx"]
    known = {p.name for p in params}
    wants_ctx = "ctx" in inspect.signature(fn).parameters

    async def tool(**kwargs):
        ctx = kwargs.pop("ctx")
        _refuse_unknown_arguments(ctx, name, known)
        if wants_ctx:
            kwargs["ctx"] = ctx
        try:
            if inspect.iscoroutinefunction(fn):
                return await fn(**kwargs)
            return await anyio.to_thread.run_sync(functools.partial(fn, **kwargs))
        except ToolError:
            raise
        except OMLInputError as exc:  # written for users: one line, names the fix, no secrets
            raise ToolError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - any crash becomes a safe is_error result
            _log_crash(name, exc)
            raise ToolError(f"internal error ({type(exc).__name__}); the server log (stderr) has "
                            "the details") from None

    ctx_param = inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=Context)
    tool.__signature__ = sig.replace(parameters=[
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in params] + [ctx_param])
    tool.__annotations__ = {p.name: p.annotation for p in params} | {
        "ctx": Context, "return": sig.return_annotation}
    tool.__name__ = tool.__qualname__ = name
    app.add_tool(tool, name=name, description=description, annotations=annotations)


async def _run_engine(ctx: Context, label: str, work):
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


def _config_from(config_cls, values: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(config_cls)}
    cfg = config_cls(**{k: v for k, v in values.items() if k in names})
    validate(cfg)
    return cfg


def _new_file(path: Path, what: str) -> Path:
    """Refuse to replace anything: a fingerprint set is a secret the user may still need."""
    if path.is_dir():
        raise OMLInputError(f"{what} {path} is a folder; pass a file path")
    if path.exists():
        raise OMLInputError(f"{what} {path} already exists; choose another file name (existing "
                            "files are never replaced over MCP)")
    if any(parent.exists() and not parent.is_dir() for parent in path.parents):
        raise OMLInputError(f"a parent of {what} {path} is a file, not a folder; pass another path")
    return path


def _flags(config_cls, values: dict[str, Any], skip: tuple[str, ...] = ()) -> list[str]:
    """CLI flags for the settings that differ from the config's defaults."""
    defaults = config_defaults(config_cls)
    argv: list[str] = []
    for name, value in values.items():
        if name in skip or name not in defaults or value == defaults[name] or value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + name.replace("_", "-"))
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


# --- the server -------------------------------------------------------------------------------

def build_server(workspace: Workspace | None = None) -> MCPServer:
    ws = workspace or Workspace.from_env()
    jobs = JobStore(ws.home / "jobs", inside=ws.inside)
    sets_dir, runs_dir, reports_dir = ws.home / "fingerprints", ws.home / "runs", ws.home / "reports"
    app = MCPServer("oml", instructions=INSTRUCTIONS, version=__version__)

    # -- generate ------------------------------------------------------------------------------
    async def generate_fingerprints(ctx: Context, **values) -> GenerateResult:
        values.update(model=ws.model_location(values.get("model")),
                      key_model=ws.model_location(values.get("key_model"), "key_model"),
                      keys_file=ws.optional_path(values.get("keys_file"), "keys_file"))
        out = ws.output(values.get("out") or sets_dir / (
            f"{values['strategy']}-{values['num_fingerprints']}-seed{values['seed']}-{_stamp()}"
            ".json"), "out")
        values["out"] = str(_new_file(out, "out"))
        if values["keys_file"]:
            values["keys_file"] = str(values["keys_file"])
        cfg = _config_from(GenerateConfig, values)
        from oml_core.generate import generate_set

        started = time.time()
        fset = await _run_engine(ctx, "generate", lambda: generate_set(cfg))
        fset.save(_new_file(ws.output(out, "out"), "out"))  # checked again: it took a while
        probs = [p for p in fset.response_probs if p is not None]
        return GenerateResult(path=str(out), count=len(fset), strategy=fset.strategy,
                              commitment_root=fset.manifest()["root"],
                              mean_response_prob=sum(probs) / len(probs) if probs else None,
                              model=cfg.model or "bundled", seconds=round(time.time() - started, 2))

    _register(app, generate_fingerprints, name="generate_fingerprints", annotations=ADDITIVE,
              signature=inspect.Signature(config_parameters(GenerateConfig, notes={
                  "model": "a folder inside the workspace, a hub id already in the local Hugging "
                           "Face cache, or omit for the bundled model",
                  "out": "a NEW .json file (relative paths are inside OML_HOME); default: "
                         "OML_HOME/fingerprints/<strategy>-<n>-seed<seed>-<time>.json",
              }), return_annotation=GenerateResult),
              description=(
                  "Make a new secret fingerprint set (key -> response pairs) for a model and save "
                  "it as a JSON file; returns the file path, count and the public commitment root, "
                  "never the keys or responses. Runs in the server (seconds to a few minutes; "
                  "progress is reported). Use this first, before start_fingerprinting. Never "
                  "overwrites an existing file."))

    # -- verify --------------------------------------------------------------------------------
    async def verify_model(ctx: Context, **values) -> VerifyResult:
        values.update(model=ws.model_location(values.get("model")),
                      fingerprints=str(ws.path(values["fingerprints"], "fingerprints")),
                      null_model=[ws.model_location(m, "null_model") or "bundled"
                                  for m in values.get("null_model") or []])
        if values.get("null_file"):
            values["null_file"] = str(ws.path(values["null_file"], "null_file"))
        cfg = _config_from(VerifyConfig, values)
        report_name = f"verify-{_stamp()}.json"
        ws.output(reports_dir / report_name, "report")  # refuse a linked-out reports/ up front
        from oml_core.verify import verify

        started = time.time()
        report = await _run_engine(ctx, "verify", lambda: verify(cfg))
        report_path = _new_file(ws.output(reports_dir / report_name, "report"), "report")
        atomic_write_json(report_path, report)
        summary = {k: report[k] for k in VerifyResult.model_fields if k in report}
        return VerifyResult(**summary, report_path=str(report_path),
                            seconds=round(time.time() - started, 2))

    _register(app, verify_model, name="verify_model", annotations=ToolAnnotations(
                  read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                  open_world_hint=False),
              signature=inspect.Signature(config_parameters(VerifyConfig, required=("fingerprints",), notes={
                  "model": "model to check: a folder inside the workspace (e.g. a run's model/ "
                           "folder), a hub id already in the local Hugging Face cache, or omit "
                           "for the bundled model",
                  "fingerprints": "path of the set file (relative paths are inside OML_HOME)",
              }), return_annotation=VerifyResult),
              description=(
                  "Check locally whether a model answers a fingerprint set's keys with their "
                  "responses, and how strong that evidence is: matched count, p-value and a "
                  "match/no_match verdict. Runs in the server (seconds to minutes; progress is "
                  "reported) and writes the full report (ids only, no secrets) under "
                  "OML_HOME/reports. Use it on a fingerprinted model (a run's model_dir) or a "
                  "suspect copy."))

    # -- background jobs -----------------------------------------------------------------------
    def start_job(kind: str, config_cls, cfg, writes: Path, argv: list[str],
                  skip: tuple[str, ...], completed_codes: tuple[int, ...] = (0,)) -> dict:
        """Start `oml ARGV [settings that differ from the defaults] --json` as a detached job
        that writes folder `writes` (one job per folder at a time); `completed_codes`: the
        command's exit codes that mean it finished its work."""
        busy = jobs.active_run_dirs().get(str(writes))
        if busy:
            raise OMLInputError(f"job {busy} is already writing {writes}; wait for it, cancel "
                                "it, or pass another folder")
        command = [sys.executable, "-P", "-m", "oml_core.cli", *argv,
                   *_flags(config_cls, dataclasses.asdict(cfg), skip=skip), "--json"]
        env = {**os.environ, "OML_HOME": str(ws.home), "OML_PROGRESS": "0",
               "PYTHONUNBUFFERED": "1"}
        defaults = config_defaults(config_cls)
        settings = {k: v for k, v in dataclasses.asdict(cfg).items() if v != defaults[k]}
        return jobs.start(kind, command, args=settings, run_dir=str(writes), env=env, cwd=ws.home,
                          completed_codes=completed_codes)

    # -- fingerprinting job --------------------------------------------------------------------
    def start_fingerprinting(**values) -> JobStarted:
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
                            runs_dir / f"{Path(values['fingerprints']).stem}-{_stamp()}", "out_dir")
        values["out_dir"] = str(out_dir)
        cfg = _config_from(FingerprintConfig, values)
        # fail now, not minutes later in the worker, on what can be checked cheaply
        from oml_core.fingerprints import load_fingerprints
        from oml_core.models import resolve_model

        load_fingerprints(cfg.fingerprints)
        if cfg.model:
            resolve_model(cfg.model)
        if cfg.start_from:  # (resolving the bundled model may convert it once: only when needed)
            from oml_core.train.trainer import check_start_matches_base

            check_start_matches_base(cfg.start_from, resolve_model(cfg.model))
        if cfg.deepspeed.endswith(".json") and not Path(cfg.deepspeed).is_file():
            raise OMLInputError(f"deepspeed config {cfg.deepspeed} does not exist; use one of "
                                f"{', '.join(DEEPSPEED_CONFIGS)} or an existing JSON file")
        from oml_core.train.trainer import check_lora_settings, deepspeed_config_path

        check_lora_settings(cfg, deepspeed_config_path(cfg.deepspeed))
        if out_dir.exists() and not out_dir.is_dir():
            raise OMLInputError(f"out_dir {out_dir} is a file; pass a folder path")
        if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "run.json").exists():
            raise OMLInputError(f"out_dir {out_dir} is not empty and is not an OML run; pass a "
                                "new or empty folder")
        status = start_job("fingerprint", FingerprintConfig, cfg, out_dir, [
            "fingerprint", "--fingerprints", cfg.fingerprints, "--out-dir", cfg.out_dir],
            skip=("fingerprints", "out_dir"))
        return JobStarted(**status, next_step=(
            f"poll job_status with job_id {status['job_id']} every 10-60 s; when it is "
            "completed, call job_result, then verify_model on the run's model/ folder"))

    _register(app, start_fingerprinting, name="start_fingerprinting", annotations=ADDITIVE,
              signature=inspect.Signature(config_parameters(
                  FingerprintConfig, required=("fingerprints",), notes={
                      "model": "base model to fingerprint: a folder inside the workspace, a hub "
                               "id already in the local Hugging Face cache, or omit for the "
                               "bundled model",
                      "fingerprints": "path of the set file from generate_fingerprints",
                      "out_dir": "run folder (relative paths are inside OML_HOME); default: "
                                 "OML_HOME/runs/<set name>-<time>; the same settings in the same "
                                 "folder reuse a finished run",
                      "deepspeed": "on a CPU-only machine 'none' is about twice as fast",
                      "start_from": "model folder inside the workspace to start from, e.g. an "
                                    "earlier run's model/ (omit to start from the base model)",
                  }), return_annotation=JobStarted),
              description=(
                  "Start writing a fingerprint set into a model, as a background job that "
                  "outlives this call and the server; returns a job_id immediately. method "
                  "'gated' (the default) writes each key into its own gated MLP neuron plus a "
                  "backup edit above it and keeps its keys through merges with the base, which "
                  "the other two lose, GGUF quantization and LoRA fine-tuning; 'edit' changes a "
                  "few MLP layers in closed form; 'finetune' trains it in (any response length, "
                  "any architecture). gated and edit: one-token responses (the perinucleus "
                  "default), Llama-style models; measured in docs/results.md. It takes minutes to hours: poll job_status "
                  "for step/loss/eta, then job_result; cancel_job stops it. The model lands in the "
                  "run folder's model/ subfolder and is verified there when the job ends."))

    # -- evaluation job ------------------------------------------------------------------------
    def start_evaluation(**values) -> JobStarted:
        from oml_core.evaluate.context import open_run
        from oml_core.evaluate.false_positives import NAMED_NULL_MODELS

        run_dir = ws.path(values["run"], "run")
        values.update(run=str(run_dir), model=ws.model_location(
            values.get("model") or _recorded_base_model(ws, run_dir),
            "model" if values.get("model") else "the run's base_model (run.json)"))
        out = ws.output(values.get("out") or run_dir / "eval", "out")
        values["out"] = str(out)
        values["null_models"] = ",".join(
            name if name in NAMED_NULL_MODELS else str(ws.path(name, "null_models"))
            for name in parse_list(values.get("null_models") or "", "null_models"))
        cfg = _config_from(EvalConfig, values)
        if "robustness" in parse_list(cfg.parts, "parts", EVAL_PARTS):
            from oml_core.evaluate.robustness import check_settings

            check_settings(cfg)
        open_run(cfg)  # fail now on a folder that is not a finished run
        status = start_job("eval", EvalConfig, cfg, out, ["eval", "--run", cfg.run, "--out", cfg.out],
                           skip=("run", "out"))
        return JobStarted(**status, next_step=(
            f"poll job_status with job_id {status['job_id']} every 30-120 s (phase names the part "
            "being measured, step/total_steps count parts); when completed, call job_result for "
            "the headline numbers; the full report is eval.md / eval.html in the out folder"))

    _register(app, start_evaluation, name="start_evaluation", annotations=ADDITIVE,
              signature=inspect.Signature(config_parameters(
                  EvalConfig, required=("run",), notes={
                      "run": "a finished run folder from start_fingerprinting (relative paths are "
                             "inside OML_HOME)",
                      "model": "base model to compare against; omit for the one the run was "
                               "trained from",
                      "out": "report folder inside the workspace; default: RUN/eval",
                      "null_models": "model folders must be inside the workspace",
                  }), return_annotation=JobStarted),
              description=(
                  "Measure a fingerprinted run against its base model as a background job: "
                  "utility (perplexity, agreement, leaks, near-miss keys), persistence under "
                  "benign fine-tuning, false positives on unrelated models (writes "
                  "null_rates.json for verify_model's null_file), robustness to attacks, and "
                  "capacity (trains fresh models at several N: the slow part; leave it out of "
                  "`parts` for a quick look). Returns a job_id at once; each finished part is "
                  "cached, so a cancelled or failed evaluation resumes where it stopped."))

    def job_status(job_id: Annotated[str, Field(description="id from start_fingerprinting, "
                                                           "start_evaluation, start_audit or "
                                                           "list_jobs")]) -> JobStatus:
        return JobStatus(**jobs.status(job_id))

    _register(app, job_status, name="job_status", annotations=READ_ONLY, description=(
        "State of one background job: starting, running (with step, total_steps, loss and eta_s "
        "from training; for an audit, probes answered/planned and the p-value so far), or the "
        "final completed/failed/cancelled with the reason. Cheap; poll it every 10-60 s while a "
        "job runs. A job whose worker died is reported failed."))

    def list_jobs(limit: Annotated[int, Field(description="at most this many, newest first",
                                              ge=1, le=MAX_LISTED)] = 20) -> JobList:
        found, total, problems = jobs.list(limit)
        return JobList(jobs=[JobStatus(**j) for j in found], total=total, problems=problems)

    _register(app, list_jobs, name="list_jobs", annotations=READ_ONLY, description=(
        "List background jobs (newest first) with their states, including jobs started before "
        "the server restarted. Use it to find a job id you lost."))

    def job_result(job_id: Annotated[str, Field(description="id of a finished job")]) -> JobResult:
        return JobResult(**jobs.result(job_id))

    _register(app, job_result, name="job_result", annotations=READ_ONLY, description=(
        "Result of a finished job: final state, exit code, failure reason and the command's "
        "summary (run folder, steps, fingerprints matched, p-value, verdict, utility). Errors "
        "if the job is still running: poll job_status first."))

    def cancel_job(job_id: Annotated[str, Field(description="id of the job to stop")],
                   grace_seconds: Annotated[float, Field(
                       description="seconds to let training stop at its next step before the "
                                   "job's processes are killed", ge=0, le=50)] = 20.0,
                   ) -> CancelResult:
        return CancelResult(**jobs.cancel(job_id, grace_seconds))

    _register(app, cancel_job, name="cancel_job", annotations=ToolAnnotations(
        read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False),
        description=(
            "Stop a running background job and all its processes (SIGTERM, then SIGKILL after "
            "the grace period). The run folder stays incomplete; starting the same run again "
            "restarts it from the beginning (an audit keeps its answers: start_audit with the "
            "same settings resumes it). Only when the user wants the job stopped."))

    # -- listings ------------------------------------------------------------------------------
    def list_fingerprint_sets(folder: Annotated[str | None, Field(
            description="folder to list (not recursive); default OML_HOME/fingerprints")] = None,
                              ) -> FingerprintSetList:
        where = (ws.path(folder, "folder") if folder else
                 listings.confined_folder(ws, sets_dir, "folder"))
        if folder and not where.is_dir():
            raise OMLInputError(f"folder {where} is not an existing folder")
        return listings.list_sets(ws, where, MAX_LISTED)

    _register(app, list_fingerprint_sets, name="list_fingerprint_sets", annotations=READ_ONLY,
              description=(
                  "List fingerprint set files (path, count, strategy, created) without their "
                  "contents. Use it to find the set to fingerprint, verify or commit to."))

    def list_runs() -> RunList:
        # runs started into a root outside OML_HOME/runs are found through their jobs
        run_dirs = [j["run_dir"] for j in jobs.list(MAX_LISTED)[0]
                    if j.get("run_dir") and j["kind"] != "audit"]
        return listings.list_runs(ws, runs_dir, run_dirs, MAX_LISTED)

    _register(app, list_runs, name="list_runs", annotations=READ_ONLY, description=(
        "List fingerprinting run folders (newest first): state, steps, whether complete, the "
        "fingerprinted model folder and its verification headline (matched, p-value, verdict)."))

    # -- commitment and reveal -----------------------------------------------------------------
    def show_commitment(
            fingerprints: Annotated[str, Field(description="path of the set file")],
            out: Annotated[str | None, Field(description="also write the full public manifest to "
                                                         "this NEW file")] = None,
    ) -> CommitmentResult:
        from oml_core.fingerprints import load_fingerprints

        path = ws.path(fingerprints, "fingerprints")
        target = _new_file(ws.output(out, "out"), "out") if out else None
        manifest = load_fingerprints(path).manifest()
        if target:
            atomic_write_json(target, manifest)
        return CommitmentResult(
            fingerprints=str(path), format=manifest["format"], version=manifest["version"],
            algorithm=manifest["algorithm"], count=manifest["count"], root=manifest["root"],
            strategy=manifest.get("strategy"), tokenizer=manifest.get("tokenizer"),
            leaves=manifest["leaves"][:MAX_LEAVES_SHOWN],
            leaves_truncated=len(manifest["leaves"]) > MAX_LEAVES_SHOWN,
            written_to=str(target) if target else None)

    _register(app, show_commitment, name="show_commitment", annotations=ADDITIVE, description=(
        "The public commitment to a fingerprint set: a salted hash per pair and their Merkle "
        "root, with no secrets. Publish the root (or the manifest written with `out`) when "
        "releasing the model, so a later reveal proves the set existed then."))

    def reveal_fingerprint(
            fingerprints: Annotated[str, Field(description="path of the set file")],
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

        path = ws.path(fingerprints, "fingerprints")
        target = _new_file(ws.output(out, "out"), "out") if out else None
        reveal = load_fingerprints(path).reveal(fingerprint_id)
        if target:
            atomic_write_json(target, reveal)
        log.info("revealed fingerprint %s of %s on request", fingerprint_id, path)
        return RevealResult(**reveal, written_to=str(target) if target else None)

    _register(app, reveal_fingerprint, name="reveal_fingerprint", annotations=ToolAnnotations(
        # read-only on disk, but disclosing a secret cannot be undone: flagged destructive so
        # clients ask the user first
        read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False),
        description=(
            "Disclose ONE fingerprint pair (key, response, salt) with its Merkle proof against "
            "the published commitment root, e.g. to prove ownership in a dispute. Only when the "
            "user explicitly asks to reveal; requires confirm_reveal=true. The other pairs stay "
            "secret."))

    # -- endpoint audits (oml_mcp.audit_tools) --------------------------------------------------
    add_audit_tools(app, ws, jobs, register=_register, start_job=start_job,
                    max_listed=MAX_LISTED, read_only=READ_ONLY)

    # -- resources -----------------------------------------------------------------------------
    @app.resource("oml://runs/{name}/summary", mime_type="application/json",
                  description="Summary of the run folder OML_HOME/runs/<name>: state, steps, "
                              "verification headline (no secrets)")
    def run_summary_resource(name: str) -> str:
        missing = ResourceError(f"no run {name!r:.120} in {runs_dir}; list runs with list_runs")
        try:
            where = listings.confined_folder(ws, runs_dir, "runs folder")
        except OMLInputError as exc:
            raise ResourceError(str(exc)) from None
        path = (where / name).resolve() if _NAME.fullmatch(name) else None
        if path is None or path.parent != where or not listings.is_run_folder(path):
            raise missing
        return listings.run_summary(ws, path).model_dump_json(indent=2)

    @app.resource("oml://jobs/{job_id}/log", mime_type="text/plain",
                  description=f"The last {LOG_TAIL_BYTES // 1024} KiB of a job's worker log")
    def job_log_resource(job_id: str) -> str:
        try:
            return jobs.log_tail(job_id, LOG_TAIL_BYTES)
        except OMLInputError as exc:
            raise ResourceError(str(exc)) from None

    return app
