"""Tool input parameters derived from the engine's stage configs, and the tool result models.

Inputs: `config_parameters` turns each field of a config dataclass (oml_core.config) into a
keyword parameter with the field's own default, help text, choices (an enum in the schema)
and range (minimum/maximum), so the MCP schemas can never drift from the CLI's flags.

Outputs: small pydantic models (→ output schemas and structured content). None of them has a
place for a fingerprint key or response except `RevealResult`.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, StrictBool

# --- inputs -----------------------------------------------------------------------------------


def _mcp_help(text: str) -> str:
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
        if kind is list:
            kind = list[str]
        if kind is bool or kind == (bool | None):
            # JSON true/false only: lax parsing takes "yes", "on", "1" and 1.0 for true, and a
            # safety flag must not be switched by a string a model happened to produce
            kind = StrictBool | None if optional else StrictBool
        if meta.get("choices"):
            kind = Literal[tuple(meta["choices"])]
            kind = kind | None if optional else kind
        description = _mcp_help(meta.get("help", ""))
        if f.name in notes:
            description = f"{description}; {notes[f.name]}" if description else notes[f.name]
        constraints: dict[str, Any] = {}
        numeric = typing.get_args(kind) or (kind,)
        if any(t in (int, float) for t in numeric):
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


def config_defaults(config_cls) -> dict[str, Any]:
    """Each field's default, to tell which settings a caller actually changed."""
    return {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(config_cls)}


# --- outputs ----------------------------------------------------------------------------------


def _empty(value) -> bool:
    return not value


class GenerateResult(BaseModel):
    path: str = Field(description="the fingerprint set file (secret: keep it; never paste it)")
    count: int = Field(description="number of fingerprints in the set")
    strategy: str | None
    commitment_root: str = Field(description="Merkle root of the public commitment to the set")
    mean_response_prob: float | None = Field(
        description="mean base-model chance of each response (perinucleus), used as null rate")
    model: str = Field(description="model whose tokenizer the lengths are counted in")
    seconds: float


class WrapperCount(BaseModel):
    matched: int
    total: int


class NullModelSummary(BaseModel):
    model: str
    matched: int
    total: int
    p_value: float | None = None
    verdict: str | None = None


class VerifyResult(BaseModel):
    model: str
    fingerprints: str
    matched: int = Field(description="fingerprints answered under at least one wrapper")
    total: int
    p_value: float = Field(description="chance an unrelated model matches this many or more")
    verdict: str = Field(description="'match' when p_value <= alpha, else 'no_match'")
    alpha: float
    null_rate: float
    null_rate_source: str
    match_rule: str
    wrappers: dict[str, WrapperCount]
    skipped_wrappers: list[str]
    null_models: list[NullModelSummary]
    rule: str = Field(description="the decision rule, fixed before decoding")
    report_path: str = Field(description="full JSON report (per-fingerprint ids, settings; no "
                                         "keys or responses)")
    seconds: float


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
                                                "status file (starting, running, completed, ...)")
    step: int | None = None
    total_steps: int | None = None
    loss: float | None = None
    eta_s: float | None = Field(None, description="estimated seconds left in training")
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


class LeafHash(BaseModel):
    id: str
    hash: str


class CommitmentResult(BaseModel):
    fingerprints: str
    format: str
    version: int
    algorithm: str
    count: int
    root: str = Field(description="Merkle root: publish this to commit to the set")
    strategy: str | None = None
    tokenizer: str | None = None
    leaves: list[LeafHash] = Field(description="salted per-pair hashes (public), maybe cut")
    leaves_truncated: bool
    written_to: str | None = Field(None, description="where the full manifest was written")


class ProofStep(BaseModel):
    side: str
    hash: str


class RevealResult(BaseModel):
    """The one deliberate exception: this result carries a key and its response."""

    format: str
    version: int
    algorithm: str
    id: str
    key: str
    response: str
    salt: str
    index: int
    leaf: str
    proof: list[ProofStep]
    root: str
    written_to: str | None = None
