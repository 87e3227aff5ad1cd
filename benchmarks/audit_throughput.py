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

`--base-url URL --model NAME` measures a server already running there instead (one mode,
"given"; nothing is started or stopped).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import sys
import tempfile
from pathlib import Path

from clients import AuditConfig, run_audit
from oml_core.fingerprints import Fingerprint, FingerprintSet
from oml_core.generate.words import word_list
from oml_core.models import resolve_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for:
from benchmarks.harness import print_table, serve, stop_server, timed, write_result  # noqa: E402


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
    summary, seconds = timed(lambda: run_audit(cfg))
    lines = [json.loads(line) for line in (out / "evidence.jsonl").read_text().splitlines()]
    assert summary.probes_done == args.num_keys and summary.probes_failed == 0
    return {"concurrency": concurrency, "probes": summary.probes_done, "seconds": seconds,
            "probes_per_s": summary.probes_done / seconds,
            "mean_latency_s": statistics.fmean(line["latency_s"] for line in lines),
            "completion_tokens": sum((line.get("usage") or {}).get("completion_tokens", 0)
                                     for line in lines)}


def measure_mode(mode: str, base_url: str, model: str, fp_file: Path, tmp: Path, levels,
                 args) -> list[dict]:
    """A warm-up audit, then `--repeats` rounds over the concurrency levels, alternating."""
    one_run(base_url, model, fp_file, tmp / f"{mode}-warmup", max(levels), args)
    return [{"server": mode, **one_run(base_url, model, fp_file, tmp / f"{mode}-r{repeat}-c{level}",
                                       level, args)}
            for repeat in range(args.repeats) for level in levels]


def mode_table(runs: list[dict], levels: list[int]) -> dict:
    table = {}
    for level in levels:
        mine = [r for r in runs if r["concurrency"] == level]
        table[str(level)] = {
            "probes_per_s": statistics.fmean(r["probes_per_s"] for r in mine),
            "mean_latency_s": statistics.fmean(r["mean_latency_s"] for r in mine),
            "runs": len(mine)}
    table["ratio"] = (table[str(levels[-1])]["probes_per_s"]
                      / table[str(levels[0])]["probes_per_s"])
    return table


def measure_all(args, model: str, levels: list[int]) -> tuple[list[dict], dict]:
    modes = ["given"] if args.base_url else [m.strip() for m in args.servers.split(",") if m.strip()]
    runs, tables = [], {}
    with tempfile.TemporaryDirectory(prefix="oml-audit-bench-") as tmp:
        tmp = Path(tmp)
        os.environ["OML_HOME"] = str(tmp / "home")  # the ledger of this run stays here
        os.environ.setdefault("OML_PROGRESS", "0")
        fp_file = tmp / "keys.json"
        key_set(args.num_keys, fp_file)
        for mode in modes:
            if args.base_url:
                mine = measure_mode(mode, args.base_url, model, fp_file, tmp, levels, args)
            else:
                proc, base_url = serve(tmp / f"serve-{mode}.log", model, threads=args.server_threads,
                                       continuous_batching=mode == "continuous-batching")
                try:
                    mine = measure_mode(mode, base_url, model, fp_file, tmp, levels, args)
                finally:
                    stop_server(proc)
            runs += mine
            tables[mode] = mode_table(mine, levels)
    return runs, tables


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--num-keys", type=int, default=24, help="probes per run (one per key)")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--server-threads", type=int, default=1, help="OMP threads of the server")
    parser.add_argument("--servers", default="plain,continuous-batching",
                        help="server modes to measure, each with its own server")
    parser.add_argument("--base-url", default=None, help="measure this running server instead")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--levels", default="1,8", help="concurrency levels to compare")
    parser.add_argument("--out", default="benchmarks/results/audit_throughput.json")
    args = parser.parse_args(argv)
    if not args.base_url:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on the way out
    levels = [int(x) for x in args.levels.split(",")]
    # the bundled model is converted once, in the real OML_HOME
    model = args.model if args.base_url else resolve_model(args.model)
    home = os.environ.get("OML_HOME")
    try:
        runs, tables = measure_all(args, model, levels)
    finally:  # measure_all pointed OML_HOME at its temporary folder
        if home is None:
            os.environ.pop("OML_HOME", None)
        else:
            os.environ["OML_HOME"] = home

    print(f"audit throughput, {Path(model).name}, {args.num_keys} probes per run, "
          f"{args.max_tokens} tokens per answer, server threads {args.server_threads}")
    print_table(["server", "concurrency", "probes/s", "mean latency s"],
                [[mode, level, f"{table[str(level)]['probes_per_s']:.2f}",
                  f"{table[str(level)]['mean_latency_s']:.3f}"]
                 for mode, table in tables.items() for level in levels])
    for mode, table in tables.items():
        print(f"{mode}: ratio concurrency {levels[-1]} / {levels[0]}: {table['ratio']:.2f}x")
    result = {"benchmark": "audit_throughput", "model": str(model), "settings": vars(args),
              "tables": tables, "runs": runs}
    write_result(args.out, result, device="cpu")
    return result

if __name__ == "__main__":
    main()
