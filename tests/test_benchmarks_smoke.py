"""The benchmark scripts run on tiny models, so they have not rotted when someone needs their
numbers; the GPU suite in its --smoke mode (CPU, a tiny Llama shape), since a session lent a
GPU has minutes, not hours, to use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke_mode_measures_every_column(tmp_path):
    out = tmp_path / "gpu_suite.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["ours"]["tokens_per_s"] > 0 and run["ours"]["memorised"] > 0
    assert run["verify"]["same_answers"] is True  # batched greedy == one generate per key
    assert run["baseline"]["epoch_s_estimated"] > 0


def test_many_fingerprints_records_each_stage(tiny_model_dir, tmp_path):
    out = tmp_path / "many.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "many_fingerprints.py"),
                           "--model", str(tiny_model_dir), "--sizes", "24", "--train-steps", "2",
                           "--no-deepspeed", "--work-dir", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["n"] == 24
    for stage in ("generate", "fingerprint", "verify"):
        assert run[stage]["seconds"] > 0 and run[stage]["peak_rss_mb"] > 50, stage
    assert run["fingerprint"]["steps"] == 2
    assert run["verify"]["matched"].endswith("/24")


def test_english_sampling_benchmark_times_both_ways(tiny_model_dir, tmp_path):
    out = tmp_path / "english.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "english_sampling.py"),
                           "--model", str(tiny_model_dir), "--rows", "6", "--batch-size", "4",
                           "--key-length", "3", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["ours_s"] > 0 and result["transformers_s"] > 0 and result["speedup"] > 0
    assert 0 <= result["ours_usable_share"] <= 1


def test_train_start_up_benchmark_times_both_samplers(tiny_model_dir, tmp_path):
    out = tmp_path / "start_up.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_start_up.py"),
                           "--model", str(tiny_model_dir), "--sizes", "8", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["rows"] == 8 * 2 * 40 and run["ours_s"] > 0 and run["transformers_s"] > 0


def test_train_memory_benchmark_measures_each_batch_in_its_own_process(tiny_model_dir, tmp_path):
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_memory.py"),
                           "--model", str(tiny_model_dir), "--batches", "1,8", "--length", "24",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert [(r["batch"], r["gradient_checkpointing"]) for r in runs] == [(1, False), (8, False), (8, True)]
    assert all(r["peak_mb"] >= r["loaded_mb"] > 50 for r in runs)
