"""The checks run right after fingerprinting: verification with held-out wrappers and the base
model as null, and the off-key behaviour comparison. Reports hold ids and counts, no secrets."""

from __future__ import annotations

from oml_core.config import VerifyConfig
from oml_core.evaluate.utility import compare_behaviour
from oml_core.models import load_model
from oml_core.verify import verify


def evaluate_run(model_dir: str, base_path: str, fset, cfg) -> dict:
    tuned = load_model(model_dir, cfg.device, cfg.dtype)
    base = load_model(base_path, cfg.device, cfg.dtype)
    report = verify(VerifyConfig(wrappers="bare,chat,system", num_system_prompts=4), tuned, fset,
                    null_models=[base])
    chat = tuned.has_chat_template and cfg.format != "raw"
    return {
        "verification": {k: report[k] for k in ("matched", "total", "p_value", "verdict",
                                               "null_rate", "null_rate_source", "rule", "wrappers")},
        "base_verification": report["null_models"][0],
        "utility": compare_behaviour(tuned, base, fset, chat),
    }
