"""The GPU benchmark script runs (its --smoke mode: CPU, a tiny Llama shape), so it has not
rotted when a session is lent a GPU and has minutes, not hours, to use it."""

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
