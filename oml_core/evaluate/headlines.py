"""The few numbers per part a person reads first (the full results are in eval.json)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from oml_core.evaluate.results import Result

if TYPE_CHECKING:
    from oml_core.evaluate.attack_results import RobustnessResult
    from oml_core.evaluate.eval_result import EvalParts


class UtilityHeadline(Result):
    perplexity_base: float
    perplexity_tuned: float
    perplexity_change: float
    first_token_agreement: float
    answers_starting_with_a_fingerprint_response: int
    matched: int
    base_matched: int
    total: int


class PersistenceHeadline(Result):
    steps: int
    full_retention: float | None = None
    lora_retention: float | None = None


class NullModelHeadline(Result):
    matched: int
    total: int
    verdict: str


class FalsePositivesHeadline(Result):
    models: dict[str, NullModelHeadline] = Field(default_factory=dict)
    skipped: list[str] = Field(default_factory=list)
    null_rate: float | None = None
    null_file: str | None = None


class CapacityHeadline(Result):
    n: int
    regularizer: float
    accuracy: float
    perplexity_change: float | None = None


class EvalHeadlines(Result):
    utility: UtilityHeadline | None = None
    persistence: PersistenceHeadline | None = None
    false_positives: FalsePositivesHeadline | None = None
    # "<attack>_survival", "<attack>_verdict", ...: one figure per attack that ran, so the
    # names follow the attacks (registered ones included)
    robustness: dict[str, float | str | None] | None = None
    capacity: list[CapacityHeadline] | None = None


def headlines(parts: EvalParts) -> EvalHeadlines:
    out = EvalHeadlines()
    if (u := parts.utility) is not None:
        b, tuned = u.behaviour, u.accuracy["fingerprinted"]
        out.utility = UtilityHeadline(
            perplexity_base=b.perplexity_base, perplexity_tuned=b.perplexity_tuned,
            perplexity_change=b.perplexity_change, first_token_agreement=b.first_token_agreement,
            answers_starting_with_a_fingerprint_response=b.answers_starting_with_a_fingerprint_response,
            matched=tuned.matched, base_matched=u.accuracy["base"].matched, total=tuned.total)
    if (p := parts.persistence) is not None:
        out.persistence = PersistenceHeadline(steps=p.steps, **{
            f"{name}_retention": m.retention["any"].retention for name, m in p.methods.items()})
    if (f := parts.false_positives) is not None:
        out.false_positives = FalsePositivesHeadline(
            models={m.model: NullModelHeadline(matched=m.matched, total=m.total, verdict=m.verdict)
                    for m in f.models},
            skipped=f.skipped_models, null_rate=f.null_rate, null_file=f.null_file)
    if parts.robustness is not None:
        out.robustness = robustness_headlines(parts.robustness)
    if (c := parts.capacity) is not None:
        out.capacity = [CapacityHeadline(n=p.n, regularizer=p.regularizer, accuracy=p.accuracy,
                                         perplexity_change=p.perplexity_change) for p in c.points]
    return out


def robustness_headlines(r: RobustnessResult) -> dict[str, float | str | None]:
    from oml_core.evaluate.attack_results import ServedAttack

    a, row = r.attacks, {}
    if (s := a.get("system_prompts")) is not None and s.mean_accuracy is not None:
        row["system_prompts_mean_accuracy"] = s.mean_accuracy
    if (s := a.get("sampling")) is not None:
        for temp, summary in s.temperatures.items():
            row[f"sampling_T{temp}_sample_hit_rate"] = summary.sample_hit_rate_any_wrapper
    for name in ("int8", "merge", "merge_slerp", "merge_ties", "merge_dare", "suppression"):
        if name in a and a[name].skipped is None:  # merge: results cached before merge_linear
            row[f"{name}_survival"] = a[name].survival
    if (s := a.get("merge_linear")) is not None:
        for weight, merged in s.base_weights.items():
            if merged.skipped is None:
                row[f"merge_linear_w{weight}_survival"] = merged.survival
    for name, s in a.items():  # attacks that audit a served copy (e.g. gguf_q8_0)
        if isinstance(s, ServedAttack) and s.verdict is not None:
            row[f"{name}_matched"] = s.matched / s.total if s.total else None
            row[f"{name}_verdict"] = s.verdict
            row[f"{name}_survival"] = s.survival
    if (s := a.get("suppression")) is not None and s.utility_cost is not None:
        row["suppression_answers_unchanged"] = s.utility_cost.answers_unchanged
    return row
