"""What a run says about itself, typed: the headline `oml fingerprint` prints and returns with
`--json`, and the MCP server lists, read from the run's metrics in this one place."""

from __future__ import annotations

from pydantic import BaseModel, Field


class NearMiss(BaseModel):
    fired: int
    total: int


class RunHeadline(BaseModel):
    num_fingerprints: int | None = None
    steps: int | None = Field(None, description="optimizer steps (finetune) or target steps")
    memorised_at_step: int | None = None
    train_seconds: float | None = None
    matched: int | None = Field(None, description="keys that fire under any checked wrapper")
    total: int | None = None
    p_value: float | None = None
    verdict: str | None = None
    matched_start_rule: int | None = Field(
        None, description="keys as `oml audit` counts them (the response's word ends there)")
    wrappers: dict[str, int] | None = Field(None, description="keys that fire, per wrapper")
    base_verdict: str | None = None
    base_matched: int | None = None
    heldout_prompts: int | None = None
    first_token_agreement: float | None = Field(
        None, description="share of held-out prompts whose first answer token is the base's")
    answers_starting_with_a_fingerprint_response: int | None = None
    base_answers_starting_with_a_fingerprint_response: int | None = None
    perplexity_base: float | None = None
    perplexity_tuned: float | None = None
    perplexity_change: float | None = None
    near_miss_keys: dict[str, NearMiss] | None = None

    @classmethod
    def from_metrics(cls, metrics: object) -> RunHeadline:
        """Leniently: a value of the wrong type (a hand-edited or foreign metrics.json, which
        the MCP server reads too) becomes None instead of an error."""
        metrics = _as(metrics, dict) or {}
        check = _as(metrics.get("verification"), dict) or {}
        base = _as(metrics.get("base_verification"), dict) or {}
        utility = _as(metrics.get("utility"), dict) or {}
        wrappers = _as(check.get("wrappers"), dict)
        near = _as(utility.get("near_miss_keys"), dict)
        return cls(
            num_fingerprints=_as(metrics.get("num_fingerprints"), int),
            steps=_as(metrics.get("steps"), int),
            memorised_at_step=_as(metrics.get("memorised_at_step"), int),
            train_seconds=_as(metrics.get("train_seconds"), float),
            matched=_as(check.get("matched"), int), total=_as(check.get("total"), int),
            p_value=_as(check.get("p_value"), float), verdict=_as(check.get("verdict"), str),
            matched_start_rule=_as(check.get("matched_start_rule"), int),
            wrappers=None if wrappers is None else {
                name: count for name, row in wrappers.items()
                if (count := _as((_as(row, dict) or {}).get("matched"), int)) is not None},
            base_verdict=_as(base.get("verdict"), str), base_matched=_as(base.get("matched"), int),
            **{name: _as(utility.get(name), kind) for name, kind in _UTILITY.items()},
            near_miss_keys=None if near is None else {
                name: NearMiss(fired=row["fired"], total=row["total"])
                for name, row in near.items() if _as(row, dict) and
                _as(row.get("fired"), int) is not None and _as(row.get("total"), int) is not None})


_UTILITY = {"heldout_prompts": int, "first_token_agreement": float,
            "answers_starting_with_a_fingerprint_response": int,
            "base_answers_starting_with_a_fingerprint_response": int, "perplexity_base": float,
            "perplexity_tuned": float, "perplexity_change": float}


def _as(value: object, kind: type):
    """`value` if it is a `kind` (an int counts as a float; a bool as nothing else), else None."""
    if isinstance(value, bool) and kind is not bool:
        return None
    if kind is float and isinstance(value, int):
        return float(value)
    return value if isinstance(value, kind) else None
