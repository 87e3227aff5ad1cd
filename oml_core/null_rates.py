"""The measured null-rate file: how often unrelated models answer each key with its response.

`oml eval --parts false_positives` writes it; `oml verify --null-file FILE` and the auditor
(`oml audit --null-file FILE`) read it. One place defines the format:

    {"format": "oml-null-rates", "version": 1,
     "null_rate": q,              # pooled per-probe rate, Laplace-smoothed: (H + 1) / (T + 2)
     "matched": H, "total": T,    # probes that matched / probes run, over every null model
     "match_rule": "exact", "decoding": "greedy", "wrappers": [...], "models": [...],
     "per_key": {"fp-00003": {"hits": h, "trials": t, "rate": r, "check": "<salted hash>"}},
     "rate_rule": "..."}

A probe is one key under one wrapper on one null model. A key's per-probe rate is
max(pooled rate, h / t): never below the pooled estimate (a key that never fired on a handful of
probes is not thereby safer than the pool says), and as high as its own firing rate where it
fired. The auditor reads the top-level `null_rate` (or `matched`/`total`); the verifier reads
the per-key rates and union-bounds them over its own wrappers.

No secrets: keys are named by id; `check` is the fingerprint's salted commitment hash (the
same kind of hash the public manifest holds), so a verifier can tell a rate was measured on
this very pair without the file revealing anything.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from oml_core.errors import OMLInputError
from oml_core.evidence import laplace_rate
from oml_core.files import atomic_write_json

FORMAT = "oml-null-rates"
VERSION = 1
RATE_RULE = ("per probe (one key, one wrapper, one null model): max(pooled Laplace rate "
             "(H+1)/(T+2), this key's own hits/trials)")


def pair_check(fp) -> str | None:
    """Salted hash of the pair (its commitment leaf) where the pair has a salt."""
    if not fp.salt:
        return None
    from oml_core.commitment import leaf_hash

    return leaf_hash(fp.id, fp.key, fp.response, fp.salt)


@dataclass
class NullRates:
    null_rate: float
    matched: int
    total: int
    match_rule: str
    per_key: dict[str, dict] = field(default_factory=dict)
    wrappers: list[str] = field(default_factory=list)
    models: list[dict] = field(default_factory=list)
    decoding: str = "greedy"
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S%z"))

    def probe_rate(self, fingerprint_id: str) -> float:
        entry = self.per_key.get(fingerprint_id)
        return float(entry["rate"]) if entry else self.null_rate

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "created": self.created,
                "null_rate": self.null_rate, "matched": self.matched, "total": self.total,
                "match_rule": self.match_rule, "decoding": self.decoding,
                "wrappers": self.wrappers, "models": self.models, "rate_rule": RATE_RULE,
                "per_key": self.per_key}

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_json())

    def check_applies(self, rule: str, fset) -> None:
        """Refuse rates measured under another match rule or on other pairs with these ids."""
        if rule != self.match_rule:
            raise OMLInputError(
                f"the null-rate file was measured with the {self.match_rule!r} match rule, not "
                f"{rule!r}; pass --match {self.match_rule} or re-measure with `oml eval --parts "
                f"false_positives --match {rule}`")
        for fp in fset.fingerprints:
            stored = (self.per_key.get(fp.id) or {}).get("check")
            mine = pair_check(fp) if stored else None
            if stored and mine and stored != mine:
                raise OMLInputError(
                    f"the null-rate file was measured on another fingerprint set ({fp.id} "
                    "differs); re-measure with `oml eval --parts false_positives` on this set")


def measure(per_key_hits: dict[str, tuple[int, int]], match_rule: str, fset=None, **meta) -> NullRates:
    """Null rates from hit counts: {fingerprint id: (hits, trials)} pooled over null models."""
    hits = sum(h for h, _ in per_key_hits.values())
    trials = sum(t for _, t in per_key_hits.values())
    pooled = laplace_rate(hits, trials)
    checks = {fp.id: pair_check(fp) for fp in fset.fingerprints} if fset is not None else {}
    per_key = {}
    for fid, (h, t) in per_key_hits.items():
        rate = max(pooled, h / t) if t else pooled
        per_key[fid] = {"hits": h, "trials": t, "rate": rate, "check": checks.get(fid)}
    return NullRates(null_rate=pooled, matched=hits, total=trials, match_rule=match_rule,
                     per_key=per_key, **meta)


def load_null_rates(path: str | Path) -> NullRates:
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise OMLInputError(f"--null-file {path}: cannot read it as JSON; pass the null_rates.json "
                            "that `oml eval --parts false_positives` wrote") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise OMLInputError(f"--null-file {path} is not an OML null-rate file; pass the "
                            "null_rates.json that `oml eval --parts false_positives` wrote")
    if data.get("version") != VERSION:
        raise OMLInputError(f"--null-file {path}: version {data.get('version')!r} is not "
                            f"supported (this OML reads version {VERSION}); upgrade OML")
    try:
        per_key = {str(k): {"hits": int(v["hits"]), "trials": int(v["trials"]),
                            "rate": float(v["rate"]), "check": v.get("check")}
                   for k, v in (data.get("per_key") or {}).items()}
        rates = NullRates(null_rate=float(data["null_rate"]), matched=int(data["matched"]),
                          total=int(data["total"]), match_rule=str(data["match_rule"]),
                          per_key=per_key, wrappers=list(data.get("wrappers") or []),
                          models=list(data.get("models") or []),
                          decoding=str(data.get("decoding") or "greedy"),
                          created=str(data.get("created") or ""))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise OMLInputError(f"--null-file {path}: a required field is missing or malformed; "
                            "re-measure with `oml eval --parts false_positives`") from None
    if not all(0.0 <= q <= 1.0 for q in [rates.null_rate, *(v["rate"] for v in per_key.values())]):
        raise OMLInputError(f"--null-file {path}: a rate is outside [0, 1]; re-measure it")
    return rates
