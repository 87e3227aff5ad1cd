"""The checks run right after fingerprinting: verification with held-out wrappers and the base
model as null, and the off-key behaviour comparison. Reports hold ids and counts, no secrets.

Their result is `RunCheck`; the run's metrics.json holds it dumped (under `verification`,
`base_verification`, `utility`) beside the method's own figures, and every reader of those
figures (the model card, the capacity sweep) goes through `RunCheck.from_metrics`."""

from __future__ import annotations

from pydantic import ValidationError

from oml_core.config import VerifyConfig
from oml_core.evaluate.results import Behaviour, Result
from oml_core.evaluate.utility import compare_behaviour
from oml_core.models import load_model
from oml_core.verify import verify
from oml_core.verify.result import NullModelCheck, WrapperCount
from oml_core.verify.verifier import check_keys
from oml_core.verify.wrappers import build_wrappers

WRAPPERS, SYSTEM_PROMPTS = ["bare", "chat", "system"], 4


class RunVerification(Result):
    """The fingerprinted model's keys under held-out wrappers, the base model as the null."""

    matched: int
    total: int
    p_value: float
    verdict: str
    null_rate: float
    null_rate_source: str
    rule: str
    wrappers: dict[str, WrapperCount]
    # what `oml audit` counts: its `start` rule also needs the response's word to end there
    matched_start_rule: int | None = None


class RunCheck(Result):
    verification: RunVerification
    base_verification: NullModelCheck
    utility: Behaviour

    def dump(self) -> dict:
        """The figures as metrics.json holds them."""
        return {"verification": self.verification.dump(),
                "base_verification": self.base_verification.model_dump(mode="json"),
                "utility": self.utility.dump()}

    @classmethod
    def from_metrics(cls, metrics: dict | None) -> RunCheck | None:
        """The checks inside a run's metrics.json; None where the run skipped them
        (`--no-verify-after`) or the file is not one we wrote."""
        try:
            return cls.model_validate(metrics or {})
        except ValidationError:
            return None


def evaluate_run(model_dir: str, base_path: str, fset, cfg) -> RunCheck:
    tuned = load_model(model_dir, cfg.device, cfg.dtype)
    base = load_model(base_path, cfg.device, cfg.dtype)
    report = verify(VerifyConfig(wrappers=WRAPPERS, num_system_prompts=SYSTEM_PROMPTS), tuned, fset,
                    null_models=[base])
    # a one-token response the model runs on into a longer word matches `exact` only
    wrappers, _ = build_wrappers(WRAPPERS, SYSTEM_PROMPTS, tuned.has_chat_template)
    start_hits = check_keys(tuned, fset, wrappers, "start", desc="verify (start rule)")
    chat = tuned.has_chat_template and cfg.format != "raw"
    verification = RunVerification.model_validate(
        report.model_dump(include=set(RunVerification.model_fields))
        | {"matched_start_rule": sum(any(row) for row in start_hits)})
    return RunCheck(verification=verification, base_verification=report.null_models[0],
                    utility=compare_behaviour(tuned, base, fset, chat))
