"""A run's metrics.json, typed: what `fingerprint()` returns and every reader of a run's
figures (the headline, the model card, the capacity sweep) goes through.

The file has always been one flat object: the figures every method states, the method's own
statistics beside them, then the after-training checks (`RunCheck`, absent with
`--no-verify-after`). `RunMetrics.dump()` writes exactly the keys that were set, so the file
keeps the keys it had; a file from before a field existed still loads, since every field
added after the first runs is optional. No key or response text is ever in it.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from oml_core.errors import OMLInputError
from oml_core.evaluate.after_training import RunCheck, RunVerification
from oml_core.evaluate.results import Behaviour
from oml_core.runs import RunFolder
from oml_core.verify.result import NullModelCheck

CHECK_FIELDS = set(RunCheck.model_fields)  # verification, base_verification, utility


class HistoryEntry(BaseModel):
    """One line of a fine-tune's history: a logged loss, or a memorisation check."""

    step: int
    loss: float | None = None
    memorised: float | None = None  # share of checked rows memorised
    train_seconds: float | None = None  # training time so far, checks excluded


class RunMetrics(BaseModel):
    """metrics.json. Typed: what every method writes, the fine-tune's training figures that
    readers use, and the checks. The method's own statistics (the edit's layers and contexts
    answered, the gated method's layer, neurons and gate scores with its backup edit, the
    fine-tune's row counts, regularizer and DeepSpeed settings) ride along as extra fields:
    each method states its own, new ones are added as the methods are tuned, and they are
    reported rather than read back, so typing each here would only tie this model to every
    method's internals and refuse older runs' files."""

    model_config = ConfigDict(extra="allow")

    run_key: str
    method: str = "finetune"  # runs from before the other methods existed were fine-tunes
    num_fingerprints: int
    format: str | None = None  # "chat" or "raw": how the keys were trained
    # the fine-tune's training figures (the computed methods have no optimizer steps)
    steps: int | None = None
    train_seconds: float | None = None
    memorised_at_step: int | None = None
    memorised_after_train_seconds: float | None = None
    history: list[HistoryEntry] | None = None
    # the after-training checks
    verification: RunVerification | None = None
    base_verification: NullModelCheck | None = None
    utility: Behaviour | None = None

    @property
    def check(self) -> RunCheck | None:
        """The after-training checks; None where the run skipped them (`--no-verify-after`)."""
        if self.verification is None or self.base_verification is None or self.utility is None:
            return None
        return RunCheck(verification=self.verification, base_verification=self.base_verification,
                        utility=self.utility)

    def record_check(self, check: RunCheck) -> None:
        self.verification = check.verification
        self.base_verification = check.base_verification
        self.utility = check.utility

    def dump(self) -> dict:
        """metrics.json as written: the keys that were set, the checks as `RunCheck` writes them."""
        data = self.model_dump(exclude_unset=True, exclude=CHECK_FIELDS)
        check = self.check
        if check is not None:
            return data | check.dump()
        # a file read back with only some of the checks: as it was
        return data | self.model_dump(mode="json", exclude_unset=True, include=CHECK_FIELDS)

    @classmethod
    def read(cls, run_dir: str | Path, use: str = "reused",
             fix: str = "move that folder away or pass another --out-dir to fingerprint "
                        "again") -> RunMetrics:
        """A finished run's metrics.json, or one clear error naming what is wrong with it (the
        field names only: the values are never echoed), why that matters (the run cannot be
        `use`d) and `fix`."""
        path = Path(run_dir) / "metrics.json"
        data = RunFolder(Path(run_dir)).read_json("metrics.json")
        if not isinstance(data, dict):
            raise OMLInputError(f"{path} is missing or not a JSON object, so the finished run in "
                                f"{run_dir} cannot be {use}; {fix}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            wrong = sorted({".".join(map(str, err["loc"])) for err in exc.errors()})
            raise OMLInputError(f"{path} is not a run's metrics as OML writes them (check "
                                f"{', '.join(wrong[:5])}), so the finished run in {run_dir} cannot "
                                f"be {use}; {fix}") from None
