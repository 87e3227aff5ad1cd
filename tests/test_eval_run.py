"""`oml eval` end to end on a tiny run: every part, the cache, the report, the CLI, capacity."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from eval_helpers import (  # noqa: F401 - one_torch_thread is an autouse fixture
    NUM,
    context,
    eval_cfg,
    leaked,
    make_tiny_run,
    one_torch_thread,
    secrets_of,
    short_benign_answers,
    text_files,
)
from safetensors.torch import load_file

from oml_core import cli
from oml_core.config import EVAL_PARTS, CapacityConfig, EvalConfig
from oml_core.errors import OMLInputError
from oml_core.evaluate import capacity as capacity_module
from oml_core.evaluate import context as context_module
from oml_core.evaluate.capacity import run_capacity
from oml_core.evaluate.eval_result import load_eval_report
from oml_core.evaluate.results import CapacitySweep
from oml_core.evaluate.run_eval import evaluate

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory):
    return make_tiny_run(tiny_model_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory):
    """One full evaluation (all five parts) of the tiny run."""
    out = tmp_path_factory.mktemp("eval_report")
    cfg = eval_cfg(tiny_run, out)
    with short_benign_answers():
        return cfg, evaluate(cfg)


def _flags(cfg: EvalConfig) -> list[str]:
    """CLI flags that reproduce `cfg` (only the fields that differ from the defaults)."""
    defaults, argv = EvalConfig(), []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value != getattr(defaults, f.name):
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
            argv += ["--" + f.name.replace("_", "-"), text]
    return argv


def test_every_part_computes_real_numbers(evaluated):
    _, summary = evaluated
    assert summary.computed == list(EVAL_PARTS) and summary.cached == []
    parts = summary.parts
    utility = parts.utility
    assert utility.accuracy["fingerprinted"].matched == NUM and utility.accuracy["base"].matched == 0
    persistence = parts.persistence
    assert set(persistence.methods) == {"full", "lora"}
    for method in persistence.methods.values():
        assert [p.step for p in method.curve] == [0, 2, 4]
        assert 0.0 <= method.retention["any"].retention <= 1.0
        assert method.perplexity_after > 1
    fp = parts.false_positives
    assert [m.model for m in fp.models] == ["base", "random"]
    assert all(m.verdict == "no_match" for m in fp.models)
    assert Path(fp.null_file).exists() and 0 < fp.null_rate < 0.5
    attacks = parts.robustness.attacks
    assert set(attacks) == {"system_prompts", "sampling", "int8", "merge_linear", "merge_slerp",
                            "merge_ties", "merge_dare", "suppression"}
    assert set(attacks["sampling"].temperatures) == {"0.7", "1"}
    assert attacks["system_prompts"].prompts == 12
    assert set(attacks["merge_linear"].base_weights) == {"0.3", "0.5", "0.7"}
    merged = [*attacks["merge_linear"].base_weights.values(), attacks["merge_slerp"],
              attacks["merge_ties"], attacks["merge_dare"]]
    for name, attack in [(n, attacks[n]) for n in ("int8", "suppression")] + list(enumerate(merged)):
        assert 0.0 <= attack.survival <= 1.0, name
    for attack in merged:
        assert attack.perplexity > 1 and 0 <= attack.first_token_agreement <= 1
    assert attacks["merge_dare"].method == "dare_ties" and attacks["merge_ties"].density == 0.5
    assert attacks["int8"].survival >= 0.8  # quantization barely moves a memorised argmax
    # capacity: N = 4 and 8 trained with the run's own settings, then lambda 0 and the run's 0.15
    points = {(p.n, p.regularizer): p for p in parts.capacity.points}
    assert sorted(points) == [(4, 0.0), (4, 0.15), (8, 0.0), (8, 0.15)]
    assert points[(4, 0.0)].accuracy == 1.0 and points[(8, 0.0)].accuracy == 1.0
    assert points[(8, 0.15)].total == 8 and points[(8, 0.15)].perplexity_change is not None
    assert parts.capacity.runs == {"n4": "completed", "n8": "completed"}


def test_eval_json_is_the_dumped_model_and_loads_back(evaluated):
    cfg, summary = evaluated
    raw = json.loads((Path(cfg.out) / "eval.json").read_text())
    report = load_eval_report(Path(cfg.out) / "eval.json")
    assert report.dump() == raw and report.parts == summary.parts
    # optional fields a part did not set stay out of the file (same keys as ever)
    assert "lm_eval" not in raw["parts"]["utility"] and "tool_note" not in json.dumps(raw)
    assert "hit_ids" not in json.dumps(raw)


def test_report_files_are_self_contained_and_hold_no_secret(evaluated, tiny_run):
    cfg, _ = evaluated
    out = Path(cfg.out)
    for name in ("eval.json", "eval.md", "eval.html", "null_rates.json"):
        assert (out / name).exists(), name
    plots = sorted(p.stem for p in (out / "plots").glob("*.png"))
    assert plots == ["accuracy", "capacity", "null_rates", "retention", "robustness"]
    page = (out / "eval.html").read_text()
    assert page.count('src="data:image/png;base64,') == 5 and "plots/" not in page
    markdown = (out / "eval.md").read_text()
    for heading in ("Utility and specificity", "Persistence", "False positives", "Robustness", "Capacity"):
        assert heading in markdown and heading in page
    assert "](plots/retention.png)" in markdown
    data = json.loads((out / "eval.json").read_text())
    assert data["format"] == "oml-eval" and set(data["parts"]) == set(EVAL_PARTS)
    secrets = secrets_of(tiny_run)
    for path in text_files(out):
        assert not leaked(path.read_text(), secrets), path


def test_a_second_call_does_no_work(evaluated, monkeypatch):
    cfg, first = evaluated

    def no_model(*args, **kwargs):
        raise AssertionError("a cached evaluation must not load a model")

    monkeypatch.setattr(context_module, "load_model", no_model)
    again = evaluate(cfg)
    assert again.computed == [] and again.cached == list(EVAL_PARTS)
    assert json.dumps(again.parts.dump(), sort_keys=True) == json.dumps(first.parts.dump(), sort_keys=True)


def test_a_changed_setting_recomputes_that_part_only(evaluated):
    cfg, _ = evaluated
    changed = dataclasses.replace(cfg, parts=["false_positives", "utility"], null_models=["random"])
    summary = evaluate(changed)
    assert summary.computed == ["false_positives"] and summary.cached == ["utility"]
    assert [m.model for m in summary.parts.false_positives.models] == ["random"]
    # the parts not asked for still come from the cache into the report
    assert set(json.loads(Path(summary.report.json_file).read_text())["parts"]) == set(EVAL_PARTS)


def test_cli_prints_the_cached_evaluation_as_json(evaluated, capsys):
    cfg, _ = evaluated
    code = cli.main(["eval", *_flags(dataclasses.replace(cfg, parts=["utility", "robustness"])), "--json"])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["computed"] == [] and data["parts"]["utility"]["matched"] == NUM
    assert "int8_survival" in data["parts"]["robustness"]
    assert "merge_linear_w0.5_survival" in data["parts"]["robustness"]
    assert "merge_ties_survival" in data["parts"]["robustness"]


@pytest.mark.parametrize("argv, message", [
    (["eval"], "no run folder given"),
    (["eval", "--run", "/no/such/run"], "is not a folder"),
    (["eval", "--run", ".", "--parts", "utility,speed"], "'speed' is not one of"),
    (["eval", "--run", ".", "--match", "fuzzy"], "--match 'fuzzy' is not one of"),
    (["eval", "--run", "."], "is not an OML run"),
    (["eval", "--run", ".", "--temperatures", "0.7,0"], "--temperatures: 0 is out of range"),
    (["eval", "--run", ".", "--temperatures", "hot"], "--temperatures: 'hot' is not a number"),
    (["eval", "--run", ".", "--temperatures", "200"], "--temperatures: 200 is out of range"),
    # one range for every stage that samples (eval, calibrate, audit): what an API accepts
    (["eval", "--run", ".", "--temperatures", "2.5"], "above 0 and at most 2"),
    (["eval", "--run", ".", "--attacks", "int4"], "--attacks: 'int4' is not one of"),
    (["eval", "--run", ".", "--parts", ""], "--parts: no value given"),
    (["eval", "--run", ".", "--merge-base-weights", "0.3,2"], "--merge-base-weights: 2 is out of range"),
    (["eval", "--run", ".", "--persistence-lora-rank", "0"], "--persistence-lora-rank must be"),
    (["eval", "--run", ".", "--lora-rank=4"], "unrecognized arguments: --lora-rank"),
    (["eval", "--run", ".", "--merge-base-weights", "half"], "--merge-base-weights: 'half' is not a"),
    (["eval", "--run", ".", "--merge-density", "0"], "--merge-density must be between 0.01 and 1"),
    (["eval", "--run", ".", "--merge-tool", "sed"], "--merge-tool 'sed' is not one of"),
    (["eval", "capacity", "--sizes", "4"], "no sweep folder given"),
])
def test_cli_bad_input_exits_2_with_one_line(argv, message, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # a bad list item: argparse refuses the flag's value itself
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_gated_capacity_sweep_refuses_too_many_keys_before_any_work(tiny_model_dir, tmp_path):
    """The default method holds at most half of one layer's MLP neurons of keys (64 of the tiny
    model's 128): a sweep asking more fails at once, not after the smaller sizes ran."""
    out = tmp_path / "sweep"
    assert cli.main(["eval", "capacity", "--model", str(tiny_model_dir), "--out", str(out),
                     "--sizes", "8,65"]) == 2
    assert not out.exists()
    with pytest.raises(OMLInputError, match="65 keys need at most half of its 128 neurons"):
        run_capacity(CapacityConfig(model=str(tiny_model_dir), out=str(out), sizes="8,65"))
    assert not out.exists()


def test_every_stage_that_samples_takes_the_same_temperatures():
    from clients.config import AuditConfig
    from oml_core.config import CalibrateConfig, EvalConfig
    from oml_core.errors import OMLInputError
    from oml_core.settings import parse_temperatures, validate

    def checked(config_cls):
        def parse(temperatures):
            cfg = config_cls(temperatures=temperatures)
            validate(cfg)
            return cfg.temperatures
        return parse

    parsers = {"eval": checked(EvalConfig), "calibrate": checked(CalibrateConfig),
               "audit": checked(AuditConfig), "parse_temperatures": parse_temperatures}
    for stage, parse in parsers.items():
        assert {0.3, 2.0} <= set(parse("0.3,2")), stage
        assert parse([0.3, 2, 0.3]) == [0.3, 2.0], stage  # a list, duplicates dropped
        for bad in ("2.5", "0", "-1", "nan", "warm", [0.0], [3]):
            with pytest.raises(OMLInputError, match="--temperatures"):
                parse(bad)


def test_cli_bad_input_from_a_real_process(tmp_path):
    proc = subprocess.run([str(BIN / "oml"), "eval", "--run", str(tmp_path), "--samples", "0"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["oml eval: error: --samples must be between 1 and 1000 (got 0)"]


@pytest.mark.parametrize("part", ["persistence", "capacity"])
def test_sigterm_stops_eval_cleanly(tiny_run, tmp_path, part):
    """SIGTERM in the middle of a part (benign fine-tuning; the capacity sweep's training, which
    has its own handler): exit 143, one line, status "cancelled", no report, no traceback."""
    out = tmp_path / "eval"
    long_work = {"persistence": ["--persistence-steps", "100000", "--persistence-methods", "full"],
                 # 64 keys: hundreds of tiny steps, so the signal lands while the sweep trains
                 "capacity": ["--capacity-sizes", "64", "--capacity-max-epochs", "10000"]}[part]
    proc = subprocess.Popen([str(BIN / "oml"), "eval", "--run", str(tiny_run), "--out", str(out),
                             "--parts", part, "--device", "cpu", *long_work],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 240
        while not (out / "status.json").exists() or not _has_training_progress(out, part):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, stderr[-2000:]
    assert "Traceback" not in stderr and stdout == ""
    assert json.loads((out / "status.json").read_text())["state"] == "cancelled"
    assert not (out / "eval.json").exists()


def _has_training_progress(out: Path, part: str) -> bool:
    if part == "capacity":
        log = out / "capacity" / "runs" / "n64" / "train.log"
        return log.exists() and "step 2/" in log.read_text()
    running = json.loads((out / "status.json").read_text()).get("state") == "running persistence"
    if running:
        time.sleep(3)  # into the fine-tuning steps
    return running


def test_capacity_sweep_trains_each_n_and_derives_the_regularized_copies(tiny_model_dir, tmp_path):
    cfg = CapacityConfig(model=str(tiny_model_dir), out=str(tmp_path / "sweep"), sizes="8,4",
                         method="finetune", regularizers="0.5,0", strategy="random_word", key_length=8, response_length=2,
                         learning_rate=1e-2, augment=False, benign_fraction=0.0, max_epochs=150,
                         batch_size=16, extra_steps=0, deepspeed="none", train_embeddings=True,
                         device="cpu")
    summary = run_capacity(cfg)
    points = {(p.n, p.regularizer): p for p in summary.points}
    assert sorted(points) == [(4, 0.0), (4, 0.5), (8, 0.0), (8, 0.5)]
    assert points[(4, 0.0)].accuracy == 1.0 and points[(8, 0.0)].accuracy == 1.0
    assert points[(8, 0.0)].total == 8 and points[(4, 0.5)].total == 4
    for p in points.values():
        assert p.perplexity_change is not None and 0 <= p.first_token_agreement <= 1
    sweep = tmp_path / "sweep"
    trained = load_file(str(sweep / "runs" / "n8" / "model" / "model.safetensors"))
    averaged = load_file(str(sweep / "runs" / "n8-reg0.5" / "model" / "model.safetensors"))
    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    for name, tensor in averaged.items():
        expected = torch.lerp(trained[name].float(), base[name].float(), 0.5).to(tensor.dtype)
        assert torch.equal(tensor, expected), name
    page = (sweep / "capacity.html").read_text()
    assert page.count("data:image/png;base64,") == 1 and (sweep / "capacity.json").exists()
    assert CapacitySweep.model_validate_json((sweep / "capacity.json").read_text()).points == summary.points
    again = run_capacity(cfg)
    assert again.runs == {"n4": "reused", "n8": "reused"}
    # a later sweep over fewer sizes keeps the larger set, so its runs are reused too
    assert run_capacity(dataclasses.replace(cfg, sizes=[4])).runs == {"n4": "reused"}
    assert [p.accuracy for p in again.points] == [p.accuracy for p in summary.points]
    assert again.points == summary.points  # the checks read back from each run's metrics.json


def test_capacity_part_trains_with_the_runs_own_settings(tiny_run, tmp_path, monkeypatch):
    given = []
    monkeypatch.setattr(capacity_module, "run_capacity", lambda cfg: given.append(cfg) or CapacitySweep(
        sizes=[4], regularizers=[0.0], runs={}, points=[]))
    ctx = context(tiny_run, tmp_path, capacity_sizes=[4], capacity_deepspeed="zero2",
                  capacity_max_epochs=7)
    capacity_module.run_part(ctx)
    (cfg,) = given
    # the tiny run's training settings, its set's kind, the run's lambda next to 0
    assert (cfg.learning_rate, cfg.batch_size, cfg.train_embeddings) == (1e-2, 16, True)
    assert (cfg.strategy, cfg.key_length, cfg.response_length) == ("random_word", 8, 2)
    assert cfg.regularizers == [0.0, 0.15] and cfg.sizes == [4] and cfg.model == ctx.base_path
    assert cfg.out == str(tmp_path / "capacity")
    assert cfg.deepspeed == "zero2" and cfg.max_epochs == 7  # the overrides (run: none, 150)
