"""The whole evaluation's models: `eval.json` (EvalReport), what `evaluate` returns (EvalResult)
and the few figures a person reads first (EvalSummary with EvalHeadlines, what `oml eval --json`
prints)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError

from oml_core.errors import OMLInputError
from oml_core.evaluate.attack_results import RobustnessResult
from oml_core.evaluate.headlines import EvalHeadlines, headlines
from oml_core.evaluate.results import (
    CapacityResult,
    FalsePositivesResult,
    PartResult,
    PersistenceResult,
    ReportFiles,
    Result,
    UtilityResult,
)

FORMAT = "oml-eval"
VERSION = 1


class EvalParts(Result):
    """The parts measured for one model and fingerprint set (any subset)."""

    utility: UtilityResult | None = None
    persistence: PersistenceResult | None = None
    false_positives: FalsePositivesResult | None = None
    robustness: RobustnessResult | None = None
    capacity: CapacityResult | None = None

    def measured(self) -> dict[str, PartResult]:
        return {name: part for name in type(self).model_fields
                if (part := getattr(self, name)) is not None}


PART_MODELS: dict[str, type[PartResult]] = {
    name: field.annotation.__args__[0] for name, field in EvalParts.model_fields.items()}


class EvalReport(Result):
    """`eval.json`."""

    always_dumped = ("format", "version")

    format: str = FORMAT
    version: int = VERSION
    run: str
    created: str | None = None
    fingerprints: int | None = None
    provenance: dict[str, Any] | None = None  # versions and host facts, open by design
    parts: EvalParts = Field(default_factory=EvalParts)


class EvalBookkeeping(Result):
    """Where an evaluation wrote, which parts it computed or reused, its report files and how
    long it took: what EvalResult and EvalSummary both state beside their parts."""

    run: str
    out: str
    computed: list[str] = Field(default_factory=list)
    cached: list[str] = Field(default_factory=list)
    report: ReportFiles
    seconds: float


class EvalResult(EvalBookkeeping):
    """What `evaluate` returns: where, which parts were computed or reused, every result."""

    parts: EvalParts

    def summary(self) -> EvalSummary:
        bookkeeping = {name: getattr(self, name) for name in EvalBookkeeping.model_fields}
        return EvalSummary(**bookkeeping, parts=headlines(self.parts))


class EvalSummary(EvalBookkeeping):
    """`oml eval --json` and the MCP eval job's result: the headline figures (the full results
    are in eval.json)."""

    parts: EvalHeadlines


def load_eval_report(path) -> EvalReport:
    """An `eval.json` file (any version `oml eval` wrote), as the model; one clear line when
    it is not one."""
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OMLInputError(f"{path}: cannot read it as JSON ({type(exc).__name__}); pass an "
                            "eval.json that `oml eval` wrote") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise OMLInputError(f"{path} is not an eval.json (its format is not {FORMAT}); pass the "
                            "eval.json in an `oml eval --out` folder")
    try:
        return EvalReport.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise OMLInputError(f"{path}: {where}: {first['msg']}; pass an eval.json that `oml eval` "
                            "wrote") from None
