"""What `verify` returns, typed: the full report (written to disk as JSON by the interfaces,
field for field as `model_dump(mode="json")` gives it) and the headline the MCP tool returns.
Neither has a place for a fingerprint key or response: fingerprints appear by id only."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class WrapperCount(BaseModel):
    matched: int
    total: int


class NullModelSummary(BaseModel):
    """A NullModelCheck without its per-wrapper counts (the headline's form)."""

    model: str
    matched: int
    total: int
    p_value: float | None = None
    verdict: str | None = None


class NullModelCheck(NullModelSummary):
    """The keys run on one unrelated model, judged by the suspect's rule."""

    wrappers: dict[str, WrapperCount]
    skipped_wrappers: list[str]


class FingerprintCheck(BaseModel):
    id: str
    matched: bool = Field(description="its response came back under at least one wrapper")
    wrappers: list[str] = Field(description="the wrappers it came back under")


class VerifyOutcome(BaseModel):
    """The counts, the evidence and the decision: what the full report and its headline both
    state."""

    model: str
    matched: int = Field(description="fingerprints answered under at least one wrapper")
    total: int
    p_value: float = Field(description="chance an unrelated model matches this many or more")
    verdict: str = Field(description="'match' when p_value <= alpha, else 'no_match'")
    alpha: float
    null_rate: float
    null_rate_source: str
    match_rule: str
    wrappers: dict[str, WrapperCount]
    skipped_wrappers: list[str]
    rule: str = Field(description="the decision rule, fixed before decoding")


class VerifyReport(VerifyOutcome):
    """`verify`'s result: counts, the evidence and the settings, per fingerprint by id."""

    fingerprints: str | None = Field(description="the set file, when the set came from one")
    null_models: list[NullModelCheck]
    per_fingerprint: list[FingerprintCheck]
    settings: dict[str, Any] = Field(description="the VerifyConfig the report was made with")


class VerifyResult(VerifyOutcome):
    """The headline of a verification whose full report was written to `report_path`."""

    fingerprints: str
    null_models: list[NullModelSummary]
    report_path: str = Field(description="full JSON report (per-fingerprint ids, settings; no "
                                         "keys or responses)")
    seconds: float

    @classmethod
    def of(cls, report: VerifyReport, report_path: str, seconds: float) -> VerifyResult:
        # each null model's wrapper counts stay in the report: NullModelSummary drops them
        data = report.model_dump(include=set(cls.model_fields))
        return cls(**data, report_path=report_path, seconds=seconds)
