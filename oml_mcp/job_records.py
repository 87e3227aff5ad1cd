"""The shape of a job's state files, checked before anything in them is used.

job.json, result.json and a run's status.json are files in the workspace: a tool output, a
hand edit or a planted file can give them any shape. A record of the wrong shape is reported
(one line naming the field), a malformed result counts as none, and progress keeps only the
values of the promised types, so no state file can crash a tool or smuggle in other types.
"""

from __future__ import annotations

FINAL_STATES = ("completed", "failed", "cancelled")
REASON_CHARS = 500


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _optional(value: object, check) -> bool:
    return value is None or check(value)


_RECORD_FIELDS = {  # field -> (check, what it must be)
    "kind": (lambda v: isinstance(v, str), "a string"),
    "created": (lambda v: isinstance(v, str), "a string"),
    "created_ts": (_is_number, "a number"),
    "pid": (lambda v: _optional(v, lambda p: _is_int(p) and p > 0), "a process id or null"),
    "pid_start": (lambda v: _optional(v, lambda t: _is_int(t) and t >= 0), "an integer or null"),
    "run_dir": (lambda v: _optional(v, lambda r: isinstance(r, str)), "a path or null"),
}


def record_problem(data: object, job_id: str) -> str | None:
    """Why `data` is not a job record the server wrote for job `job_id`, or None."""
    if not isinstance(data, dict):
        return "is not a job record (not a JSON object)"
    if data.get("job_id") != job_id:
        return "is not this job's record (its job_id differs)"
    for field, (check, shape) in _RECORD_FIELDS.items():
        if field not in data or not check(data[field]):
            return f"is malformed ({field} must be {shape})"
    return None


def valid_result(data: object) -> dict | None:
    """A result.json of the right shape, or None (missing or malformed count as no result)."""
    if not isinstance(data, dict) or data.get("state") not in FINAL_STATES:
        return None
    shapes = {"exit_code": _is_int, "reason": lambda v: isinstance(v, str),
              "ended": lambda v: isinstance(v, str), "output": lambda v: isinstance(v, dict)}
    if not all(_optional(data.get(k), check) for k, check in shapes.items()):
        return None
    reason = data.get("reason")
    return {**data, "reason": reason[:REASON_CHARS] if reason else reason}


def run_progress(data: object, created_ts: float) -> dict:
    """The training progress a run's status.json reports, keeping only well-typed values."""
    if not isinstance(data, dict) or not _is_number(data.get("updated", 0)):
        return {}
    if data.get("updated", 0) < created_ts:
        return {}  # left by an earlier attempt in the same run folder
    checks = {"state": lambda v: isinstance(v, str), "step": _is_int, "total_steps": _is_int,
              "loss": _is_number, "eta_s": _is_number}
    return {k: data.get(k) if _optional(data.get(k), check) else None
            for k, check in checks.items()}


def audit_progress(data: object, created_ts: float) -> dict:
    """How far an audit job is, from the progress.json `oml audit --progress-file` writes in
    its folder: probes answered of those planned (as step / total_steps) and the p-value of
    the answers so far, keeping only well-typed values."""
    if not isinstance(data, dict) or not _is_number(data.get("updated")):
        return {}
    if data["updated"] < created_ts:
        return {}  # left by an earlier run of the same audit
    done, planned = data.get("probes_done"), data.get("probes_planned")
    p_value, eta = data.get("p_value"), data.get("eta_s")
    return {"state": "probing", "step": done if _is_int(done) else None,
            "total_steps": planned if _is_int(planned) else None, "loss": None,
            "eta_s": eta if _is_number(eta) else None,
            "p_value": p_value if _is_number(p_value) and 0 <= p_value <= 1 else None}
