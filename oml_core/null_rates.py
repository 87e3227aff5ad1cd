"""Null rates: the one model `oml verify` and `oml audit` share, and the measured null-rate file.

A probe's pre-registered null rate (`probe_null_rate`) is the largest of
- its context rate: the base model's probability that an answer is counted by the match rule,
  in the probe's own rendered context and at its temperature (oml_core.calibrate, stored in the
  fingerprint set by `oml calibrate`), summed over the answer positions the rule checks; for a
  set that was not calibrated, the old bound from `response_prob` (or ASSUMED_NULL_RATE);
- the measured panel rate of the key (--null-file, below), per probe;
- NULL_RATE_FLOOR, per answer position.
A greedy probe's context rate is the largest of its rates at GREEDY_TEMPERATURES. A user-given
--null-rate replaces all of this.

The measured null-rate file: how often unrelated models answer each key with its response.
`oml eval --parts false_positives` writes it; `oml verify --null-file FILE` and the auditor
(`oml audit --null-file FILE`) read it with `load_null_rates` and refuse, through
`NullRates.check_applies`, a file measured under another match rule or on another set. One
place defines the format:

    {"format": "oml-null-rates", "version": 1,
     "null_rate": q,              # pooled per-probe rate, Laplace-smoothed: (H + 1) / (T + 2)
     "matched": H, "total": T,    # probes that matched / probes run, over every null model
     "match_rule": "exact", "decoding": "greedy", "wrappers": [...], "models": [...],
     "per_key": {"fp-00003": {"hits": h, "trials": t, "rate": r, "check": "<salted hash>"}},
     "rate_rule": "..."}

A probe is one key under one wrapper on one null model. A key's per-probe rate is
max(pooled rate, h / t): never below the pooled estimate (a key that never fired on a handful of
probes is not thereby safer than the pool says), and as high as its own firing rate where it
fired. Both readers take a key's per-probe rate (the pooled one for a key the file does not
name) as a lower bound on each of its probes' rates.

No secrets: keys are named by id; `check` is the fingerprint's salted commitment hash (the
same kind of hash the public manifest holds), so a verifier can tell a rate was measured on
this very pair without the file revealing anything.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from oml_core.errors import OMLInputError
from oml_core.evidence import ASSUMED_NULL_RATE, laplace_rate
from oml_core.files import atomic_write_json

FORMAT = "oml-null-rates"
VERSION = 1
RATE_RULE = ("per probe (one key, one wrapper, one null model): max(pooled Laplace rate "
             "(H+1)/(T+2), this key's own hits/trials)")

NULL_RATE_FLOOR = 1e-3
"""The smallest null rate any answer position gets, whatever the measurements say.

A context rate is one base model's softmax; below about 1e-3 it describes that model's tail,
not unrelated models in general, and no practical panel can check it: a panel with no hit in
N probes bounds the rate only to about 3/N (the rule of three, 95%), so showing 1e-3 already
takes some 3,000 clean probes (the project's published panel ran 208). The floor keeps a
verdict from resting on rates nobody measured: with every rate at least 1e-3, two chance hits
among 16 keys give p >= 1e-4, so a match at alpha = 1e-6 needs several keys to answer, as a
fingerprinted model's do (14-16 of 16 measured), while costing such a model almost nothing.
"""

GREEDY_TEMPERATURES = (1.0, 0.25)
"""Whose rates stand for a greedy probe: the largest of the base model's rates at these
temperatures. An unrelated model's greedy answer is its own argmax, which the base model's
distribution describes only as a spread over plausible models: the temperature-1 probability is
that spread, and greedy decoding of the base model itself (rate 0 or 1) would say nothing about
other models. But the spread undercounts the answers the base model favours most: another
model's argmax lands on the base's mode more often than the mode's probability says (innocent
models answered greedily in the multi-turn context 10 times in 480 probes where the
temperature-1 rates expected 5.7; docs/results.md). The sharpened distribution (T = 0.25) gives
such an answer nearly the weight of a sure pick, and leaves every other answer's
temperature-1 rate in place (a max). Sets calibrated before 0.25 was added keep their
temperature-1 rate."""
GREEDY_TEMPERATURE = GREEDY_TEMPERATURES[0]  # the one every calibrated set holds

# Which calibrated rates (oml_core.calibrate.RULES) measure the events a match rule counts.
# `prefix` counts a subset of what `start` counts (oml_core.verify.matching), so `start` rates
# bound it; the loose rules look past the answer's opening, which a first-token measure cannot.
CALIBRATED_RULE = {"exact": "exact", "prefix": "start", "start": "start"}


def temperature_key(temperature: float) -> str:
    """How a temperature names its rates in a fingerprint file: 1.0 -> "1", 0.7 -> "0.7"."""
    return f"{float(temperature):g}"


def context_rate(fp, rule: str, context: str, temperature: float) -> float | None:
    """The calibrated rate of `fp` under match `rule` in `context` at `temperature` (greedy, 0:
    the largest at GREEDY_TEMPERATURES the set holds), or None when the set holds none for it."""
    calibrated = CALIBRATED_RULE.get(rule)
    table = ((getattr(fp, "context_rates", None) or {}).get(calibrated) or {}).get(context) or {}
    used = GREEDY_TEMPERATURES if temperature <= 0 else (temperature,)
    values = [float(table[k]) for k in map(temperature_key, used) if k in table]
    return max(values) if values else None


def probe_null_rate(position_rates: Sequence[float] | None, fallback: tuple[float, str] | None,
                    panel: float | None) -> tuple[float, set[str]]:
    """One probe's pre-registered null rate and the sources that went into it.

    `position_rates`: the context rate of each answer position the rule checks (None when the
    set is not calibrated for them); `fallback`: the uncalibrated bound for the whole probe and
    its source (`response_prob` times the positions checked, or the assumed rate; None when
    unknown); `panel`: the key's measured per-probe rate (--null-file). Each answer position is
    at least NULL_RATE_FLOOR, the probe at least its panel rate; with nothing known at all,
    ASSUMED_NULL_RATE.
    """
    sources: set[str] = set()
    if position_rates is not None:
        rate = sum(max(r, NULL_RATE_FLOOR) for r in position_rates)
        sources.add("context")
        floored = any(r < NULL_RATE_FLOOR for r in position_rates)
    elif fallback is not None:
        rate, source = max(fallback[0], NULL_RATE_FLOOR), fallback[1]
        sources.add(source)
        floored = fallback[0] < NULL_RATE_FLOOR
    elif panel is None:
        rate, floored = ASSUMED_NULL_RATE, False
        sources.add("assumed")
    else:
        rate, floored = NULL_RATE_FLOOR, panel < NULL_RATE_FLOOR
    if panel is not None:
        sources.add("measured")
        floored = floored and panel < rate
        rate = max(rate, panel)
    if floored:
        sources.add("floor")
    return min(1.0, rate), sources


SOURCE_ORDER = ("given", "context", "response_prob", "measured", "assumed", "floor")


def source_label(sources: set[str]) -> str:
    """"context+measured+floor": where a set of rates came from, in a fixed order."""
    return "+".join(s for s in SOURCE_ORDER if s in sources) or "assumed"


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
        """Refuse rates measured under another match rule (`rule`: the engine rule whose
        events the caller counts, oml_core.verify.matching) or on another set: a pair whose
        salted check differs, or a file that names none of this set's keys."""
        if rule != self.match_rule:
            raise OMLInputError(
                f"the null-rate file was measured with the {self.match_rule!r} match rule, not "
                f"{rule!r}, the rule this check counts; pass a file measured with it (`oml eval "
                f"--parts false_positives --match {rule}`)")
        for fp in fset.fingerprints:
            stored = (self.per_key.get(fp.id) or {}).get("check")
            mine = pair_check(fp) if stored else None
            if stored and mine and stored != mine:
                raise OMLInputError(
                    f"the null-rate file was measured on another fingerprint set ({fp.id} "
                    "differs); re-measure with `oml eval --parts false_positives` on this set")
        if self.per_key and not any(fp.id in self.per_key for fp in fset.fingerprints):
            raise OMLInputError(
                "the null-rate file was measured on another fingerprint set (it names none of "
                "this set's keys); re-measure with `oml eval --parts false_positives` on this set")


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
        # a bare {"null_rate": q} names no rule or set, so nothing could check it applies
        raise OMLInputError(f"--null-file {path} is not an OML null-rate file; pass the "
                            "null_rates.json that `oml eval --parts false_positives` wrote (or "
                            "a single rate with --null-rate Q)")
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
