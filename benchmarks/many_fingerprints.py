"""Many fingerprints: generate, train and verify N = 1,024 and 8,192 through the `oml` command
line, recording each stage's wall time and peak memory.

Each stage is its own `oml` process, exactly as a user runs it, so its peak resident memory
(from `wait4`) is that stage's alone:

  generate     `oml generate --strategy perinucleus --num-fingerprints N`: English keys sampled
               from the model, then each key's response scored (`--keys random_word`: keys
               drawn first by `oml generate --strategy random_word` and passed as --keys-file,
               for sizes where sampling English keys takes an hour on a CPU)
  fingerprint  `oml fingerprint --method finetune` with its defaults (ZeRO-2, benign mixing,
               augmentation; gated holds at most half a layer's neurons of keys) for
               `--train-steps` optimizer steps, without the checks after training: the
               per-step cost and the memory of a run over N keys, not time to
               100% (on a 2-core CPU that is hours at N = 8,192; the GPU suite measures it)
  verify       `oml verify --wrappers chat` on the trained model over all N keys, batched

Memory that stays flat as N grows 8x is what "no blow-up" means here; time should grow about
linearly for generate and verify and stay flat per training step.

    .venv/bin/python benchmarks/many_fingerprints.py [--sizes 1024,8192] [--train-steps 6]
        [--keys english|random_word] [--model M] [--no-deepspeed] [--work-dir DIR]
        [--out benchmarks/results/many_fingerprints.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for:
from benchmarks.harness import print_table, write_result  # noqa: E402
from oml_core.train.metrics import RunMetrics  # noqa: E402

OML = str(Path(sys.executable).parent / "oml")


def run_stage(args: list[str], log: Path) -> dict:
    """Run one `oml` command; its wall time, peak RSS and parsed --json output."""
    start = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.Popen([OML, *args, "--json"], stdout=subprocess.PIPE, stderr=err,
                                text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        sys.exit(f"`oml {args[0]}` failed with exit code {code}; see {log}")
    # ru_maxrss is in KiB on Linux
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024),
            "result": json.loads(out) if out.strip() else None}


def measure(n: int, model: list[str], folder: Path, train_steps: int, batch_size: int,
            train_args: list[str], keys: str) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    fset = folder / "fingerprints.json"
    run = folder / "run"
    stages = {}
    perinucleus = ["generate", *model, "--strategy", "perinucleus", "--num-fingerprints", str(n),
                   "--seed", "0", "--out", str(fset), "--force"]
    if keys == "random_word":
        key_file = folder / "keys.json"
        stages["keys"] = run_stage(["generate", *model, "--strategy", "random_word",
                                    "--num-fingerprints", str(n), "--seed", "0", "--out",
                                    str(key_file), "--force"], folder / "keys.log")
        perinucleus += ["--keys-file", str(key_file)]
    generate = run_stage(perinucleus, folder / "generate.log")
    fingerprint = run_stage(["fingerprint", "--method", "finetune", *model, "--fingerprints", str(fset),
                             "--out-dir", str(run), "--max-steps", str(train_steps),
                             "--no-verify-after", *train_args], folder / "fingerprint.log")
    metrics = RunMetrics.read(run)
    verify = run_stage(["verify", "--model", str(run / "model"), "--fingerprints", str(fset),
                        "--wrappers", "chat", "--batch-size", str(batch_size)],
                       folder / "verify.log")
    verdict = verify["result"]
    return {
        "n": n, "keys": keys,
        **({"random_word_keys": {k: stages["keys"][k] for k in ("seconds", "peak_rss_mb")}}
           if stages else {}),
        "generate": {k: generate[k] for k in ("seconds", "peak_rss_mb")}
                    | {"keys_per_s": round(n / generate["seconds"], 1)},
        "fingerprint": {k: fingerprint[k] for k in ("seconds", "peak_rss_mb")}
                       | {"steps": train_steps, "train_seconds": metrics.train_seconds},
        "verify": {k: verify[k] for k in ("seconds", "peak_rss_mb")}
                  | {"keys_per_s": round(n / verify["seconds"], 1),
                     "matched": _matched(verdict)},
    }


def _matched(verdict: dict) -> str:
    """'k/n' from `oml verify --json` (counts only: no key or response is read)."""
    return f"{verdict['matched']}/{verdict['total']}"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1024,8192")
    parser.add_argument("--train-steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64, help="verify: rows per call")
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2")
    parser.add_argument("--keys", choices=("english", "random_word"), default="english",
                        help="english: perinucleus' own sampled keys (~3 keys/s on a 2-core "
                             "CPU); random_word: drawn first and passed as --keys-file, so "
                             "the stage times perinucleus scoring alone")
    parser.add_argument("--no-deepspeed", action="store_true",
                        help="train with the plain Trainer (default: ZeRO-2, as `oml fingerprint`)")
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--out", default="benchmarks/results/many_fingerprints.json")
    args = parser.parse_args(argv)

    sizes = [int(s) for s in args.sizes.split(",")]
    model = ["--model", args.model] if args.model else []
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="oml-many-"))
    rows = []
    for n in sizes:
        print(f"N = {n} ...", file=sys.stderr, flush=True)
        rows.append(measure(n, model, work / f"n{n}", args.train_steps, args.batch_size,
                            ["--no-deepspeed"] if args.no_deepspeed else [], args.keys))

    print_table(["N", "stage", "wall s", "peak RSS MB", "notes"],
                [line for row in rows for line in table_lines(row)])
    result = {"model": args.model or "bundled SmolLM2-135M-Instruct", "runs": rows}
    write_result(args.out, result, device="cpu")
    return result


def table_lines(row: dict) -> list[list]:
    g, f, v = row["generate"], row["fingerprint"], row["verify"]
    lines = []
    if "random_word_keys" in row:
        k = row["random_word_keys"]
        lines.append([row["n"], "keys", k["seconds"], k["peak_rss_mb"], "random-word keys"])
    return lines + [
        [row["n"], "generate", g["seconds"], g["peak_rss_mb"],
         f"{g['keys_per_s']} keys/s ({row['keys']} keys)"],
        [row["n"], "fingerprint", f["seconds"], f["peak_rss_mb"],
         f"{f['steps']} steps, {f['train_seconds']} s training"],
        [row["n"], "verify", v["seconds"], v["peak_rss_mb"],
         f"{v['keys_per_s']} keys/s, matched {v['matched']}"]]

if __name__ == "__main__":
    main()
