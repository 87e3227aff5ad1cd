"""What list_audits, audit_result and the audit report resource read from audit folders.

An audit folder (clients/audit.py) holds plan.json (format "oml-audit-plan": the audit id,
endpoint, model, the keys' fingerprint ids), status.json, evidence.jsonl, and once a run of
the audit ends report.json / report.md / report.html; an MCP audit job adds progress.json.
Like run folders (listings), these are workspace contents: a folder is confined before it is
read (a link out is reported, never followed) and only regular files are read. plan.json and
report.json are read through the models they are written from (StoredAuditPlan, AuditReport),
strictly: a file that does not validate is treated as no plan (the folder is listed as a
problem) or no report; status.json keeps each field only if it has the promised type. Only
headlines are returned: never the evidence, an answer, or the list of fingerprint ids. An
audit run with --reveal-keys (the CLI's option; the MCP tool has none) wrote keys into its
reports, so its report resource is refused (and so is one whose report.json cannot be read).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from pydantic import ValidationError

from clients.audit_plan_file import StoredAuditPlan
from clients.audit_result import AuditReport
from oml_core.errors import OMLInputError
from oml_mcp.listings import candidate_folders
from oml_mcp.paths import Workspace, shown
from oml_mcp.schemas import AuditInfo, AuditList, AuditResult
from oml_mcp.state_files import read_regular

MAX_DOC_BYTES = 16 << 20    # report.json lists every probed key's id: large for huge budgets
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
# the report figures a listing shows
_LISTED = {"verdict", "p_value", "matched", "total", "probes_done", "finished"}


def report_uri(audit_id: str) -> str:
    return f"oml://audits/{audit_id}/report"


def _file(ws: Workspace, folder: Path, name: str) -> bytes | None:
    path = folder / name
    return read_regular(path, MAX_DOC_BYTES) if ws.inside(path) else None


def _status_state(ws: Workspace, folder: Path) -> str | None:
    """status.json's state, if it is a string."""
    data = _file(ws, folder, "status.json")
    try:
        found = json.loads(data.decode("utf-8")) if data is not None else None
    except (ValueError, RecursionError):
        found = None
    state = found.get("state") if isinstance(found, dict) else None
    return state if isinstance(state, str) else None


def _plan(ws: Workspace, folder: Path) -> StoredAuditPlan | None:
    data = _file(ws, folder, "plan.json")
    try:
        plan = StoredAuditPlan.from_json(data) if data is not None else None
    except ValidationError:
        return None
    return plan if plan is not None and _ID.fullmatch(plan.audit_id) else None


def _report(ws: Workspace, folder: Path) -> AuditReport | None:
    """report.json as the report it was written from; None when missing or not one."""
    data = _file(ws, folder, "report.json")
    try:
        return AuditReport.model_validate_json(data, strict=True) if data is not None else None
    except ValidationError:
        return None


def _report_of(ws: Workspace, folder: Path, audit_id: str) -> AuditReport | None:
    report = _report(ws, folder)
    return report if report is not None and report.audit_id == audit_id else None


def check_id(audit_id: object) -> str:
    if not isinstance(audit_id, str) or not _ID.fullmatch(audit_id):
        raise OMLInputError(f"audit id {shown(str(audit_id))} is not a valid id (letters, digits, "
                            "'.', '_', '-'); list audits with list_audits")
    return audit_id


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def audit_folders(ws: Workspace, audits_dir: Path, job_dirs: list[str]
                  ) -> tuple[list[Path], list[str]]:
    """Audit folders (with a plan.json) in `audits_dir` and those audit jobs wrote elsewhere in
    the workspace, newest first, and one line per folder not read."""
    problems: list[str] = []
    candidates = candidate_folders(ws, audits_dir, "audits folder", job_dirs, problems)
    folders: set[Path] = set()
    for entry in candidates:
        if not (entry.is_dir() and os.path.lexists(entry / "plan.json")):
            continue
        if not ws.inside(entry) or not ws.inside(entry / "plan.json"):
            problems.append(f"audit folder {entry} leads outside the workspace; not read")
            continue
        folders.add(entry.resolve())
    return sorted(folders, key=_modified, reverse=True), problems


def audit_info(ws: Workspace, folder: Path, job_id: str | None) -> AuditInfo | None:
    plan = _plan(ws, folder)
    if plan is None:
        return None
    report = _report_of(ws, folder, plan.audit_id)
    figures = report.model_dump(include=_LISTED) if report is not None else {}
    return AuditInfo(
        audit_id=plan.audit_id, folder=str(folder), endpoint=plan.endpoint, model=plan.model,
        created=plan.created, state=_status_state(ws, folder), keys=len(plan.fingerprint_ids),
        probes_planned=plan.probes_planned, job_id=job_id,
        report_uri=report_uri(plan.audit_id) if report is not None else None, **figures)


def list_audits(ws: Workspace, audits_dir: Path, job_dirs: list[str], active: dict[str, str],
                limit: int) -> AuditList:
    """`active`: folder -> id of the job writing it now."""
    folders, problems = audit_folders(ws, audits_dir, job_dirs)
    found = []
    for folder in folders:
        info = audit_info(ws, folder, active.get(str(folder)))
        if info is None:
            problems.append(f"audit folder {folder}: its plan.json is no audit plan; not read")
        else:
            found.append(info)
    return AuditList(audits=found[:limit], truncated=len(found) > limit, problems=problems)


def find_audit(ws: Workspace, audits_dir: Path, job_dirs: list[str], audit_id: str) -> Path:
    check_id(audit_id)
    for folder in audit_folders(ws, audits_dir, job_dirs)[0]:
        plan = _plan(ws, folder)
        if plan is not None and plan.audit_id == audit_id:
            return folder
    raise OMLInputError(f"no audit {audit_id!r} in {audits_dir} or in a folder an audit job "
                        "wrote; list audits with list_audits")


def audit_result(ws: Workspace, folder: Path, job_id: str | None) -> AuditResult:
    """The headline of the last finished run of the audit in `folder`."""
    plan = _plan(ws, folder)
    audit_id = plan.audit_id if plan is not None else folder.name
    if job_id is not None:
        raise OMLInputError(f"audit {audit_id} is running (job {job_id}); poll job_status until "
                            "it is completed, then call audit_result")
    report = _report_of(ws, folder, audit_id)
    if report is None:
        raise OMLInputError(f"audit {audit_id} has no report yet (state "
                            f"{_status_state(ws, folder) or 'unknown'}); an interrupted or "
                            "aborted audit resumes when start_audit is called with the same "
                            "settings")
    return AuditResult.of(report, folder=str(folder), report_uri=report_uri(audit_id))


def _holds_keys(ws: Workspace, folder: Path) -> bool:
    """Whether the audit's reports may hold keys: its plan says --reveal-keys (or there is no
    plan to ask), or a run of it revealed them (or its report.json cannot tell)."""
    plan = _plan(ws, folder)
    if plan is None or plan.config.get("reveal_keys") is not False:
        return True
    report = _report(ws, folder)
    if report is None:
        return os.path.lexists(folder / "report.json")
    return report.revealed is not None


def report_text(ws: Workspace, folder: Path, max_bytes: int) -> str:
    """report.md of the audit in `folder`; refused where the audit wrote keys into it."""
    if _holds_keys(ws, folder):
        raise OMLInputError(f"the report in {folder} holds fingerprint keys (the audit ran with "
                            "--reveal-keys) or cannot be checked for them; it is not served over "
                            "MCP, read it on disk")
    path = folder / "report.md"
    data = read_regular(path, max_bytes) if ws.inside(path) else None
    if data is None:
        raise OMLInputError(f"{folder} has no readable report.md (no run of this audit has "
                            f"finished, or it is over {max_bytes // 1024} KiB)")
    return data.decode("utf-8", errors="replace")
