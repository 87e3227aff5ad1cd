"""What `verify` returns, typed: the full report (written to disk as JSON by the interfaces,
field for field as `model_dump(mode="json")` gives it) and the headline the MCP tool returns.
Neither has a place for a fingerprint key or response: fingerprints appear by id only."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class WrapperCount(BaseModel):
    matched: int
    total: int


class NullModelCheck(BaseModel):
    """The keys run on one unrelated model, judged by the suspect's rule."""

    model: str
    matched: int
    total: int
    wrappers: dict[str, WrapperCount]
    skipped_wrappers: list[str]
    p_value: float | None = None
    verdict: str | None = None


class FingerprintCheck(BaseModel):
    id: str
    matched: bool = Field(description="its response came back under at least one wrapper")
    wrappers: list[str] = Field(description="the wrappers it came back under")


class VerifyReport(BaseModel):
    """`verify`'s result: counts, the evidence and the settings, per fingerprint by id."""

    model: str
    fingerprints: str | None = Field(description="the set file, when the set came from one")
    matched: int = Field(description="fingerprints answered under at least one wrapper")
    total: int
    null_rate: float
    null_rate_source: str
    p_value: float = Field(description="chance an unrelated model matches this many or more")
    alpha: float
    verdict: str = Field(description="'match' when p_value <= alpha, else 'no_match'")
    rule: str = Field(description="the decision rule, fixed before decoding")
    match_rule: str
    wrappers: dict[str, WrapperCount]
    skipped_wrappers: list[str]
    null_models: list[NullModelCheck]
    per_fingerprint: list[FingerprintCheck]
    settings: dict[str, Any] = Field(description="the VerifyConfig the report was made with")


class NullModelSummary(BaseModel):
    model: str
    matched: int
    total: int
    p_value: float | None = None
    verdict: str | None = None


class VerifyResult(BaseModel):
    """The headline of a verification whose full report was written to `report_path`."""

    model: str
    fingerprints: str
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
    null_models: list[NullModelSummary]
    rule: str = Field(description="the decision rule, fixed before decoding")
    report_path: str = Field(description="full JSON report (per-fingerprint ids, settings; no "
                                         "keys or responses)")
    seconds: float

    @classmethod
    def of(cls, report: VerifyReport, report_path: str, seconds: float) -> VerifyResult:
        data = report.model_dump(include=set(cls.model_fields))
        data["null_models"] = [NullModelSummary.model_validate(n, from_attributes=True)
                               for n in report.null_models]
        return cls(**data, report_path=report_path, seconds=seconds)
