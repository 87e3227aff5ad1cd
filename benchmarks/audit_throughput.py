"""Audit throughput: probes per second against a local OpenAI-compatible server, with the
auditor's concurrency at 1 and at 8, in one run (same server, same keys, same settings).

The server is `transformers serve` on loopback (the bundled SmolLM2-135M-Instruct by default),
once as it comes (one inference thread: requests queue) and once with --continuous-batching
(concurrent requests are batched). Each probe is one chat completion of --max-tokens tokens.
Runs alternate between the concurrency levels (--repeats times) so drift on a shared machine
hits both alike. Prints a table and the ratios, writes JSON.

    .venv/bin/python benchmarks/audit_throughput.py [--model FOLDER] [--num-keys 24]
        [--max-tokens 8] [--server-threads 1] [--servers plain,continuous-batching]
        [--repeats 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from clients import AuditConfig, run_audit
from oml_core.fingerprints import Fingerprint, FingerprintSet
from oml_core.generate.words import word_list
from oml_core.localhost import free_port
from oml_core.models import resolve_model

BIN = Path(sys.executable).parent


def start_server(model: str, threads: int, continuous_batching: bool, log: Path):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads)}
    command = [str(BIN / "transformers"), "serve", model, "--host", "127.0.0.1", "--port",
               str(port), "--device", "cpu"]
    if continuous_batching:
        command.append("--continuous-batching")
    with open(log, "wb") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"transformers serve exited; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise SystemExit("transformers serve did not come up")
        time.sleep(0.25)


def key_set(num_keys: int, path: Path) -> None:
    """Random-word keys: throughput does not depend on whether anything matches."""
    rng = random.Random(0)
    words = sorted(word_list())
    fps = [Fingerprint(f"fp-{i:05d}", " ".join(rng.choice(words) for _ in range(12)),
                       rng.choice(words)) for i in range(num_keys)]
    FingerprintSet(fps, strategy="random_word").save(path)


def one_run(base_url, model, fp_file, out, concurrency, args) -> dict:
    cfg = AuditConfig(base_url=base_url, model=model, fingerprints=str(fp_file), out=str(out),
                      layers="user", sampled_layers="", max_tokens=args.max_tokens,
                      max_keys=args.num_keys, concurrency=concurrency, reuse_keys=True,
                      request_timeout=300.0, exhaustive=True)  # every key: a throughput measure
    start = time.perf_counter()
    summary = run_audit(cfg)
    seconds = time.perf_counter() - start
    lines = [json.loads(line) for line in (out / "evidence.jsonl").read_text().splitlines()]
    assert summary["probes_done"] == args.num_keys and summary["probes_failed"] == 0
    return {"concurrency": concurrency, "probes": summary["probes_done"], "seconds": seconds,
            "probes_per_s": summary["probes_done"] / seconds,
            "mean_latency_s": statistics.fmean(line["latency_s"] for line in lines),
            "completion_tokens": sum((line.get("usage") or {}).get("completion_tokens", 0)
                                     for line in lines)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--num-keys", type=int, default=24, help="probes per run (one per key)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--server-threads", type=int, default=1, help="OMP threads of the server")
    parser.add_argument("--servers", default="plain,continuous-batching",
                        help="server modes to measure, each with its own server")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--levels", default="1,8", help="concurrency levels to compare")
    parser.add_argument("--out", default="benchmarks/results/audit_throughput.json")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    levels = [int(x) for x in args.levels.split(",")]

    modes = [m.strip() for m in args.servers.split(",") if m.strip()]
    model = resolve_model(args.model)  # converts the bundled model once, in the real OML_HOME
    runs, tables = [], {}
    with tempfile.TemporaryDirectory(prefix="oml-audit-bench-") as tmp:
        tmp = Path(tmp)
        os.environ["OML_HOME"] = str(tmp / "home")  # the ledger of this run stays here
        os.environ.setdefault("OML_PROGRESS", "0")
        fp_file = tmp / "keys.json"
        key_set(args.num_keys, fp_file)
        for mode in modes:
            proc, base_url = start_server(model, args.server_threads,
                                          mode == "continuous-batching", tmp / f"serve-{mode}.log")
            try:
                one_run(base_url, model, fp_file, tmp / f"{mode}-warmup", max(levels), args)
                for repeat in range(args.repeats):
                    for level in levels:
                        run = one_run(base_url, model, fp_file, tmp / f"{mode}-r{repeat}-c{level}",
                                      level, args)
                        runs.append({"server": mode, **run})
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
            table = {}
            for level in levels:
                mine = [r for r in runs if r["server"] == mode and r["concurrency"] == level]
                table[str(level)] = {
                    "probes_per_s": statistics.fmean(r["probes_per_s"] for r in mine),
                    "mean_latency_s": statistics.fmean(r["mean_latency_s"] for r in mine),
                    "runs": len(mine)}
            table["ratio"] = (table[str(levels[-1])]["probes_per_s"]
                              / table[str(levels[0])]["probes_per_s"])
            tables[mode] = table

    print(f"audit throughput, {Path(model).name}, {args.num_keys} probes per run, "
          f"{args.max_tokens} tokens per answer, server threads {args.server_threads}")
    print(f"{'server':<22} {'concurrency':>11} {'probes/s':>9} {'mean latency':>13}")
    for mode, table in tables.items():
        for level in levels:
            row = table[str(level)]
            print(f"{mode:<22} {level:>11} {row['probes_per_s']:>9.2f} {row['mean_latency_s']:>11.3f} s")
        print(f"{mode:<22} ratio concurrency {levels[-1]} / {levels[0]}: {table['ratio']:.2f}x")
    result = {"benchmark": "audit_throughput", "model": str(model), "settings": vars(args),
              "tables": tables, "runs": runs,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version()},
              "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
