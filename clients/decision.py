"""The audit's decision rule, fixed before the first probe (docs/design.md#evidence).

Trying many layers, wrappers and samples gives chance many openings; the rule below pays for
every one of them, so a verdict means the same thing however many probes were sent.

1. Per probe, a null rate: the chance that an *unrelated* model's answer matches, from the one
   null-rate model the verifier shares (oml_core.null_rates.probe_null_rate), written into
   plan.json before the first request:
   - for a calibrated set (`oml calibrate`) and the start rule: the base model's probability
     that an answer in this probe's own context (its layer's chat template, system prompt or
     agent frame), at this probe's temperature (greedy: temperature 1), opens with the response
     at a word boundary; the agent layer adds, for each of --json-fields JSON values, the
     probability at a JSON value's opening (union bound over the positions checked);
   - otherwise the older bound from the set's `response_prob` q (the base model's probability
     of the response's first token in the context the set was made in), or the pessimistic
     ASSUMED_NULL_RATE: q per position checked ((1 + json_fields)·q in the agent layer,
     max_tokens·q for the anywhere rule), q^(1/T) above temperature 1;
   - never below the key's measured panel rate (--null-file, read and checked by
     oml_core.null_rates like `oml verify` does) nor NULL_RATE_FLOOR per position;
   - or a given one (--null-rate, used as is).
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

from clients.audit_result import AuditDecision, TestOutcome
from oml_core.evidence import ASSUMED_NULL_RATE, combine_null_rates, decide
from oml_core.null_rates import context_rate, probe_null_rate, source_label

ANY = "any"
# The engine rule (oml_core.verify.matching) that counts what each audit rule counts: the
# rule a --null-file must have been measured with, and the rule of the calibrated rates.
ENGINE_RULE = {"start": "start", "anywhere": "normalized"}


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
    """The uncalibrated bound: q per answer position, flattened above temperature 1."""
    if temperature > 1.0 and 0.0 < q < 1.0:
        q = q ** (1.0 / temperature)
    return min(1.0, q * mult)


def probe_rates(cfg, probes, fingerprints: dict, panel: dict[str, float] | None
                ) -> tuple[dict[str, float], str, list[str]]:
    """Every probe's pre-registered null rate (see the module docstring), the label of their
    sources, and notes on what had to fall back to the uncalibrated bound."""
    if cfg.null_rate is not None:
        return {p.id: float(cfg.null_rate) for p in probes}, "given", []
    rule = ENGINE_RULE[cfg.answer_match]
    rates, sources, missing = {}, set(), set()
    for probe in probes:
        fp = fingerprints[probe.fingerprint_id]
        q = fp.response_prob
        fallback = (probe_rate(ASSUMED_NULL_RATE if q is None else q, probe.temperature,
                               multiplier(probe.layer, cfg.answer_match, cfg.json_fields, cfg.max_tokens)),
                    "assumed" if q is None else "response_prob")
        positions = [context_rate(fp, rule, context, probe.temperature)
                     for context in probe.rated_contexts(cfg.json_fields)]
        if None in positions:
            positions = None
            if fp.context_rates and rule == "start":
                missing.add(f"{probe.layer} at temperature {probe.temperature:g}")
        rate, used = probe_null_rate(positions, fallback, None if panel is None
                                     else panel.get(probe.fingerprint_id))
        rates[probe.id] = rate
        sources |= used
    notes = [f"no calibrated null rate for {', '.join(sorted(missing))}: those probes use the "
             "response_prob bound (recalibrate the set with `oml calibrate --temperatures ...`)"
             ] if missing else []
    return rates, source_label(sources), notes


def rule_text(cfg, layers: list[str], source: str) -> str:
    tests = family_of(layers)
    return (
        f"pre-registered before probing: per probe, a null rate from {source} (the chance the "
        f"{cfg.answer_match} rule counts an unrelated answer in that probe's context, summed over the "
        "answer positions checked, at least the floor); a key hits a test if any of its probes "
        "there matched, with the summed (union-bound) rate of its completed probes; per test "
        "the Poisson-binomial "
        f"tail P[X >= hits]; match iff min(1, {len(tests)} x smallest test p) <= {cfg.alpha:g} "
        f"(Bonferroni over the tests {', '.join(tests)}); errors are not counted as misses")


def evaluate(cfg, layers: list[str], outcomes: list[dict], key_rates: dict[str, float],
             measured: dict[str, float] | None, source: str) -> AuditDecision:
    """Apply the rule to completed probe outcomes.

    `outcomes`: dicts with fingerprint_id, layer, temperature, status ("ok"/"error"), hit, and
    the probe's pre-registered `rate` (`probe_rates`). Without a `rate`, the uncalibrated
    bound from `key_rates` (the per-key response_prob or assumed rate) and `measured` (the
    per-key measured per-probe rates, --null-file, or None) stands in.
    """
    tests = family_of(layers)
    alpha_each = cfg.alpha / len(tests)
    per_key: dict[str, dict[str, list]] = {t: defaultdict(lambda: [False, 0.0]) for t in tests}
    for o in outcomes:
        if o["status"] != "ok" or o["layer"] not in layers:
            continue
        if cfg.null_rate is not None:
            rate = cfg.null_rate
        elif o.get("rate") is not None:
            rate = o["rate"]
        else:
            mult = multiplier(o["layer"], cfg.answer_match, cfg.json_fields, cfg.max_tokens)
            fallback = probe_rate(key_rates.get(o["fingerprint_id"], ASSUMED_NULL_RATE),
                                  o["temperature"], mult)
            rate, _ = probe_null_rate(None, (fallback, "response_prob"), None if measured is None
                                      else measured.get(o["fingerprint_id"]))
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
        results[test] = TestOutcome(matched=hits, total=len(rates), p_value=evidence.p_value,
                                    mean_null_rate=evidence.null_rate,
                                    significant_at_corrected_alpha=evidence.verdict == "match",
                                    tested=bool(rates),
                                    best_possible_p_value=math.prod(rates))  # P[X >= n]: all hit
    best = min(tests, key=lambda t: (results[t].p_value, t != ANY))
    p = min(1.0, len(tests) * results[best].p_value)
    if not any(results[t].tested for t in tests):
        verdict = "inconclusive"
    else:
        verdict = "match" if p <= cfg.alpha else "no_match"
    best_possible = min(1.0, len(tests) * min(results[t].best_possible_p_value for t in tests))
    return AuditDecision(verdict=verdict, p_value=p, alpha=cfg.alpha, deciding_test=best,
                         best_possible_p_value=best_possible,
                         untested=[t for t in tests if not results[t].tested],
                         tests=results, family_size=len(tests), null_rate_source=source,
                         unadjusted_p_value=results[best].p_value,
                         log10_p_value=math.log10(p) if p > 0 else None)
