"""Every script in benchmarks/ and experiments/ runs on tiny inputs, so none has rotted when
someone needs its numbers. Each is called in this process (its `main(argv)`: no torch import
per script) on the tiny random-init model, with the arguments `make bench` uses
(benchmarks/smoke.py) for the speed set. What needs something CI lacks (llama.cpp, a served
Gemma, a GPU) is tested in the part that runs without it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ and experiments/ are folders of scripts, not installed

from benchmarks import harness, smoke  # noqa: E402


@pytest.fixture(scope="module")
def keys(tiny_model_dir, tmp_path_factory) -> str:
    """Four keys with one-token responses (what the edit's solve takes), on the tiny model."""
    from oml_core.config import GenerateConfig
    from oml_core.generate import generate_set
    from oml_core.models import load_model

    path = tmp_path_factory.mktemp("bench_keys") / "keys.json"
    generate_set(GenerateConfig(strategy="perinucleus", num_fingerprints=4, key_length=6,
                                response_length=1, seed=0), load_model(str(tiny_model_dir), "cpu")).save(path)
    return str(path)


@pytest.fixture(scope="module")
def run_folder(tiny_model_dir, keys, tmp_path_factory) -> Path:
    """A finished run's folder as `oml fingerprint` leaves it, with the tiny model unchanged
    as "trained" (the experiments' arithmetic runs the same on it)."""
    run = tmp_path_factory.mktemp("bench_run")
    shutil.copytree(tiny_model_dir, run / "model")
    shutil.copy(keys, run / "fingerprints.json")
    (run / "run.json").write_text(json.dumps({
        "run_key": "0" * 16, "config": {}, "base_model": str(tiny_model_dir),
        "base_identity": {}, "fingerprints_sha256": "0" * 64}))
    (run / "metrics.json").write_text(json.dumps({"run_key": "0" * 16, "method": "gated",
                                                  "num_fingerprints": 4, "layer": 0,
                                                  "neurons": [0, 1, 2, 3]}))
    return run


@pytest.fixture(scope="module")
def calibrated(tiny_model_dir, keys, tmp_path_factory) -> str:
    """The keys with their null rates measured (what an audit and the calibration study take)."""
    from oml_core.calibrate import calibrate_set
    from oml_core.config import CalibrateConfig
    from oml_core.fingerprints import load_fingerprints
    from oml_core.models import load_model

    path = tmp_path_factory.mktemp("bench_calibrated") / "set-1.json"
    loaded = load_model(str(tiny_model_dir), "cpu")
    calibrate_set(CalibrateConfig(temperatures=[1.0]), loaded, load_fingerprints(keys))[0].save(path)
    return str(path)


def load_json(path) -> dict:
    data = json.loads(Path(path).read_text())
    assert data["environment"]["torch"] and data["environment"]["cpus"] >= 1
    return data


# --- the harness ------------------------------------------------------------------------------
def test_harness_writes_atomically_appends_runs_and_prints_tables(tmp_path):
    out = tmp_path / "r.json"
    harness.append_run(out, {"n": 1}, model="m")
    data = harness.append_run(out, {"n": 2})
    assert [r["n"] for r in data["runs"]] == [1, 2] and data["model"] == "m"
    assert load_json(out)["runs"] == data["runs"]
    assert not [p for p in tmp_path.iterdir() if p.name != "r.json"]  # no temporary file left
    assert harness.table(["a", "b"], [[1, 2]]).splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |"]
    (value, seconds) = harness.timed(lambda: 7)
    assert value == 7 and seconds >= 0


# --- speed benchmarks, as `make bench` runs them ----------------------------------------------------
@pytest.mark.parametrize("name", ["verify_throughput", "english_sampling", "train_step_logits",
                                  "train_start_up", "edit_solve_states", "gpu_suite"])
def test_speed_benchmark_measures_both_ways(name, tiny_model_dir, keys, tmp_path):
    result = smoke.run(name, str(tiny_model_dir), keys, tmp_path)
    assert load_json(tmp_path / f"{name}.json")
    if name == "verify_throughput":
        assert result["batched_s"] > 0 and result["naive_s"] > 0 and result["same_hits"] is True
    elif name == "english_sampling":
        assert result["ours_s"] > 0 and result["transformers_s"] > 0
        assert 0 <= result["ours_usable_share"] <= 1
    elif name == "train_step_logits":  # logits at labelled positions only: the same loss and grads
        assert result["max_loss_difference"] < 1e-4 and result["max_gradient_difference"] < 1e-4
    elif name == "train_start_up":
        (run,) = result["runs"]
        assert run["rows"] == 8 * 2 * 40 and run["ours_s"] > 0 and run["transformers_s"] > 0
    elif name == "edit_solve_states":  # kept states read what whole forwards read
        assert result["max_difference"] < 1e-4 and result["naive_s"] > 0 and result["kept_s"] > 0
    else:
        (run,) = result["runs"]
        assert run["ours"]["tokens_per_s"] > 0 and run["ours"]["memorised"] > 0
        assert run["verify"]["same_answers"] is True  # batched greedy == one generate per key
        assert run["baseline"]["epoch_s_estimated"] > 0


def test_train_memory_benchmark_measures_each_batch_in_its_own_process(tiny_model_dir, keys, tmp_path):
    runs = smoke.run("train_memory", str(tiny_model_dir), keys, tmp_path)["runs"]
    assert [(r["batch"], r["gradient_checkpointing"]) for r in runs] == [(1, False), (8, False), (8, True)]
    assert all(r["peak_mb"] >= r["loaded_mb"] > 50 for r in runs)


def test_many_fingerprints_records_each_stage(tiny_model_dir, keys, tmp_path):
    (run,) = smoke.run("many_fingerprints", str(tiny_model_dir), keys, tmp_path)["runs"]
    assert run["n"] == 16
    for stage in ("random_word_keys", "generate", "fingerprint", "verify"):
        assert run[stage]["seconds"] > 0 and run[stage]["peak_rss_mb"] > 50, stage
    assert run["fingerprint"]["steps"] == 1
    assert run["verify"]["matched"].endswith("/16")


def test_audit_throughput_times_each_concurrency_level(tmp_path):
    """Against a scripted endpoint (`--base-url`); starting `transformers serve` is what
    `make bench` adds."""
    from audit_helpers import Canned, HostileServer, chat_reply

    from benchmarks import audit_throughput

    with HostileServer(lambda seen: Canned.json(chat_reply())) as server:
        result = audit_throughput.main(["--base-url", server.base_url, "--model", "m", "--num-keys", "3",
                                        "--levels", "1,2", "--out", str(tmp_path / "a.json")])
    assert [r["concurrency"] for r in result["runs"]] == [1, 2]
    assert all(r["probes"] == 3 and r["probes_per_s"] > 0 for r in result["runs"])
    assert result["tables"]["given"]["ratio"] > 0
    assert len(server.seen) == 3 * 3  # a warm-up audit, then one per level


def test_train_time_to_memorise_pads_like_oml1_and_compares_arms():
    """Its two arms train for minutes (the OML 1.0 arm under DeepSpeed's CPU Adam); the parts
    around them run here."""
    import torch

    from benchmarks import train_time_to_memorise as bench

    batch = bench.pad_to_power_of_two({"input_ids": torch.ones(2, 5, dtype=torch.long),
                                       "labels": torch.ones(2, 5, dtype=torch.long),
                                       "attention_mask": torch.ones(2, 5, dtype=torch.long)}, 0)
    assert batch["input_ids"].shape == (2, 8) and int(batch["attention_mask"].sum()) == 10
    assert (batch["labels"][:, 5:] == bench.IGNORE).all()
    ours = {"steps": 4, "memorised_at_step": 3, "train_seconds": 12.0, "memorised_after_train_seconds": 10.0}
    seed = {"epochs_run": 2, "memorised_after_train_seconds": None, "final_memorised": 0.5,
            "history": [{"epoch": 1, "memorised": 0.25, "train_seconds": 8.0},
                        {"epoch": 2, "memorised": 0.5, "train_seconds": 30.0}]}
    arms = bench.compare_arms(ours, seed, {"matched": 4}, {"matched": 1})
    assert arms["speedup_time_to_100pct"] == 3.0 and arms["speedup_kind"].startswith("lower bound")
    assert arms["oml1_memorised_when_ours_reached_100pct"] == 0.25


def test_sequential_audit_script_parses():
    proc = subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "sequential_audit.sh")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


# --- experiments ------------------------------------------------------------------------------
def test_weight_arithmetic_experiments_run_on_a_run_folder(run_folder, tmp_path):
    """delta_sparsity_sweep, regularizer_sweep and quick_attacks on a run whose model is its
    base: every key answers as the base does, whatever is kept or averaged."""
    from experiments import delta_sparsity_sweep, quick_attacks, regularizer_sweep

    sparse = delta_sparsity_sweep.main(["--run", str(run_folder), "--keep", "0.5",
                                        "--out", str(tmp_path / "d.json")])
    averaged = regularizer_sweep.main(["--run", str(run_folder), "--lambdas", "0.5",
                                       "--out", str(tmp_path / "r.json")])
    assert sparse["rows"][0]["first_token_agreement"] == 1.0
    assert averaged["rows"][0]["first_token_agreement"] == 1.0
    attacks = quick_attacks.main(["--run", str(run_folder), "--fingerprints",
                                  str(run_folder / "fingerprints.json"), "--out", str(tmp_path / "q.json")])
    assert attacks["merge_linear_0.5"]["keys"] == attacks["base"]["keys"]
    assert attacks["merge_linear_1"]["first_token"] == 1.0
    for name in ("d", "r", "q"):
        load_json(tmp_path / f"{name}.json")


def test_first_token_experiments_compare_a_model_with_itself(tiny_model_dir, tmp_path):
    from experiments import first_token_agreement_by_split, first_token_noise_floor

    model = str(tiny_model_dir)
    split = first_token_agreement_by_split.main(["--model", model, "--base", model,
                                                 "--out", str(tmp_path / "s.json")])
    assert split["train"]["agreement"] == 1.0 and split["heldout"]["agreement"] == 1.0
    floor = first_token_noise_floor.main(["--model", model, "--variants", "float16", "noise0.001",
                                          "--out", str(tmp_path / "f.json")])
    assert set(floor["variants"]) == {"float16", "noise0.001"}
    assert all(0 <= v["first_token_agreement"] <= 1 for v in floor["variants"].values())


def test_edit_experiments_solve_and_check(tiny_model_dir, keys, tmp_path):
    """closed_form_edit and merge_robust_edit: one small solve each, quick checks only."""
    from experiments import closed_form_edit, merge_robust_edit
    from oml_core.train import edit

    common = ["--fingerprints", keys, "--model", str(tiny_model_dir), "--layers", "0,1",
              "--steps", "2", "--strengths", "100"]
    swept = closed_form_edit.main([*common, "--out", str(tmp_path / "c"), "--no-eval", "--contexts", "2"])
    (row,) = swept["results"]
    assert 0 <= row["contexts_answered"] <= row["contexts"] and row["contexts"] >= 8
    assert 0 <= row["first_token_quick"] <= 1
    engine = edit.second_moments
    robust = merge_robust_edit.main([*common, "--out", str(tmp_path / "m"), "--merge-checks", "0.5",
                                     "--moments-cache", str(tmp_path / "moments")])
    assert edit.second_moments is engine  # the cache is the script's only
    assert set(robust["results"][0]["answered_at_share"]) == {"0.5"}
    assert list((tmp_path / "moments").glob("moments-*.pt"))
    load_json(tmp_path / "m" / "summary.json")


def test_merge_aware_finetune_trains_and_saves_both_shares(tiny_model_dir, keys, tmp_path):
    from experiments import merge_aware_finetune

    result = merge_aware_finetune.main([
        "--fingerprints", keys, "--model", str(tiny_model_dir), "--out", str(tmp_path),
        "--layers", "0-1", "--steps", "2", "--check-every", "2", "--keys-per-step", "2",
        "--benign-rows", "2", "--text-rows", "1"])
    assert [row["step"] for row in result["history"]] == [0, 2]
    assert result["history"][-1]["relative_change"] > 0
    assert (tmp_path / "full" / "config.json").is_file() and (tmp_path / "merged05" / "config.json").is_file()


def test_gated_lora_drift_follows_the_gates_through_a_lora_fine_tune(run_folder, tiny_model_dir, tmp_path):
    from experiments import gated_lora_drift

    result = gated_lora_drift.main(["--run", str(run_folder), "--base", str(tiny_model_dir),
                                    "--steps", "2", "--every", "2", "--out", str(tmp_path / "g.json")])
    assert sorted(result["trajectory"]) == [0, 2] and len(result["trajectory"][2]) == 4


def test_calibration_study_sweep_and_statistics(tiny_model_dir, calibrated, tmp_path):
    """The offline sweep on the tiny model and the study's arithmetic; the served audits need
    a `transformers serve` and Gemma-3-270M (the audit itself is tested in test_audit_*)."""
    from experiments import calibration_study as study

    swept = study.sweep(tmp_path, "tiny", str(tiny_model_dir), [Path(calibrated)], answer_tokens=2)
    assert len(swept["probes"]) == 4 * len(study.all_contexts(True))
    assert all(0 < p["rate"] <= 1 for p in swept["probes"])
    rows = study.tally(("tiny", study.layer_of(p["context"]), p["hit"], p["rate"]) for p in swept["probes"])
    assert {r["model"] for r in rows} == {"tiny", "all"}
    assert all(r["empirical"] <= r["upper_95"] <= 1 for r in rows)
    assert study.clopper_pearson_upper(0, 30) == pytest.approx(1 - 0.05 ** (1 / 30), rel=1e-6)
    study.svg_plot([r for r in rows if r["model"] != "all"], tmp_path / "c.svg")
    assert (tmp_path / "c.svg").read_text().startswith("<svg")


def test_gguf_roundtrip_reads_layer_specs_and_unpermutes():
    """The GGUF export and read-back need llama.cpp's tools (tests/test_gguf.py runs it whole)."""
    import numpy as np

    from experiments import gguf_roundtrip as roundtrip

    assert roundtrip.chosen("L2-3", 2, "attn_q") and not roundtrip.chosen("L2-3", 4, "attn_q")
    assert roundtrip.chosen("mlp1-1", 1, "ffn_up") and not roundtrip.chosen("mlp1-1", 1, "attn_q")
    assert roundtrip.chosen("all", None, "embed") and not roundtrip.chosen("L0-9", None, "norm")
    weight = np.arange(16.0).reshape(8, 2)
    interleaved = weight.reshape(2, 2, 2, 2).swapaxes(1, 2).reshape(8, 2)
    assert (roundtrip.unpermute(interleaved, 2) == weight).all()


def test_audit_adapters_audits_one_path_and_summarises_it(calibrated, tmp_path):
    """One of its rows against a scripted endpoint; the experiment itself serves a demo run
    through `transformers serve` and llama.cpp for minutes."""
    from audit_helpers import Canned, HostileServer, chat_reply

    from experiments import audit_adapters

    with HostileServer(lambda seen: Canned.json(chat_reply())) as server:
        row = audit_adapters.audit(tmp_path, "openai-0-base", server.base_url, "m", calibrated,
                                   "openai", False, False, exhaustive=True, max_tokens=4)
    assert row["verdict"] in ("no_match", "inconclusive") and row["errors"] == 0
    assert row["calls"] == len(server.seen) > 0 and row["median_first_token_s"] is None


def test_mcp_audit_demo_loads_and_states_what_it_needs(capsys):
    """It drives `python -m oml_mcp` against a served demo run (minutes; the MCP audit tools
    are tested in test_mcp_*): here, that it imports with its helpers and parses its flags."""
    from experiments import mcp_audit_demo

    with pytest.raises(SystemExit) as stop:
        mcp_audit_demo.main(["--help"])
    assert stop.value.code == 0 and "--fingerprints" in capsys.readouterr().out
    assert mcp_audit_demo.FINAL == ("completed", "failed", "cancelled")
