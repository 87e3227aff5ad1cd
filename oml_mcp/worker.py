"""The worker wrapper: run one command for a job and record how it ended.

    python -m oml_mcp.worker --job-dir DIR [--completed-codes 0,3] -- COMMAND...

The server starts this in a new session with stdout/stderr on DIR/worker.log. It runs the
command (an `oml ... --json` call) with the same log as stderr, captures the command's stdout
(its JSON summary), and when the command ends writes DIR/result.json atomically: state,
exit code, end time, the last log line as the reason on failure, and the summary (an exit code
in --completed-codes, default 0, means the command finished its work). Without
this wrapper a command that crashed or was killed would leave nothing saying so.

A cancel sends SIGTERM to the whole process group: the command stops at its next training
step (exit 143) while this wrapper only notes the request and waits to record the result.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from oml_mcp.jobs import read_log_line
from oml_mcp.state_files import open_folder, state_exists, write_state_json

log = logging.getLogger("oml_mcp.worker")
CANCEL_EXIT_CODES = (143, -signal.SIGTERM, 130, -signal.SIGINT)


def _parse_output(text: str) -> dict | None:
    """The command's --json summary (one JSON object on stdout), if it printed one."""
    text = text.strip()
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return {"unparsed_stdout_chars": len(text)}
    return data if isinstance(data, dict) else {"value": data}


def run(job_dir: Path, command: list[str], completed_codes: tuple[int, ...] = (0,)) -> int:
    # The folder is opened once, refusing a link, and the result is written relative to it:
    # a job folder swapped for a link while the command runs cannot redirect the result.
    with open_folder(job_dir) as folder:
        return _run(folder, job_dir, command, completed_codes)


def _run(folder: int, job_dir: Path, command: list[str], completed_codes: tuple[int, ...]) -> int:
    stop = {"requested": False}

    def note_stop(signum, _frame):
        # The command got the same signal (same process group) and winds down by itself;
        # dying here would lose the result.
        stop["requested"] = True
        log.info("worker: %s received; waiting for the command to stop", signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, note_stop)
    signal.signal(signal.SIGINT, note_stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the client's terminal going away is not a cancel

    log.info("worker: running %s", " ".join(command))
    try:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    except OSError as exc:
        code, output = 127, ""
        log.error("worker: cannot start the command (%s)", type(exc).__name__)
    else:
        output = child.stdout.read().decode("utf-8", errors="replace")
        code = child.wait()
    cancelled = stop["requested"] or state_exists(folder, "cancel_requested")
    if code in completed_codes:
        state, reason = "completed", None
    elif cancelled or code in CANCEL_EXIT_CODES:
        state, reason = "cancelled", "cancelled; the run folder is incomplete"
    else:
        state = "failed"
        reason = read_log_line(folder, job_dir) or f"the command exited with code {code}"
    log.info("worker: command ended with exit code %s (%s)", code, state)
    write_state_json(folder, "result.json", {
        "state": state, "exit_code": code, "reason": reason,
        "ended": datetime.now(UTC).isoformat(timespec="seconds"),
        "output": _parse_output(output), "recorded_by": "worker"})
    return 0 if state == "completed" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oml_mcp.worker")
    parser.add_argument("--job-dir", required=True, type=Path)
    parser.add_argument("--completed-codes", default="0", help="comma list of the command's exit "
                        "codes that mean it finished its work (default 0)")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given after --")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    try:
        completed = tuple(int(code) for code in args.completed_codes.split(","))
    except ValueError:
        parser.error("--completed-codes: use a comma list of integers")
    return run(args.job_dir, command, completed)


if __name__ == "__main__":
    sys.exit(main())
