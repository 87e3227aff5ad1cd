"""The endpoint-audit tools: thin wiring over clients/ (the auditor), in the server's style.

| tool | what it does |
|---|---|
| `start_audit` | the plan (keys, calls, tokens), then the audit as a background job |
| `list_audits` | audit folders (newest first): state, verdict, p-value, matched/total |
| `audit_result` | a finished audit's verdict, p-value, matched/total, per-layer counts |

`start_audit` with `plan_only: true` returns the plan alone and starts nothing.

Resource `oml://audits/{audit_id}/report`: the audit's report.md (keys and responses are not
in it; an audit run with the CLI's --reveal-keys is refused).

The job is `oml audit ... --progress-file <folder>/progress.json --json` under the worker
wrapper, like fine-tuning: it outlives the call and the server, job_status shows probes
answered / planned (step / total_steps) and the p-value so far, cancel_job stops it, and
start_audit with the same settings resumes it from the folder's evidence.jsonl (the default
folder, OML_HOME/audits/<settings id>, is the CLI's, so each resumes the other's audits).
Exit code 3 (inconclusive: no probe got a valid answer) is a finished audit, not a failure.

Arguments that could carry a secret are restricted (oml_mcp.audit_inputs): the API key comes
from a server variable on an allow-list, header values only as $API_KEY, no credentials in the
base URL. `reveal_keys` is not offered: nothing the server writes or returns holds a key.
"""

# no `from __future__ import annotations`: the SDK evaluates the methods' annotations (which
# name MAX_LISTED) to build the tools' schemas
import contextlib
import inspect
from pathlib import Path
from typing import Annotated

from mcp.server.mcpserver.exceptions import ResourceError
from mcp.types import ToolAnnotations
from pydantic import Field, StrictBool

from clients.cli import EXIT_INCONCLUSIVE
from clients.config import AuditConfig, validate_audit
from oml_core.errors import OMLInputError
from oml_mcp import audit_folders
from oml_mcp.audit_inputs import (
    API_KEY_ENV_RULE,
    PLAIN_HEADERS,
    check_api_key_env,
    check_base_url,
    check_headers,
    check_model_name,
    request_template,
)
from oml_mcp.job_records import FINAL_STATES
from oml_mcp.lifecycle_tools import MAX_LISTED
from oml_mcp.schemas import (
    AuditList,
    AuditResult,
    AuditStarted,
    JobStatus,
    config_parameters,
    mcp_help,
)

REPORT_MAX_BYTES = 1 << 20
NOT_OFFERED = ("reveal_keys",)  # CLI only: keys written into the folder's files
SPENDS_KEYS = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False,
                              open_world_hint=True)


@contextlib.contextmanager
def _tool_words():
    """The engine's messages name CLI flags (--max-keys); a tool caller knows max_keys."""
    try:
        yield
    except OMLInputError as exc:
        raise OMLInputError(mcp_help(str(exc))) from None


def _parameters() -> list[inspect.Parameter]:
    params = [p for p in config_parameters(
        AuditConfig, required=("base_url", "model", "fingerprints"), notes={
            "base_url": "any http(s) URL; no user:password and no credential in the query (the "
                        "key comes from api_key_env)",
            "fingerprints": "path of the set file inside the workspace (it stays on this machine; "
                            "only the chosen keys are sent)",
            "api_key_env": f"allowed: {API_KEY_ENV_RULE}; never the key itself",
            "header": f"over MCP only '$API_KEY' values ('Authorization: Bearer $API_KEY'), or "
                      f"literal values for {', '.join(PLAIN_HEADERS)}",
            "request_template": "inline JSON, or a file inside the workspace",
            "null_file": "a file inside the workspace",
            "out": "inside the workspace; default OML_HOME/audits/<settings id>: the same "
                   "settings find (and resume) the same folder",
        }) if p.name not in NOT_OFFERED]
    params.append(inspect.Parameter(
        "plan_only", inspect.Parameter.KEYWORD_ONLY, default=False,
        annotation=Annotated[StrictBool, Field(description=(
            "true: return the plan (keys to spend, calls, token estimate) and start nothing; "
            "show it to the user before spending keys"))]))
    return params


def add_audit_tools(app, ws, jobs, *, register, start_job, read_only: ToolAnnotations) -> None:
    """Register start_audit, list_audits, audit_result and the report resource on `app`."""
    tools = AuditTools(ws, jobs, start_job)
    register(app, tools.start_audit, name="start_audit", annotations=SPENDS_KEYS,
             signature=inspect.Signature(_parameters(), return_annotation=AuditStarted),
             description=START_AUDIT)
    register(app, tools.list_audits, name="list_audits", annotations=read_only, description=(
        "List endpoint audits (newest first): endpoint, model, state, and once finished the "
        "verdict, p-value and keys matched/total. No keys, answers or evidence."))
    register(app, tools.audit_result, name="audit_result", annotations=read_only, description=(
        "The verdict of a finished audit: match / no_match / inconclusive, the corrected "
        "p-value, keys matched/total, per-layer counts and p-values, notes, the verdict in plain "
        "words and the report files; the report itself is the resource "
        "oml://audits/{audit_id}/report. No keys or answers."))
    app.resource("oml://audits/{audit_id}/report", mime_type="text/markdown",
                 description="An audit's report.md: verdict, per-layer table, decision rule "
                             "(no keys or responses)")(tools.audit_report_resource)


START_AUDIT = (
    "Audit a remote chat endpoint (OpenAI-compatible, or any JSON API with adapter 'http') for "
    "a fingerprint set: probe it with secret keys under several wrappings (layers) and turn the "
    "answers into a verdict with a false-positive bound. Every probed key is shown to the "
    "endpoint and recorded as spent in its key ledger, so call it first with plan_only=true and "
    "show the plan (keys, calls, token estimate) to the user; by default the audit is "
    "sequential, so those are the most it may spend: it stops as soon as the evidence decides "
    "and keys it never sends stay unspent (exhaustive=true sends every key). Then it runs as a "
    "background job that outlives this call: poll job_status (probes answered/planned, p-value "
    "so far), then audit_result; cancel_job stops it and the same call resumes it. The API key "
    "is read from the server's environment variable named by api_key_env (OPENAI_API_KEY or "
    "OML_AUDIT_*), never passed or returned.")


class AuditTools:
    """One workspace's audit tools; `start_job` is the lifecycle tools' job runner."""

    def __init__(self, ws, jobs, start_job):
        self.ws, self.jobs, self.start_job = ws, jobs, start_job
        self.audits_dir = ws.home / "audits"

    def start_audit(self, **values) -> AuditStarted:
        from clients.audit_preview import audit_folder, preview_audit

        ws = self.ws
        plan_only = values.pop("plan_only")
        values.update(base_url=check_base_url(values.get("base_url")),
                      model=check_model_name(values.get("model")),
                      api_key_env=check_api_key_env(values.get("api_key_env")),
                      header=check_headers(values.get("header") or []),
                      fingerprints=str(ws.path(values["fingerprints"], "fingerprints")),
                      request_template=request_template(ws, values.get("request_template")))
        if values.get("null_file"):
            values["null_file"] = str(ws.path(values["null_file"], "null_file"))
        if values.get("out"):
            values["out"] = str(ws.output(values["out"], "out"))
        cfg = AuditConfig(**values)
        with _tool_words():
            validate_audit(cfg)
            folder = audit_folder(cfg, self.audits_dir)
        # the default folder is confined too: OML_HOME/audits may be a planted link
        cfg.out = str(ws.output(folder, "out"))
        with _tool_words():
            plan = preview_audit(cfg, ws.home / "ledgers")
        if plan_only:
            return AuditStarted(plan=plan, job=None, next_step=(
                f"show the user this plan ({plan.keys} keys shown to the endpoint, "
                f"{plan.calls_to_send} calls); to run it, call start_audit again with the "
                "same arguments without plan_only"))
        status = self.start_job("audit", AuditConfig, cfg, Path(cfg.out), [
            "audit", "--progress-file", str(Path(cfg.out) / "progress.json")], skip=(),
            completed_codes=(0, EXIT_INCONCLUSIVE))
        return AuditStarted(plan=plan, job=JobStatus(**status), next_step=(
            f"poll job_status with job_id {status['job_id']} every 5-30 s (step/total_steps: "
            "probes answered/planned at most; p_value: the evidence so far); when it is completed, "
            f"call audit_result with audit_id {status['job_id']}; cancel_job stops it, and "
            "start_audit with the same settings resumes it"))

    def list_audits(self, limit: Annotated[int, Field(description="at most this many, newest first",
                                                      ge=1, le=MAX_LISTED)] = 20) -> AuditList:
        found = self._audit_jobs()
        return audit_folders.list_audits(self.ws, self.audits_dir, [j["run_dir"] for j in found], {
            j["run_dir"]: j["job_id"] for j in found if j["state"] not in FINAL_STATES}, limit)

    def audit_result(self, audit_id: Annotated[str, Field(description=(
            "the audit's id (list_audits), or the job_id start_audit returned"))]) -> AuditResult:
        folder = self._locate(audit_folders.check_id(audit_id))
        active = {j["run_dir"]: j["job_id"] for j in self._audit_jobs()
                  if j["state"] not in FINAL_STATES}
        return audit_folders.audit_result(self.ws, folder, active.get(str(folder)))

    def audit_report_resource(self, audit_id: str) -> str:
        try:
            return audit_folders.report_text(self.ws, self._locate(audit_folders.check_id(audit_id)),
                                             REPORT_MAX_BYTES)
        except OMLInputError as exc:
            raise ResourceError(str(exc)) from None

    def _audit_jobs(self) -> list[dict]:
        return [j for j in self.jobs.list(10_000)[0] if j["kind"] == "audit" and j.get("run_dir")]

    def _locate(self, audit_id: str) -> Path:
        """The folder of an audit id, or of an audit job's id."""
        if audit_id.startswith("audit-"):
            with contextlib.suppress(OMLInputError):
                job = self.jobs.status(audit_id)
                folder = Path(job["run_dir"] or "")
                if job["kind"] == "audit" and folder.is_absolute() and self.ws.inside(folder):
                    return folder.resolve()
        return audit_folders.find_audit(self.ws, self.audits_dir,
                                        [j["run_dir"] for j in self._audit_jobs()], audit_id)
