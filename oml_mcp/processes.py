"""Processes of background jobs: is one still running, and is it really the job's worker?

A job record names its worker's pid, but the record is a file in the workspace: a forged or
stale one can name any process of the user (an editor, a shell, another server). A pid alone
proves nothing, so a process counts as a job's worker only if it started at the recorded time
(clock ticks since boot, from /proc: a reused pid has another) and its command line is the
worker wrapper for that very job folder (`-m oml_mcp.worker --job-dir <folder>`). Only such a
process is ever signalled.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

WORKER_MODULE = "oml_mcp.worker"


def worker_command(job_dir: Path, completed_codes: tuple[int, ...] = (0,)) -> list[str]:
    """The wrapper's argv up to the `--` before the job's command; its job-dir is the marker
    `is_job_worker` looks for. `completed_codes`: the command's exit codes that mean it
    finished its work (an audit's 3, inconclusive, is a finished audit). (-P: the working
    folder, OML_HOME, is writable by tools and must not shadow our packages.)"""
    codes = [] if completed_codes == (0,) else [
        "--completed-codes", ",".join(map(str, completed_codes))]
    return [sys.executable, "-P", "-m", WORKER_MODULE, "--job-dir", str(job_dir), *codes, "--"]


def _is_pid(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


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
    """Whether process `pid` runs (and, given `start_ticks`, is the one that started then)."""
    if not _is_pid(pid):
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


def _has_marker(argv: list[str], job_dir: Path) -> bool:
    pairs = set(zip(argv, argv[1:], strict=False))
    return ("-m", WORKER_MODULE) in pairs and ("--job-dir", str(job_dir)) in pairs


def is_job_worker(pid: object, start_ticks: object, job_dir: Path) -> bool:
    """Whether `pid` is running the worker wrapper of `job_dir` and started at `start_ticks`."""
    if not _is_pid(pid) or pid == 1:
        return False
    if Path("/proc").is_dir():
        if not _is_pid(start_ticks) or process_start_ticks(pid) != start_ticks:
            return False
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        argv = raw.decode("utf-8", "surrogateescape").split("\0")
        # checked again: the pid may have been reused between the two reads
        return _has_marker(argv, job_dir) and process_start_ticks(pid) == start_ticks
    # no /proc (macOS): no start time was recorded; the command line is the whole proof
    try:
        shown = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True,
                               text=True, timeout=10, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return f" -m {WORKER_MODULE} --job-dir {job_dir} --" in shown


def group_has_live_member(pgid: int) -> bool:
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
