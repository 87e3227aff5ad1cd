"""The checks run right after fingerprinting: verification with held-out wrappers and the base
model as null, and the off-key behaviour comparison. Reports hold ids and counts, no secrets."""

from __future__ import annotations

from oml_core.config import VerifyConfig
from oml_core.evaluate.utility import compare_behaviour
from oml_core.models import load_model
from oml_core.verify import verify
from oml_core.verify.verifier import check_keys
from oml_core.verify.wrappers import build_wrappers

WRAPPERS, SYSTEM_PROMPTS = ("bare", "chat", "system"), 4


def evaluate_run(model_dir: str, base_path: str, fset, cfg) -> dict:
    tuned = load_model(model_dir, cfg.device, cfg.dtype)
    base = load_model(base_path, cfg.device, cfg.dtype)
    report = verify(VerifyConfig(wrappers=WRAPPERS, num_system_prompts=SYSTEM_PROMPTS), tuned, fset,
                    null_models=[base])
    # what `oml audit` will count: its `start` rule also needs the response's word to end there
    # (a one-token response the model runs on into a longer word matches `exact` only)
    wrappers, _ = build_wrappers(WRAPPERS, SYSTEM_PROMPTS, tuned.has_chat_template)
    start_hits = check_keys(tuned, fset, wrappers, "start", desc="verify (start rule)")
    chat = tuned.has_chat_template and cfg.format != "raw"
    return {
        "verification": report.model_dump(mode="json", include={
            "matched", "total", "p_value", "verdict", "null_rate", "null_rate_source", "rule",
            "wrappers"}) | {"matched_start_rule": sum(any(row) for row in start_hits)},
        "base_verification": report.null_models[0].model_dump(mode="json"),
        "utility": compare_behaviour(tuned, base, fset, chat).dump(),  # into metrics.json
    }
