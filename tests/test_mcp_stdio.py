"""`python -m oml_mcp` as a real stdio subprocess, driven by the SDK's stdio client.

The server runs behind a small bash script that copies every byte of its stdout to a file,
so the tests can check that nothing but JSON-RPC messages reached stdout while it generated a
set, trained a tiny model in a worker and verified the result in-process (where transformers,
DeepSpeed and progress bars all get a chance to print). A second test SIGKILLs the server in
the middle of a job: the worker keeps going and a new server finds the job and its result.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import anyio
import mcp
import pytest
from conftest import build_tiny_model
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp_helpers import (
    FAST_JOB,
    FINAL,
    SLOW_JOB,
    TOOLS,
    assert_no_secrets,
    result_text,
    secrets_of,
)

from oml_core.config import GenerateConfig
from oml_core.generate import generate_set
from oml_core.models import load_model
from oml_mcp.jobs import is_alive

CAPTURE_SCRIPT = """#!/usr/bin/env bash
# The server's stdout goes to the client *and* to $OML_TEST_STDOUT (byte for byte).
exec "$OML_TEST_PYTHON" -m oml_mcp "$@" > >(exec tee -a "$OML_TEST_STDOUT")
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """OML_HOME, a tiny model inside it, the capture script, and the server's environment."""
    base = tmp_path_factory.mktemp("mcp_stdio")
    home = base / "home"
    build_tiny_model(home / "models" / "tiny")
    script = base / "serve.sh"
    script.write_text(CAPTURE_SCRIPT)
    script.chmod(0o755)
    env = {**os.environ, "OML_HOME": str(home), "OML_TEST_PYTHON": sys.executable,
           "OML_TEST_STDOUT": str(base / "stdout.jsonl"), "OML_PROGRESS": "0"}
    with open(base / "stderr.log", "a") as errlog:
        yield {"home": home, "model": str(home / "models" / "tiny"), "script": str(script),
               "env": env, "stdout": base / "stdout.jsonl", "stderr": base / "stderr.log",
               "errlog": errlog}


def client(setup) -> mcp.Client:
    """A client that starts a new server; the server's stderr is appended to one log file."""
    params = StdioServerParameters(command=setup["script"], args=[], env=setup["env"])
    return mcp.Client(stdio_client(params, errlog=setup["errlog"]), read_timeout_seconds=120)


async def call(session: mcp.Client, tool: str, args: dict | None = None) -> dict:
    result = await session.call_tool(tool, args or {})
    assert not result.is_error, result_text(result)
    return result.structured_content


async def poll(session: mcp.Client, job_id: str, states, timeout: float) -> dict:
    with anyio.fail_after(timeout):
        while True:
            status = await call(session, "job_status", {"job_id": job_id})
            if status["state"] in states:
                return status
            await anyio.sleep(0.3)


def assert_stdout_is_protocol_only(path: Path, secrets) -> int:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines, "the server wrote nothing to stdout"
    for line in lines:
        message = json.loads(line)  # a stray print or progress bar fails here
        assert message.get("jsonrpc") == "2.0", line[:200]
        assert {"method", "result", "error"} & set(message), line[:200]
    assert_no_secrets("\n".join(lines), secrets)
    return len(lines)


def test_lifecycle_over_stdio_keeps_stdout_for_the_protocol(setup):
    async def scenario():
        async with client(setup) as session:
            tools = {t.name for t in (await session.list_tools()).tools}
            assert tools == TOOLS
            typo = await session.call_tool("list_jobs", {"limt": 3})  # the server keeps serving
            assert typo.is_error and "unknown argument(s) limt" in result_text(typo)
            made = await call(session, "generate_fingerprints", {
                "model": "models/tiny", "strategy": "random_word", "num_fingerprints": 8,
                "key_length": 8, "response_length": 6, "out": "fingerprints/stdio.json"})
            started = await call(session, "start_fingerprinting", {
                "model": "models/tiny", "fingerprints": made["path"], **FAST_JOB})
            done = await poll(session, started["job_id"], FINAL, timeout=240)
            assert done["state"] == "completed", done
            verified = await call(session, "verify_model", {
                "model": str(Path(done["run_dir"]) / "model"), "fingerprints": made["path"]})
            result = await call(session, "job_result", {"job_id": started["job_id"]})
            return made, verified, result

    made, verified, result = anyio.run(scenario)
    assert verified["matched"] == verified["total"] == 8 and verified["verdict"] == "match"
    assert result["state"] == "completed" and result["output"]["steps"] >= 1
    secrets = secrets_of(made["path"])
    assert assert_stdout_is_protocol_only(setup["stdout"], secrets) >= 10
    assert_no_secrets(setup["stderr"].read_text(), secrets)


@pytest.fixture(scope="module")
def fp_file(setup) -> str:
    path = setup["home"] / "fingerprints" / "restart.json"
    generate_set(GenerateConfig(strategy="random_word", num_fingerprints=8, key_length=8,
                                response_length=6, seed=5),
                 load_model(setup["model"], device="cpu")).save(path)
    return str(path)


def test_killed_server_leaves_the_job_running_and_a_new_server_finds_it(setup, fp_file):
    job = {}

    async def first_server():
        try:
            async with client(setup) as session:
                started = await call(session, "start_fingerprinting", {
                    "model": setup["model"], "fingerprints": fp_file,
                    "out_dir": "runs/survivor", **SLOW_JOB, "max_steps": 30})
                job.update(await poll(session, started["job_id"], ("running", *FINAL), 120))
                record = json.loads((setup["home"] / "jobs" / started["job_id"] /
                                     "job.json").read_text())
                job["pid_start"] = record["pid_start"]
                os.kill(record["server_pid"], signal.SIGKILL)  # mid-job, no goodbye
                job["killed"] = True
                await anyio.sleep(0.5)
        except Exception:
            if not job.get("killed"):  # only the session dying with its server is expected
                raise

    anyio.run(first_server)
    assert job["state"] == "running", job
    assert is_alive(job["pid"], job["pid_start"]), "the worker died with the server"

    async def second_server():
        async with client(setup) as session:
            listed = await call(session, "list_jobs", {})
            assert job["job_id"] in [j["job_id"] for j in listed["jobs"]]
            done = await poll(session, job["job_id"], FINAL, timeout=240)
            return done, await call(session, "job_result", {"job_id": job["job_id"]})

    done, result = anyio.run(second_server)
    assert done["state"] == "completed", done
    assert result["exit_code"] == 0 and result["output"]["steps"] == 30
    assert (Path(done["run_dir"]) / "COMPLETE").exists()
