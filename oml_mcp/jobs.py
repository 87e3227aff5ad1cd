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

These folders sit in the workspace, so nothing in them is trusted: job folders and their
files are read and written without following links (state_files), a record of the wrong
shape is reported, never a crash, a run folder a record names is read only inside the
workspace, and a process is signalled only when it is proven to be the job's worker
(processes).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from oml_core.errors import OMLInputError
from oml_mcp.job_records import (
    FINAL_STATES,
    REASON_CHARS,
    audit_progress,
    record_problem,
    run_progress,
    valid_result,
)
from oml_mcp.processes import (  # is_alive, process_start_ticks: also used by the tests
    group_has_live_member,
    is_alive,  # noqa: F401
    is_job_worker,
    process_start_ticks,
    worker_command,
)
from oml_mcp.state_files import (
    LinkRefused,
    create_log,
    open_folder,
    read_regular_json,
    read_state,
    read_state_json,
    state_exists,
    write_state_json,
)

log = logging.getLogger(__name__)

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
STARTUP_GRACE_S = 30.0   # a job.json without a pid older than this never got its worker
LOG_LINE_BYTES = 8192    # how far back from its end a log is searched for its last line
_group_has_live_member = group_has_live_member  # the name the tests know


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def last_line(text: str) -> str | None:
    """The last non-empty line of a log's tail (progress bars use \\r, so split on that too)."""
    lines = [line.strip() for line in re.split(r"[\r\n]", text) if line.strip()]
    return lines[-1][:REASON_CHARS] if lines else None


def tail_text(data: bytes, size: int) -> str:
    """The end of a log as text, saying how much before it is not shown."""
    text = data.decode("utf-8", errors="replace")
    if size > len(data):
        text = f"[... {size - len(data)} earlier bytes not shown ...]\n" + text.split("\n", 1)[-1]
    return text


def read_log_line(folder: int, folder_path: Path) -> str | None:
    """The last line of an open job folder's worker.log (None if missing or refused)."""
    try:
        found = read_state(folder, folder_path, "worker.log", LOG_LINE_BYTES, tail=True)
    except (OSError, LinkRefused):
        return None
    return last_line(tail_text(*found)) if found else None


# --- the store --------------------------------------------------------------------------------

class NoJob(OMLInputError):
    """No job of that id (no folder, or a folder without job.json)."""


class JobStore:
    def __init__(self, root: Path, inside: Callable[[Path], bool] | None = None):
        """Jobs in folder `root`; `inside(path)` says whether a run folder a job record
        names may be read (by default none is)."""
        self.root = Path(root)
        self._inside = inside or (lambda path: False)
        # Popen objects of workers this server started, only to reap them (a finished child
        # stays a zombie until its parent waits); correctness never depends on them.
        self._children: dict[str, subprocess.Popen] = {}

    # folders
    def _check_id(self, job_id: str) -> None:
        if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id):
            raise OMLInputError(f"job id {job_id!r:.120} is not a valid job id (letters, digits, "
                                "'.', '_', '-'); list jobs with list_jobs")

    @contextlib.contextmanager
    def _root_folder(self) -> Iterator[int]:
        with contextlib.ExitStack() as stack:
            try:
                fd = stack.enter_context(open_folder(self.root))
            except FileNotFoundError:
                raise NoJob(f"no jobs in {self.root} yet; start one with "
                            "start_fingerprinting") from None
            yield fd

    @contextlib.contextmanager
    def _job_folder(self, job_id: str) -> Iterator[tuple[int, dict]]:
        """The open folder of job `job_id` and its validated record."""
        self._check_id(job_id)
        folder = self.root / job_id
        missing = NoJob(f"no job {job_id!r} in {self.root}; list jobs with list_jobs")
        with contextlib.ExitStack() as stack:
            try:
                root = stack.enter_context(self._root_folder())
                fd = stack.enter_context(open_folder(folder, parent=root))
            except (NoJob, FileNotFoundError):
                raise missing from None
            data = read_state_json(fd, folder, "job.json")
            if data is None and not state_exists(fd, "job.json"):
                raise missing
            problem = record_problem(data, job_id)
            if problem:
                raise OMLInputError(f"job {job_id}: its job.json {problem}; remove the folder "
                                    f"{folder} if it is no job of this server")
            yield fd, data

    def log_tail(self, job_id: str, max_bytes: int) -> str:
        with self._job_folder(job_id) as (fd, _):
            found = read_state(fd, self.root / job_id, "worker.log", max_bytes, tail=True)
        return tail_text(*found) if found else ""

    # start
    def start(self, kind: str, command: list[str], *, args: dict, run_dir: str | None,
              env: dict[str, str], cwd: Path, completed_codes: tuple[int, ...] = (0,)) -> dict:
        """Start `command` (argv of the real work) under the worker wrapper; return its status.
        `completed_codes`: its exit codes that mean it finished (see the worker)."""
        with contextlib.suppress(FileExistsError):  # a link there is refused just below
            self.root.mkdir(parents=True)
        job_id = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        folder = self.root / job_id
        with self._root_folder() as root:
            os.mkdir(job_id, 0o755, dir_fd=root)
            with open_folder(folder, parent=root) as fd:
                record = {"job_id": job_id, "kind": kind, "created": _now_iso(),
                          "created_ts": time.time(), "args": args, "run_dir": run_dir,
                          "command": command, "pid": None, "pid_start": None,
                          "server_pid": os.getpid()}
                write_state_json(fd, "job.json", record)
                log_fd = create_log(fd, "worker.log")
                try:
                    proc = subprocess.Popen([*worker_command(folder, completed_codes), *command],
                                            stdin=subprocess.DEVNULL, stdout=log_fd,
                                            stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                            start_new_session=True, close_fds=True)
                finally:
                    os.close(log_fd)
                self._children[job_id] = proc
                record.update(pid=proc.pid, pid_start=process_start_ticks(proc.pid))
                write_state_json(fd, "job.json", record)
        log.info("job %s started: worker pid %s", job_id, proc.pid)
        return self.status(job_id)

    # read
    def _reap(self, job_id: str) -> None:
        proc = self._children.get(job_id)
        if proc is not None and proc.poll() is not None:
            del self._children[job_id]

    def _worker_running(self, record: dict) -> bool:
        return is_job_worker(record["pid"], record["pid_start"], self.root / record["job_id"])

    def _recorded_result(self, fd: int, record: dict) -> dict | None:
        """result.json if it is a result; a link or a malformed file counts as none (the
        result the server then records replaces it)."""
        try:
            data = read_state_json(fd, self.root / record["job_id"], "result.json")
        except LinkRefused:
            return None
        return valid_result(data)

    def _result(self, fd: int, record: dict) -> dict | None:
        """result.json, or (worker gone without one) a result recorded now, or None if running."""
        result = self._recorded_result(fd, record)
        if result is not None:
            return result
        self._reap(record["job_id"])
        if self._worker_running(record):
            return None
        if record["pid"] is None and time.time() - record["created_ts"] < STARTUP_GRACE_S:
            return None  # the server is between writing job.json and starting the worker
        result = self._recorded_result(fd, record)  # it may have finished just now
        if result is not None:
            return result
        if state_exists(fd, "cancel_requested"):
            state = "cancelled"
            reason = "cancelled; the worker was stopped before it recorded a result"
        else:
            last = read_log_line(fd, self.root / record["job_id"])
            state = "failed"
            reason = ("worker died (no result recorded): it was killed, crashed hard or the "
                      "machine restarted" + (f"; last log line: {last}" if last else ""))
        result = {"state": state, "exit_code": None, "ended": _now_iso(),
                  "reason": reason[:REASON_CHARS], "output": None, "recorded_by": "server"}
        write_state_json(fd, "result.json", result)
        return result

    def _run_status(self, record: dict) -> dict:
        """Progress from the folder the job writes (a run's status.json, an audit's
        progress.json), if that folder is in the workspace."""
        if not record["run_dir"]:
            return {}
        name, reader = (("progress.json", audit_progress) if record["kind"] == "audit"
                        else ("status.json", run_progress))
        path = Path(record["run_dir"]) / name
        if not path.is_absolute() or not self._inside(path):
            return {}
        return reader(read_regular_json(path), record["created_ts"])

    def status(self, job_id: str) -> dict:
        with self._job_folder(job_id) as (fd, record):
            status = {"job_id": job_id, "kind": record["kind"], "created": record["created"],
                      "run_dir": record["run_dir"], "pid": record["pid"],
                      "log_uri": f"oml://jobs/{job_id}/log"}
            run_status = self._run_status(record)
            if run_status:
                status.update(phase=run_status["state"], step=run_status["step"],
                              total_steps=run_status["total_steps"], loss=run_status["loss"],
                              eta_s=run_status["eta_s"], p_value=run_status.get("p_value"))
            result = self._result(fd, record)
        if result is None:  # training has begun once the run reports a phase past "starting"
            phase = run_status.get("state")
            status["state"] = "starting" if phase in (None, "starting") else "running"
        else:
            status.update(state=result["state"], ended=result.get("ended"),
                          exit_code=result.get("exit_code"), reason=result.get("reason"),
                          eta_s=None)
        return status

    def list(self, limit: int) -> tuple[list[dict], int, list[str]]:
        """Up to `limit` job statuses (newest first), how many jobs there are, and one line
        per folder in the jobs folder that is no readable job (a link, a malformed record)."""
        try:
            with self._root_folder() as root:
                names = sorted(os.listdir(root))
        except NoJob:
            return [], 0, []
        except LinkRefused as exc:
            return [], 0, [str(exc)]
        created, problems = {}, []
        for name in names:
            if not _JOB_ID.fullmatch(name):
                continue  # not a name the server gives a job (a temporary file, a stray entry)
            try:
                with self._job_folder(name) as (_, record):
                    created[name] = record["created_ts"]
            except NoJob:
                continue  # a folder without job.json is no job
            except OMLInputError as exc:
                problems.append(f"job {name}: {exc}" if isinstance(exc, LinkRefused) else str(exc))
        newest = sorted(created, key=created.get, reverse=True)
        found = []
        for name in newest[:limit]:
            try:
                found.append(self.status(name))
            except OMLInputError as exc:  # changed since it was listed
                problems.append(str(exc))
        return found, len(created), problems

    def result(self, job_id: str) -> dict:
        with self._job_folder(job_id) as (fd, record):
            result = self._result(fd, record)
        if result is None:
            now = self.status(job_id)
            progress = (f", step {now.get('step')}/{now.get('total_steps')}"
                        if now.get("step") is not None else "")
            raise OMLInputError(f"job {job_id} has not finished (state {now['state']}{progress}); "
                                "poll job_status until it is completed, failed or cancelled")
        return {"job_id": job_id, "state": result["state"], "exit_code": result.get("exit_code"),
                "reason": result.get("reason"), "run_dir": record["run_dir"],
                "output": result.get("output")}

    def active_run_dirs(self) -> dict[str, str]:
        """run folder -> job id, for jobs still starting or running."""
        jobs, _, _ = self.list(limit=10_000)
        return {j["run_dir"]: j["job_id"] for j in jobs
                if j["state"] not in FINAL_STATES and j.get("run_dir")}

    # cancel
    def cancel(self, job_id: str, grace_s: float) -> dict:
        """SIGTERM the worker's process group, SIGKILL it after `grace_s`; wait until it is gone.

        Only a process proven to be this job's worker is signalled (is_job_worker): a pid in
        a forged or stale job.json alone never is.
        """
        with self._job_folder(job_id) as (fd, record):
            if self._result(fd, record) is not None:
                state = self.status(job_id)["state"]
                return {"job_id": job_id, "state": state, "was_running": False, "signal": None,
                        "message": f"job {job_id} had already ended ({state}); nothing to cancel"}
            write_state_json(fd, "cancel_requested", {"requested": _now_iso()})
        pid, sent = record["pid"], None
        if self._worker_running(record):
            # start_new_session made the worker its group's leader: pgid == pid, and the
            # training command (and any launcher ranks) inherited that group.
            sent = self._signal_worker(pid, signal.SIGTERM)
            if not self._wait_gone(record, grace_s):
                sent = self._signal_worker(pid, signal.SIGKILL) or sent
                self._wait_gone(record, 10.0)
            if sent:
                self._wait_group_gone(pid, 10.0)
        status = self.status(job_id)
        kept = ("the audit folder keeps every answer so far (start_audit with the same settings "
                "resumes it)" if record["kind"] == "audit" else "the run folder stays "
                "incomplete (starting the same run again restarts it)")
        return {"job_id": job_id, "state": status["state"], "was_running": True, "signal": sent,
                "message": f"job {job_id} stopped ({status['state']}); {kept}"}

    @staticmethod
    def _signal_worker(pid: int, sig: signal.Signals) -> str | None:
        """Signal the worker's process group (or only the worker, if it leads none)."""
        try:
            if os.getpgid(pid) == pid:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            return None
        return sig.name

    def _wait_gone(self, record: dict, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._reap(record["job_id"])
            if not self._worker_running(record):
                return True
            time.sleep(0.1)
        return False

    @staticmethod
    def _wait_group_gone(pgid: int, timeout: float) -> None:
        """Children of the worker may outlive it by a moment; make sure its group is empty.
        (Called only for a group whose leader was proven to be the job's worker.)"""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except (ProcessLookupError, PermissionError):
                return
            if not group_has_live_member(pgid):
                return
            time.sleep(0.1)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
