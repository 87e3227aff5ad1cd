"""evidence.jsonl: one line per completed call, appended as it completes, fsync'd.

The log is the audit's memory. A line is written only when a call has finished (an answer or
a final error), so an interrupted audit (Ctrl-C, SIGKILL, power loss) loses at most the calls
in flight. On resume, probes whose latest line is an answer are skipped; probes whose latest
line is an error are tried again (the new line supersedes the old one). A crash in the middle
of a write leaves a torn last line: it is cut off before anything new is appended, so it can
never glue itself to the next record.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Self

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


class EvidenceLog:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = None

    def read(self) -> list[dict]:
        """Every intact record in order; a torn last line is dropped (and cut off the file)."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            log.warning("evidence log %s: dropping a torn last line (%d bytes) from an "
                        "interrupted write", self.path, len(data) - cut)
            with open(self.path, "r+b") as handle:
                handle.truncate(cut)
                handle.flush()
                os.fsync(handle.fileno())
            data = data[:cut]
        records = []
        for number, line in enumerate(data.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                log.warning("evidence log %s: line %d is not JSON; ignored", self.path, number)
                continue
            if isinstance(record, dict) and "probe" in record:
                records.append(record)
        return records

    def latest(self) -> dict[str, dict]:
        """The last record of each probe (a retried error is superseded by its rerun)."""
        return {record["probe"]: record for record in self.read()}

    def append(self, record: dict) -> None:
        line = json.dumps({"v": FORMAT_VERSION, **record}, ensure_ascii=False,
                          separators=(",", ":")) + "\n"
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        payload = line.encode("utf-8")
        written = 0
        while written < len(payload):
            written += os.write(self._fd, payload[written:])
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
