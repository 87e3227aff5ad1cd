"""What list_audits, audit_result and the audit report resource read from audit folders.

An audit folder (clients/audit.py) holds plan.json (format "oml-audit-plan": the audit id,
endpoint, model, the keys' fingerprint ids), status.json, evidence.jsonl, and once a run of
the audit ends report.json / report.md / report.html; an MCP audit job adds progress.json.
Like run folders (listings), these are workspace contents: a folder is confined before it is
read (a link out is reported, never followed), only regular files are read, and each field
is kept only if it has the type the result promises. Only headlines are returned: never the
evidence, an answer, or the list of fingerprint ids. An audit run with --reveal-keys (the
CLI's option; the MCP tool has none) wrote keys into its reports, so its report resource is
refused.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from oml_core.errors import OMLInputError
from oml_mcp.listings import candidate_folders
from oml_mcp.paths import Workspace, shown
from clients.audit_result import AuditLayer
from oml_mcp.schemas import AuditInfo, AuditList, AuditResult
from oml_mcp.state_files import read_regular

PLAN_FORMAT = "oml-audit-plan"
MAX_DOC_BYTES = 16 << 20    # report.json lists every probed key's id: large for huge budgets
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")


def report_uri(audit_id: str) -> str:
    return f"oml://audits/{audit_id}/report"


def _typed(value: object, *types: type) -> object:
    if isinstance(value, bool) and bool not in types:
        return None
    return value if isinstance(value, types) else None


def _doc(ws: Workspace, folder: Path, name: str) -> dict:
    path = folder / name
    data = read_regular(path, MAX_DOC_BYTES) if ws.inside(path) else None
    try:
        found = json.loads(data.decode("utf-8")) if data is not None else None
    except (ValueError, RecursionError):
        found = None
    return found if isinstance(found, dict) else {}


def _plan(ws: Workspace, folder: Path) -> dict | None:
    plan = _doc(ws, folder, "plan.json")
    ok = plan.get("format") == PLAN_FORMAT and isinstance(plan.get("audit_id"), str)
    return plan if ok and _ID.fullmatch(plan["audit_id"]) else None


def _revealed(plan: dict, report: dict) -> bool:
    config = _typed(plan.get("config"), dict) or {}
    return config.get("reveal_keys") is not False or "revealed" in report


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
    status, report = _doc(ws, folder, "status.json"), _doc(ws, folder, "report.json")
    number = (int, float)
    has_report = bool(report) and report.get("audit_id") == plan["audit_id"]
    report = report if has_report else {}
    return AuditInfo(
        audit_id=plan["audit_id"], folder=str(folder), endpoint=_typed(plan.get("endpoint"), str),
        model=_typed(plan.get("model"), str), created=_typed(plan.get("created"), str),
        state=_typed(status.get("state"), str), verdict=_typed(report.get("verdict"), str),
        p_value=_typed(report.get("p_value"), *number), matched=_typed(report.get("matched"), int),
        total=_typed(report.get("total"), int),
        keys=len(ids) if isinstance(ids := plan.get("fingerprint_ids"), list) else None,
        probes_planned=_typed(plan.get("probes_planned"), int),
        probes_done=_typed(report.get("probes_done"), int),
        finished=_typed(report.get("finished"), str), job_id=job_id,
        report_uri=report_uri(plan["audit_id"]) if has_report else None)


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
        if plan is not None and plan["audit_id"] == audit_id:
            return folder
    raise OMLInputError(f"no audit {audit_id!r} in {audits_dir} or in a folder an audit job "
                        "wrote; list audits with list_audits")


def audit_result(ws: Workspace, folder: Path, job_id: str | None) -> AuditResult:
    """The headline of the last finished run of the audit in `folder`."""
    plan = _plan(ws, folder) or {}
    audit_id = plan.get("audit_id") or folder.name
    status, report = _doc(ws, folder, "status.json"), _doc(ws, folder, "report.json")
    state = _typed(status.get("state"), str)
    if job_id is not None:
        raise OMLInputError(f"audit {audit_id} is running (job {job_id}); poll job_status until "
                            "it is completed, then call audit_result")
    if not report or report.get("audit_id") != audit_id or not isinstance(
            report.get("verdict"), str):
        raise OMLInputError(f"audit {audit_id} has no report yet (state {state or 'unknown'}); "
                            "an interrupted or aborted audit resumes when start_audit is called "
                            "with the same settings")
    number = (int, float)
    decision = _typed(report.get("decision"), dict) or {}
    tests = _typed(decision.get("tests"), dict) or {}
    layers = {}
    for name, row in (_typed(report.get("layers"), dict) or {}).items():
        if not isinstance(row, dict) or not isinstance(name, str):
            continue
        test = tests.get(name)
        layers[name] = AuditLayer(
            **{k: _typed(row.get(k), int)
               for k in ("matched", "total", "hits", "probes", "errors")},
            p_value=_typed(test.get("p_value"), *number) if isinstance(test, dict) else None)
    errors = _typed(report.get("errors_by_kind"), dict) or {}
    reports = _typed(report.get("reports"), dict) or {}
    return AuditResult(
        audit_id=audit_id, folder=str(folder), state=_typed(report.get("state"), str),
        verdict=report["verdict"], p_value=_typed(report.get("p_value"), *number),
        alpha=_typed(report.get("alpha"), *number), matched=_typed(report.get("matched"), int),
        total=_typed(report.get("total"), int),
        deciding_test=_typed(decision.get("deciding_test"), str), layers=layers,
        endpoint=_typed(report.get("endpoint"), str), model=_typed(report.get("model"), str),
        keys_probed=_typed(report.get("keys_probed"), int),
        probes_planned=_typed(report.get("probes_planned"), int),
        probes_done=_typed(report.get("probes_done"), int),
        probes_failed=_typed(report.get("probes_failed"), int),
        pending=_typed(report.get("pending"), int),
        errors_by_kind={k: v for k, v in errors.items()
                        if isinstance(k, str) and _typed(v, int) is not None},
        notes=[n for n in _typed(report.get("notes"), list) or [] if isinstance(n, str)],
        verdict_words=_typed(report.get("verdict_words"), str),
        finished=_typed(report.get("finished"), str),
        reports={k: v for k, v in reports.items() if isinstance(k, str) and isinstance(v, str)},
        report_uri=report_uri(audit_id))


def report_text(ws: Workspace, folder: Path, max_bytes: int) -> str:
    """report.md of the audit in `folder`; refused where the audit wrote keys into it."""
    plan, report = _plan(ws, folder) or {}, _doc(ws, folder, "report.json")
    if _revealed(plan, report):
        raise OMLInputError(f"the report in {folder} holds fingerprint keys (the audit ran with "
                            "--reveal-keys); it is not served over MCP, read it on disk")
    path = folder / "report.md"
    data = read_regular(path, max_bytes) if ws.inside(path) else None
    if data is None:
        raise OMLInputError(f"{folder} has no readable report.md (no run of this audit has "
                            f"finished, or it is over {max_bytes // 1024} KiB)")
    return data.decode("utf-8", errors="replace")
