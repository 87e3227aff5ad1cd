"""Tests for oml_core.evidence: tails checked against exact rational arithmetic."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest

from oml_core.errors import OMLInputError
from oml_core.evidence import (
    ASSUMED_NULL_RATE,
    DEFAULT_ALPHA,
    Evidence,
    binomial_sf,
    combine_null_rates,
    decide,
    laplace_rate,
    min_hits_for_significance,
    p_value,
    poisson_binomial_sf,
    union_bound_rate,
)

REL_TOL = 1e-9


def exact_binomial_sf(k: int, n: int, q: Fraction) -> Fraction:
    """P[X >= k] for Binomial(n, q), exactly."""
    return sum(
        (Fraction(math.comb(n, i)) * q**i * (1 - q) ** (n - i) for i in range(max(k, 0), n + 1)),
        Fraction(0),
    )


def exact_poisson_binomial_sf(k: int, qs: list[Fraction]) -> Fraction:
    """P[X >= k] by enumerating all 2^n outcomes, exactly."""
    total = Fraction(0)
    for outcome in itertools.product((0, 1), repeat=len(qs)):
        if sum(outcome) >= k:
            prob = Fraction(1)
            for hit, q in zip(outcome, qs):
                prob *= q if hit else 1 - q
            total += prob
    return total


def assert_close(actual: float, exact: Fraction) -> None:
    """Relative error below REL_TOL (exact zero must be exactly zero)."""
    if exact == 0:
        assert actual == 0.0
    else:
        assert abs(Fraction(actual) - exact) / exact < REL_TOL, (actual, float(exact))


# --- binomial_sf -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", range(0, 34))
def test_binomial_sf_matches_exact_for_q_1_over_256(k: int) -> None:
    q = Fraction(1, 256)
    assert_close(binomial_sf(k, 32, float(q)), exact_binomial_sf(k, 32, q))


@pytest.mark.parametrize(
    ("k", "n", "q"),
    [
        (3, 10, Fraction(1, 2)),
        (7, 20, Fraction(1, 10)),
        (15, 40, Fraction(3, 100)),
        (1, 5, Fraction(1, 1000)),
        (50, 100, Fraction(1, 50)),
        (100, 100, Fraction(1, 1000)),
        (60, 200, Fraction(1, 4)),
    ],
)
def test_binomial_sf_matches_exact_various(k: int, n: int, q: Fraction) -> None:
    assert_close(binomial_sf(k, n, float(q)), exact_binomial_sf(k, n, Fraction(float(q))))


def test_binomial_sf_tiny_tail_all_hits() -> None:
    q = Fraction(1, 256)
    exact = q**64
    assert exact == exact_binomial_sf(64, 64, q)
    result = binomial_sf(64, 64, 1 / 256)
    assert result < 1e-150
    assert_close(result, exact)


def test_binomial_sf_tail_below_1e30() -> None:
    q = Fraction(1, 100)
    exact = exact_binomial_sf(20, 50, q)
    assert exact < Fraction(1, 10**20)
    assert_close(binomial_sf(20, 50, 0.01), exact)


def test_binomial_sf_edges() -> None:
    assert binomial_sf(0, 10, 0.3) == 1.0
    assert binomial_sf(-2, 10, 0.3) == 1.0
    assert binomial_sf(11, 10, 0.3) == 0.0
    assert binomial_sf(1, 10, 0.0) == 0.0
    assert binomial_sf(0, 10, 0.0) == 1.0
    assert binomial_sf(10, 10, 1.0) == 1.0
    assert binomial_sf(11, 10, 1.0) == 0.0
    assert binomial_sf(0, 0, 0.5) == 1.0
    assert binomial_sf(1, 0, 0.5) == 0.0


@pytest.mark.parametrize("q", [-0.1, 1.5, float("nan")])
def test_binomial_sf_rejects_bad_rate(q: float) -> None:
    with pytest.raises(ValueError):
        binomial_sf(1, 10, q)


def test_binomial_sf_rejects_negative_n() -> None:
    with pytest.raises(ValueError):
        binomial_sf(1, -1, 0.5)


def test_binomial_sf_is_monotone_in_k() -> None:
    values = [binomial_sf(k, 64, 0.05) for k in range(66)]
    assert all(a >= b for a, b in zip(values, values[1:]))


# --- the worked example of docs/design.md#evidence ---------------------------------------------------------------------


def test_spec_example_q_1_over_256() -> None:
    q = Fraction(1, 256)
    assert exact_binomial_sf(5, 32, q) <= Fraction(1, 10**6) < exact_binomial_sf(4, 32, q)
    assert binomial_sf(5, 32, 1 / 256) <= 1e-6
    assert binomial_sf(4, 32, 1 / 256) > 1e-6
    assert min_hits_for_significance(32, 1 / 256, 1e-6) == 5


@pytest.mark.parametrize(("q", "expected"), [(0.014, 7), (0.2, 20)])
def test_spec_example_other_rates(q: float, expected: int) -> None:
    exact_q = Fraction(q)
    alpha = Fraction(1, 10**6)
    assert exact_binomial_sf(expected, 32, exact_q) <= alpha < exact_binomial_sf(
        expected - 1, 32, exact_q
    )
    assert min_hits_for_significance(32, q, 1e-6) == expected


def test_min_hits_none_when_unreachable() -> None:
    # Even 32 of 32 hits at q = 0.7 happen by chance with probability 0.7^32 ~ 1e-5.
    assert min_hits_for_significance(32, 0.7, 1e-6) is None
    assert min_hits_for_significance(0, 0.01, 1e-6) is None


def test_min_hits_agrees_with_linear_scan() -> None:
    for n, q, alpha in [(50, 0.03, 1e-4), (200, 0.1, 1e-9), (10, 0.5, 0.01)]:
        scan = next((k for k in range(n + 1) if binomial_sf(k, n, q) <= alpha), None)
        assert min_hits_for_significance(n, q, alpha) == scan


# --- poisson_binomial_sf ---------------------------------------------------------------------

VARIED = [
    Fraction(1, 256), Fraction(1, 3), Fraction(1, 10), Fraction(7, 8), Fraction(1, 2),
    Fraction(1, 100), Fraction(0), Fraction(1), Fraction(2, 7), Fraction(1, 1000),
]


@pytest.mark.parametrize("k", range(0, 12))
def test_poisson_binomial_matches_enumeration(k: int) -> None:
    qs = [Fraction(float(q)) for q in VARIED]
    assert_close(poisson_binomial_sf(k, [float(q) for q in qs]), exact_poisson_binomial_sf(k, qs))


def test_poisson_binomial_equals_binomial_when_rates_equal() -> None:
    for n, q in [(32, 1 / 256), (64, 0.014), (100, 0.2)]:
        for k in range(0, n + 2):
            expected = binomial_sf(k, n, q)
            actual = poisson_binomial_sf(k, [q] * n)
            assert actual == pytest.approx(expected, rel=REL_TOL, abs=0.0)


def test_poisson_binomial_tiny_tail() -> None:
    assert_close(poisson_binomial_sf(64, [1 / 256] * 64), Fraction(1, 256) ** 64)


def test_poisson_binomial_large_n_completes() -> None:
    qs = [0.001 + 0.01 * (i % 7) / 7 for i in range(8192)]
    for k in (0, 50, 100, 8192):
        p = poisson_binomial_sf(k, qs)
        assert 0.0 <= p <= 1.0


def test_poisson_binomial_edges_and_validation() -> None:
    assert poisson_binomial_sf(0, []) == 1.0
    assert poisson_binomial_sf(1, []) == 0.0
    assert poisson_binomial_sf(3, [0.5, 0.5]) == 0.0
    with pytest.raises(ValueError):
        poisson_binomial_sf(1, [0.5, 1.2])
    with pytest.raises(ValueError):
        poisson_binomial_sf(1, [float("nan")])


# --- p_value, union bound, Laplace ------------------------------------------------------------


def test_p_value_dispatch() -> None:
    assert p_value(5, 1 / 256, n=32) == binomial_sf(5, 32, 1 / 256)
    assert p_value(2, [0.1, 0.2, 0.3]) == poisson_binomial_sf(2, [0.1, 0.2, 0.3])
    assert p_value(2, [0.1, 0.2, 0.3], n=3) == poisson_binomial_sf(2, [0.1, 0.2, 0.3])
    with pytest.raises(ValueError):
        p_value(5, 0.01)
    with pytest.raises(ValueError):
        p_value(1, [0.1, 0.2], n=3)


def test_union_bound_rate() -> None:
    assert union_bound_rate(0.01, 3) == pytest.approx(0.03)
    assert union_bound_rate(0.4, 3) == 1.0
    assert union_bound_rate(0.05, 1) == 0.05
    with pytest.raises(ValueError):
        union_bound_rate(0.01, 0)
    with pytest.raises(ValueError):
        union_bound_rate(1.5, 2)


def test_laplace_rate() -> None:
    assert laplace_rate(0, 98) == pytest.approx(1 / 100)
    assert laplace_rate(3, 8) == pytest.approx(4 / 10)
    assert laplace_rate(0, 0) == 0.5
    assert laplace_rate(0, 10**6) > 0
    with pytest.raises(ValueError):
        laplace_rate(5, 4)
    with pytest.raises(ValueError):
        laplace_rate(-1, 4)


# --- decide ----------------------------------------------------------------------------------


def test_decide_boundary_at_spec_example() -> None:
    rates = [1 / 256] * 32
    hit = decide(5, rates)
    miss = decide(4, rates)
    assert hit.verdict == "match" and miss.verdict == "no_match"
    assert hit.p_value <= DEFAULT_ALPHA < miss.p_value
    assert hit.matched == 5 and hit.total == 32
    assert hit.null_rate == pytest.approx(1 / 256)
    assert hit.alpha == DEFAULT_ALPHA


def test_decide_exactly_at_alpha_is_a_match() -> None:
    rates = [0.5, 0.5]
    assert decide(2, rates, alpha=0.25).verdict == "match"
    assert decide(2, rates, alpha=0.2499).verdict == "no_match"


def test_decide_no_keys_is_never_a_match() -> None:
    evidence = decide(0, [], alpha=0.999)
    assert evidence.verdict == "no_match"
    assert evidence.total == 0 and evidence.p_value == 1.0


def test_decide_records_source_and_rule() -> None:
    evidence = decide(3, [0.01] * 10, alpha=1e-3, source="measured", rule="my rule")
    assert evidence.null_rate_source == "measured"
    assert evidence.rule == "my rule"
    as_dict = evidence.to_dict()
    assert as_dict == {
        "matched": 3, "total": 10, "null_rate": evidence.null_rate,
        "null_rate_source": "measured", "p_value": evidence.p_value, "alpha": 1e-3,
        "verdict": evidence.verdict, "rule": "my rule",
    }
    default_rule = decide(3, [0.01] * 10, alpha=1e-3).rule
    assert "0.001" in default_rule
    with pytest.raises(AttributeError):
        evidence.verdict = "match"  # type: ignore[misc]
    assert isinstance(evidence, Evidence)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -1e-6, 2.0, float("nan")])
def test_decide_rejects_bad_alpha(alpha: float) -> None:
    with pytest.raises(OMLInputError, match="alpha"):
        decide(1, [0.1, 0.1], alpha=alpha)


@pytest.mark.parametrize("rate", [-0.01, 1.01, float("nan")])
def test_decide_rejects_bad_rate(rate: float) -> None:
    with pytest.raises(OMLInputError, match="key 1"):
        decide(1, [0.1, rate])


@pytest.mark.parametrize("matched", [3, -1])
def test_decide_rejects_bad_matched(matched: int) -> None:
    with pytest.raises(OMLInputError, match="matched"):
        decide(matched, [0.1, 0.1])


def test_decide_errors_are_one_line() -> None:
    with pytest.raises(OMLInputError) as info:
        decide(5, [0.1])
    assert "\n" not in str(info.value)


# --- combine_null_rates ----------------------------------------------------------------------


def test_combine_given_wins_outright() -> None:
    rates, source = combine_null_rates([0.001, None], measured=0.02, given=0.1, n=2)
    assert rates == [0.1, 0.1] and source == "given"


def test_combine_takes_max_of_prob_and_measured() -> None:
    rates, source = combine_null_rates([0.001, 0.5], measured=0.02, given=None, n=2)
    assert rates == [0.02, 0.5] and source == "response_prob+measured"


def test_combine_response_prob_alone() -> None:
    rates, source = combine_null_rates([0.001, 0.003], measured=None, given=None, n=2)
    assert rates == [0.001, 0.003] and source == "response_prob"


def test_combine_measured_alone() -> None:
    rates, source = combine_null_rates(None, measured=0.02, given=None, n=3)
    assert rates == [0.02] * 3 and source == "measured"
    rates, source = combine_null_rates([None, None], measured=0.02, given=None, n=2)
    assert rates == [0.02, 0.02] and source == "measured"


def test_combine_assumed_when_nothing_known() -> None:
    rates, source = combine_null_rates(None, measured=None, given=None, n=4)
    assert rates == [ASSUMED_NULL_RATE] * 4 and source == "assumed"


def test_combine_mixed_prob_and_assumed() -> None:
    rates, source = combine_null_rates([0.001, None], measured=None, given=None, n=2)
    assert rates == [0.001, ASSUMED_NULL_RATE] and source == "response_prob+assumed"


def test_combine_mixed_prob_and_measured_with_gaps() -> None:
    rates, source = combine_null_rates([0.001, None], measured=0.02, given=None, n=2)
    assert rates == [0.02, 0.02] and source == "response_prob+measured"


def test_combine_validation() -> None:
    with pytest.raises(OMLInputError, match="3 keys"):
        combine_null_rates([0.1, 0.2], measured=None, given=None, n=3)
    with pytest.raises(OMLInputError, match="given"):
        combine_null_rates(None, measured=None, given=1.5, n=3)
    with pytest.raises(OMLInputError, match="measured"):
        combine_null_rates(None, measured=-0.1, given=None, n=3)
    with pytest.raises(OMLInputError, match="key 1"):
        combine_null_rates([0.1, 2.0], measured=None, given=None, n=2)
