"""Measurement: an assistant's audit, end to end, on the demo's fingerprinted model.

The MCP SDK's client starts `python -m oml_mcp` over stdio (as `claude mcp add oml -- ...`
does) and, for the demo's fingerprinted model and then the base model, both served by one
`transformers serve` on loopback: start_audit with plan_only (the plan an assistant shows its
user), start_audit, job_status until the job ends, audit_result. Prints one JSON line per
model (verdict, p-value, keys and calls spent, seconds). Defaults only, except the server
dialect and --reuse-keys for the base (the same endpoint has seen the keys once).

    .venv/bin/python experiments/mcp_audit_demo.py --run runs/demo/run-edit \\
        --fingerprints runs/demo/fingerprints-calibrated.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import anyio
import mcp
from mcp.client.stdio import StdioServerParameters, stdio_client

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository root, for benchmarks.harness and experiments


from oml_core.models import resolve_model  # noqa: E402
from benchmarks.harness import serve, stop_server  # noqa: E402

FINAL = ("completed", "failed", "cancelled")


async def audit_both(base_url: str, home: Path, models: list[tuple[str, str]]) -> list[dict]:
    env = {**os.environ, "OML_HOME": str(home), "OML_PROGRESS": "0"}
    params = StdioServerParameters(command=sys.executable, args=["-m", "oml_mcp"], env=env)
    rows = []
    async with mcp.Client(stdio_client(params), read_timeout_seconds=600) as client:
        for name, model in models:
            args = {"base_url": base_url, "model": model, "fingerprints": "fingerprints/set.json",
                    "dialect": "transformers", "reuse_keys": name == "base"}
            t0 = time.monotonic()
            plan = (await client.call_tool("start_audit", {**args, "plan_only": True}))
            plan = plan.structured_content["plan"]
            started = await client.call_tool("start_audit", args)
            job = started.structured_content["job"]["job_id"]
            while True:
                status = (await client.call_tool("job_status", {"job_id": job})).structured_content
                if status["state"] in FINAL:
                    break
                await anyio.sleep(2.0)
            result = (await client.call_tool("audit_result", {"audit_id": job})).structured_content
            rows.append({"model": name, "verdict": result["verdict"], "p_value": result["p_value"],
                         "keys_sent": result["keys_probed"], "calls": status["step"],
                         "planned_at_most": plan["calls_to_send"], "job_state": status["state"],
                         "seconds": round(time.monotonic() - t0, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the demo's run folder (holds model/)")
    parser.add_argument("--fingerprints", required=True, help="the calibrated set")
    args = parser.parse_args(argv)
    home = Path(tempfile.mkdtemp(prefix="oml-mcp-audit-"))
    (home / "fingerprints").mkdir()
    shutil.copy(args.fingerprints, home / "fingerprints" / "set.json")
    proc, base_url = serve(home / "serve.log")
    try:
        models = [("fingerprinted", str(Path(args.run).resolve() / "model")),
                  ("base", resolve_model(None))]
        anyio.run(audit_both, base_url, home, models)
    finally:
        stop_server(proc)
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
