"""Files read and written without following a symlink or blocking on a planted FIFO.

The jobs folder lives in the workspace, and whatever can write there (a client through a tool,
anyone with access to the folder) can plant a link: a worker.log linked to /etc/passwd, a job
folder linked to another folder that then receives result.json. So a job folder is opened
once with O_NOFOLLOW | O_DIRECTORY and its files are opened relative to that descriptor, again
with O_NOFOLLOW: a link anywhere on that way is refused, even one swapped in after a check.
Writes go to a fresh temporary file in the same folder, then replace the target in one
rename (atomic, and a rename replaces a link itself, never what it points to).

Files the workspace owns (a run's status.json) may be links inside the workspace; the caller
confines those, and `read_regular` only makes sure it reads a regular file, a bounded amount.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

from oml_core.errors import OMLInputError

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
# O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC
MAX_STATE_BYTES = 1 << 20  # job records, results, status files are a few KiB


class LinkRefused(OMLInputError):
    """A symlink, or something that is not a plain file or folder, where the server keeps
    its own state."""


def _refusal(path: Path, expected: str) -> LinkRefused:
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        mode = 0
    if stat.S_ISLNK(mode):
        problem = ("is a symlink, and the server never follows links where it keeps its own "
                   "state; remove the link")
    else:
        problem = f"is not a {expected}; remove or rename it"
    return LinkRefused(f"{path} {problem}")


@contextlib.contextmanager
def open_folder(path: Path, parent: int | None = None) -> Iterator[int]:
    """A descriptor of folder `path` (a name inside folder descriptor `parent`, if given).

    FileNotFoundError if it does not exist; LinkRefused if it is a link or not a folder.
    """
    try:
        fd = os.open(path.name if parent is not None else path, _FOLDER_FLAGS, dir_fd=parent)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise _refusal(path, "folder") from None
        raise
    try:
        yield fd
    finally:
        os.close(fd)


def _read_fd(fd: int, path: Path, max_bytes: int, tail: bool) -> tuple[bytes, int]:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise _refusal(path, "plain file")
    size = info.st_size
    if tail and size > max_bytes:
        os.lseek(fd, size - max_bytes, os.SEEK_SET)
    chunks, left = [], max_bytes
    while left > 0:
        chunk = os.read(fd, min(left, 1 << 16))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks), size


def read_state(folder: int, folder_path: Path, name: str, max_bytes: int = MAX_STATE_BYTES,
               tail: bool = False) -> tuple[bytes, int] | None:
    """The bytes (the first, or with `tail` the last, `max_bytes`) and full size of file `name`
    in an open folder; None if it does not exist; LinkRefused if it is a link or no plain file."""
    path = folder_path / name
    try:
        fd = os.open(name, _READ_FLAGS, dir_fd=folder)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EMLINK, errno.ENXIO):
            raise _refusal(path, "plain file") from None
        raise
    try:
        return _read_fd(fd, path, max_bytes, tail)
    finally:
        os.close(fd)


def read_state_json(folder: int, folder_path: Path, name: str) -> object | None:
    """The JSON in file `name` of an open folder; None if missing, unreadable or not JSON."""
    try:
        found = read_state(folder, folder_path, name)
    except OSError:
        return None
    if found is None or found[1] > MAX_STATE_BYTES:
        return None
    return _json(found[0])


def state_exists(folder: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=folder, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def write_state_json(folder: int, name: str, data: object) -> None:
    """Write `data` as file `name` in an open folder, atomically, never through a link."""
    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    temporary = f".{name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC,
                 0o600, dir_fd=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=folder)
        raise


def create_log(folder: int, name: str) -> int:
    """A new, empty file `name` in an open folder, opened for appending (never a link)."""
    return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW
                   | _CLOEXEC, 0o600, dir_fd=folder)


def read_regular(path: Path, max_bytes: int = MAX_STATE_BYTES) -> bytes | None:
    """The bytes of regular file `path` (links followed: the caller confined it), or None if
    it is missing, no regular file, or larger than `max_bytes`."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _CLOEXEC)
    except OSError:
        return None
    try:
        data, size = _read_fd(fd, path, max_bytes, tail=False)
    except (OSError, LinkRefused):
        return None
    finally:
        os.close(fd)
    return data if size <= max_bytes else None


def _json(data: bytes) -> object | None:
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError):
        return None


def read_regular_json(path: Path) -> object | None:
    data = read_regular(path)
    return None if data is None else _json(data)
