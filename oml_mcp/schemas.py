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
        if kind is list:
            kind = list[str]
        if kind is bool or kind == (bool | None):
            # JSON true/false only: lax parsing takes "yes", "on", "1" and 1.0 for true, and a
            # safety flag must not be switched by a string a model happened to produce
            kind = StrictBool | None if optional else StrictBool
        if meta.get("choices"):
            kind = Literal[tuple(meta["choices"])]
            kind = kind | None if optional else kind
        description = mcp_help(meta.get("help", ""))
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


# --- audits -----------------------------------------------------------------------------------


class AuditPlan(BaseModel):
    """What an audit will send and spend, computed before anything is sent."""

    endpoint: str = Field(description="scheme://host:port/path (no credentials or query)")
    model: str
    fingerprints: str
    folder: str = Field(description="the audit folder (evidence.jsonl, plan.json, reports)")
    audit_id: str | None = Field(None, description="the audit's id when the folder already holds "
                                                   "it (a resume); a new audit gets one when it "
                                                   "starts")
    resumes: bool = Field(description="the folder holds this audit: only unanswered probes are "
                                      "sent, with the keys it already spent")
    sequential: bool = Field(description="true (the default audit): keys, calls and tokens "
                                         "are the most it may spend; it stops as soon as the "
                                         "evidence decides, and keys it never sends stay unspent")
    keys: int = Field(description="fingerprint keys the endpoint will see (spent for good)")
    key_budget: int
    call_budget: int | None = Field(description="max_calls: the most calls the audit may send")
    keys_passed_over: int = Field(description="keys skipped because the ledger says this "
                                              "endpoint has already seen them")
    reuse_keys: bool
    layers: list[str] = Field(description="probe layers that can be sent with this adapter")
    probes_by_layer: dict[str, int]
    probes_planned: int = Field(description="one call each")
    probes_not_sendable: int
    probes_answered: int = Field(description="already answered in the folder (not sent again)")
    calls_to_send: int
    max_requests: int = Field(description="calls_to_send x (1 + max_retries): the worst case")
    estimated_prompt_tokens: int = Field(description="rough: about 4 characters a token")
    max_completion_tokens: int = Field(description="calls_to_send x max_tokens")
    estimated_tokens: int
    api_key_env: str = Field(description="the server's environment variable whose value is sent "
                                         "as the API key (the value is never shown)")
    api_key_set: bool = Field(description="whether that variable is set in the server's "
                                          "environment (without it no key is sent)")
    ledger: str = Field(description="the endpoint's key ledger (keyed hashes only)")


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


class AuditLayer(BaseModel):
    matched: int | None = Field(None, description="keys that came back in this layer")
    total: int | None = Field(None, description="keys with at least one valid answer here")
    hits: int | None = Field(None, description="probes that matched")
    probes: int | None = Field(None, description="probes answered")
    errors: int | None = None
    p_value: float | None = None


class AuditResult(BaseModel):
    audit_id: str
    folder: str
    state: str | None = Field(None, description="complete, or incomplete (pending probes: "
                                                "start_audit with the same settings resumes)")
    verdict: str = Field(description="match, no_match, or inconclusive (no valid answer: the "
                                     "endpoint was not tested)")
    p_value: float | None = Field(None, description="Bonferroni-corrected over the tests")
    alpha: float | None = None
    matched: int | None = Field(None, description="keys that came back (deciding test)")
    total: int | None = None
    deciding_test: str | None = None
    layers: dict[str, AuditLayer]
    endpoint: str | None = None
    model: str | None = None
    keys_probed: int | None = None
    probes_planned: int | None = None
    probes_done: int | None = None
    probes_failed: int | None = None
    pending: int | None = None
    errors_by_kind: dict[str, int] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    verdict_words: str | None = Field(None, description="the verdict in plain words")
    finished: str | None = None
    reports: dict[str, str] = Field(default_factory=dict, description="report files in the folder")
    report_uri: str
