"""What the listing tools and resources report about run folders and fingerprint set files.

The workspace's contents are no more trusted than the client: an entry of a listed folder may
be a link out of the workspace, a dangling link, a FIFO, or have a forged name, and a run's
status.json may be a link or hold fields of any type. So every entry is confined before it
is read (a link out is reported, never followed), only regular files are read, and each
field is kept only if it has the type the result promises.
"""

from __future__ import annotations

import os
from pathlib import Path

from oml_core.errors import OMLInputError
from oml_core.train.headline import RunHeadline
from oml_mcp.paths import Workspace, name_problem
from oml_mcp.schemas import FingerprintSetInfo, FingerprintSetList, RunInfo, RunList
from oml_mcp.state_files import read_regular_json

RUN_MARKERS = ("run.json", "status.json")
COMPLETE_MARKER = "COMPLETE"  # oml_core.runs writes it once model and metrics are final


def _typed(value: object, *types: type) -> object:
    """`value` if it is one of `types` (a bool is no number here), else None."""
    if isinstance(value, bool) and bool not in types:
        return None
    return value if isinstance(value, types) else None


def read_doc(ws: Workspace, folder: Path, name: str) -> dict:
    """JSON object `name` in `folder` if it stays inside the workspace, else (or if it is no
    regular file or no object) {}."""
    path = folder / name
    data = read_regular_json(path) if ws.inside(path) else None
    return data if isinstance(data, dict) else {}


def is_run_folder(path: Path) -> bool:
    return path.is_dir() and any(os.path.lexists(path / name) for name in RUN_MARKERS)


def run_summary(ws: Workspace, path: Path) -> RunInfo:
    """What a run folder (already confined) says about itself: status, settings, and the
    final metrics' headline."""
    status, settings = read_doc(ws, path, "status.json"), read_doc(ws, path, "run.json")
    head = RunHeadline.from_metrics(read_doc(ws, path, "metrics.json"))
    config = _typed(settings.get("config"), dict) or {}
    number = (int, float)
    complete = ws.inside(path / COMPLETE_MARKER) and (path / COMPLETE_MARKER).exists()
    return RunInfo(
        name=path.name, path=str(path), complete=complete,
        state=_typed(status.get("state"), str), step=_typed(status.get("step"), int),
        total_steps=_typed(status.get("total_steps"), int),
        loss=_typed(status.get("loss"), *number),
        run_key=_typed(settings.get("run_key"), str),
        base_model=_typed(settings.get("base_model"), str),
        fingerprints=_typed(config.get("fingerprints"), str),
        num_fingerprints=head.num_fingerprints, memorised_at_step=head.memorised_at_step,
        train_seconds=head.train_seconds, matched=head.matched, total=head.total,
        p_value=head.p_value, verdict=head.verdict,
        first_token_agreement=head.first_token_agreement, perplexity_change=head.perplexity_change,
        model_dir=str(path / "model") if complete and (path / "model").is_dir() else None,
        summary_uri=f"oml://runs/{path.name}/summary")


def confined_folder(ws: Workspace, path: Path, what: str) -> Path:
    """`path` (one the server names, e.g. OML_HOME/runs) resolved inside the workspace."""
    return ws.path(str(path), what)


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed since it was listed
        return 0.0


def candidate_folders(ws: Workspace, folder: Path, what: str, job_dirs: list[str],
                      problems: list[str]) -> list[Path]:
    """The entries of `folder` (if it is confined; else a line in `problems`) and the folders
    jobs wrote elsewhere, unchecked: the caller decides which are its kind and inside."""
    candidates: list[Path] = []
    try:
        where = confined_folder(ws, folder, what)
    except OMLInputError as exc:
        problems.append(str(exc))
    else:
        if where.is_dir():
            candidates += sorted(where.iterdir())
    return candidates + [Path(d) for d in job_dirs if Path(d).is_absolute()]


def list_runs(ws: Workspace, runs_dir: Path, job_run_dirs: list[str], limit: int) -> RunList:
    """Run folders in `runs_dir` and those jobs wrote elsewhere in the workspace, newest first;
    entries that are links out of the workspace are reported in `problems`, not read."""
    problems: list[str] = []
    candidates = candidate_folders(ws, runs_dir, "runs folder", job_run_dirs, problems)
    folders: set[Path] = set()
    for entry in candidates:
        if not is_run_folder(entry):
            continue
        if not ws.inside(entry):
            problems.append(f"run folder {entry} leads outside the workspace; not read")
            continue
        folders.add(entry.resolve())
    ordered = sorted(folders, key=_modified, reverse=True)
    return RunList(runs=[run_summary(ws, p) for p in ordered[:limit]],
                   truncated=len(ordered) > limit, problems=problems)


def _set_info(ws: Workspace, path: Path) -> FingerprintSetInfo:
    from oml_core.fingerprints import load_fingerprints

    problem = name_problem(path.name)
    if problem:
        return FingerprintSetInfo(path=str(path), problem=f"its name {problem}; not read")
    if path.is_symlink() and not path.exists():
        return FingerprintSetInfo(path=str(path), problem="a symlink to a file that does not "
                                                          "exist; remove it")
    if not ws.inside(path):
        return FingerprintSetInfo(path=str(path), problem="a symlink that leads outside the "
                                                          "workspace; not read")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "no regular file (a FIFO, socket or device)"
        return FingerprintSetInfo(path=str(path), problem=f"{kind}; not read")
    info = {"path": str(path), "bytes": path.stat().st_size}
    try:
        fset = load_fingerprints(path)
    except OMLInputError as exc:
        info["problem"] = str(exc)
    else:
        info.update(count=len(fset), strategy=_typed(fset.strategy, str),
                    created=_typed(fset.created, str),
                    source_format=_typed(fset.source_format, str),
                    committable=all(fp.salt for fp in fset.fingerprints))
    return FingerprintSetInfo(**info)


def list_sets(ws: Workspace, where: Path, limit: int) -> FingerprintSetList:
    """The *.json files in folder `where` (confined by the caller), not recursive."""
    files = sorted(where.glob("*.json")) if where.is_dir() else []
    return FingerprintSetList(folder=str(where), sets=[_set_info(ws, p) for p in files[:limit]],
                              truncated=len(files) > limit)
