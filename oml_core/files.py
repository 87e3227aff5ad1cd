"""Atomic file writes and the OML home folder.

Every file that matters is written to a temporary sibling and renamed into place, so a crash
or Ctrl-C never leaves a half-written fingerprint set, manifest or report behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def oml_home() -> Path:
    """Cache and workspace folder: `$OML_HOME`, default `~/.cache/oml`."""
    return Path(os.environ.get("OML_HOME") or Path.home() / ".cache" / "oml").expanduser()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def remove_tree(path: str | os.PathLike) -> None:
    """Remove the folder at `path`, or the link if `path` is a symlink: never what a link
    points to, and never silently leave a planted link in place for the next write to follow
    (shutil.rmtree refuses links, and ignore_errors would hide that)."""
    import shutil

    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
