"""Workspace confinement: every path a tool receives must land inside OML_HOME or a root.

An assistant passes paths it was told or guessed; a prompt-injected one may try `../..`,
`/etc/...` or a symlink planted in the workspace. So each path is taken relative to
OML_HOME when relative, refused when it has a `..` part, resolved through symlinks, and
accepted only if the resolved place is inside one of the allowed folders. Errors name the
problem and the allowed folders, so the model can correct itself.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from oml_core.errors import OMLInputError
from oml_core.files import oml_home

ROOTS_ENV = "OML_MCP_ROOTS"
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
_BUNDLED = ("bundled", "SmolLM2-135M-Instruct")


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


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
        return OMLInputError(f"{what} {value!r} {problem}; allowed folders: {self.describe()} "
                             f"(relative paths start at {self.home}; add folders with --root or "
                             f"{ROOTS_ENV})")

    def path(self, value: str, what: str = "path") -> Path:
        """The resolved path for `value`, or OMLInputError saying why it is refused."""
        if not isinstance(value, str) or not value.strip():
            raise OMLInputError(f"{what} is empty; pass a file or folder path")
        if "\x00" in value:
            raise OMLInputError(f"{what} contains a NUL character; pass a plain path")
        raw = Path(value).expanduser()
        if ".." in raw.parts:
            raise self._refuse(what, value, "contains '..'")
        candidate = raw if raw.is_absolute() else self.home / raw
        # Judge the literal place first, so the message can tell "outside" from "a symlink
        # that leads outside" (the second is the one a planted link produces).
        literal = Path(os.path.abspath(candidate))
        literal_inside = any(_inside(literal, root) for root in self.allowed)
        resolved = candidate.resolve()
        if any(_inside(resolved, root) for root in self.allowed):
            return resolved
        if literal_inside:
            raise self._refuse(what, value, f"leads outside the workspace through a symlink "
                                             f"(it resolves to {resolved})")
        raise self._refuse(what, value, "is outside the workspace")

    def optional_path(self, value: str | None, what: str) -> Path | None:
        return None if value is None else self.path(value, what)

    def model(self, spec: str | None, what: str = "model") -> str | None:
        """A model argument: None/'bundled' (the bundled model), a hub id, or a confined folder.

        A bare `name` or `org/name` is a hub id unless such a folder exists in OML_HOME; anything
        else (absolute, `~`, `./`, deeper paths) is a path and must be inside the workspace.
        """
        if spec is None or not spec.strip() or spec in _BUNDLED:
            return None
        if _HUB_ID.fullmatch(spec) and ".." not in spec and not (self.home / spec).exists():
            return spec
        return str(self.path(spec, what))
