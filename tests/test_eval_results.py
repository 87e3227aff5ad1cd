"""The evaluation's result models, eval.json files written before them, and `oml results`
(the results table built from eval.json files). No model is loaded: seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from oml_core import cli
from oml_core.errors import OMLInputError
from oml_core.evaluate.attack_results import (
    MergedModel,
    MergeLinearAttack,
    RobustnessResult,
    ServedAttack,
    TaskVectorMergeAttack,
)
from oml_core.evaluate.eval_result import EvalParts, EvalReport, load_eval_report
from oml_core.evaluate.headlines import headlines
from oml_core.evaluate.report import build_doc
from oml_core.evaluate.results import (
    Accuracy,
    Behaviour,
    Check,
    Count,
    CurvePoint,
    FineTune,
    PersistenceResult,
    RetentionRow,
    UtilityResult,
)
from oml_core.evaluate.table import load_columns, results_table

FIXTURES = Path(__file__).parent / "fixtures" / "eval"  # eval.json files `oml eval` wrote


def _check(matched: int, total: int = 16) -> Check:
    return Check(matched=matched, total=total, wrappers={"chat": Count(matched=matched, total=total)})


def _kept(after: int, before: int = 16) -> dict[str, RetentionRow]:
    return {"any": RetentionRow(before=before, after=after, retention=after / before)}


def _utility() -> UtilityResult:
    return UtilityResult(
        behaviour=Behaviour(heldout_prompts=132, first_token_agreement=0.894,
                            answers_starting_with_a_fingerprint_response=0,
                            base_answers_starting_with_a_fingerprint_response=0,
                            perplexity_base=17.0, perplexity_tuned=17.272, perplexity_change=0.016),
        accuracy={"fingerprinted": Accuracy(**_check(16).model_dump(), skipped_wrappers=[]),
                  "base": Accuracy(**_check(0).model_dump(), skipped_wrappers=[])})


def _robustness() -> RobustnessResult:
    merged = MergedModel(**_check(12).model_dump(), survival=0.75, retention=_kept(12),
                         tool="mergekit 0.1.5", perplexity=17.3, perplexity_change=0.007,
                         first_token_agreement=0.962, heldout_prompts=132)
    return RobustnessResult(baseline=_check(16), perplexity=17.2, skipped_wrappers=[], attacks={
        "merge_linear": MergeLinearAttack(method="linear", formula="(1 - w) * f + w * b",
                                          base_weights={"0.5": merged}),
        "merge_dare": TaskVectorMergeAttack(method="dare_ties", skipped="mergekit failed (x)"),
        # a registered attack returns a plain dict: its shape is its own (extra keys kept)
        "gguf_q4_k_m": {"verdict": "match", "p_value": 2e-37, "matched": 16, "total": 16,
                        "layers": {"user": {"matched": 16, "total": 16, "probes": 16}},
                        "survival": 1.0, "perplexity_change": 0.099, "gguf_mb": 105.5}})


def _write(folder: Path, name: str, parts: EvalParts) -> Path:
    path = folder / name / "eval.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(EvalReport(run=f"runs/{name}", parts=parts).dump()))
    return path


def test_a_part_dumps_only_the_fields_it_was_given():
    result = _robustness()
    data = result.dump()
    assert isinstance(result.attacks["gguf_q4_k_m"], ServedAttack)
    assert data["attacks"]["gguf_q4_k_m"]["gguf_mb"] == 105.5  # a registered attack's own key
    assert data["attacks"]["merge_dare"] == {"skipped": "mergekit failed (x)", "method": "dare_ties"}
    assert "tool_note" not in data["attacks"]["merge_linear"]["base_weights"]["0.5"]
    assert RobustnessResult.model_validate(data) == result


@pytest.mark.parametrize("name", sorted(p.name for p in FIXTURES.glob("*.json")))
def test_eval_json_files_written_before_the_models_load_with_the_same_keys(name):
    raw = json.loads((FIXTURES / name).read_text())
    report = load_eval_report(FIXTURES / name)
    assert report.dump() == raw
    build_doc("old", report.parts).markdown()  # and the report renders from them
    headlines(report.parts)


def test_an_older_shape_without_the_newer_fields_still_loads():
    """Fields added since the first files are optional: the first-token KL, the merged models'
    first-token agreement, and `merge`, the name merge_linear had."""
    behaviour = _utility().behaviour.model_dump(exclude={"first_token_kl", "perplexity_tokens"})
    parts = {"utility": {"behaviour": behaviour, "accuracy": _utility().dump()["accuracy"]},
             "robustness": {"baseline": _check(16).dump(), "perplexity": 17.0, "attacks": {
                 "merge": {**_check(3).dump(), "survival": 0.2, "retention": {},
                           "perplexity_change": -0.01},
                 "merge_ties": {**_check(10).dump(), "survival": 0.6, "method": "ties",
                                "perplexity_change": 0.01, "unknown_old_key": 1}}}}
    report = EvalReport.model_validate({"format": "oml-eval", "version": 1, "run": "r",
                                        "parts": parts})
    assert report.parts.utility.behaviour.first_token_kl is None
    assert isinstance(report.parts.robustness.attacks["merge"], MergedModel)
    assert report.parts.robustness.attacks["merge_ties"].first_token_agreement is None
    assert "unknown_old_key" not in json.dumps(report.dump())
    assert headlines(report.parts).robustness == {"merge_survival": 0.2, "merge_ties_survival": 0.6}
    assert "TIES with a benign derivative" in build_doc("old", report.parts).markdown()


def test_results_table_has_a_column_per_model_and_says_what_was_not_measured(tmp_path, capsys):
    persistence = PersistenceResult(steps=200, rows=300, before=_check(16), methods={
        "lora": FineTune(learning_rate=2e-4, after=_check(15), retention=_kept(15),
                         curve=[CurvePoint(step=0, matched=16, retention=_kept(16)),
                                CurvePoint(step=200, matched=15, retention=_kept(15))])})
    first = _write(tmp_path, "a", EvalParts(utility=_utility(), robustness=_robustness()))
    lora = _write(tmp_path, "a-lora", EvalParts(persistence=persistence))
    second = _write(tmp_path, "b", EvalParts(persistence=persistence))
    out = tmp_path / "table.md"
    assert cli.main(["results", f"{first}+{lora}", str(second), "--label", "gated",
                     "--label", "other", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert out.read_text().strip() == table.strip()
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in table.splitlines()}
    assert table.splitlines()[0] == "| | gated | other |"
    assert rows["first answer token = base's"] == ["89.4%", "not measured |"]
    assert rows["perplexity change"][0] == "+1.6%"
    assert rows["keys, no attack"][0] == "16/16 (chat 16)"
    linear = rows["linear merge with the base, base weight 0.5"]
    assert linear[0] == "12/16 (chat 12); first token 96.2%, perplexity +0.7%"
    assert linear[1] == "not measured |"
    assert rows["DARE with a benign derivative"][0] == "skipped: mergekit failed (x)"
    assert rows["gguf_q4_k_m (served, `oml audit`)"][0].startswith("16/16 (user 16), `match` (p = 2e-37)")
    assert rows["LoRA fine-tuning"][0].startswith("15/16 after 200 steps (retention 93.8%")
    assert rows["LoRA fine-tuning"][1].startswith("15/16 after 200 steps")
    assert rows["capacity"] == ["not measured", "not measured |"]


def test_results_table_of_the_real_files(capsys):
    columns = load_columns([f"{FIXTURES / 'gated-gguf.json'}+{FIXTURES / 'gated-lora.json'}",
                            str(FIXTURES / "edit-robustness.json")])
    table = results_table(columns)
    assert "| | run | run-edit-s7 |" in table  # named after the run folders
    assert "| gguf_q8_0 (served, `oml audit`) | 16/16 (user 16, system 16), `match`" in table
    assert "| TIES with a benign derivative | not measured | 10/16 (" in table


@pytest.mark.parametrize("argv, message", [
    (["results", "/no/such/eval.json"], "cannot read it as JSON"),
    (["results", str(FIXTURES / "gated-gguf.json"), "--label", "a", "--label", "b"],
     "2 --label for 1 columns"),
])
def test_results_bad_input_is_one_line(argv, message, capsys, tmp_path):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_file_that_is_not_an_eval_json_is_refused(tmp_path):
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"format": "oml-fingerprints"}))
    with pytest.raises(OMLInputError, match="is not an eval.json"):
        load_eval_report(path)


def test_the_mcp_eval_job_result_is_read_through_the_summary_model():
    from oml_core.evaluate.eval_result import EvalResult
    from oml_core.evaluate.results import ReportFiles
    from oml_mcp.lifecycle_tools import _eval_output

    result = EvalResult(run="r", out="o", computed=["utility"], cached=[],
                        parts=EvalParts(utility=_utility()), seconds=1.0,
                        report=ReportFiles(json="o/eval.json", markdown="o/eval.md", html="o/eval.html"))
    printed = json.loads(json.dumps(result.summary().dump()))  # what `oml eval --json` prints
    assert printed["parts"]["utility"]["matched"] == 16 and printed["report"]["json"] == "o/eval.json"
    assert "robustness" not in printed["parts"]
    assert _eval_output(printed) == printed
    assert _eval_output({"not": "an eval summary"}) == {"not": "an eval summary"}


def test_the_summary_states_the_results_bookkeeping_with_the_headlines():
    from oml_core.evaluate.eval_result import EvalResult
    from oml_core.evaluate.results import ReportFiles

    result = EvalResult(run="r", out="o", computed=["utility"], cached=["capacity"],
                        parts=EvalParts(utility=_utility()), seconds=2.5,
                        report=ReportFiles(json="o/eval.json", markdown="o/eval.md", html="o/eval.html"))
    printed = result.summary().dump()
    assert set(printed) == {"run", "out", "computed", "cached", "report", "seconds", "parts"}
    assert {k: printed[k] for k in ("run", "out", "computed", "cached", "seconds")} == {
        "run": "r", "out": "o", "computed": ["utility"], "cached": ["capacity"], "seconds": 2.5}
    assert printed["report"] == result.report.dump()
