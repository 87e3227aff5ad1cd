"""The audit's results, typed: the plan (`preview_audit`), the decision (`decision.evaluate`,
`SequentialTest.summary`), the full report (`run_audit`; written as report.json field for field
as `model_dump(mode="json")` gives it) and the headline `oml audit --json` prints.

Keys and responses have no field here except `AuditReport.revealed`, which exists only for an
audit run with --reveal-keys (and is left out of the dump otherwise)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


def _absent(value) -> bool:
    return value is None


class AuditPlan(BaseModel):
    """What an audit will send and spend, computed before anything is sent."""

    endpoint: str = Field(description="scheme://host:port/path (no credentials or query)")
    model: str
    fingerprints: str
    folder: str = Field(description="the audit folder (evidence.jsonl, plan.json, reports)")
    audit_id: str | None = Field(None, description="the audit's id when the folder already holds "
                                                   "it (a resume); a new audit gets one when it "
                                                   "starts")
    resumes: bool = Field(description="the folder holds this audit: only unanswered probes are "
                                      "sent, with the keys it already spent")
    sequential: bool = Field(description="true (the default audit): keys, calls and tokens "
                                         "are the most it may spend; it stops as soon as the "
                                         "evidence decides, and keys it never sends stay unspent")
    keys: int = Field(description="fingerprint keys the endpoint will see (spent for good)")
    key_budget: int
    call_budget: int | None = Field(description="max_calls: the most calls the audit may send")
    keys_passed_over: int = Field(description="keys skipped because the ledger says this "
                                              "endpoint has already seen them")
    reuse_keys: bool
    layers: list[str] = Field(description="probe layers that can be sent with this adapter")
    probes_by_layer: dict[str, int]
    probes_planned: int = Field(description="one call each")
    probes_not_sendable: int
    probes_answered: int = Field(description="already answered in the folder (not sent again)")
    calls_to_send: int
    max_requests: int = Field(description="calls_to_send x (1 + max_retries): the worst case")
    estimated_prompt_tokens: int = Field(description="rough: about 4 characters a token")
    max_completion_tokens: int = Field(description="calls_to_send x max_tokens")
    estimated_tokens: int
    api_key_env: str = Field(description="the server's environment variable whose value is sent "
                                         "as the API key (the value is never shown)")
    api_key_set: bool = Field(description="whether that variable is set in the server's "
                                          "environment (without it no key is sent)")
    ledger: str = Field(description="the endpoint's key ledger (keyed hashes only)")


class AuditProgress(BaseModel):
    """How far a running audit is, as `run_audit`'s `on_progress` is told."""

    probes_done: int
    probes_failed: int
    probes_planned: int
    calls_this_run: int
    p_value: float | None = Field(description="of the answers so far; only the final one is "
                                              "the verdict's")
    matched: int
    total: int


class KeyStep(BaseModel):
    """One finished key of a sequential audit, in the order sent."""

    fingerprint_id: str
    hit: bool | None = Field(description="None: no probe of the key got a valid answer")
    null_rate: float
    calls: int
    e_value: float
    p_value: float = Field(description="the anytime-valid p-value after this key")


class SequentialSummary(BaseModel):
    verdict: str
    p_value: float
    alpha: float
    e_value: float
    max_e_value: float
    alternative_hit_rate: float
    keys_tested: int
    hits: int
    curve: list[KeyStep]


class TestOutcome(BaseModel):
    """One test of the family (a layer, or `any` layer): its keys and tail probability."""

    matched: int
    total: int
    p_value: float
    mean_null_rate: float
    significant_at_corrected_alpha: bool
    tested: bool
    best_possible_p_value: float = Field(description="the p-value had every key come back")


class AuditDecision(BaseModel):
    verdict: str
    p_value: float
    alpha: float
    deciding_test: str
    best_possible_p_value: float
    untested: list[str]
    tests: dict[str, TestOutcome]
    family_size: int
    null_rate_source: str
    unadjusted_p_value: float
    log10_p_value: float | None
    sequential: SequentialSummary | None = Field(
        None, exclude_if=_absent, description="a sequential audit's e-value, which decides it")


class HitCount(BaseModel):
    hits: int = 0
    probes: int = 0


class LayerTally(BaseModel):
    """One probe layer's answers in the report."""

    matched: int = Field(0, description="keys that came back in this layer")
    total: int = Field(0, description="keys with at least one valid answer here")
    hits: int = 0
    probes: int = 0
    errors: int = 0
    pending: int = 0
    tokens: int = 0
    answer_kinds: dict[str, int] = Field(default_factory=dict)
    by_temperature: dict[str, HitCount] = Field(default_factory=dict)
    variants: dict[str, HitCount] = Field(default_factory=dict)


class RevealedKey(BaseModel):
    id: str
    key: str
    response: str


class AuditRunFacts(BaseModel):
    """What the report and its headline both say about the run: its state, where the audit
    is, what it sent (declared once; each derives from it)."""

    state: str = Field(description="complete, or incomplete (pending probes: rerunning the audit "
                                   "with the same settings resumes it)")
    pending: int
    audit_id: str
    folder: str
    endpoint: str
    model: str | None
    keys_probed: int
    keys_not_sent: int
    probes_planned: int
    probes_done: int
    probes_failed: int
    errors_by_kind: dict[str, int]
    probes_skipped: int
    calls_this_run: int
    requests_this_run: int
    seconds_this_run: float
    notes: list[str]
    reports: dict[str, str] = Field(default_factory=dict, description="report files written")
    verdict_words: str = Field("", description="the verdict in plain words")


_VERDICT = "match, no_match, or inconclusive (no valid answer: the endpoint was not tested)"
_P_VALUE = ("the deciding p-value: Bonferroni-corrected over the tests (a sequential audit's: "
            "its e-value's, anytime-valid)")
_MATCHED = "keys that came back (deciding test)"


class _ReportOpening(BaseModel):
    """The report's first fields (a base class's fields come before a subclass's)."""

    verdict: str = Field(description=_VERDICT)
    p_value: float = Field(description=_P_VALUE)
    matched: int = Field(description=_MATCHED)
    total: int
    layers: dict[str, LayerTally]
    decision: AuditDecision
    rule: str
    alpha: float


class AuditReport(AuditRunFacts, _ReportOpening):
    """`run_audit`'s result: everything report.json holds."""

    incomplete: bool
    adapter: str
    set_sha256: str
    commitment_root: str | None
    key_budget: int | None
    keys_passed_over: int
    fingerprint_ids: list[str]
    ledger: str
    resumed: bool
    decoys_sent: int
    tokens_reported: int
    finished: str
    config: dict[str, Any] = Field(description="the audit's settings, credentials masked")
    provenance: dict[str, Any]
    revealed: list[RevealedKey] | None = Field(None, exclude_if=_absent)


class AuditLayer(BaseModel):
    matched: int | None = Field(None, description="keys that came back in this layer")
    total: int | None = Field(None, description="keys with at least one valid answer here")
    hits: int | None = Field(None, description="probes that matched")
    probes: int | None = Field(None, description="probes answered")
    errors: int | None = None
    p_value: float | None = None


class _HeadlineOpening(BaseModel):
    """The headline's first fields: the verdict numbers (`oml audit --json` opens with them)."""

    verdict: str = Field(description=_VERDICT)
    layers: dict[str, AuditLayer]
    deciding_test: str
    p_value: float = Field(description=_P_VALUE)
    matched: int = Field(description=_MATCHED)
    total: int
    alpha: float


class AuditHeadline(AuditRunFacts, _HeadlineOpening):
    """What `oml audit --json` prints: the verdict numbers first, then where everything is."""

    @classmethod
    def of(cls, report: AuditReport, **fields) -> AuditHeadline:
        """The headline of `report`; `fields` set those of a subclass the report lacks, or
        replace the report's."""
        tests = report.decision.tests
        layers = {name: AuditLayer(**row.model_dump(include={"matched", "total", "hits",
                                                               "probes", "errors"}),
                                   p_value=tests[name].p_value if name in tests else None)
                  for name, row in report.layers.items()}
        shared = report.model_dump(include=set(cls.model_fields) - {"layers", "deciding_test"})
        return cls(**{**shared, **fields}, layers=layers,
                   deciding_test=report.decision.deciding_test)


class LayerKeys(BaseModel):
    matched: int
    total: int


class ComparedEndpoint(BaseModel):
    """One suspect's row of a comparison: its verdict, or the error that stopped its audit."""

    endpoint: str
    verdict: str = Field(description="match, no_match, inconclusive, or error")
    error: str | None = Field(None, exclude_if=_absent)
    p_value: float | None = Field(None, exclude_if=_absent)
    keys: int | None = Field(None, exclude_if=_absent)
    calls: int | None = Field(None, exclude_if=_absent)
    state: str | None = Field(None, exclude_if=_absent)
    layers: dict[str, LayerKeys] | None = Field(None, exclude_if=_absent)
    keys_passed_over: int | None = Field(None, exclude_if=_absent)
    folder: str


class AuditComparison(BaseModel):
    """`compare_endpoints`' result, written as comparison.json."""

    format: str = "oml-audit-comparison"
    version: int = 1
    alpha: float
    model: str | None
    share_keys: bool
    endpoints: list[ComparedEndpoint]
    folder: str
