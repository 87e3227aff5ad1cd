"""plan.json, typed: what an audit fixed before its first request (clients/audit.py writes it,
a resume and the MCP audit listings read it back through `StoredAuditPlan.from_json`).

The file holds no key and no response: fingerprint ids, hashes and the public settings only.
Plans written by earlier versions lack the null-rate fields (and, for the fixed plan, the
`sequential` entry); they still load, with those fields empty.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, NonNegativeInt

PLAN_FORMAT = "oml-audit-plan"
PLAN_VERSION = 1

NullRate = Annotated[float, Field(ge=0, le=1)]


def _absent(value) -> bool:
    return value is None


class AuditPlanHead(BaseModel):
    """A new audit's identity and keys, fixed before its probes are (the start of plan.json)."""

    format: Literal["oml-audit-plan"] = PLAN_FORMAT
    version: int = PLAN_VERSION
    created: str
    settings_id: str = Field(description="hash of the settings that change what is sent or "
                                         "how it is judged (clients.audit.settings_id)")
    audit_id: str
    endpoint: str = Field(description="scheme://host:port/path (no credentials or query)")
    model: str | None
    set_sha256: str = Field(description="content hash of the set's pairs")
    fingerprint_ids: list[str] = Field(description="the keys, in the order they are sent")
    keys_passed_over: NonNegativeInt = Field(description="keys left out because the ledger (or "
                                                         "a comparison) had shown them already")
    config: dict[str, Any] = Field(description="the audit's settings, credentials masked")


class SequentialOrder(BaseModel):
    """How a sequential audit sends its keys and weighs each answer."""

    alternative_hit_rate: float
    order: str


class StoredAuditPlan(AuditPlanHead):
    """plan.json as written before any key leaves: the head plus the probes and decision rule."""

    sequential: SequentialOrder | None = Field(None, exclude_if=_absent,
                                               description="absent for the fixed plan")
    tests: list[str] = Field(description="the pre-registered family of tests")
    rule: str
    alpha: float
    probes_planned: NonNegativeInt
    probes_not_sendable: NonNegativeInt
    null_rate_source: str | None = Field(None, description="absent in plans of earlier versions")
    probe_null_rates: dict[str, NullRate] = Field(default_factory=dict,
                                                  description="every probe's null rate, by id")

    @classmethod
    def from_json(cls, data: bytes | str) -> StoredAuditPlan:
        """plan.json's text, checked strictly (a count given as "5" or true is no count);
        raises pydantic.ValidationError, whose text may quote the file: never show it."""
        return cls.model_validate_json(data, strict=True)
