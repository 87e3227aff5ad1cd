"""Tool input parameters derived from the engine's stage configs, and the tool result models.

Inputs: `config_parameters` turns each field of a config dataclass (oml_core.config) into a
keyword parameter with the field's own default, help text, choices (an enum in the schema)
and range (minimum/maximum), so the MCP schemas can never drift from the CLI's flags.

Outputs: small pydantic models (→ output schemas and structured content): the MCP-only ones
(jobs, listings, audit folders) here; the stages' results come from the engine (generate,
verify, commitment, the audit's plan) and are imported here. None of them has a place for a
fingerprint key or response except `RevealResult`.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, StrictBool

# the audit's own models, which the MCP's audit models hold
from clients.audit_result import AuditHeadline, AuditPlan
from oml_core.settings import choices_of, list_item_type

# --- inputs -----------------------------------------------------------------------------------


def mcp_help(text: str) -> str:
    """CLI help says `--key-length`; a tool caller knows that setting as `key_length`."""
    return re.sub(r"--([a-z][a-z-]*)", lambda m: m.group(1).replace("-", "_"), text)


def config_parameters(config_cls, *, required: tuple[str, ...] = (),
                      notes: dict[str, str] | None = None) -> list[inspect.Parameter]:
    """One keyword parameter per field of `config_cls` (defaults, help, choices, ranges).

    `required` fields lose their default (the tool cannot work without them); `notes` adds
    MCP-specific words to a field's help (e.g. where a relative path is taken from).
    """
    hints = typing.get_type_hints(config_cls)
    notes = notes or {}
    params = []
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        kind = hints[f.name]
        optional = type(None) in typing.get_args(kind)
        item = list_item_type(config_cls, f)
        if item is not None:
            kind = _list_annotation(f, item)
        elif kind is bool or kind == (bool | None):
            # JSON true/false only: lax parsing takes "yes", "on", "1" and 1.0 for true, and a
            # safety flag must not be switched by a string a model happened to produce
            kind = StrictBool | None if optional else StrictBool
        elif choices_of(f):
            kind = Literal[choices_of(f)]
            kind = kind | None if optional else kind
        description = mcp_help(meta.get("help", ""))
        if item is not None and meta.get("empty") and not meta.get("repeat"):
            description += f" ([]: {meta['empty']})"
        if f.name in notes:
            description = f"{description}; {notes[f.name]}" if description else notes[f.name]
        constraints: dict[str, Any] = {}
        numeric = typing.get_args(kind) or (kind,)
        if item is None and any(t in (int, float) for t in numeric):
            if meta.get("low") is not None:
                constraints["ge"] = meta["low"]
            if meta.get("high") is not None:
                constraints["le"] = meta["high"]
        if f.name in required:
            kind = str if kind == (str | None) else kind
            default = inspect.Parameter.empty
        elif f.default is not dataclasses.MISSING:
            default = f.default
        else:
            default = f.default_factory()
        params.append(inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
            annotation=Annotated[kind, Field(description=description, **constraints)]))
    return params


def _comma_string_as_list(value):
    """Clients written for the old comma-string settings: 'a,b' -> ['a', 'b'] (items then
    validated as the list's)."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


def _list_annotation(f, item: type):
    """A list setting's type: an array whose items carry the field's choices (old names
    included) or range, as the config's `validate` checks them."""
    meta = f.metadata
    choices = choices_of(f)
    if choices:
        item = Literal[(*choices, *meta.get("aliases", {}))]
    elif item in (int, float):
        bounds = {("gt" if meta.get("above") else "ge"): meta.get("low"), "le": meta.get("high")}
        bounds = {k: v for k, v in bounds.items() if v is not None}
        item = Annotated[item, Field(**bounds)] if bounds else item
    length = {} if meta.get("empty") is not None else {"min_length": 1}
    if meta.get("repeat"):  # one value per item already (a header may hold commas)
        return Annotated[list[item], Field(**length)]
    return Annotated[list[item], BeforeValidator(_comma_string_as_list), Field(**length)]


def config_defaults(config_cls) -> dict[str, Any]:
    """Each field's default, to tell which settings a caller actually changed."""
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(config_cls)}


# --- outputs ----------------------------------------------------------------------------------


def _empty(value) -> bool:
    return not value


JobState = Literal["starting", "running", "completed", "failed", "cancelled"]


class JobStatus(BaseModel):
    job_id: str
    kind: str
    state: JobState = Field(description="starting/running (poll again) or completed/failed/"
                                        "cancelled (final)")
    created: str
    ended: str | None = None
    run_dir: str | None = Field(None, description="the run folder the job writes")
    phase: str | None = Field(None, description="the trainer's own state from the run folder's "
                                                "status file (starting, running, completed, ...); "
                                                "'probing' for an audit")
    step: int | None = Field(None, description="training step; for an audit, probes answered")
    total_steps: int | None = Field(None, description="for an audit, probes planned")
    loss: float | None = None
    eta_s: float | None = Field(None, description="estimated seconds left in training (or "
                                                  "probing)")
    p_value: float | None = Field(None, description="audit only: the p-value of the answers so "
                                                    "far (the verdict is audit_result's)")
    exit_code: int | None = None
    reason: str | None = Field(None, description="why the job failed or was cancelled")
    pid: int | None = None
    log_uri: str = Field(description="MCP resource with the tail of the worker's log")


class JobStarted(JobStatus):
    next_step: str = Field(description="what to do next")


class JobList(BaseModel):
    jobs: list[JobStatus]
    total: int = Field(description="jobs on disk (the list may be cut to `limit`)")
    problems: list[str] = Field(default_factory=list, exclude_if=_empty, description=(
        "entries of the jobs folder that are no readable job (a symlink, a malformed "
        "job.json), one line each with the fix; left out when there are none"))


class JobResult(BaseModel):
    job_id: str
    state: JobState
    exit_code: int | None
    reason: str | None
    run_dir: str | None
    output: dict[str, Any] | None = Field(
        description="the command's JSON summary (run folder, steps, verification counts, "
                    "p-value, utility); no keys or responses")


class CancelResult(BaseModel):
    job_id: str
    state: JobState
    was_running: bool
    signal: str | None = Field(description="SIGTERM, or SIGKILL when the grace period ran out")
    message: str


class FingerprintSetInfo(BaseModel):
    path: str
    count: int | None = None
    strategy: str | None = None
    created: str | None = None
    source_format: str | None = None
    committable: bool | None = Field(None, description="every pair has a salt (our format)")
    bytes: int | None = None
    problem: str | None = Field(None, description="why the file could not be read as a set")


class FingerprintSetList(BaseModel):
    folder: str
    sets: list[FingerprintSetInfo]
    truncated: bool


class RunInfo(BaseModel):
    name: str
    path: str
    complete: bool = Field(description="the COMPLETE marker exists: model and metrics are final")
    state: str | None = Field(None, description="from the run's status file")
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    run_key: str | None = None
    base_model: str | None = None
    fingerprints: str | None = None
    num_fingerprints: int | None = None
    memorised_at_step: int | None = None
    train_seconds: float | None = None
    matched: int | None = None
    total: int | None = None
    p_value: float | None = None
    verdict: str | None = None
    first_token_agreement: float | None = None
    perplexity_change: float | None = None
    model_dir: str | None = Field(None, description="the fingerprinted model folder, once saved")
    summary_uri: str | None = None


class RunList(BaseModel):
    runs: list[RunInfo]
    truncated: bool
    problems: list[str] = Field(default_factory=list, exclude_if=_empty, description=(
        "run folders not read because they lead outside the workspace, one line each; left "
        "out when there are none"))


# --- audits -----------------------------------------------------------------------------------


class AuditStarted(BaseModel):
    plan: AuditPlan
    job: JobStatus | None = Field(description="the background audit job; null with plan_only")
    next_step: str = Field(description="what to do next")


class AuditInfo(BaseModel):
    audit_id: str
    folder: str
    endpoint: str | None = None
    model: str | None = None
    created: str | None = None
    state: str | None = Field(None, description="from the folder's status.json: running, "
                                                "complete, incomplete, interrupted, aborted")
    verdict: str | None = Field(None, description="match, no_match or inconclusive, once finished")
    p_value: float | None = None
    matched: int | None = None
    total: int | None = None
    keys: int | None = None
    probes_planned: int | None = None
    probes_done: int | None = None
    finished: str | None = None
    job_id: str | None = Field(None, description="the job writing it now, if one is")
    report_uri: str | None = Field(None, description="MCP resource with report.md, once written")


class AuditList(BaseModel):
    audits: list[AuditInfo]
    truncated: bool
    problems: list[str] = Field(default_factory=list, exclude_if=_empty, description=(
        "audit folders not read (a link out of the workspace, an unreadable plan), one line "
        "each; left out when there are none"))


class AuditResult(AuditHeadline):
    """audit_result's answer: the headline of the audit's last finished run (what `oml audit
    --json` prints), when that run finished, and the resource with its report."""

    finished: str
    report_uri: str
