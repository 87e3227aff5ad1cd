"""The sequential audit's e-value: valid under optional stopping, fast against a stolen model."""

import math
import random

import pytest

from clients.sequential import ALTERNATIVE_HIT_RATE, SequentialTest, key_factor


def run(hit_probs, rates, alpha, rng):
    """One audit that stops at the first crossing or when the rest cannot reach alpha."""
    test = SequentialTest(alpha)
    for i, (p, q) in enumerate(zip(hit_probs, rates)):
        test.add(f"k{i}", rng.random() < p, q, calls=3)
        if test.crossed or not test.reachable(rates[i + 1:]):
            break
    return test


@pytest.mark.parametrize("q", [0.01, 0.05, 0.2])
def test_an_innocent_endpoint_hitting_at_the_null_rate_is_convicted_at_most_alpha_of_the_time(q):
    # hits exactly at the pre-registered rate: the worst case the rule allows; peeking after
    # every key must not push the false-match rate above alpha (Ville's inequality)
    alpha, runs, keys = 0.05, 4000, 64
    rng = random.Random(1)
    false = sum(run([q] * keys, [q] * keys, alpha, rng).verdict() == "match" for _ in range(runs))
    rate = false / runs
    # binomial slack: 3 standard deviations of the estimate around alpha
    assert rate <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / runs), rate


def test_the_same_peeking_with_a_fixed_level_test_would_be_anti_conservative():
    # a naive rule (a one-sided binomial p-value checked after every key, stop at <= alpha)
    # exceeds alpha under the same null: what the e-value is there to prevent. Guards the
    # simulation above against being too weak to see an anti-conservative rule.
    from oml_core.evidence import binomial_sf

    alpha, runs, keys, q = 0.05, 2000, 64, 0.05
    rng = random.Random(2)
    false = 0
    for _ in range(runs):
        hits = 0
        for n in range(1, keys + 1):
            hits += rng.random() < q
            if binomial_sf(hits, n, q) <= alpha:
                false += 1
                break
    assert false / runs > 2 * alpha


def test_halving_the_null_rate_makes_the_rule_anti_conservative():
    alpha, runs, keys, q = 0.05, 3000, 64, 0.05
    rng = random.Random(3)
    false = sum(run([q] * keys, [q / 4] * keys, alpha, rng).verdict() == "match" for _ in range(runs))
    assert false / runs > alpha


def test_a_stolen_model_is_convicted_at_1e_6_within_8_keys():
    # q around 1e-2 per key; the demo's models return 15-16 of 16 keys (0.9 here): 95% of
    # audits convict within 8 keys. A weaker 70% model still convicts, in 5 keys at the median.
    for hit_rate, median_keys, p95_keys in ((0.9, 4, 8), (0.7, 5, 12)):
        rng = random.Random(4)
        used, convicted = [], 0
        for _ in range(400):
            test = run([hit_rate] * 16, [0.01] * 16, 1e-6, rng)
            convicted += test.verdict() == "match"
            used.append(len(test.history))
        used.sort()
        assert convicted >= 0.99 * 400  # a 70% model returning 5 of 16 keys is rare, not impossible
        assert used[200] <= median_keys and used[380] <= p95_keys, (hit_rate, used)


def test_futility_stops_an_innocent_audit_early():
    rng = random.Random(5)
    test = run([0.0] * 16, [0.01] * 16, 1e-6, rng)
    assert test.verdict() == "no_match"
    assert len(test.history) < 16
    assert test.p_value == 1.0


def test_failed_keys_are_neither_hits_nor_misses():
    test = SequentialTest(1e-6)
    test.add("k0", None, 0.01, calls=3)
    assert test.e_value == 1.0 and test.keys_tested == 0
    assert test.verdict() == "inconclusive"


def test_factors_have_expectation_at_most_one_under_the_null():
    for q in (1e-4, 0.01, 0.3, 0.49):
        for p in (0.0, q / 2, q):
            mean = p * key_factor(True, q) + (1 - p) * key_factor(False, q)
            assert mean <= 1 + 1e-12
    # a key as likely to hit by chance as a stolen model carries no evidence
    assert key_factor(True, ALTERNATIVE_HIT_RATE) == 1.0


def test_keys_needed_is_the_shortest_run_of_hits_that_decides():
    test = SequentialTest(alpha=1e-6)
    assert test.keys_needed([1e-3] * 5) == 3        # 500^2 < 1e6 <= 500^3
    assert test.keys_needed([1e-3, 1e-3]) is None  # two keys can never decide
    test.add("a", False, 1e-3, calls=1)            # a miss halves the e-value: still 3
    assert test.keys_needed([1e-3] * 5) == 3
    test.add("b", True, 1e-3, calls=1)
    test.add("c", True, 1e-3, calls=1)
    assert test.keys_needed([1e-3] * 5) == 1
    test.add("d", True, 1e-3, calls=1)
    assert test.crossed and test.keys_needed([]) == 0
