"""Sequential audits: stop as soon as the evidence is enough, without paying for peeking.

A fixed plan sends every key before deciding; most of those calls are wasted on a stolen
model (a handful of hits already decide) and all of them show keys to the suspect. Here the
unit of evidence is a key, taken in the plan's pre-registered order. A key's outcome is a hit
if any of its probes matched; under the null (a model that never saw the keys) it hits with
probability at most q, the summed null rate of its probes (a union bound, valid whatever the
dependence between one key's probes). Each finished key multiplies a running e-value by

    E = p1 / q          on a hit
    E = (1 - p1) / (1 - q)  on a miss

For any true hit probability p <= q < p1 the expectation p·p1/q + (1-p)(1-p1)/(1-q) is at most
1 (it grows with p and is exactly 1 at p = q), so the running product is a nonnegative
supermartingale that starts at 1, whatever the suspect chose to do with earlier keys. Ville's
inequality then bounds the chance that it *ever* reaches 1/alpha by alpha: the audit may stop
the moment it does (`match`), or at any other point, and the false-match rate stays at most
alpha. The anytime-valid p-value reported is min(1, 1 / the largest e-value reached).

Keys are independent draws (each key is its own random string), which is what lets their
factors multiply; one key's several probes are folded into one factor by the union bound. A
key whose probes all failed contributes nothing (factor 1): an endpoint that errors on purpose
can hide evidence, never create it.

p1, the hit rate expected of a fingerprinted model, is fixed before probing (ALTERNATIVE_HIT_RATE).
It only trades speed: with q around 1e-2, a hit multiplies the e-value by ~50 and a miss
divides it by 2, so a model that returns half its keys convicts at 1e-6 in about 4-6 keys, and
one that returns none is dropped within a few keys by the futility rule: stop when even a hit
on every key still unsent could not reach 1/alpha.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from clients.audit_result import KeyStep, SequentialSummary

ALTERNATIVE_HIT_RATE = 0.5


def key_factor(hit: bool | None, null_rate: float, alternative: float = ALTERNATIVE_HIT_RATE) -> float:
    """The e-value factor of one finished key (1 when it was not tested or cannot inform)."""
    if hit is None or not 0.0 < null_rate < alternative:
        return 1.0  # a key as likely to hit by chance as under the alternative proves nothing
    return alternative / null_rate if hit else (1.0 - alternative) / (1.0 - null_rate)


@dataclass
class SequentialTest:
    """The running e-value over keys in plan order; `add` one finished key at a time."""

    alpha: float
    alternative: float = ALTERNATIVE_HIT_RATE
    e_value: float = 1.0
    max_e_value: float = 1.0
    keys_tested: int = 0
    hits: int = 0
    history: list[dict] = field(default_factory=list)  # per key: id, hit, null rate, e after

    def add(self, fingerprint_id: str, hit: bool | None, null_rate: float, calls: int) -> None:
        self.e_value *= key_factor(hit, null_rate, self.alternative)
        self.max_e_value = max(self.max_e_value, self.e_value)
        if hit is not None:
            self.keys_tested += 1
            self.hits += bool(hit)
        self.history.append({"fingerprint_id": fingerprint_id, "hit": hit,
                             "null_rate": null_rate, "calls": calls,
                             "e_value": self.e_value, "p_value": self.p_value})

    @property
    def crossed(self) -> bool:
        return self.max_e_value >= 1.0 / self.alpha

    @property
    def p_value(self) -> float:
        return min(1.0, 1.0 / self.max_e_value)

    def reachable(self, remaining_rates: list[float]) -> bool:
        """Could a hit on every remaining key still lift the e-value to 1/alpha?"""
        if self.crossed:
            return True
        best = self.e_value * math.prod(key_factor(True, q, self.alternative) for q in remaining_rates)
        return best >= 1.0 / self.alpha

    def keys_needed(self, next_rates: list[float]) -> int | None:
        """The fewest of the next keys (in order) that could lift the e-value to 1/alpha if
        each of them hit; None when even all of them could not. A round larger than this
        spends keys a stolen model may not need to be shown."""
        if self.crossed:
            return 0
        best = self.e_value
        for count, q in enumerate(next_rates, 1):
            best *= key_factor(True, q, self.alternative)
            if best >= 1.0 / self.alpha:
                return count
        return None

    def verdict(self) -> str:
        if self.crossed:
            return "match"
        return "no_match" if self.keys_tested else "inconclusive"

    def summary(self) -> SequentialSummary:
        return SequentialSummary(
            verdict=self.verdict(), p_value=self.p_value, alpha=self.alpha, e_value=self.e_value,
            max_e_value=self.max_e_value, alternative_hit_rate=self.alternative,
            keys_tested=self.keys_tested, hits=self.hits,
            curve=[KeyStep(**step) for step in self.history])
