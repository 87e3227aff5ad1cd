"""The typed headline of a run, read from its metrics in one place (CLI, MCP listings)."""

from oml_core.train.headline import RunHeadline


def test_headline_reads_what_a_run_writes():
    metrics = {"num_fingerprints": 16, "steps": 40, "train_seconds": 12,
               "verification": {"matched": 15, "total": 16, "p_value": 1e-20, "verdict": "match",
                                "matched_start_rule": 14,
                                "wrappers": {"chat": {"matched": 15, "total": 16}}},
               "base_verification": {"matched": 0, "verdict": "no_match"},
               "utility": {"heldout_prompts": 132, "first_token_agreement": 0.9,
                           "perplexity_change": 0.016,
                           "near_miss_keys": {"lowercased": {"fired": 3, "total": 16}}}}
    head = RunHeadline.from_metrics(metrics)
    assert (head.matched, head.total, head.matched_start_rule, head.base_matched) == (15, 16, 14, 0)
    assert head.wrappers == {"chat": 15} and head.train_seconds == 12.0
    assert head.near_miss_keys["lowercased"].fired == 3 and head.first_token_agreement == 0.9


def test_a_foreign_metrics_file_gives_nones_not_errors():
    hostile = {"num_fingerprints": True, "verification": {"matched": "16", "wrappers": [1],
                                                          "p_value": None},
               "utility": {"near_miss_keys": {"a": 5, "b": {"fired": "x", "total": 2}},
                           "first_token_agreement": "high"}}
    head = RunHeadline.from_metrics(hostile)
    assert head.num_fingerprints is None and head.matched is None and head.wrappers is None
    assert head.near_miss_keys == {} and head.first_token_agreement is None
    assert RunHeadline.from_metrics([1, 2]) == RunHeadline()
