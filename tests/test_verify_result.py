"""The verify report and its headline share their counts and decision (VerifyOutcome); the
headline carries each null model without its per-wrapper counts."""

from __future__ import annotations

from oml_core.verify.result import (
    FingerprintCheck,
    NullModelCheck,
    VerifyReport,
    VerifyResult,
    WrapperCount,
)

REPORT_KEYS = {"model", "fingerprints", "matched", "total", "null_rate", "null_rate_source",
               "p_value", "alpha", "verdict", "rule", "match_rule", "wrappers", "skipped_wrappers",
               "null_models", "per_fingerprint", "settings"}


def _report() -> VerifyReport:
    null = NullModelCheck(model="base", matched=1, total=4, p_value=0.5, verdict="no_match",
                          wrappers={"bare": WrapperCount(matched=1, total=4)},
                          skipped_wrappers=["system"])
    return VerifyReport(
        model="suspect", fingerprints="set.json", matched=3, total=4, null_rate=0.01,
        null_rate_source="response_prob", p_value=1e-7, alpha=1e-6, verdict="match",
        rule="binomial", match_rule="exact", wrappers={"bare": WrapperCount(matched=3, total=4)},
        skipped_wrappers=[], null_models=[null],
        per_fingerprint=[FingerprintCheck(id="f1", matched=True, wrappers=["bare"])],
        settings={"alpha": 1e-6})


def test_the_report_on_disk_keeps_its_keys():
    dumped = _report().model_dump(mode="json")
    assert set(dumped) == REPORT_KEYS
    assert set(dumped["null_models"][0]) == {"model", "matched", "total", "p_value", "verdict",
                                             "wrappers", "skipped_wrappers"}


def test_the_headline_states_the_reports_outcome_and_where_it_is():
    report = _report()
    result = VerifyResult.of(report, "out/verify.json", 1.25).model_dump(mode="json")
    shared = REPORT_KEYS - {"null_models", "per_fingerprint", "settings"}
    assert set(result) == shared | {"null_models", "report_path", "seconds"}
    assert {k: result[k] for k in shared} == {k: v for k, v in report.model_dump(mode="json").items()
                                              if k in shared}
    assert result["null_models"] == [{"model": "base", "matched": 1, "total": 4, "p_value": 0.5,
                                      "verdict": "no_match"}]
    assert (result["report_path"], result["seconds"]) == ("out/verify.json", 1.25)
