"""Fingerprint sets: our versioned JSON format, OML 1.0's formats, and commitments.

Our format (`"format": "oml-fingerprints"`, `"version": 1`) keeps everything needed to
reproduce, train on and later prove a set: ids, key, response, strategy, the generation
settings, the tokenizer used, per-key `response_prob` where known, and a secret salt per pair
for the public commitment. Keys and responses are secrets: nothing here puts them in a log
line or an exception message; errors name the file and the entry index instead.

Version 2 is version 1 plus calibrated null rates (`oml calibrate`, oml_core.calibrate): a
set-level `calibration` object (base model, temperatures, contexts, method) and per pair
`context_rates` {rule: {probe context: {temperature: rate}}}. The rates are not secret. A set
without rates is still written as version 1, so OML versions that read only version 1 keep
reading it; they refuse a calibrated set with "upgrade OML" rather than drop its rates.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from pydantic import BaseModel

from oml_core import commitment
from oml_core.errors import OMLInputError
from oml_core.files import atomic_write_json

FORMAT = "oml-fingerprints"
VERSION = 1             # written for sets without calibrated rates
CALIBRATED_VERSION = 2  # written for sets with them
READABLE_VERSIONS = (VERSION, CALIBRATED_VERSION)


@dataclass
class Fingerprint:
    id: str
    key: str
    response: str
    response_prob: float | None = None
    salt: str | None = None
    # {rule: {probe context: {temperature: rate}}}, from `oml calibrate`; not secret
    context_rates: dict | None = None


@dataclass
class FingerprintSet:
    fingerprints: list[Fingerprint]
    strategy: str | None = None
    generation: dict = field(default_factory=dict)
    tokenizer: dict = field(default_factory=dict)
    source_format: str = FORMAT
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    calibration: dict = field(default_factory=dict)  # how context_rates were measured

    def __len__(self) -> int:
        return len(self.fingerprints)

    @property
    def response_probs(self) -> list[float | None]:
        return [fp.response_prob for fp in self.fingerprints]

    @property
    def calibrated(self) -> bool:
        return any(fp.context_rates for fp in self.fingerprints)

    def to_json(self) -> dict:
        rows = []
        for fp in self.fingerprints:
            row = asdict(fp)
            if not row["context_rates"]:
                del row["context_rates"]
            rows.append(row)
        data = {
            "format": FORMAT, "version": CALIBRATED_VERSION if self.calibrated else VERSION,
            "created": self.created, "strategy": self.strategy, "generation": self.generation,
            "tokenizer": self.tokenizer, "count": len(self.fingerprints),
        }
        if self.calibrated:
            data["calibration"] = self.calibration
        return {**data, "fingerprints": rows}

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_json())

    def with_salts(self) -> "FingerprintSet":
        """A copy where every pair has a salt (seed files have none)."""
        fps = [fp if fp.salt else replace(fp, salt=commitment.new_salt()) for fp in self.fingerprints]
        return replace(self, fingerprints=fps, source_format=FORMAT)

    def trimmed(self, tokenizer, num: int | None = None, max_key_tokens: int | None = None,
                max_response_tokens: int | None = None) -> "FingerprintSet":
        """The first `num` pairs with keys/responses cut to token limits (as training used)."""
        def cut(text: str, limit: int | None) -> str:
            if limit is None:
                return text
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            return text if len(ids) <= limit else tokenizer.decode(ids[:limit])

        fps = self.fingerprints[:num] if num else self.fingerprints
        trimmed = []
        for fp in fps:
            key, response = cut(fp.key, max_key_tokens), cut(fp.response, max_response_tokens)
            same = key == fp.key and response == fp.response
            # rates were measured for the whole pair; a cut pair is another event
            trimmed.append(replace(fp, key=key, response=response,
                                   context_rates=fp.context_rates if same else None))
        return replace(self, fingerprints=trimmed)

    # --- commitment -------------------------------------------------------------------
    def _entries(self) -> list[tuple[str, str, str, str]]:
        missing = [i for i, fp in enumerate(self.fingerprints) if not fp.salt]
        if missing:
            raise OMLInputError(
                f"{len(missing)} fingerprint(s) have no salt (entry {missing[0]} first), so the "
                "set cannot be committed; convert it with `oml import --fingerprints FILE --out NEW`")
        return [(fp.id, fp.key, fp.response, fp.salt) for fp in self.fingerprints]

    def manifest(self) -> commitment.Manifest:
        """Public commitment: salted hashes + Merkle root, no secrets."""
        meta = {"created": datetime.now(timezone.utc).isoformat(), "strategy": self.strategy,
                "tokenizer": self.tokenizer.get("name_or_path")}
        return commitment.build_manifest(self._entries(), meta)

    def reveal(self, fingerprint_id: str) -> commitment.Reveal:
        """One pair with its salt and Merkle path: proves membership, reveals that pair only."""
        ids = [fp.id for fp in self.fingerprints]
        if fingerprint_id not in ids:
            raise OMLInputError(f"no fingerprint with id {fingerprint_id!r} in this set; "
                                "list ids with `oml commit --json`")
        return commitment.build_reveal(self._entries(), ids.index(fingerprint_id))


def _read_json(path: Path):
    if not path.exists():
        raise OMLInputError(f"fingerprint file not found: {path}; pass an existing JSON file")
    if path.is_dir():
        raise OMLInputError(f"{path} is a folder; pass a fingerprint JSON file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise OMLInputError(f"{path} is not UTF-8 text; pass a fingerprint JSON file") from None
    except json.JSONDecodeError as exc:
        # exc.msg and position only: the message must not quote the file's content
        raise OMLInputError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}); "
                            "fix or regenerate the file") from None


def _text(entry: dict, name: str, path: Path, index: int) -> str:
    value = entry.get(name)
    if not isinstance(value, str) or not value.strip():
        raise OMLInputError(f"{path}: entry {index} has no non-empty string {name!r}; "
                            "fix the entry or regenerate the file")
    _check_unicode(value, f"{path}: entry {index} {name!r}")
    return value


def _check_unicode(value: str, where: str) -> None:
    """JSON can carry lone surrogates, which load but cannot be saved or hashed."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise OMLInputError(f"{where} is not valid Unicode text; fix the entry") from None


def _prob(entry: dict, path: Path, index: int) -> float | None:
    value = entry.get("response_prob")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise OMLInputError(f"{path}: entry {index} has response_prob outside [0, 1]; fix it")
    return float(value)


def _context_rates(entry: dict, path: Path, index: int) -> dict | None:
    """{rule: {context: {temperature: rate}}} with every rate in [0, 1], or None."""
    value = entry.get("context_rates")
    if value is None:
        return None

    def is_rate(rate) -> bool:
        return (not isinstance(rate, bool) and isinstance(rate, (int, float))
                and 0.0 <= rate <= 1.0)

    ok = isinstance(value, dict) and all(
        isinstance(contexts, dict) and all(
            isinstance(temps, dict) and all(isinstance(t, str) and is_rate(r)
                                            for t, r in temps.items())
            for temps in contexts.values())
        for contexts in value.values())
    if not ok:
        raise OMLInputError(f"{path}: entry {index} has malformed context_rates; recalibrate the "
                            "set with `oml calibrate --fingerprints FILE`")
    return {str(rule): {str(c): {t: float(r) for t, r in temps.items()}
                        for c, temps in contexts.items()} for rule, contexts in value.items()}


def _from_pairs(rows: list, path: Path, source_format: str) -> FingerprintSet:
    fps = []
    for index, entry in enumerate(rows):
        if not isinstance(entry, dict):
            raise OMLInputError(f"{path}: entry {index} is not an object with key and response")
        # OML 1.0's perinucleus files carry the truncated key actually used as effective_key.
        key_field = "effective_key" if entry.get("effective_key") else "key"
        fps.append(Fingerprint(
            id=str(entry.get("id") or f"fp-{index:05d}"),
            key=_text(entry, key_field, path, index),
            response=_text(entry, "response", path, index),
            response_prob=_prob(entry, path, index),
            salt=entry.get("salt") if isinstance(entry.get("salt"), str) else None,
            context_rates=_context_rates(entry, path, index)))
    ids = [fp.id for fp in fps]
    if len(set(ids)) != len(ids):
        raise OMLInputError(f"{path}: fingerprint ids are not unique; fix the ids")
    return FingerprintSet(fingerprints=fps, source_format=source_format)


def load_fingerprints(path: str | Path) -> FingerprintSet:
    """Read our format or an OML 1.0 pair format; keys-only files are refused with the fix."""
    path = Path(path).expanduser()
    data = _read_json(path)
    if isinstance(data, dict) and data.get("format") == FORMAT:
        version = data.get("version")
        if type(version) is not int or version not in READABLE_VERSIONS:  # JSON true == 1
            raise OMLInputError(f"{path}: fingerprint format version {version!r} is not "
                                f"supported (this OML reads versions {VERSION} and "
                                f"{CALIBRATED_VERSION}); upgrade OML")
        rows = data.get("fingerprints")
        if not isinstance(rows, list):
            raise OMLInputError(f"{path}: 'fingerprints' is not a list; regenerate the file")
        fset = _from_pairs(rows, path, FORMAT)
        fset.strategy = data.get("strategy")
        fset.generation = data.get("generation") or {}
        fset.tokenizer = data.get("tokenizer") or {}
        fset.created = data.get("created") or fset.created
        calibration = data.get("calibration")
        fset.calibration = calibration if isinstance(calibration, dict) else {}
    elif isinstance(data, list) and data and all(isinstance(x, str) for x in data):
        raise OMLInputError(
            f"{path} holds keys only (no responses); make a set from it with "
            "`oml generate --keys-file FILE --strategy perinucleus --out SET.json`")
    elif isinstance(data, list):
        fset = _from_pairs(data, path, "oml-1.0")
    else:
        raise OMLInputError(f"{path} is not a fingerprint file (expected our format or a JSON "
                            "list of {key, response}); regenerate it with `oml generate`")
    if not fset.fingerprints:
        raise OMLInputError(f"{path} holds no fingerprints; generate some with `oml generate`")
    return fset


class ImportedSet(BaseModel):
    """`oml import`'s result: where the converted set was written and how many pairs it holds."""

    path: str
    count: int


def import_set(source: str | Path, out: str | Path) -> ImportedSet:
    """A set in any format `load_fingerprints` reads, written in ours with every pair salted
    (so it can be committed to)."""
    fset = load_fingerprints(source).with_salts()
    fset.save(out)
    return ImportedSet(path=str(out), count=len(fset))


def load_keys(path: str | Path) -> list[str]:
    """Keys from a custom-keys file: a list of strings, or any fingerprint file's keys."""
    path = Path(path).expanduser()
    data = _read_json(path)
    if isinstance(data, list) and all(isinstance(x, str) for x in data):
        keys = data
        empty = [i for i, k in enumerate(keys) if not k.strip()]
        if empty:
            raise OMLInputError(f"{path}: key {empty[0]} is empty; remove empty keys")
        for i, key in enumerate(keys):
            _check_unicode(key, f"{path}: key {i}")
    else:
        keys = [fp.key for fp in load_fingerprints(path).fingerprints]
    if not keys:
        raise OMLInputError(f"{path} holds no keys; pass a JSON list of key strings")
    return keys
