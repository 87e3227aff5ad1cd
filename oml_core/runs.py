"""Run folders: content-keyed identity, status other processes can poll, atomic completion.

A run folder holds `run.json` (resolved config, provenance, run key), `status.json`,
`train.log`, `metrics.json`, `model/`, the fingerprint set, the model card, and last of all the
`COMPLETE` marker. The run key hashes the settings, the fingerprint file's *content* and the
base model's identity — never paths — so a changed file can't silently reuse a stale model,
and an identical request reuses the finished run.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from oml_core.errors import OMLInputError
from oml_core.files import atomic_write_json, atomic_write_text

COMPLETE = "COMPLETE"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_identity(path: str) -> dict:
    """What identifies a base model: config content and weight files' names and sizes."""
    folder = Path(path)
    if not folder.is_dir():
        return {"hub_id": path}
    weights = sorted((p.name, p.stat().st_size) for p in folder.iterdir()
                     if p.suffix in (".safetensors", ".bin"))
    return {"config_sha256": sha256_file(folder / "config.json"), "weights": weights}


TRAINING_PACKAGES = ("torch", "transformers", "deepspeed")


def provenance(packages: tuple[str, ...] = TRAINING_PACKAGES) -> dict:
    """What produced a result: Python's, OML's and `packages`' versions (None where one is not
    installed), the checkout's git revision, the platform and the time. Versions come from the
    installed packages' metadata, so nothing is imported (the audit's report needs no torch)."""
    from importlib.metadata import PackageNotFoundError, version

    from oml_core import __version__

    versions = {"python": platform.python_version(), "oml": __version__}
    for package in packages:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    try:
        repo = Path(__file__).resolve().parents[1]
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {"versions": versions, "git_revision": rev, "platform": platform.platform(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run_key(settings: dict, fingerprint_sha256: str, base_identity: dict) -> str:
    payload = json.dumps({"settings": settings, "fingerprints": fingerprint_sha256,
                          "base": base_identity}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


class RunRecord(BaseModel):
    """run.json: what a run was asked to do, written before any work starts.

    `config` stays a mapping of `FingerprintConfig`'s fields as the run had them: settings are
    renamed and added over versions, and a run of an earlier version must still be found,
    reused and evaluated. The provenance (`provenance()`: versions, git revision, platform,
    time) rides along as extra fields."""

    model_config = ConfigDict(extra="allow")

    run_key: str
    config: dict[str, Any]
    base_model: str
    base_identity: dict[str, Any]
    fingerprints_sha256: str

    def setting(self, name: str, default: Any = None) -> Any:
        """One of the run's settings; `default` where its version had no such setting."""
        return self.config.get(name, default)


@dataclass
class RunFolder:
    path: Path

    @property
    def complete(self) -> bool:
        return (self.path / COMPLETE).exists()

    def read_json(self, name: str) -> dict | None:
        try:
            return json.loads((self.path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def record(self) -> RunRecord | None:
        """run.json, or None where it is missing or not one OML wrote."""
        data = self.read_json("run.json")
        try:
            return RunRecord.model_validate(data) if isinstance(data, dict) else None
        except ValidationError:
            return None

    def prepare(self, key: str) -> str:
        """Decide what to do with the folder: 'reuse', 'fresh' or 'restart' (says why)."""
        if self.path.exists() and not self.path.is_dir():
            raise OMLInputError(f"--out-dir {self.path} is a file; pass a folder path")
        existing = self.record()
        if existing is None:
            if self.path.exists() and any(self.path.iterdir()):
                what = ("its run.json is not one this version reads"
                        if (self.path / "run.json").exists() else "is not an OML run")
                raise OMLInputError(f"--out-dir {self.path} is not empty and {what}; pass a new "
                                    "or empty folder")
            self.path.mkdir(parents=True, exist_ok=True)
            return "fresh"
        if existing.run_key != key:
            raise OMLInputError(
                f"--out-dir {self.path} holds a different run (key {existing.run_key}, "
                f"this one {key}); pass another --out-dir or delete that folder")
        if self.complete:
            return "reuse"
        (self.path / COMPLETE).unlink(missing_ok=True)
        return "restart"

    def reusable_action(self, key: str) -> str:
        """Read-only: 'reuse' if a complete run with this key is here, else 'fresh'."""
        existing = self.record()
        return "reuse" if self.complete and existing and existing.run_key == key else "fresh"

    def write_status(self, **fields) -> None:
        fields.setdefault("updated", time.time())
        fields.setdefault("pid", os.getpid())
        atomic_write_json(self.path / "status.json", fields)

    def log(self, line: str) -> None:
        with open(self.path / "train.log", "a", encoding="utf-8") as handle:
            handle.write(time.strftime("%H:%M:%S ") + line + "\n")

    def mark_complete(self) -> None:
        atomic_write_text(self.path / COMPLETE, time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")


def weights_digest(folder: Path, memo_file: Path | None = None) -> str:
    """SHA-256 over a model folder's config and weight files' content (memoised by size+mtime)."""
    files = sorted(p for p in folder.iterdir()
                   if p.suffix in (".safetensors", ".bin") or p.name == "config.json")
    memo: dict = {}
    if memo_file is not None:
        try:
            memo = json.loads(memo_file.read_text())
        except (OSError, ValueError):
            memo = {}
    digest, changed = hashlib.sha256(), False
    for path in files:
        stat = path.stat()
        tag = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
        if tag not in memo:
            memo[tag], changed = sha256_file(path), True
        digest.update(f"{path.name}:{memo[tag]}\n".encode())
    if memo_file is not None and changed:
        atomic_write_json(memo_file, memo)
    return digest.hexdigest()
