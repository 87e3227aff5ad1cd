"""Every speed benchmark at smoke size, in one process, on a tiny random-init model: the code
paths of each, both arms, in under two minutes on 2 cores (`make bench`; CI runs it after the
tests). The numbers mean nothing at this size; that each script still runs, does. Nothing is
downloaded or converted: the tiny model is built here (benchmarks.harness.tiny_model).

    .venv/bin/python benchmarks/smoke.py [--only verify_throughput,english_sampling] [--keep DIR]

tests/test_benchmarks_smoke.py runs the same argument lists (SMOKE_ARGS) under pytest.
`train_time_to_memorise` is not here: its OML 1.0 arm needs DeepSpeed's CPU Adam and trains for
minutes even on a tiny model (its own parts are tested in the test file).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for:
from benchmarks.harness import print_table, tiny_model  # noqa: E402

# name -> arguments, given the tiny model's folder, a one-token-response key set and a folder
SMOKE_ARGS = {
    "verify_throughput": lambda m, fp, out: [
        "--model", m, "--num-keys", "8", "--key-length", "4", "--batch-size", "4", "--device", "cpu",
        "--out", f"{out}/verify_throughput.json"],
    "english_sampling": lambda m, fp, out: [
        "--model", m, "--rows", "6", "--batch-size", "4", "--key-length", "3", "--device", "cpu",
        "--out", f"{out}/english_sampling.json"],
    "train_step_logits": lambda m, fp, out: [
        "--model", m, "--batches", "2", "--batch-size", "4", "--out", f"{out}/train_step_logits.json"],
    "train_start_up": lambda m, fp, out: [
        "--model", m, "--sizes", "8", "--out", f"{out}/train_start_up.json"],
    "train_memory": lambda m, fp, out: [
        "--model", m, "--batches", "1,8", "--length", "24", "--out", f"{out}/train_memory.json"],
    "edit_solve_states": lambda m, fp, out: [
        "--model", m, "--fingerprints", fp, "--layers", "0,1", "--contexts", "2",
        "--out", f"{out}/edit_solve_states.json"],
    "gpu_suite": lambda m, fp, out: ["--smoke", "--out", f"{out}/gpu_suite.json"],
    "audit_throughput": lambda m, fp, out: [
        "--model", m, "--servers", "plain", "--num-keys", "4", "--max-tokens", "2",
        "--levels", "1,2", "--out", f"{out}/audit_throughput.json"],
    "many_fingerprints": lambda m, fp, out: [
        "--model", m, "--sizes", "16", "--train-steps", "1", "--keys", "random_word",
        "--no-deepspeed", "--work-dir", f"{out}/many", "--out", f"{out}/many_fingerprints.json"],
}


def key_set(model: str, path: Path, num: int = 4) -> str:
    """Random-word keys with one-token responses (what the edit's solve takes)."""
    from oml_core.config import GenerateConfig
    from oml_core.generate import generate_set
    from oml_core.models import load_model

    if not path.is_file():
        generate_set(GenerateConfig(strategy="random_word", num_fingerprints=num, key_length=4,
                                    response_length=1, seed=0), load_model(model, "cpu")).save(path)
    return str(path)


def run(name: str, model: str, fingerprints: str, out: Path):
    """One benchmark's main() at smoke size; its result."""
    module = importlib.import_module(f"benchmarks.{name}")
    return module.main(SMOKE_ARGS[name](model, fingerprints, str(out)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SMOKE_ARGS), help="comma list of benchmarks")
    parser.add_argument("--keep", default=None, help="folder for the results (default: temporary)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OML_PROGRESS", "0")
    with tempfile.TemporaryDirectory(prefix="oml-bench-smoke-") as scratch:
        out = Path(args.keep or scratch)
        out.mkdir(parents=True, exist_ok=True)
        model = str(tiny_model(out / "tiny-model"))
        fingerprints = key_set(model, out / "keys.json")
        seconds = {}
        for name in args.only.split(","):
            started = time.perf_counter()
            run(name, model, fingerprints, out)
            seconds[name] = round(time.perf_counter() - started, 1)
    print_table(["benchmark (smoke size)", "seconds"], list(seconds.items()))
    return seconds

if __name__ == "__main__":
    main()
