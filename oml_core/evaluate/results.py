"""What the evaluation parts return, as typed models: the shapes `eval.json` holds.

`eval.json` is `EvalReport.dump()`: each model dumped with only the fields that were set, so a
file has the same keys the parts wrote (an optional field a part leaves out, e.g. `lm_eval`
when no task was asked for, is left out of the file too), and an older file, which lacks
fields added since, still loads: every field added after the first files is optional.
Unknown keys in an old file are ignored, except where a shape is open by design (a registered
attack's result, lm-eval's scores, provenance), which says so where it is declared.
Results hold ids and counts only: no key or response text.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field


class Result(BaseModel):
    """Base of every result model: unknown keys of an older file are dropped on load."""

    model_config = ConfigDict(extra="ignore")
    always_dumped: ClassVar[tuple[str, ...]] = ()  # fields with defaults a file always states

    def model_post_init(self, context) -> None:
        self.__pydantic_fields_set__.update(self.always_dumped)

    def dump(self) -> dict:
        """The JSON form, with the keys that were set (the shape `eval.json` has always had)."""
        return self.model_dump(mode="json", exclude_unset=True, by_alias=True)


# --- checks: which keys fire -----------------------------------------------------------------
class Count(Result):
    matched: int
    total: int


class Check(Result):
    """Keys that fire under any wrapper, and per wrapper (counts only)."""

    matched: int
    total: int
    wrappers: dict[str, Count] = Field(default_factory=dict)


class KeyCheck(Check):
    """A check with the ids of the keys that fired per wrapper (what retention compares);
    reports keep the counts only (`public`)."""

    hit_ids: dict[str, list[str]] = Field(default_factory=dict)

    def public(self) -> Check:
        return Check(matched=self.matched, total=self.total, wrappers=self.wrappers)


class RetentionRow(Result):
    """Of the keys that fired before, how many still fire (retention None: none fired before)."""

    before: int
    after: int
    retention: float | None


Retention = dict[str, RetentionRow]  # per wrapper, and "any"


class Survived(Check):
    """An attacked model's check: the share of the baseline's keys that still fire."""

    matched: int | None = None  # absent when the attack was skipped
    total: int | None = None
    survival: float | None = None
    retention: Retention = Field(default_factory=dict)


# --- utility -------------------------------------------------------------------------------
class Fired(Result):
    fired: int
    total: int


class Behaviour(Result):
    """Base vs fingerprinted off the keys (utility.compare_behaviour)."""

    heldout_prompts: int
    first_token_agreement: float
    answers_starting_with_a_fingerprint_response: int
    base_answers_starting_with_a_fingerprint_response: int
    perplexity_base: float
    perplexity_tuned: float
    perplexity_change: float
    perplexity_tokens: int | None = None
    near_miss_keys: dict[str, Fired] = Field(default_factory=dict)
    first_token_kl: float | None = None
    confident_prompts: int | None = None
    first_token_agreement_where_base_is_confident: float | None = None
    base_top_token_prob_median: float | None = None


class Accuracy(Check):
    skipped_wrappers: list[str] = Field(default_factory=list)


class LmEval(Result):
    """lm-evaluation-harness scores, or why they were skipped; per model label ("base",
    "fingerprinted"): {task: {metric: value}}, whatever the harness reports, hence open."""

    model_config = ConfigDict(extra="allow")
    skipped: str | None = None
    tasks: list[str] | None = None
    limit: int | None = None


class PartResult(Result):
    """What `oml eval` adds to every part's result."""

    seconds: float | None = None
    settings: dict[str, Any] | None = None


class UtilityResult(PartResult):
    behaviour: Behaviour
    accuracy: dict[str, Accuracy]  # "fingerprinted", "base"
    lm_eval: LmEval | None = None


# --- persistence ---------------------------------------------------------------------------
class CurvePoint(Result):
    step: int
    matched: int
    retention: Retention


class FineTune(Result):
    learning_rate: float
    lora_rank: int | None = None
    after: Check
    retention: Retention
    curve: list[CurvePoint] = Field(default_factory=list)
    loss_first: float | None = None
    loss_last: float | None = None
    perplexity_before: float | None = None
    perplexity_after: float | None = None
    seconds: float | None = None


class PersistenceResult(PartResult):
    steps: int
    rows: int
    skipped_wrappers: list[str] = Field(default_factory=list)
    before: Check
    methods: dict[str, FineTune] = Field(default_factory=dict)  # "full", "lora"


# --- false positives -----------------------------------------------------------------------
class NullModel(Check):
    model: str
    kind: str
    probes_matched: int
    probes: int
    probe_rate: float
    skipped_wrappers: list[str] = Field(default_factory=list)
    p_value: float
    verdict: str
    null_rate_source: str | None = None


class FingerprintedWithMeasuredRates(Check):
    p_value_with_measured_rates: float
    verdict_with_measured_rates: str
    mean_key_null_rate: float | None = None


class FalsePositivesResult(PartResult):
    models: list[NullModel] = Field(default_factory=list)
    skipped_models: list[str] = Field(default_factory=list)
    null_file: str | None = None
    note: str | None = None  # set when no null model could run
    null_rate: float | None = None
    probes_matched: int | None = None
    probes: int | None = None
    keys_that_fired: int | None = None
    per_key_rates: list[float] = Field(default_factory=list)
    rate_rule: str | None = None
    fingerprinted: FingerprintedWithMeasuredRates | None = None


# --- capacity ------------------------------------------------------------------------------
class CapacityPoint(Result):
    n: int
    regularizer: float
    run_dir: str | None = None
    matched: int | None = None
    total: int | None = None
    accuracy: float
    wrappers: dict[str, float] = Field(default_factory=dict)
    verdict: str | None = None
    perplexity_change: float | None = None
    first_token_agreement: float | None = None
    first_token_kl: float | None = None
    leaks: int | None = None
    steps: int | None = None
    memorised_at_step: int | None = None
    train_seconds: float | None = None


class CapacityResult(PartResult):
    sizes: list[int]
    regularizers: list[float]
    runs: dict[str, Any] = Field(default_factory=dict)  # run name -> the trainer's state
    points: list[CapacityPoint] = Field(default_factory=list)
    max_epochs: int | None = None
    deepspeed: str | None = None


class ReportFiles(Result):
    json_file: str | None = Field(None, alias="json")  # `json` would shadow BaseModel.json
    markdown: str
    html: str

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class CapacitySweep(Result):
    """`oml eval capacity`'s summary (capacity.json, plus the report's files)."""

    always_dumped = ("format", "version")

    format: str = "oml-capacity"
    version: int = 1
    sizes: list[int]
    regularizers: list[float]
    runs: dict[str, Any] = Field(default_factory=dict)
    points: list[CapacityPoint] = Field(default_factory=list)
    settings: dict[str, Any] = Field(default_factory=dict)
    seconds: float | None = None
    report: ReportFiles | None = None
