"""Hub ids resolved through the local Hugging Face cache only, never the network or a path.

The snapshot folder of a cached repo is `<cache>/models--<org>--<name>/snapshots/<commit>/`,
where `refs/main` names the commit. A model is usable there once its config.json is cached.
"""

from __future__ import annotations

import os
from pathlib import Path


def cached_snapshot(repo_id: str) -> Path | None:
    """The cached snapshot folder of hub model `repo_id` (its `main`), or None if it is not
    cached with a config.json or the id is not a valid hub id."""
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        config = try_to_load_from_cache(repo_id, "config.json")
    except (HFValidationError, ValueError, OSError):
        return None
    if not isinstance(config, str):  # None: never fetched; _CACHED_NO_EXIST: the repo has none
        return None
    snapshot = Path(os.path.abspath(Path(config).parent))
    # refs/main is a file in the cache; whatever it says, the folder must be a snapshot of
    # this repo (not `snapshots/../../elsewhere`) and a real folder, not a link
    repo_folder = "models--" + repo_id.replace("/", "--")
    expected = Path(os.path.abspath(Path(constants.HF_HUB_CACHE) / repo_folder / "snapshots"))
    if snapshot.parent != expected or snapshot.is_symlink() or not snapshot.is_dir():
        return None
    return snapshot


def is_snapshot_folder(path: Path) -> bool:
    """Whether `path` is a snapshot folder of a model in the local Hugging Face cache (where
    `cached_snapshot` points, and what a run trained from a hub id records as its base)."""
    from huggingface_hub import constants

    path = Path(os.path.abspath(path))
    cache = Path(os.path.abspath(constants.HF_HUB_CACHE))
    return (path.parent.name == "snapshots" and path.parent.parent.parent == cache
            and path.parent.parent.name.startswith("models--")
            and not path.is_symlink() and (path / "config.json").is_file())
