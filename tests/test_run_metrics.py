"""metrics.json read and written through `RunMetrics`: the same keys out as in."""

from __future__ import annotations

import json

import pytest

from oml_core.errors import OMLInputError
from oml_core.evaluate.after_training import RunCheck
from oml_core.train.metrics import RunMetrics

CHECKS = {
    "verification": {"matched": 15, "total": 16, "p_value": 1e-30, "verdict": "match",
                     "null_rate": 0.001, "null_rate_source": "prior", "rule": "exact",
                     "wrappers": {"chat": {"matched": 15, "total": 16}},
                     "matched_start_rule": 14},
    "base_verification": {"model": "base", "matched": 0, "total": 16,
                          "wrappers": {"chat": {"matched": 0, "total": 16}},
                          "skipped_wrappers": [], "p_value": 1.0, "verdict": "no_match"},
    "utility": {"heldout_prompts": 100, "first_token_agreement": 0.9,
                "answers_starting_with_a_fingerprint_response": 0,
                "base_answers_starting_with_a_fingerprint_response": 0, "perplexity_base": 3.0,
                "perplexity_tuned": 3.1, "perplexity_change": 0.033,
                "near_miss_keys": {"one_word_changed": {"fired": 1, "total": 16}}},
}
FINETUNE = {"run_key": "abc", "method": "finetune", "num_fingerprints": 16, "format": "chat",
            "steps": 40, "train_seconds": 12.5, "memorised_at_step": 30,
            "memorised_after_train_seconds": 9.1,
            "history": [{"step": 1, "loss": 4.2}, {"step": 2, "memorised": 0.5, "train_seconds": 1.0}],
            "benign_rows": 0, "forgetting_regularizer": {"lambda": 0.0, "applied": "once"},
            "deepspeed": "zero2", "world_size": 1, **CHECKS}
GATED = {"run_key": "def", "method": "gated", "num_fingerprints": 6, "format": "raw", "layer": 0,
         "neurons": [3, 7], "key_contexts": 42, "backup_edit": None}


@pytest.mark.parametrize("written", [FINETUNE, GATED], ids=["finetune", "gated"])
def test_a_file_reads_back_to_the_same_keys_and_values(written):
    metrics = RunMetrics.model_validate(written)
    assert json.dumps(metrics.dump(), sort_keys=True) == json.dumps(written, sort_keys=True)


def test_typed_fields_and_the_methods_own_statistics():
    finetune, gated = RunMetrics.model_validate(FINETUNE), RunMetrics.model_validate(GATED)
    assert finetune.history[1].memorised == 0.5 and finetune.world_size == 1
    assert finetune.check.verification.wrappers["chat"].matched == 15
    assert gated.check is None and gated.steps is None and gated.neurons == [3, 7]


def test_a_recorded_check_is_written_as_run_check_writes_it():
    metrics = RunMetrics(run_key="k", method="edit", num_fingerprints=16, format="chat", layers=[1])
    check = RunCheck.model_validate(CHECKS)
    metrics.record_check(check)
    assert metrics.dump() == {"run_key": "k", "method": "edit", "num_fingerprints": 16,
                              "format": "chat", "layers": [1], **check.dump()}


def test_an_older_file_without_later_fields_still_reads():
    old = {"run_key": "abc", "num_fingerprints": 4, "steps": 10, "memorised_at_step": None}
    metrics = RunMetrics.model_validate(old)
    assert metrics.method == "finetune" and metrics.dump() == old


@pytest.mark.parametrize("content", ["not json", "[1, 2]",
                                     json.dumps({**FINETUNE, "steps": "forty"})])
def test_a_damaged_file_is_one_clear_error(tmp_path, content):
    (tmp_path / "metrics.json").write_text(content)
    with pytest.raises(OMLInputError, match="cannot be reused") as caught:
        RunMetrics.read(tmp_path)
    assert "\n" not in str(caught.value) and "forty" not in str(caught.value)
