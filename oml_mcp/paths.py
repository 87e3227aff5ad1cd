"""Workspace confinement: every path a tool receives must land inside OML_HOME or a root.

An assistant passes paths it was told or guessed; a prompt-injected one may try `../..`,
`/etc/...` or a symlink planted in the workspace. So each path is taken relative to
OML_HOME when relative, refused when it has a `..` part, resolved through symlinks, and
accepted only if the resolved place is inside one of the allowed folders. Errors name the
problem and the allowed folders, so the model can correct itself.

Paths the server makes itself (default outputs, run folders named in job records, entries of
a listed folder) go through the same check: the workspace's contents are no more trusted
than the client. Tool outputs never land in the server's own folders (RESERVED_FOLDERS).
"""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from oml_core.errors import OMLInputError
from oml_core.files import oml_home

ROOTS_ENV = "OML_MCP_ROOTS"
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
_BUNDLED = ("bundled", "SmolLM2-135M-Instruct")
# job records, logs and results (jobs/), the converted bundled model (models/): a tool output
# written there would break the server or every later default-model call
RESERVED_FOLDERS = ("jobs", "models")
MAX_PATH_CHARS = 1024   # far above any real workspace path, far below PATH_MAX (4096)
MAX_NAME_BYTES = 255    # one file or folder name (NAME_MAX on Linux and macOS)
_SHOWN_CHARS = 80       # how much of a refused value an error message quotes


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def shown(value: str) -> str:
    """`value` for an error message: quoted, escaped, and cut so the message stays one line."""
    if len(value) <= _SHOWN_CHARS:
        return repr(value)
    return f"{value[:_SHOWN_CHARS]!r}... ({len(value)} characters)"


def name_problem(value: str) -> str | None:
    """Why `value` cannot be a path name (control characters, too long), or None."""
    if any(unicodedata.category(ch) in ("Cc", "Zl", "Zp") for ch in value):
        # a newline, escape sequence or Unicode line break in a file name forges lines in
        # logs and listings
        return "contains a control character (newline, tab, escape, ...); use a plain name"
    if len(value) > MAX_PATH_CHARS:
        return (f"is too long ({len(value)} characters, at most {MAX_PATH_CHARS}); use a "
                "shorter path")
    longest = max((len(part.encode("utf-8", "surrogateescape")) for part in value.split("/")),
                  default=0)
    if longest > MAX_NAME_BYTES:
        return (f"has a name that is too long ({longest} bytes, at most {MAX_NAME_BYTES} per "
                "file or folder name); use a shorter name")
    return None


@dataclass(frozen=True)
class Workspace:
    home: Path                 # OML_HOME, resolved: jobs, runs, fingerprint sets, reports
    roots: tuple[Path, ...]    # further folders the user allowed (--root, OML_MCP_ROOTS)

    @classmethod
    def from_env(cls, extra_roots: list[str] | tuple[str, ...] = ()) -> Workspace:
        home = oml_home()
        home.mkdir(parents=True, exist_ok=True)
        named = [r for r in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if r.strip()]
        roots = []
        for raw in [*named, *extra_roots]:
            root = Path(raw).expanduser()
            if not root.is_dir():
                raise OMLInputError(f"workspace root {raw!r} is not an existing folder; fix "
                                    f"--root or {ROOTS_ENV}")
            roots.append(root.resolve())
        return cls(home.resolve(), tuple(dict.fromkeys(roots)))

    @property
    def allowed(self) -> tuple[Path, ...]:
        return (self.home, *self.roots)

    def describe(self) -> str:
        return ", ".join(str(p) for p in self.allowed)

    def _refuse(self, what: str, value: str, problem: str) -> OMLInputError:
        return OMLInputError(f"{what} {shown(value)} {problem}; allowed folders: {self.describe()} "
                             f"(relative paths start at {self.home}; add folders with --root or "
                             f"{ROOTS_ENV})")

    def path(self, value: str, what: str = "path") -> Path:
        """The resolved path for `value`, or OMLInputError saying why it is refused."""
        if not isinstance(value, str) or not value.strip():
            raise OMLInputError(f"{what} is empty; pass a file or folder path")
        problem = name_problem(value)
        if problem:
            raise OMLInputError(f"{what} {shown(value)} {problem}")
        raw = Path(value).expanduser()
        if ".." in raw.parts:
            raise self._refuse(what, value, "contains '..'")
        candidate = raw if raw.is_absolute() else self.home / raw
        # Judge the literal place first, so the message can tell "outside" from "a symlink
        # that leads outside" (the second is the one a planted link produces).
        literal = Path(os.path.abspath(candidate))
        literal_inside = any(_inside(literal, root) for root in self.allowed)
        try:
            resolved = candidate.resolve()
        except (OSError, RuntimeError) as exc:  # a link loop, or a name the system refuses
            raise OMLInputError(f"{what} {shown(value)} cannot be resolved "
                                f"({type(exc).__name__}); pass another path") from None
        if any(_inside(resolved, root) for root in self.allowed):
            if resolved.exists() and not (resolved.is_file() or resolved.is_dir()):
                # reading a FIFO would hang the tool; a socket or device is no OML file either
                raise OMLInputError(f"{what} {shown(value)} is a FIFO, socket or device, not a "
                                    "file or folder; pass a regular file or folder")
            return resolved
        if literal_inside:
            raise self._refuse(what, value, f"leads outside the workspace through a symlink "
                                             f"(it resolves to {resolved})")
        raise self._refuse(what, value, "is outside the workspace")

    def optional_path(self, value: str | None, what: str) -> Path | None:
        return None if value is None else self.path(value, what)

    def output(self, value: str | os.PathLike, what: str) -> Path:
        """A place a tool writes: a confined path outside the server's own folders."""
        path = self.path(str(value), what)
        if _inside(path, self.home) and path != self.home:
            # casefolded: on a case-insensitive disk (macOS) `JOBS/x` is the jobs folder too
            first = path.relative_to(self.home).parts[0].casefold()
            if first in RESERVED_FOLDERS:
                raise OMLInputError(
                    f"{what} {shown(str(value))} is in {self.home / first}, which is reserved for "
                    f"the server's own state ({', '.join(RESERVED_FOLDERS)} in OML_HOME); pass a "
                    "path elsewhere in the workspace")
        return path

    def inside(self, path: Path) -> bool:
        """Whether `path`, through any symlinks, stays inside the allowed folders."""
        try:
            resolved = Path(path).resolve()
        except (OSError, RuntimeError):
            return False
        return any(_inside(resolved, root) for root in self.allowed)

    def model(self, spec: str | None, what: str = "model") -> str | None:
        """Classify a model argument: None/'bundled' (the bundled model), a hub id, or a
        confined folder. A hub id is returned as given: load it only via `model_location`.

        A bare `name` or `org/name` is a hub id unless such a folder exists in OML_HOME; anything
        else (absolute, `~`, `./`, deeper paths) is a path and must be inside the workspace.
        """
        if spec is None or not spec.strip() or spec in _BUNDLED:
            return None
        if self._is_hub_id(spec, what):
            return spec
        return str(self.path(spec, what))

    def _is_hub_id(self, spec: str, what: str) -> bool:
        problem = name_problem(spec)
        if problem:
            raise OMLInputError(f"{what} {shown(spec)} {problem}")
        return (bool(_HUB_ID.fullmatch(spec)) and ".." not in spec
                and not os.path.lexists(self.home / spec))

    def model_location(self, spec: str | None, what: str = "model") -> str | None:
        """Where to load a model argument from: None (the bundled model), a folder inside the
        workspace, or, for a hub id (or such a snapshot folder itself), its snapshot folder in
        the local Hugging Face cache.

        A hub id handed on as such would be tried as a folder relative to the server's working
        folder first (by the engine and by transformers), so a client could load any model
        folder next to the server by naming it `org/name`. An absolute snapshot folder cannot
        be misread that way, and the hub is never contacted from a tool call.
        """
        from oml_mcp.hub_cache import cached_snapshot, is_snapshot_folder

        if spec is None or not spec.strip() or spec in _BUNDLED:
            return None
        if not self._is_hub_id(spec, what):
            snapshot = Path(spec)
            if (snapshot.is_absolute() and ".." not in snapshot.parts
                    and is_snapshot_folder(snapshot)):
                return spec  # a cached snapshot, as a run started from a hub id records it
            return self.model(spec, what)

        snapshot = cached_snapshot(spec)
        if snapshot is None:
            raise OMLInputError(
                f"{what} {shown(spec)} is no folder inside the workspace and no model in the local "
                f"Hugging Face cache; download it first (`hf download {spec}`) or pass a model "
                f"folder inside the workspace ({self.describe()})")
        return str(snapshot)
