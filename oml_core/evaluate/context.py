"""What every evaluation part shares: the run being measured, its models, checks and the cache.

A part's result is cached under `OUT/cache/<part>.json` with a key that hashes the part's
settings and the *content* of its inputs (the fingerprinted weights, the fingerprint set, the
base model's identity), so a part whose inputs have not changed is not recomputed, and a
retrained model or an edited set is never served a stale number. Results hold ids and
counts only: no key or response text.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydantic import ValidationError

from oml_core.config import EvalConfig
from oml_core.errors import OMLInputError
from oml_core.evaluate.results import Check, Count, KeyCheck, PartResult, RetentionRow
from oml_core.files import atomic_write_json
from oml_core.fingerprints import FingerprintSet, load_fingerprints
from oml_core.models import LoadedModel, load_model, pick_device, resolve_model
from oml_core.runs import COMPLETE, RunFolder, model_identity, sha256_file, weights_digest
from oml_core.train.metrics import RunMetrics
from oml_core.verify.verifier import check_keys
from oml_core.verify.wrappers import Wrapper, build_wrappers

CACHE_VERSION = 2  # bump when a part's method changes, so old cached numbers are not reused


@dataclass
class EvalContext:
    cfg: EvalConfig
    run_dir: Path
    model_dir: Path
    base_path: str
    fset: FingerprintSet
    chat: bool
    out_dir: Path
    device: str
    _models: dict = field(default_factory=dict)
    _inputs: dict | None = None

    # --- models (loaded on first use, so a fully cached evaluation loads nothing) -------------
    def tuned(self) -> LoadedModel:
        if "tuned" not in self._models:
            self._models["tuned"] = load_model(str(self.model_dir), self.device, self.cfg.dtype)
        return self._models["tuned"]

    def base(self) -> LoadedModel:
        if "base" not in self._models:
            self._models["base"] = load_model(self.base_path, self.device, self.cfg.dtype)
        return self._models["base"]

    # --- checking -----------------------------------------------------------------------------
    def wrappers(self, loaded: LoadedModel, kinds: list[str] | None = None,
                 num_system_prompts: int | None = None) -> tuple[list[Wrapper], list[str]]:
        return build_wrappers(kinds or self.cfg.wrappers,
                              num_system_prompts or self.cfg.num_system_prompts,
                              loaded.has_chat_template)

    def check(self, loaded: LoadedModel, wrappers: list[Wrapper], desc: str = "verify",
              fset: FingerprintSet | None = None, adjust_logits=None) -> KeyCheck:
        """Which fingerprints come back under each wrapper: counts and per-id hits (no text)."""
        fset = fset or self.fset
        hits = check_keys(loaded, fset, wrappers, self.cfg.match, batch_size=self.cfg.batch_size,
                          desc=desc, adjust_logits=adjust_logits)
        return summarise(hits, wrappers, fset)

    # --- cache --------------------------------------------------------------------------------
    def inputs(self) -> dict:
        """Content identity of what every part measures."""
        if self._inputs is None:
            self._inputs = {
                "model": weights_digest(self.model_dir, self.out_dir / "cache" / "digests.json"),
                "fingerprints": sha256_file(self.run_dir / "fingerprints.json"),
                "base": model_identity(self.base_path),
                "device": self.device, "dtype": self.cfg.dtype,
            }
        return self._inputs

    def cache_key(self, part: str, settings: dict) -> str:
        payload = {"part": part, "version": CACHE_VERSION, "inputs": self.inputs(),
                   "settings": settings}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def cache_file(self, part: str) -> Path:
        return self.out_dir / "cache" / f"{part}.json"

    def cached(self, part: str, key: str | None = None) -> PartResult | None:
        """The cached result of `part` for this key; key None: any result on these inputs.
        A cached result that no longer reads as the part's model is recomputed."""
        from oml_core.evaluate.eval_result import PART_MODELS

        try:
            entry = json.loads(self.cache_file(part).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or not isinstance(entry.get("result"), dict):
            return None
        if key is not None and entry.get("key") != key:
            return None
        if key is None and entry.get("inputs") != json.loads(json.dumps(self.inputs())):
            return None
        try:
            return PART_MODELS[part].model_validate(entry["result"])
        except ValidationError:
            return None

    def store(self, part: str, key: str, settings: dict, result: PartResult) -> None:
        atomic_write_json(self.cache_file(part), {"key": key, "inputs": self.inputs(),
                                                  "settings": settings, "result": result.dump(),
                                                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def summarise(hits: list[list[bool]], wrappers: list[Wrapper], fset: FingerprintSet) -> KeyCheck:
    return KeyCheck(
        matched=sum(any(row) for row in hits),
        total=len(hits),
        wrappers={w.name: Count(matched=sum(row[j] for row in hits), total=len(hits))
                  for j, w in enumerate(wrappers)},
        hit_ids={w.name: [fp.id for fp, row in zip(fset.fingerprints, hits) if row[j]]
                 for j, w in enumerate(wrappers)},
    )


def _hit_ids(check: KeyCheck | dict) -> dict[str, list[str]]:
    # a registered attack (e.g. clients' gguf_*) may pass its own {"hit_ids": ...}
    return check.hit_ids if isinstance(check, KeyCheck) else check["hit_ids"]


def retention(before: KeyCheck | dict, after: KeyCheck | dict) -> dict[str, RetentionRow]:
    """Per wrapper (and 'any'): of the keys that fired before, the share that still fires."""
    before_ids, after_ids = _hit_ids(before), _hit_ids(after)
    out = {}
    for name, ids in before_ids.items():
        still = set(after_ids.get(name, ())) & set(ids)
        out[name] = RetentionRow(before=len(ids), after=len(still),
                                 retention=len(still) / len(ids) if ids else None)
    any_before = set().union(*before_ids.values()) if before_ids else set()
    any_after = set().union(*after_ids.values()) if after_ids else set()
    kept = any_before & any_after
    out["any"] = RetentionRow(before=len(any_before), after=len(kept),
                              retention=len(kept) / len(any_before) if any_before else None)
    return out


def public(check: KeyCheck) -> Check:
    """A check result without the per-id lists (for reports that only need counts)."""
    return check.public()


def open_run(cfg: EvalConfig) -> EvalContext:
    """Read a finished run folder; one clear line when it is not one."""
    if not cfg.run:
        raise OMLInputError("no run folder given; pass --run DIR (a folder `oml fingerprint` made)")
    run_dir = Path(cfg.run).expanduser()
    if not run_dir.is_dir():
        raise OMLInputError(f"--run {run_dir} is not a folder; pass the run folder `oml fingerprint` made")
    run = RunFolder(run_dir)
    record = run.record()
    if record is None or not (run_dir / "fingerprints.json").exists():
        raise OMLInputError(f"--run {run_dir} is not an OML run (no run.json / fingerprints.json); "
                            "pass the folder `oml fingerprint --out-dir` made")
    if not (run_dir / COMPLETE).exists() or not (run_dir / "model" / "config.json").exists():
        raise OMLInputError(f"--run {run_dir} did not finish (no COMPLETE marker or model/); rerun "
                            "`oml fingerprint` with the same settings to finish it")
    base_path = resolve_model(cfg.model or record.base_model)
    fset = load_fingerprints(run_dir / "fingerprints.json")
    metrics = RunMetrics.read(run_dir, "evaluated", "rerun `oml fingerprint` with the same "
                              "settings into a new folder")
    trained_format = metrics.format or record.setting("format")
    has_template = (run_dir / "model" / "tokenizer_config.json").exists() and _has_chat_template(
        run_dir / "model")
    chat = trained_format == "chat" if trained_format in ("chat", "raw") else has_template
    out_dir = Path(cfg.out).expanduser() if cfg.out else run_dir / "eval"
    if out_dir.exists() and not out_dir.is_dir():
        raise OMLInputError(f"--out {out_dir} is a file; pass a folder")
    return EvalContext(cfg=cfg, run_dir=run_dir, model_dir=run_dir / "model", base_path=base_path,
                       fset=fset, chat=chat, out_dir=out_dir, device=pick_device(cfg.device))


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").exists():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


def settings_of(cfg: EvalConfig, names: tuple[str, ...]) -> dict:
    values = asdict(cfg)
    return {name: values[name] for name in names}
