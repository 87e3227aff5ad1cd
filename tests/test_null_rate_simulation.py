"""Innocent audits, simulated: how often does the audit's decision rule call `match` on a model
that carries no fingerprint? With the real null rates, at most alpha of the time.

An innocent endpoint here is the base model itself answering from its own distribution in each
probe's rendered context (chat template, system prompt, embedded message, agent frame) at the
probe's temperature; a greedy probe's answer is a temperature-1 draw, since an unrelated
model's greedy answer is one plausible answer among those the base model spreads its mass over
(oml_core.null_rates.GREEDY_TEMPERATURES). The answers are judged by the audit's own match
function and fed, with the rates the audit would pre-register (clients.decision.probe_rates),
to the audit's decision code (clients.decision.evaluate) at alpha = 0.05, where a small
sample of audits can see an excess.

The base model is the tiny in-test chat model with sharpened logits (conftest.sharp_tiny_model);
responses are word tokens it gives 2-30% of its mass in the user context, so innocent hits are
common and a rate that is too low shows at once. Each trial uses fresh draws for every probe,
so the number of false matches in N trials is at most Binomial(N, alpha) if the rates are
valid; `allowed_false_matches` is that distribution's 99.9% quantile, so a valid rule fails
these tests with probability below 1e-3 (the draws are seeded: the outcome is fixed). The
second test shows the check has teeth: rates too low by half, or the old raw-context
`response_prob`, exceed it on the same draws.
"""

from __future__ import annotations

import random

import pytest
from eval_helpers import one_torch_thread  # noqa: F401 - autouse fixture

from clients.adapters.base import Answer
from clients.answers import match
from clients.config import AuditConfig
from clients.decision import evaluate, probe_rates
from clients.probes import AGENT, plan_probes
from clients.sequential import SequentialTest
from oml_core.evidence import binomial_sf
from oml_core.fingerprints import Fingerprint, FingerprintSet
from oml_core.generate.perinucleus import is_word_token
from oml_core.generate.words import word_list
from oml_core.inference import next_token_probs, sample
from oml_core.null_rates import GREEDY_TEMPERATURE
from oml_core.probe_contexts import render

ALPHA = 0.05
ANSWER_TOKENS = 4  # enough for the rule to see the word boundary after a one-token response




def allowed_false_matches(trials: int, alpha: float = ALPHA, miss: float = 1e-3) -> int:
    """The smallest c with P[Binomial(trials, alpha) > c] <= miss."""
    return next(c for c in range(trials + 1) if binomial_sf(c + 1, trials, alpha) <= miss)


@pytest.fixture(scope="module")
def innocent_set(sharp_tiny_model) -> FingerprintSet:
    """48 keys of random words; each response a word token the model gives 2-30% of its mass
    as the first token of its user-turn answer. `response_prob` is that token's probability
    in the raw key context, as `oml generate --context raw` records it (the old null rate)."""
    model, tok = sharp_tiny_model, sharp_tiny_model.tokenizer
    rng = random.Random(5)
    words = list(word_list())
    keys = [" ".join(rng.sample(words, 5)) for _ in range(48)]
    responses: dict[int, int] = {}
    for rows, probs in next_token_probs(model, [render(tok, "user", k) for k in keys], 32):
        for row, index in enumerate(rows):
            ranked = probs[row].argsort(descending=True)[:40].tolist()
            fitting = [t for t in ranked if is_word_token(tok.decode([t]))
                       and 0.02 <= float(probs[row, t]) <= 0.3]
            responses[index] = fitting[0] if fitting else ranked[0]
    raw_probs: dict[int, float] = {}
    for rows, probs in next_token_probs(model, [render(tok, "raw", k) for k in keys], 32):
        for row, index in enumerate(rows):
            raw_probs[index] = float(probs[row, responses[index]])
    return FingerprintSet([Fingerprint(f"fp-{i:05d}", key, tok.decode([responses[i]]), raw_probs[i])
                           for i, key in enumerate(keys)])


def innocent_hits(model, fset: FingerprintSet, cfg: AuditConfig, trials: int, seed: int) -> dict:
    """{probe id: [did trial t's innocent answer match]} for every probe of the plan."""
    by_id = {fp.id: fp for fp in fset.fingerprints}
    hits = {}
    for n, probe in enumerate(plan_probes(cfg, list(by_id))):
        fp = by_id[probe.fingerprint_id]
        context = AGENT if probe.layer == "agent" else probe.variant
        temperature = probe.temperature if probe.temperature > 0 else GREEDY_TEMPERATURE
        answers = sample(model, [render(model.tokenizer, context, fp.key)] * trials, ANSWER_TOKENS,
                         trials, temperature=temperature, seed=seed * 10_007 + n)
        fields = cfg.json_fields if probe.layer == "agent" else 0
        hits[probe.id] = [match(Answer(text), fp.response, "start", fields)["hit"]
                          for text in model.tokenizer.batch_decode(answers, skip_special_tokens=True)]
    return hits


def false_matches(cfg: AuditConfig, fset: FingerprintSet, hits: dict, scale: float = 1.0) -> int:
    """Innocent audits (one per trial) that the decision rule calls `match`, with the rates
    the audit pre-registers for `fset` (times `scale`)."""
    probes = plan_probes(cfg, [fp.id for fp in fset.fingerprints])
    rates, source, _ = probe_rates(cfg, probes, {fp.id: fp for fp in fset.fingerprints}, None)
    layers = cfg.layers
    trials = len(next(iter(hits.values())))
    count = 0
    for trial in range(trials):
        outcomes = [{"fingerprint_id": p.fingerprint_id, "layer": p.layer, "status": "ok",
                     "temperature": p.temperature, "hit": hits[p.id][trial],
                     "rate": min(1.0, rates[p.id] * scale)} for p in probes]
        count += evaluate(cfg, layers, outcomes, {}, None, source).verdict == "match"
    return count


def sequential_false_matches(cfg: AuditConfig, fset: FingerprintSet, hits: dict,
                             scale: float = 1.0) -> int:
    """Innocent sequential audits (one per trial) that reach 1/alpha: keys in order of their
    summed null rate, each a hit if any of its probes hit, fed to the audit's SequentialTest;
    a trial stops as the audit does (crossed, or out of reach)."""
    probes = plan_probes(cfg, [fp.id for fp in fset.fingerprints])
    rates, _, _ = probe_rates(cfg, probes, {fp.id: fp for fp in fset.fingerprints}, None)
    by_key: dict[str, list] = {}
    for p in probes:
        by_key.setdefault(p.fingerprint_id, []).append(p)
    key_rate = {k: min(1.0, scale * sum(rates[p.id] for p in v)) for k, v in by_key.items()}
    order = sorted(by_key, key=key_rate.get)
    count = 0
    for trial in range(len(next(iter(hits.values())))):
        test = SequentialTest(cfg.alpha)
        for n, key in enumerate(order):
            test.add(key, any(hits[p.id][trial] for p in by_key[key]), key_rate[key], 1)
            if test.crossed or not test.reachable([key_rate[k] for k in order[n + 1:]]):
                break
        count += test.crossed
    return count


def test_innocent_sequential_audits_match_at_most_alpha_of_the_time(sharp_tiny_model,
                                                                   innocent_set):
    """The default audit: 2 probes a key, keys in order of their null rate, the e-value, with
    the rates `oml calibrate` measures (4 of 300 innocent audits match at alpha = 0.05)."""
    from oml_core.calibrate import calibrate_set
    from oml_core.config import CalibrateConfig

    calibrated, _ = calibrate_set(CalibrateConfig(temperatures="1.0"), sharp_tiny_model,
                                  innocent_set)
    cfg = AuditConfig(max_tokens=ANSWER_TOKENS, alpha=ALPHA, json_fields=3)
    trials = 300
    hits = innocent_hits(sharp_tiny_model, calibrated, cfg, trials, seed=3)
    allowed = allowed_false_matches(trials)
    assert sum(map(sum, hits.values())) > trials, "innocent answers must hit often for this to test anything"
    found = sequential_false_matches(cfg, calibrated, hits)
    # the check has teeth: the old raw-context response_prob (no calibration), or rates 20x
    # too low, convict far more innocent endpoints than alpha allows (the e-value's union bound
    # over a key's probes and its alternative p1 = 0.5 leave slack: a quarter of the real rates
    # still passes, 8 of 300)
    old = sequential_false_matches(cfg, innocent_set, hits)
    too_low = sequential_false_matches(cfg, calibrated, hits, scale=0.05)
    assert found <= allowed < min(old, too_low), (found, allowed, old, too_low)


def test_innocent_audits_match_at_most_alpha_of_the_time(sharp_tiny_model, innocent_set):
    """Every probe layer the base model can take, greedy and sampled, with the rates
    `oml calibrate` measures by default."""
    from oml_core.calibrate import calibrate_set
    from oml_core.config import CalibrateConfig

    fset = FingerprintSet(innocent_set.fingerprints[:8])
    calibrated, _ = calibrate_set(CalibrateConfig(), sharp_tiny_model, fset)
    cfg = AuditConfig(layers="user,system,embedded,multiturn,agent", num_system_prompts=2,
                      sampled_layers="user", temperatures="0.7,1.0", samples=2, json_fields=3,
                      max_tokens=ANSWER_TOKENS, alpha=ALPHA, exhaustive=True)
    trials = 300
    hits = innocent_hits(sharp_tiny_model, calibrated, cfg, trials, seed=1)
    assert sum(map(sum, hits.values())) > trials, "innocent answers must hit often for this to test anything"
    found = false_matches(cfg, calibrated, hits)
    assert found <= allowed_false_matches(trials), f"{found}/{trials} innocent audits matched"


def test_rates_too_low_would_fail_the_check(sharp_tiny_model, innocent_set, monkeypatch):
    """One test (the user layer, greedy, 48 keys) where the decision rule has no slack of its
    own (no union bound over probes, no Bonferroni), and rates measured tightly (every opening
    of mass 1e-4 or more followed): the real rates pass; half of them, or the raw-context
    `response_prob` of the old rule, make far more innocent audits match than alpha allows.
    (48 keys: enough hits per audit that the tail's steps are finer than a factor of 2.) The
    greedy probes' answers are temperature-1 draws here, so their rates are the temperature-1
    ones alone (the sharpened rate a greedy probe also takes would be slack of its own)."""
    import oml_core.calibrate
    import oml_core.null_rates
    from oml_core.calibrate import calibrate_set
    from oml_core.config import CalibrateConfig

    monkeypatch.setattr(oml_core.calibrate, "MIN_FOLLOWED_MASS", 1e-4)
    for module in (oml_core.calibrate, oml_core.null_rates):
        monkeypatch.setattr(module, "GREEDY_TEMPERATURES", (1.0,))
    monkeypatch.setattr(oml_core.calibrate, "all_contexts", lambda has_chat_template: ["user"])
    calibrated, _ = calibrate_set(CalibrateConfig(temperatures="1.0", expansions=16),
                                  sharp_tiny_model, innocent_set)
    cfg = AuditConfig(layers="user", sampled_layers="", max_tokens=ANSWER_TOKENS, alpha=ALPHA,
                      exhaustive=True)
    trials = 400
    hits = innocent_hits(sharp_tiny_model, calibrated, cfg, trials, seed=2)
    allowed = allowed_false_matches(trials)
    real = false_matches(cfg, calibrated, hits)
    halved = false_matches(cfg, calibrated, hits, scale=0.5)
    old = false_matches(cfg, innocent_set, hits)  # no calibrated rates: response_prob, raw context
    assert real <= allowed < halved and allowed < old, (real, halved, old, allowed)
