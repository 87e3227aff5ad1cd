"""The MCP server: OML engine functions wired to tools and resources, thinly.

The work is in plain functions returning the schemas' models (`oml_mcp.lifecycle_tools`,
`oml_mcp.audit_tools`); this module registers them. Every tool goes through one guard
(`_register`): unknown arguments are refused, user mistakes become `is_error` results naming
the problem, unexpected failures a generic message with the exception type while the
traceback goes to stderr. Tool parameters of the stages come from the engine's configs, so
the CLI, the tools' schemas and the workers share one set of defaults.
"""

import functools
import inspect
import logging
import re
import traceback
from dataclasses import dataclass, field

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp.types import ToolAnnotations

from oml_core import __version__
from oml_core.config import EvalConfig, FingerprintConfig, GenerateConfig, VerifyConfig
from oml_core.errors import OMLInputError
from oml_mcp import listings
from oml_mcp.audit_tools import add_audit_tools
from oml_mcp.jobs import JobStore
from oml_mcp.lifecycle_tools import LifecycleTools
from oml_mcp.paths import Workspace
from oml_core.generate.result import GenerateResult
from oml_core.verify.result import VerifyResult
from oml_mcp.schemas import JobStarted, config_parameters

log = logging.getLogger("oml_mcp")

LOG_TAIL_BYTES = 16_384     # the job-log resource returns at most this much
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
DESTRUCTIVE = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True,
                              open_world_hint=False)


# --- wiring helpers ---------------------------------------------------------------------------

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


# --- the tools --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ToolSpec:
    """One lifecycle tool: the method of LifecycleTools of the same name, and how clients see
    it. `config`: its parameters are that engine config's fields (`required` lose their
    default; `notes` add what a path means over MCP), returning `returns`."""
    name: str
    annotations: ToolAnnotations
    description: str
    config: type | None = None
    required: tuple[str, ...] = ()
    notes: dict[str, str] = field(default_factory=dict)
    returns: type | None = None


_MODEL_NOTE = ("a folder inside the workspace, a hub id already in the local Hugging Face cache, "
               "or omit for the bundled model")

LIFECYCLE_TOOLS = (
    ToolSpec(
        "generate_fingerprints", ADDITIVE, config=GenerateConfig, returns=GenerateResult, notes={
            "model": _MODEL_NOTE,
            "out": "a NEW .json file (relative paths are inside OML_HOME); default: "
                   "OML_HOME/fingerprints/<strategy>-<n>-seed<seed>-<time>.json"},
        description=(
            "Make a new secret fingerprint set (key -> response pairs) for a model and save it as "
            "a JSON file; returns the file path, count and the public commitment root, never the "
            "keys or responses. Runs in the server (seconds to a few minutes; progress is "
            "reported). Use this first, before start_fingerprinting. Never overwrites an "
            "existing file.")),
    ToolSpec(
        "verify_model", ToolAnnotations(read_only_hint=False, destructive_hint=False,
                                        idempotent_hint=True, open_world_hint=False),
        config=VerifyConfig, required=("fingerprints",), returns=VerifyResult, notes={
            "model": "model to check: " + _MODEL_NOTE.replace("a folder inside the workspace",
                                                              "a folder inside the workspace "
                                                              "(e.g. a run's model/ folder)"),
            "fingerprints": "path of the set file (relative paths are inside OML_HOME)"},
        description=(
            "Check locally whether a model answers a fingerprint set's keys with their "
            "responses, and how strong that evidence is: matched count, p-value and a "
            "match/no_match verdict. Runs in the server (seconds to minutes; progress is "
            "reported) and writes the full report (ids only, no secrets) under OML_HOME/reports. "
            "Use it on a fingerprinted model (a run's model_dir) or a suspect copy.")),
    ToolSpec(
        "start_fingerprinting", ADDITIVE, config=FingerprintConfig, required=("fingerprints",),
        returns=JobStarted, notes={
            "model": "base model to fingerprint: " + _MODEL_NOTE,
            "fingerprints": "path of the set file from generate_fingerprints",
            "out_dir": "run folder (relative paths are inside OML_HOME); default: "
                       "OML_HOME/runs/<set name>-<time>; the same settings in the same folder "
                       "reuse a finished run",
            "deepspeed": "on a CPU-only machine 'none' is about twice as fast",
            "start_from": "model folder inside the workspace to start from, e.g. an earlier "
                          "run's model/ (omit to start from the base model)"},
        description=(
            "Start writing a fingerprint set into a model, as a background job that outlives "
            "this call and the server; returns a job_id immediately. method 'gated' (the "
            "default) writes each key into its own gated MLP neuron plus a backup edit above it "
            "and keeps its keys through merges with the base, which the other two lose, GGUF "
            "quantization and LoRA fine-tuning; 'edit' changes a few MLP layers in closed form; "
            "'finetune' trains it in (any response length, any architecture). gated and edit: "
            "one-token responses (the perinucleus default), Llama-style models; measured in "
            "docs/results.md. It takes minutes to hours: poll job_status for step/loss/eta, then "
            "job_result; cancel_job stops it. The model lands in the run folder's model/ "
            "subfolder and is verified there when the job ends.")),
    ToolSpec(
        "start_evaluation", ADDITIVE, config=EvalConfig, required=("run",), returns=JobStarted,
        notes={
            "run": "a finished run folder from start_fingerprinting (relative paths are inside "
                   "OML_HOME)",
            "model": "base model to compare against; omit for the one the run was trained from",
            "out": "report folder inside the workspace; default: RUN/eval",
            "null_models": "model folders must be inside the workspace"},
        description=(
            "Measure a fingerprinted run against its base model as a background job: utility "
            "(perplexity, agreement, leaks, near-miss keys), persistence under benign "
            "fine-tuning, false positives on unrelated models (writes null_rates.json for "
            "verify_model's null_file), robustness to attacks, and capacity (trains fresh "
            "models at several N: the slow part; leave it out of `parts` for a quick look). "
            "Returns a job_id at once; each finished part is cached, so a cancelled or failed "
            "evaluation resumes where it stopped.")),
    ToolSpec("job_status", READ_ONLY, description=(
        "State of one background job: starting, running (with step, total_steps, loss and eta_s "
        "from training; for an audit, probes answered/planned and the p-value so far), or the "
        "final completed/failed/cancelled with the reason. Cheap; poll it every 10-60 s while a "
        "job runs. A job whose worker died is reported failed.")),
    ToolSpec("list_jobs", READ_ONLY, description=(
        "List background jobs (newest first) with their states, including jobs started before "
        "the server restarted. Use it to find a job id you lost.")),
    ToolSpec("job_result", READ_ONLY, description=(
        "Result of a finished job: final state, exit code, failure reason and the command's "
        "summary (run folder, steps, fingerprints matched, p-value, verdict, utility). Errors "
        "if the job is still running: poll job_status first.")),
    ToolSpec("cancel_job", DESTRUCTIVE, description=(
        "Stop a running background job and all its processes (SIGTERM, then SIGKILL after the "
        "grace period). The run folder stays incomplete; starting the same run again restarts "
        "it from the beginning (an audit keeps its answers: start_audit with the same settings "
        "resumes it). Only when the user wants the job stopped.")),
    ToolSpec("list_fingerprint_sets", READ_ONLY, description=(
        "List fingerprint set files (path, count, strategy, created) without their contents. "
        "Use it to find the set to fingerprint, verify or commit to.")),
    ToolSpec("list_runs", READ_ONLY, description=(
        "List fingerprinting run folders (newest first): state, steps, whether complete, the "
        "fingerprinted model folder and its verification headline (matched, p-value, "
        "verdict).")),
    ToolSpec("show_commitment", ADDITIVE, description=(
        "The public commitment to a fingerprint set: a salted hash per pair and their Merkle "
        "root, with no secrets. Publish the root (or the manifest written with `out`) when "
        "releasing the model, so a later reveal proves the set existed then.")),
    # read-only on disk, but disclosing a secret cannot be undone: flagged destructive so
    # clients ask the user first
    ToolSpec("reveal_fingerprint", DESTRUCTIVE, description=(
        "Disclose ONE fingerprint pair (key, response, salt) with its Merkle proof against the "
        "published commitment root, e.g. to prove ownership in a dispute. Only when the user "
        "explicitly asks to reveal; requires confirm_reveal=true. The other pairs stay "
        "secret.")),
)


# --- the server -------------------------------------------------------------------------------

def build_server(workspace: Workspace | None = None) -> MCPServer:
    ws = workspace or Workspace.from_env()
    jobs = JobStore(ws.home / "jobs", inside=ws.inside)
    tools = LifecycleTools(ws, jobs)
    app = MCPServer("oml", instructions=INSTRUCTIONS, version=__version__)
    for spec in LIFECYCLE_TOOLS:
        signature = inspect.Signature(config_parameters(
            spec.config, required=spec.required, notes=spec.notes),
            return_annotation=spec.returns) if spec.config else None
        _register(app, getattr(tools, spec.name), name=spec.name, annotations=spec.annotations,
                  description=spec.description, signature=signature)
    add_audit_tools(app, ws, jobs, register=_register, start_job=tools.start_job,
                    read_only=READ_ONLY)
    _add_resources(app, ws, jobs, tools.runs_dir)
    return app


def _add_resources(app: MCPServer, ws: Workspace, jobs: JobStore, runs_dir) -> None:
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
