"""Turn "k fingerprint hits out of n probed keys" into a p-value and a verdict (docs/design.md#evidence).

An accusation needs a number: how likely would an unrelated model produce at least this many
hits by chance? Each key has a null rate q_i (the chance an unrelated model answers it with the
fingerprint response). The hit count under the null is a sum of independent Bernoulli(q_i), so
the p-value is a binomial (all q_i equal) or Poisson-binomial upper tail. Tails as small as
1e-30 matter, so nothing here computes 1 - cdf: upper tails are summed directly.

Everything here is pure: no I/O, no randomness.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from numbers import Real
from typing import Sequence

import numpy as np

from oml_core.errors import OMLInputError

DEFAULT_ALPHA = 1e-6
"""Default significance level: claim a match only when chance would explain it at most 1e-6."""

ASSUMED_NULL_RATE = 0.05
"""Null rate used for a key when neither its response probability nor a measurement is known.

Deliberately pessimistic (real per-key rates are usually far lower), so that a verdict made on
this assumption needs more hits, never fewer.
"""


def _check_rate(q: float, what: str = "q") -> None:
    """Reject a rate outside [0, 1] (NaN included) before it silently poisons a tail sum."""
    if not isinstance(q, Real) or not 0.0 <= q <= 1.0:
        raise ValueError(f"{what} must be a probability in [0, 1], got {q!r}")


def _check_count(n: int, what: str) -> None:
    """Counts must be non-negative integers; floats would make the sums ill-defined."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {n!r}")


def _log_sum_exp(logs: Sequence[float]) -> float:
    """log(sum(exp(x))) without underflow: tail terms can be far below the float range."""
    top = max(logs)
    if top == -math.inf:
        return -math.inf
    return top + math.log(math.fsum(math.exp(x - top) for x in logs))


def _log_binomial_term(i: int, n: int, log_q: float, log_not_q: float) -> float:
    """log of C(n, i) q^i (1-q)^(n-i), computed in log space so tiny terms keep their precision."""
    log_choose = math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1)
    return log_choose + i * log_q + (n - i) * log_not_q


def binomial_sf(k: int, n: int, q: float) -> float:
    """P[X >= k] for X ~ Binomial(n, q), accurate in the far tail.

    The tail terms are summed in log space rather than taking 1 - cdf, which would lose
    everything below about 1e-16 to cancellation.
    """
    _check_count(n, "n")
    _check_rate(q)
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if q == 0:
        return 0.0
    if q == 1:
        return 1.0
    log_q, log_not_q = math.log(q), math.log1p(-q)
    logs = [_log_binomial_term(i, n, log_q, log_not_q) for i in range(k, n + 1)]
    return min(1.0, math.exp(_log_sum_exp(logs)))


def poisson_binomial_sf(k: int, qs: Sequence[float]) -> float:
    """P[X >= k] where X is a sum of independent Bernoulli(q_i): the exact per-key p-value.

    Builds the exact pmf by dynamic programming (one vectorised update per key, O(n^2)) and
    sums its upper tail directly, so small tails are not lost to 1 - cdf cancellation. Tails
    below the smallest double (about 1e-308) come out as 0.0.
    """
    rates = np.asarray(list(qs), dtype=np.float64)
    if rates.ndim != 1:
        raise ValueError("qs must be a flat sequence of probabilities")
    if rates.size and (np.isnan(rates).any() or rates.min() < 0.0 or rates.max() > 1.0):
        raise ValueError("every q_i must be a probability in [0, 1]")
    n = int(rates.size)
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    pmf = np.zeros(n + 1, dtype=np.float64)
    pmf[0] = 1.0
    for done, q in enumerate(rates):
        # After `done` keys only pmf[0..done] is non-zero; update that prefix plus one slot.
        head = pmf[: done + 1].copy()
        pmf[: done + 1] = head * (1.0 - q)
        pmf[1 : done + 2] += head * q
    return float(min(1.0, math.fsum(pmf[k:])))


def p_value(k: int, null_rates: float | Sequence[float], n: int | None = None) -> float:
    """P-value for k hits: binomial for one shared rate (needs n), Poisson-binomial for per-key rates."""
    if isinstance(null_rates, Real):
        if n is None:
            raise ValueError("n (the number of keys probed) is required with a single null rate")
        return binomial_sf(k, n, float(null_rates))
    rates = list(null_rates)
    if n is not None and n != len(rates):
        raise ValueError(f"n={n} does not match the {len(rates)} per-key null rates given")
    return poisson_binomial_sf(k, rates)


def union_bound_rate(q: float, trials: int) -> float:
    """Null chance that a key hits under ANY of `trials` wrappers: min(1, trials * q).

    A key probed under several prompt wrappers counts as one hit if any of them hits, which
    raises its null rate. The union bound holds whatever the dependence between wrappers, so
    it never understates the rate.
    """
    _check_rate(q)
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive integer, got {trials!r}")
    return min(1.0, trials * q)


def laplace_rate(hits: int, trials: int) -> float:
    """Null rate measured on an unrelated model, smoothed to (hits + 1) / (trials + 2).

    A raw 0/n measurement would claim an impossible-by-chance key and make any single hit
    damning; the add-one estimate is never 0 and shrinks toward 1/2 when data are scarce.
    """
    _check_count(hits, "hits")
    _check_count(trials, "trials")
    if hits > trials:
        raise ValueError(f"hits ({hits}) cannot exceed trials ({trials})")
    return (hits + 1) / (trials + 2)


def min_hits_for_significance(n: int, q: float, alpha: float) -> int | None:
    """Smallest k with binomial_sf(k, n, q) <= alpha, or None if even k = n is not enough.

    Lets a user fix the decision rule before probing: "we claim a match at k or more hits".
    The tail is non-increasing in k, so a binary search keeps this fast for large n.
    """
    _check_count(n, "n")
    _check_rate(q)
    if not isinstance(alpha, Real) or not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if binomial_sf(n, n, q) > alpha:
        return None
    low, high = 0, n  # invariant: sf(high) <= alpha, and sf(low) > alpha since sf(0) = 1
    while high - low > 1:
        mid = (low + high) // 2
        if binomial_sf(mid, n, q) <= alpha:
            high = mid
        else:
            low = mid
    return high


@dataclass(frozen=True)
class Evidence:
    """Everything a reader needs to check a verdict: counts, null rate, p-value and the rule."""

    matched: int
    total: int
    null_rate: float
    null_rate_source: str
    p_value: float
    alpha: float
    verdict: str
    rule: str

    def to_dict(self) -> dict:
        """Plain dict for JSON reports."""
        return asdict(self)


def _default_rule(alpha: float) -> str:
    """The decision rule in words, so a report states what was fixed before probing."""
    return (
        f"match if P[X >= hits] <= {alpha:g}, where X counts chance hits among the probed keys "
        "as independent Bernoulli trials at the per-key null rates (Poisson-binomial tail)"
    )


def _validate_decision_inputs(matched: int, rates: list[float], alpha: float) -> None:
    """Reject inputs that would make a verdict meaningless, with a message saying how to fix them."""
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not 0.0 < alpha < 1.0:
        raise OMLInputError(
            f"alpha must be strictly between 0 and 1, got {alpha!r}; use a small level such as 1e-6"
        )
    for i, q in enumerate(rates):
        if isinstance(q, bool) or not isinstance(q, Real) or not 0.0 <= q <= 1.0:
            raise OMLInputError(
                f"null rate for key {i} must be in [0, 1], got {q!r}; pass a probability"
            )
    if isinstance(matched, bool) or not isinstance(matched, int):
        raise OMLInputError(f"matched must be a whole number of hits, got {matched!r}")
    if not 0 <= matched <= len(rates):
        raise OMLInputError(
            f"matched={matched} is outside 0..{len(rates)} (the number of keys probed); "
            "count each probed key at most once"
        )


def decide(
    matched: int,
    null_rates: Sequence[float],
    alpha: float = DEFAULT_ALPHA,
    source: str = "given",
    rule: str | None = None,
) -> Evidence:
    """Apply the fixed rule "match iff p <= alpha" to `matched` hits over len(null_rates) keys.

    With no keys probed there is no evidence, so the verdict is "no_match" whatever alpha is.
    `rule` defaults to a sentence describing this test at the given alpha.
    """
    rates = list(null_rates)
    _validate_decision_inputs(matched, rates, alpha)
    total = len(rates)
    p = poisson_binomial_sf(matched, rates)
    verdict = "match" if total > 0 and p <= alpha else "no_match"
    return Evidence(
        matched=matched,
        total=total,
        null_rate=math.fsum(rates) / total if total else 0.0,
        null_rate_source=source,
        p_value=p,
        alpha=float(alpha),
        verdict=verdict,
        rule=rule if rule is not None else _default_rule(alpha),
    )


_SOURCE_ORDER = ("response_prob", "measured", "assumed")


def _check_user_rate(value: float, what: str, fix: str) -> None:
    """User-supplied rates must be probabilities; say which one is wrong and how to fix it."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= value <= 1.0:
        raise OMLInputError(f"{what} must be in [0, 1], got {value!r}; {fix}")


def _key_null_rate(prob: float | None, measured: float | None) -> tuple[float, tuple[str, ...]]:
    """One key's null rate and the sources it came from; the larger known rate is the safe one."""
    if prob is not None and measured is not None:
        return max(prob, measured), ("response_prob", "measured")
    if prob is not None:
        return prob, ("response_prob",)
    if measured is not None:
        return measured, ("measured",)
    return ASSUMED_NULL_RATE, ("assumed",)


def combine_null_rates(
    response_probs: Sequence[float | None] | None,
    measured: float | Sequence[float] | None,
    given: float | None,
    n: int,
) -> tuple[list[float], str]:
    """Per-key null rates for n keys and a label saying where they came from.

    A user-given rate overrides everything. Otherwise each key takes the larger of its
    response probability and the measured rate (the conservative choice when both are known),
    whichever one is known, or ASSUMED_NULL_RATE when neither is. `measured` is one rate for
    every key or one per key (a measured null-rate file). The label joins the sources used,
    e.g. "response_prob+measured" or "response_prob+assumed".
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise OMLInputError(f"number of keys must be a non-negative integer, got {n!r}")
    if given is not None:
        _check_user_rate(given, "given null rate", "pass a probability such as 0.01")
        return [float(given)] * n, "given"
    per_key_measured: list[float | None] = [None] * n
    if measured is not None and not isinstance(measured, Real):
        per_key_measured = list(measured)
        if len(per_key_measured) != n:
            raise OMLInputError(f"got {len(per_key_measured)} measured null rates for {n} keys; "
                                "re-run the null-rate measurement on this set")
        for i, value in enumerate(per_key_measured):
            _check_user_rate(value, f"measured null rate for key {i}", "re-run the null-rate measurement")
    elif measured is not None:
        _check_user_rate(measured, "measured null rate", "re-run the null-rate measurement")
        per_key_measured = [measured] * n
    probs: Sequence[float | None] = [None] * n if response_probs is None else response_probs
    if len(probs) != n:
        raise OMLInputError(
            f"got {len(probs)} response probabilities for {n} keys; pass one per key (or none)"
        )
    rates: list[float] = []
    used: set[str] = set()
    for i, prob in enumerate(probs):
        if prob is not None:
            _check_user_rate(prob, f"response_prob for key {i}", "regenerate the fingerprints")
        rate, sources = _key_null_rate(prob, per_key_measured[i])
        rates.append(float(rate))
        used.update(sources)
    if not used:  # n == 0: name what was supplied
        used = {"measured"} if measured is not None else {"assumed"}
    return rates, "+".join(s for s in _SOURCE_ORDER if s in used)
