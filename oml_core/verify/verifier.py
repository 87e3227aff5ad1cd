"""Check which fingerprints a model answers, and what that proves.

Every (fingerprint, wrapper) prompt goes through one batched greedy decoding pass
(shared-prefix KV cache, per-row early stop: see `inference.greedy`). A
fingerprint counts as matched when any wrapper produced its response; the evidence rule is
fixed before decoding: a key's null rate is the chance an unrelated model matches it under
any of the W wrappers, bounded by the sum of its per-wrapper rates. Each per-wrapper rate comes
from the null-rate model the auditor shares (oml_core.null_rates.probe_null_rate): the set's
calibrated rate for this rule in the wrapper's own context (`oml calibrate`; greedy: the
temperature-1 rate), else `response_prob`, never below the key's measured panel rate
(--null-file) nor the floor; a rate measured by running the same keys, wrappers and rule on
--null-model models in this call bounds the key's rate from below too. Then p = P[X >= matched]
for X a Poisson-binomial over those rates.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import NamedTuple

from oml_core import evidence, progress
from oml_core.config import VerifyConfig
from oml_core.errors import OMLInputError
from oml_core.evidence import ASSUMED_NULL_RATE
from oml_core.fingerprints import FingerprintSet, load_fingerprints
from oml_core.inference import greedy
from oml_core.models import LoadedModel, load_model
from oml_core.null_rates import (
    NULL_RATE_FLOOR,
    NullRates,
    context_rate,
    load_null_rates,
    probe_null_rate,
    source_label,
)
from oml_core.settings import validate
from oml_core.verify.matching import is_match
from oml_core.verify.result import FingerprintCheck, NullModelCheck, VerifyReport, WrapperCount
from oml_core.verify.wrappers import Wrapper, build_wrappers

LOOSE_RULES = ("contains", "normalized")  # a first-token probability says nothing about these


def check_keys(loaded: LoadedModel, fset: FingerprintSet, wrappers: list[Wrapper], rule: str,
               max_new_tokens: int | None = None, batch_size: int = 64,
               desc: str = "verify", adjust_logits=None) -> list[list[bool]]:
    """hits[i][w]: did fingerprint i come back under wrapper w (one batched pass).

    `adjust_logits` is handed to `inference.greedy` (a decoding-time intervention)."""
    tokenizer = loaded.tokenizer
    response_ids = [tokenizer(fp.response, add_special_tokens=False)["input_ids"]
                    for fp in fset.fingerprints]
    width = len(wrappers)
    if max_new_tokens is None:  # each row decodes only as far as its own response needs
        extra = 32 if rule in LOOSE_RULES else 2 if rule in ("prefix", "start") else 0
        limits = [len(ids) + extra for ids in response_ids for _ in range(width)]
    else:
        limits = [max_new_tokens] * (len(response_ids) * width)
    prompts = [w.render(tokenizer, fp.key) for fp in fset.fingerprints for w in wrappers]
    with progress.bar(desc, len(prompts)) as advance:
        outputs = greedy(loaded, prompts, limits, batch_size, progress=advance,
                         adjust_logits=adjust_logits)
    texts = tokenizer.batch_decode(outputs, skip_special_tokens=True)
    return [[is_match(rule, outputs[i * width + w], texts[i * width + w], fp.response,
                      response_ids[i]) for w in range(width)]
            for i, fp in enumerate(fset.fingerprints)]


class _Tally(NamedTuple):
    matched: int
    total: int
    wrappers: dict[str, WrapperCount]


def _summarise(hits: list[list[bool]], wrappers: list[Wrapper]) -> _Tally:
    return _Tally(matched=sum(any(row) for row in hits), total=len(hits),
                  wrappers={w.name: WrapperCount(matched=sum(row[j] for row in hits),
                                                 total=len(hits))
                            for j, w in enumerate(wrappers)})


def _measure_null(cfg: VerifyConfig, fset: FingerprintSet, preloaded: list[LoadedModel]
                  ) -> tuple[float | None, list[NullModelCheck]]:
    """Run the keys on each null model with the same wrappers and rule; pooled Laplace rate."""
    reports, hits, trials = [], 0, 0
    nulls = list(preloaded) + [lambda spec=spec: load_model(spec, cfg.device, cfg.dtype)
                               for spec in cfg.null_model]
    for entry in nulls:
        null = entry() if callable(entry) else entry
        wrappers, notes = build_wrappers(cfg.wrappers, cfg.num_system_prompts, null.has_chat_template)
        outcome = _summarise(check_keys(null, fset, wrappers, cfg.match, cfg.max_new_tokens,
                                        cfg.batch_size, desc=f"null model {len(reports) + 1}"),
                             wrappers)
        reports.append(NullModelCheck(model=null.name, matched=outcome.matched,
                                      total=outcome.total, wrappers=outcome.wrappers,
                                      skipped_wrappers=notes))
        hits, trials = hits + outcome.matched, trials + outcome.total
        del null
    return (evidence.laplace_rate(hits, trials) if trials else None), reports


def null_rate_file(cfg: VerifyConfig, fset: FingerprintSet) -> NullRates | None:
    """--null-file, read and checked (rule, pairs) before anything is decoded."""
    if not cfg.null_file or cfg.null_rate is not None:
        return None
    panel = load_null_rates(cfg.null_file)
    panel.check_applies(cfg.match, fset)
    return panel


def key_null_rates(cfg: VerifyConfig, fset: FingerprintSet, wrappers: list[Wrapper],
                   panel: NullRates | None, measured_now: float | None) -> tuple[list[float], str]:
    """Per-key null rates and the label of their sources: the union bound over the wrappers of
    each (key, wrapper) probe's rate (`panel`: the --null-file rates), never below
    `measured_now` (null models run in this call). A key with nothing known per probe takes
    `measured_now`, else the assumed rate."""
    if cfg.null_rate is not None:
        return [float(cfg.null_rate)] * len(fset), "given"
    rates, sources = [], set()
    for fp in fset.fingerprints:
        known = fp.response_prob is not None and cfg.match not in LOOSE_RULES
        fallback = (fp.response_prob, "response_prob") if known else None
        total, used = 0.0, set()
        for wrapper in wrappers:
            rate = context_rate(fp, cfg.match, wrapper.context, 0.0)  # greedy decoding
            if rate is None and fallback is None and panel is None:
                total = None
                break
            probe, probe_sources = probe_null_rate(None if rate is None else [rate], fallback,
                                                   None if panel is None else panel.probe_rate(fp.id))
            total += probe
            used |= probe_sources
        if total is None:  # nothing known per probe: the key as a whole
            total = ASSUMED_NULL_RATE if measured_now is None else len(wrappers) * NULL_RATE_FLOOR
            used = {"assumed"} if measured_now is None else set()
        if measured_now is not None:
            used.add("measured")
            total = max(total, measured_now)
        rates.append(min(1.0, total))
        sources |= used
    return rates, source_label(sources)


def verify(cfg: VerifyConfig, loaded: LoadedModel | None = None,
           fset: FingerprintSet | None = None, null_models: list[LoadedModel] = ()
           ) -> VerifyReport:
    """Verify a model against a fingerprint set; returns the report (no keys or responses).

    `null_models` are already-loaded null models, used besides those named in `cfg.null_model`.
    """
    validate(cfg)
    if fset is None:
        if not cfg.fingerprints:
            raise OMLInputError("no fingerprint set given; pass --fingerprints FILE")
        fset = load_fingerprints(cfg.fingerprints)
    loaded = loaded or load_model(cfg.model, cfg.device, cfg.dtype)
    fset = fset.trimmed(loaded.tokenizer, cfg.num_fingerprints, cfg.max_key_tokens,
                        cfg.max_response_tokens)
    wrappers, notes = build_wrappers(cfg.wrappers, cfg.num_system_prompts, loaded.has_chat_template)
    if not wrappers:
        raise OMLInputError(f"no usable wrapper among {','.join(cfg.wrappers)!r} ({'; '.join(notes)}); "
                            "add 'bare' to --wrappers")
    panel = null_rate_file(cfg, fset)
    hits = check_keys(loaded, fset, wrappers, cfg.match, cfg.max_new_tokens, cfg.batch_size)
    measured, null_reports = _measure_null(cfg, fset, null_models)
    rates, source = key_null_rates(cfg, fset, wrappers, panel, measured)
    summary = _summarise(hits, wrappers)
    rule = (f"a fingerprint counts once if its response comes back under any of "
            f"{len(wrappers)} wrappers ({cfg.match} match); p = P[X >= matched], X a "
            f"Poisson-binomial over per-key null rates ({source}); match when p <= {cfg.alpha:g}")
    decision = evidence.decide(summary.matched, rates, cfg.alpha, source=source, rule=rule)
    for null in null_reports:  # the same rule applied to each null model's own hits
        null_decision = evidence.decide(null.matched, rates, cfg.alpha, source=source, rule=rule)
        null.p_value, null.verdict = null_decision.p_value, null_decision.verdict
    return VerifyReport(
        model=loaded.name, fingerprints=cfg.fingerprints, **decision.to_dict(),
        match_rule=cfg.match, wrappers=summary.wrappers, skipped_wrappers=notes,
        null_models=null_reports,
        per_fingerprint=[FingerprintCheck(id=fp.id, matched=any(row),
                                          wrappers=[w.name for w, hit in zip(wrappers, row) if hit])
                         for fp, row in zip(fset.fingerprints, hits)],
        settings=asdict(cfg))
