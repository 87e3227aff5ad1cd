"""Long jobs as detached worker processes whose whole state lives on disk.

Fine-tuning takes minutes to hours and MCP clients time out after about a minute, so a tool
only starts the work and returns a job id. Each job is a folder `$OML_HOME/jobs/<job_id>/`:

  job.json          what was started (kind, settings without secrets, run folder), the
                    worker's pid and its start time from /proc (a reused pid has another one)
  worker.log        stdout + stderr of the worker and of the command it runs
  cancel_requested  written before a cancel signals the worker
  result.json       written atomically when the command ended (exit code, state, reason, the
                    command's JSON summary)

The worker (oml_mcp.worker) is started in its own session, so it survives the server and a
cancel can signal its whole process group. Nothing is kept only in memory: a restarted
server reads the same folders, and a worker that is gone without a result is reported failed,
never "running" forever.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from oml_core.errors import OMLInputError
from oml_core.files import atomic_write_json

log = logging.getLogger(__name__)

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
FINAL_STATES = ("completed", "failed", "cancelled")
STARTUP_GRACE_S = 30.0   # a job.json without a pid older than this never got its worker
REASON_CHARS = 500


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --- processes --------------------------------------------------------------------------------

def process_start_ticks(pid: int) -> int | None:
    """Start time of a live process (clock ticks since boot), None if gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may contain spaces
    if fields[0] in ("Z", "X"):  # exited, waiting to be reaped: not running anything
        return None
    return int(fields[19])  # field 22 of proc(5), counted from field 3


def is_alive(pid: int | None, start_ticks: int | None) -> bool:
    if not pid:
        return False
    if Path("/proc").is_dir():
        ticks = process_start_ticks(pid)
        return ticks is not None and (start_ticks is None or ticks == start_ticks)
    try:  # no /proc (macOS): best effort
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def last_line(path: Path, limit: int = 8192) -> str | None:
    """The last non-empty line of a log (progress bars use \\r, so split on that too)."""
    tail = read_tail(path, limit)
    lines = [line.strip() for line in re.split(r"[\r\n]", tail) if line.strip()]
    return lines[-1][:REASON_CHARS] if lines else None


def read_tail(path: Path, max_bytes: int) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - max_bytes))
            data = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    if size > max_bytes:
        data = f"[... {size - max_bytes} earlier bytes not shown ...]\n" + data.split("\n", 1)[-1]
    return data


# --- the store --------------------------------------------------------------------------------

class JobStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        # Popen objects of workers this server started, only to reap them (a finished child
        # stays a zombie until its parent waits); correctness never depends on them.
        self._children: dict[str, subprocess.Popen] = {}

    # paths
    def folder(self, job_id: str) -> Path:
        if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
            raise OMLInputError(f"job id {job_id!r} is not a valid job id (letters, digits, "
                                "'.', '_', '-'); list jobs with list_jobs")
        folder = self.root / job_id
        if not (folder / "job.json").is_file():
            raise OMLInputError(f"no job {job_id!r} in {self.root}; list jobs with list_jobs")
        return folder

    def log_path(self, job_id: str) -> Path:
        return self.folder(job_id) / "worker.log"

    # start
    def start(self, kind: str, command: list[str], *, args: dict, run_dir: str | None,
              env: dict[str, str], cwd: Path) -> dict:
        """Start `command` (argv of the real work) under the worker wrapper; return its status."""
        self.root.mkdir(parents=True, exist_ok=True)
        job_id = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        folder = self.root / job_id
        folder.mkdir()
        record = {"job_id": job_id, "kind": kind, "created": _now_iso(),
                  "created_ts": time.time(), "args": args, "run_dir": run_dir,
                  "command": command, "pid": None, "pid_start": None,
                  "server_pid": os.getpid()}
        atomic_write_json(folder / "job.json", record)
        # -P: the working folder (OML_HOME, user-writable) must not shadow our packages
        wrapper = [sys.executable, "-P", "-m", "oml_mcp.worker", "--job-dir", str(folder), "--",
                   *command]
        with open(folder / "worker.log", "ab") as log_file:
            proc = subprocess.Popen(wrapper, stdin=subprocess.DEVNULL, stdout=log_file,
                                    stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                    start_new_session=True, close_fds=True)
        self._children[job_id] = proc
        record.update(pid=proc.pid, pid_start=process_start_ticks(proc.pid))
        atomic_write_json(folder / "job.json", record)
        log.info("job %s started: worker pid %s", job_id, proc.pid)
        return self.status(job_id)

    # read
    def _reap(self, job_id: str) -> None:
        proc = self._children.get(job_id)
        if proc is not None and proc.poll() is not None:
            del self._children[job_id]

    def _result(self, folder: Path, record: dict) -> dict | None:
        """result.json, or (worker gone without one) a result recorded now, or None if running."""
        result = _read_json(folder / "result.json")
        if result is not None:
            return result
        self._reap(record["job_id"])
        if is_alive(record.get("pid"), record.get("pid_start")):
            return None
        if record.get("pid") is None and time.time() - record.get("created_ts", 0) < STARTUP_GRACE_S:
            return None  # the server is between writing job.json and starting the worker
        result = _read_json(folder / "result.json")  # it may have finished just now
        if result is not None:
            return result
        if (folder / "cancel_requested").exists():
            state, reason = "cancelled", "cancelled; the worker was stopped before it recorded a result"
        else:
            last = last_line(folder / "worker.log")
            state = "failed"
            reason = ("worker died (no result recorded): it was killed, crashed hard or the "
                      "machine restarted" + (f"; last log line: {last}" if last else ""))
        result = {"state": state, "exit_code": None, "ended": _now_iso(), "reason": reason,
                  "output": None, "recorded_by": "server"}
        atomic_write_json(folder / "result.json", result)
        return result

    def status(self, job_id: str) -> dict:
        folder = self.folder(job_id)
        record = _read_json(folder / "job.json") or {}
        record.setdefault("job_id", job_id)
        status = {"job_id": job_id, "kind": record.get("kind", "unknown"),
                  "created": record.get("created", ""), "run_dir": record.get("run_dir"),
                  "pid": record.get("pid"), "log_uri": f"oml://jobs/{job_id}/log"}
        run_status = _read_json(Path(record["run_dir"]) / "status.json") if record.get("run_dir") else None
        if run_status and run_status.get("updated", 0) < record.get("created_ts", 0):
            run_status = None  # left by an earlier attempt in the same run folder
        if run_status:
            status.update(phase=run_status.get("state"), step=run_status.get("step"),
                          total_steps=run_status.get("total_steps"), loss=run_status.get("loss"),
                          eta_s=run_status.get("eta_s"))
        result = self._result(folder, record)
        if result is None:  # training has begun once the run reports a phase past "starting"
            phase = (run_status or {}).get("state")
            status["state"] = "starting" if phase in (None, "starting") else "running"
        else:
            status.update(state=result["state"], ended=result.get("ended"),
                          exit_code=result.get("exit_code"), reason=result.get("reason"),
                          eta_s=None)
        return status

    def list(self, limit: int) -> tuple[list[dict], int]:
        if not self.root.is_dir():
            return [], 0
        folders = [p for p in self.root.iterdir() if (p / "job.json").is_file()]
        folders.sort(key=lambda p: (_read_json(p / "job.json") or {}).get("created_ts", 0),
                     reverse=True)
        return [self.status(p.name) for p in folders[:limit]], len(folders)

    def result(self, job_id: str) -> dict:
        folder = self.folder(job_id)
        record = _read_json(folder / "job.json") or {}
        record.setdefault("job_id", job_id)
        result = self._result(folder, record)
        if result is None:
            now = self.status(job_id)
            progress = (f", step {now.get('step')}/{now.get('total_steps')}"
                        if now.get("step") is not None else "")
            raise OMLInputError(f"job {job_id} has not finished (state {now['state']}{progress}); "
                                "poll job_status until it is completed, failed or cancelled")
        return {"job_id": job_id, "state": result["state"], "exit_code": result.get("exit_code"),
                "reason": result.get("reason"), "run_dir": record.get("run_dir"),
                "output": result.get("output")}

    def active_run_dirs(self) -> dict[str, str]:
        """run folder -> job id, for jobs still starting or running."""
        jobs, _ = self.list(limit=10_000)
        return {j["run_dir"]: j["job_id"] for j in jobs
                if j["state"] not in FINAL_STATES and j.get("run_dir")}

    # cancel
    def cancel(self, job_id: str, grace_s: float) -> dict:
        """SIGTERM the worker's process group, SIGKILL it after `grace_s`; wait until it is gone."""
        folder = self.folder(job_id)
        record = _read_json(folder / "job.json") or {}
        record.setdefault("job_id", job_id)
        if self._result(folder, record) is not None:
            state = self.status(job_id)["state"]
            return {"job_id": job_id, "state": state, "was_running": False, "signal": None,
                    "message": f"job {job_id} had already ended ({state}); nothing to cancel"}
        atomic_write_json(folder / "cancel_requested", {"requested": _now_iso()})
        pid, start = record.get("pid"), record.get("pid_start")
        sent = None
        if is_alive(pid, start):
            # start_new_session made the worker its group's leader: pgid == pid, and the
            # training command (and any launcher ranks) inherited that group.
            sent = self._signal_group(pid, signal.SIGTERM)
            if not self._wait_gone(job_id, pid, start, grace_s):
                sent = self._signal_group(pid, signal.SIGKILL) or sent
                self._wait_gone(job_id, pid, start, 10.0)
        self._wait_group_gone(pid, 10.0)
        status = self.status(job_id)
        return {"job_id": job_id, "state": status["state"], "was_running": True, "signal": sent,
                "message": f"job {job_id} stopped ({status['state']}); the run folder stays "
                           "incomplete (starting the same run again restarts it)"}

    @staticmethod
    def _signal_group(pid: int, sig: signal.Signals) -> str | None:
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return None
        return sig.name

    def _wait_gone(self, job_id: str, pid: int, start: int | None, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._reap(job_id)
            if not is_alive(pid, start):
                return True
            time.sleep(0.1)
        return False

    @staticmethod
    def _wait_group_gone(pgid: int | None, timeout: float) -> None:
        """Children of the worker may outlive it by a moment; make sure the group is empty."""
        if not pgid:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                return
            if not _group_has_live_member(pgid):
                return
            time.sleep(0.1)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _group_has_live_member(pgid: int) -> bool:
    """True if a non-zombie process is in group `pgid` (zombies answer killpg(.., 0) too)."""
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False
