"""The robustness part's result: one typed model per attack (see robustness.py for what each
attack does). An attack that could not run holds only why (`skipped`), so every measured
field is optional; which fields a result has is what it was given (see results.Result.dump).
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, Field, SerializeAsAny, field_validator

from oml_core.evaluate.results import Check, Count, PartResult, Result, Survived


class Attack(Result):
    skipped: str | None = None  # why the attack did not run; then nothing else is measured


class SurvivedAttack(Attack, Survived):
    """An attacked model re-verified: keys firing and their survival."""


class SystemPromptsAttack(Attack):
    matched: int | None = None
    total: int | None = None
    wrappers: dict[str, Count] = Field(default_factory=dict)
    prompts: int | None = None
    mean_accuracy: float | None = None
    min_accuracy: float | None = None
    max_accuracy: float | None = None


class SampleRate(Result):
    sample_hit_rate: float
    keys_hit_in_any_sample: int
    keys_hit_in_most_samples: int
    total: int


class SamplingSummary(Result):
    wrappers: dict[str, SampleRate] = Field(default_factory=dict)
    sample_hit_rate_any_wrapper: float
    keys_hit_in_any_sample: int
    keys_hit_in_most_samples: int
    total: int


class SamplingAttack(Attack):
    samples: int | None = None
    temperatures: dict[str, SamplingSummary] = Field(default_factory=dict)  # "0.7" -> summary


class Int8Attack(SurvivedAttack):
    method: str | None = None
    perplexity: float | None = None
    perplexity_change: float | None = None


class MergedModel(SurvivedAttack):
    """One merged model: survival and its own utility (perplexity change against the
    fingerprinted model, first answer token against the base)."""

    tool: str | None = None
    tool_note: str | None = None  # why mergekit was not the tool after all
    perplexity: float | None = None
    perplexity_change: float | None = None
    first_token_agreement: float | None = None
    heldout_prompts: int | None = None


class MergeLinearAttack(Attack):
    method: str | None = None
    formula: str | None = None
    first_token_agreement_fingerprinted: float | None = None
    base_weights: dict[str, MergedModel] = Field(default_factory=dict)  # "0.5" -> merged model


class MergeSlerpAttack(MergedModel):
    method: str | None = None
    t: float | None = None
    first_token_agreement_fingerprinted: float | None = None


class Derivative(Result):
    """The benign second parent of a TIES/DARE merge."""

    folder: str | None = None
    steps: int
    learning_rate: float
    batch_size: int | None = None
    rows: int
    loss_first: float | None = None
    loss_last: float | None = None
    reused: bool | None = None


class TaskVectorMergeAttack(MergedModel):
    method: str | None = None
    weights: dict[str, float] = Field(default_factory=dict)  # "fingerprinted", "derivative"
    density: float | None = None
    seed: int | None = None
    derivative: Derivative | None = None
    first_token_agreement_fingerprinted: float | None = None


class SuppressionCost(Result):
    heldout_prompts: int
    first_answer_token_unchanged: float
    answers_unchanged: float
    next_token_accuracy: float
    next_token_accuracy_attacked: float
    relative_next_token_accuracy: float | None = None
    fired_share: float | None = None
    true_token_blocked_share: float | None = None


class SuppressionAttack(SurvivedAttack):
    threshold: float | None = None
    top_k: int | None = None
    utility_cost: SuppressionCost | None = None


class ServedLayer(Count):
    """One audit layer's counts. Open: the registered attack decides what else it reports."""

    model_config = ConfigDict(extra="allow")


class ServedAttack(SurvivedAttack):
    """A registered attack's result (robustness.PLUGIN_GROUP, e.g. gguf_q8_0: a copy served
    and audited over HTTP). Open (extra fields kept): the registering package owns its shape;
    the fields named here are the ones reports read."""

    model_config = ConfigDict(extra="allow")
    method: str | None = None
    verdict: str | None = None
    p_value: float | None = None
    layers: dict[str, ServedLayer] = Field(default_factory=dict)
    perplexity: float | None = None
    perplexity_change: float | None = None


ATTACK_MODELS: dict[str, type[Attack]] = {
    "system_prompts": SystemPromptsAttack, "sampling": SamplingAttack, "int8": Int8Attack,
    "merge": MergedModel,  # the name merge_linear had before it took several weights
    "merge_linear": MergeLinearAttack, "merge_slerp": MergeSlerpAttack,
    "merge_ties": TaskVectorMergeAttack, "merge_dare": TaskVectorMergeAttack,
    "suppression": SuppressionAttack}


def attack_result(name: str, value: Any) -> Attack:
    """An attack's result as its model (a registered attack may return a plain dict)."""
    if isinstance(value, Attack):
        return value
    return ATTACK_MODELS.get(name, ServedAttack).model_validate(value)


class RobustnessResult(PartResult):
    baseline: Check
    perplexity: float
    skipped_wrappers: list[str] = Field(default_factory=list)
    # SerializeAsAny: each attack dumps as its own model, not as the base class
    attacks: dict[str, SerializeAsAny[Attack]] = Field(default_factory=dict)

    @field_validator("attacks", mode="before")
    @classmethod
    def _typed(cls, value):
        return {name: attack_result(name, v) for name, v in (value or {}).items()}
