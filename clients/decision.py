"""The audit's decision rule, fixed before the first probe (SPEC §5).

Trying many layers, wrappers and samples gives chance many openings; the rule below pays for
every one of them, so a verdict means the same thing however many probes were sent.

1. Per probe, a null rate: the chance that an *unrelated* model's answer matches.
   - From the set's `response_prob` q (the base model's probability of the response's first
     token; SPEC §2), or the pessimistic ASSUMED_NULL_RATE when the set has none. The start
     rule checks one position, so the rate is q; in the agent layer it checks the answer start
     and up to --json-fields JSON values, so (1 + json_fields)·q; the anywhere rule checks up to
     --max-tokens positions, so max_tokens·q. Sampling above temperature 1 flattens the
     distribution: q^(1/T) bounds the rate there.
   - Or a measured rate (--null-file: the key's own measured rate, else the pooled one; taken
     as the per-probe rate under the same rule, never below the response_prob bound) or a
     given one (--null-rate, used as is).
2. Per test and key: the key hits if any of its probes in the test matched; its null rate is
   the sum of its probes' rates (union bound, valid whatever the dependence between probes).
   Probes that ended in an error are left out: they are neither hits nor misses.
3. The tests: one per planned layer, plus "any" (all layers pooled), fixed from the plan.
   Each test's p-value is the Poisson-binomial tail P[X >= hits] (oml_core.evidence).
4. Bonferroni over the F tests: p = min(1, F · min_test p_test); verdict `match` iff p <= alpha.
5. A test none of whose keys got a valid answer did not take place (`tested`: false). When no
   test took place, the verdict is `inconclusive`, not `no_match`: an endpoint that fails every
   probe (down, hostile, misconfigured) has shown nothing either way, and must not read as
   innocent. A `no_match` also says whether it could have been a `match` at all
   (`best_possible_p_value`: the p-value had every answered key come back), since a handful of
   answered keys cannot reach a small alpha.
"""

from __future__ import annotations

import math
from collections import defaultdict

from oml_core.evidence import ASSUMED_NULL_RATE, combine_null_rates, decide

ANY = "any"


def family_of(layers: list[str]) -> list[str]:
    """The pre-registered family: every layer, plus the pooled test when there are several."""
    return list(layers) + ([ANY] if len(layers) > 1 else [])


def multiplier(layer: str, rule: str, json_fields: int, max_tokens: int) -> int:
    """How many answer positions one probe's match check looks at (union bound on its rate)."""
    if rule == "anywhere":
        return max_tokens
    return 1 + json_fields if layer == "agent" else 1


def base_rates(response_probs: list[float | None]) -> tuple[list[float], str]:
    rates, source = combine_null_rates(response_probs, None, None, len(response_probs))
    return rates, source


def probe_rate(q: float, temperature: float, mult: int) -> float:
    if temperature > 1.0 and 0.0 < q < 1.0:
        q = q ** (1.0 / temperature)
    return min(1.0, q * mult)


def rule_text(cfg, layers: list[str], source: str) -> str:
    tests = family_of(layers)
    return (
        f"pre-registered before probing: per probe, a null rate from {source} (x answer positions "
        f"checked: {cfg.match} rule); a key hits a test if any of its probes there matched, with "
        "the summed (union-bound) rate of its completed probes; per test the Poisson-binomial "
        f"tail P[X >= hits]; match iff min(1, {len(tests)} x smallest test p) <= {cfg.alpha:g} "
        f"(Bonferroni over the tests {', '.join(tests)}); errors are not counted as misses")


def null_source(cfg, sources: str, measured: bool) -> str:
    if cfg.null_rate is not None:
        return "given"
    return f"{sources}+measured" if measured else sources


def evaluate(cfg, layers: list[str], outcomes: list[dict], key_rates: dict[str, float],
             measured: dict[str, float] | None, source: str) -> dict:
    """Apply the rule to completed probe outcomes.

    `outcomes`: dicts with fingerprint_id, layer, temperature, status ("ok"/"error"), hit.
    `key_rates`: the per-key base null rate (response_prob or assumed); `measured`: the
    per-key measured per-probe rates (--null-file), or None.
    """
    tests = family_of(layers)
    alpha_each = cfg.alpha / len(tests)
    per_key: dict[str, dict[str, list]] = {t: defaultdict(lambda: [False, 0.0]) for t in tests}
    for o in outcomes:
        if o["status"] != "ok" or o["layer"] not in layers:
            continue
        if cfg.null_rate is not None:
            rate = cfg.null_rate
        else:
            mult = multiplier(o["layer"], cfg.match, cfg.json_fields, cfg.max_tokens)
            rate = probe_rate(key_rates.get(o["fingerprint_id"], ASSUMED_NULL_RATE),
                              o["temperature"], mult)
            if measured is not None:
                rate = max(rate, measured.get(o["fingerprint_id"], 0.0))
        for test in (o["layer"], ANY):
            if test in per_key:
                cell = per_key[test][o["fingerprint_id"]]
                cell[0] = cell[0] or bool(o["hit"])
                cell[1] += rate
    results = {}
    for test in tests:
        cells = per_key[test]
        rates = [min(1.0, rate) for _, rate in cells.values()]
        hits = sum(1 for hit, _ in cells.values() if hit)
        evidence = decide(hits, rates, alpha=alpha_each, source=source)
        results[test] = {"matched": hits, "total": len(rates), "p_value": evidence.p_value,
                         "mean_null_rate": evidence.null_rate,
                         "significant_at_corrected_alpha": evidence.verdict == "match",
                         "tested": bool(rates),
                         "best_possible_p_value": math.prod(rates)}  # P[X >= n] = all hit
    best = min(tests, key=lambda t: (results[t]["p_value"], t != ANY))
    p = min(1.0, len(tests) * results[best]["p_value"])
    if not any(results[t]["tested"] for t in tests):
        verdict = "inconclusive"
    else:
        verdict = "match" if p <= cfg.alpha else "no_match"
    best_possible = min(1.0, len(tests) * min(results[t]["best_possible_p_value"] for t in tests))
    return {"verdict": verdict, "p_value": p, "alpha": cfg.alpha, "deciding_test": best,
            "best_possible_p_value": best_possible,
            "untested": [t for t in tests if not results[t]["tested"]],
            "tests": results, "family_size": len(tests), "null_rate_source": source,
            "unadjusted_p_value": results[best]["p_value"],
            "log10_p_value": math.log10(p) if p > 0 else None}
