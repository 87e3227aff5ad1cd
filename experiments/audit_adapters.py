"""Experiment: the default audit of a fingerprinted model and of its base through every way a
suspect may serve them (docs/auditing.md).

`transformers serve` on loopback: chat completions whole and streamed, /v1/responses whole and
streamed; llama-cpp-python's server on a q8_0 GGUF export: chat completions whole and streamed
(one request at a time: that server cuts a stream when the next request arrives). Each row:
verdict, p-value, keys and calls spent, seconds, and for streams the median time to the first
token and how many streams were read only until their opening decided the probe.

    .venv/bin/python experiments/audit_adapters.py --run RUN --fingerprints CALIBRATED_SET \\
        [--out runs/audit-adapters]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository root, for benchmarks.harness and experiments

from experiments.calibration_study import NO_KEY_ENV  # noqa: E402

from clients.audit import run_audit  # noqa: E402
from clients.config import AuditConfig  # noqa: E402
from oml_core.models import resolve_model  # noqa: E402
from benchmarks.harness import serve, stop_server, write_result  # noqa: E402

PATHS = [  # (name, server, adapter, stream)
    ("transformers serve, chat", "transformers", "openai", False),
    ("transformers serve, chat, streamed", "transformers", "openai", True),
    ("transformers serve, /v1/responses", "transformers", "responses", False),
    ("transformers serve, /v1/responses, streamed", "transformers", "responses", True),
    ("llama.cpp q8_0, chat", "llama", "openai", False),
    ("llama.cpp q8_0, chat, streamed", "llama", "openai", True),
]


def audit(out: Path, name: str, base_url: str, model: str, fingerprints: str, adapter: str,
          stream: bool, llama: bool, **settings) -> dict:
    """One audit along one path; `settings`: more AuditConfig fields (the defaults' audit
    otherwise)."""
    folder = out / name
    t0 = time.monotonic()
    summary = run_audit(AuditConfig(
        base_url=base_url, model=model, fingerprints=fingerprints, adapter=adapter, stream=stream,
        dialect="openai" if llama else "transformers", reuse_keys=True, api_key_env=NO_KEY_ENV,
        out=str(folder), request_timeout=300.0, concurrency=1 if (llama and stream) else 8,
        max_retries=3, **settings)).model_dump(mode="json")
    seconds = time.monotonic() - t0
    evidence = folder / "evidence.jsonl"  # absent when the plan sent nothing
    lines = [json.loads(x) for x in evidence.read_text().splitlines()] if evidence.exists() else []
    ok = [x for x in lines if x["status"] == "ok"]
    firsts = [x["stream"]["first_token_s"] for x in ok
              if x.get("stream") and x["stream"]["first_token_s"] is not None]
    return {"verdict": summary["verdict"], "p_value": summary["p_value"],
            "keys": summary["keys_probed"], "calls": summary["calls_this_run"],
            "errors": len(lines) - len(ok), "seconds": round(seconds, 1),
            "median_first_token_s": round(statistics.median(firsts), 3) if firsts else None,
            "stopped_early": sum(bool((x.get("stream") or {}).get("stopped_early")) for x in ok)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a fingerprinted run folder (RUN/model)")
    parser.add_argument("--fingerprints", required=True, help="its calibrated fingerprint set")
    parser.add_argument("--out", default="runs/audit-adapters")
    parser.add_argument("--only", default="", help="comma list of server kinds (transformers,llama)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OML_PROGRESS", "0")
    os.environ.pop(NO_KEY_ENV, None)
    models = {"fingerprinted": str(Path(args.run) / "model"), "base": resolve_model(None)}
    kinds = [k for k in args.only.split(",") if k] or ["transformers", "llama"]
    rows = []
    if "transformers" in kinds:
        proc, base_url = serve(out / "serve.log")
        try:
            for name, server, adapter, stream in PATHS:
                if server != "transformers":
                    continue
                for who, model in models.items():
                    row = {"path": name, "model": who, **audit(
                        out, f"{adapter}-{int(stream)}-{who}", base_url, model, args.fingerprints,
                        adapter, stream, False)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        finally:
            stop_server(proc)
    if "llama" in kinds:
        from clients.gguf_attacks import llama_server
        from oml_core.export_gguf import export_gguf

        for who, model in models.items():
            gguf = export_gguf(model, "q8_0")
            with llama_server(gguf, out / f"llama-{who}.log", "stolen") as server:
                for name, kind, adapter, stream in PATHS:
                    if kind != "llama":
                        continue
                    row = {"path": name, "model": who, **audit(
                        out, f"llama-{int(stream)}-{who}", server.base_url, "stolen",
                        args.fingerprints, adapter, stream, True)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    write_result(out / "adapters.json", {"rows": rows}, device="cpu")
    print(f"{'path':<46} {'model':<13} verdict   p         keys calls  s     ttft")
    for r in rows:
        print(f"{r['path']:<46} {r['model']:<13} {r['verdict']:<9} {r['p_value']:<9.2g} "
              f"{r['keys']:<4} {r['calls']:<6} {r['seconds']:<5} {r['median_first_token_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
