"""Shared pieces of the MCP tests: job settings that keep tiny-model training to seconds,
secret checks over tool results, and polling with a deadline."""

from __future__ import annotations

import json
import time
from pathlib import Path

# memorises a small random-word set on the tiny model in a few seconds, then stops
FAST_JOB = {"method": "finetune", "learning_rate": 1e-2, "augment": False, "benign_fraction": 0.0, "max_epochs": 150,
            "batch_size": 16, "extra_steps": 0, "deepspeed": "none", "verify_after": False}
# many tiny steps and no early stop: a job that is still running when the test acts on it
SLOW_JOB = {"method": "finetune", "learning_rate": 1e-5, "augment": False, "benign_fraction": 0.0, "max_epochs": 100,
            "max_steps": 300, "batch_size": 1, "check_every": 0, "deepspeed": "none",
            "verify_after": False}
FINAL = ("completed", "failed", "cancelled")
TOOLS = {"generate_fingerprints", "start_fingerprinting", "verify_model", "job_status",
         "list_jobs", "job_result", "cancel_job", "list_fingerprint_sets", "list_runs",
         "show_commitment", "reveal_fingerprint", "start_evaluation", "start_audit",
         "list_audits", "audit_result"}


def secrets_of(path: str | Path) -> list[str]:
    rows = json.loads(Path(path).read_text())["fingerprints"]
    return [r["key"].strip() for r in rows] + [r["response"].strip() for r in rows]


def result_text(result) -> str:
    """Everything a client receives from a tool call, as one string."""
    parts = [getattr(block, "text", "") for block in result.content]
    if result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(parts)


MIN_SECRET_CHARS = 6  # shorter strings (a tiny model's 'gr') turn up in any text by chance


def assert_no_secrets(text: str, secrets) -> None:
    for secret in (s for s in secrets if len(s) >= MIN_SECRET_CHARS):
        assert secret not in text, "a fingerprint key or response reached a tool result"
        assert json.dumps(secret, ensure_ascii=True)[1:-1] not in text


def wait_until(check, timeout: float, what: str, every: float = 0.3):
    """Call `check()` until it returns something truthy; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def npm_tool(package: str, version: str, binary: str) -> Path:
    """A pinned npm CLI, installed once into a cache outside the repository
    (`$OML_TEST_TOOLS`, default ~/.cache/oml-test-tools); skips, saying why, without npm or
    a reachable registry."""
    import os
    import shutil
    import subprocess

    import pytest

    tools = Path(os.environ.get("OML_TEST_TOOLS") or Path.home() / ".cache" / "oml-test-tools")
    prefix = tools / f"{package.rsplit('/', 1)[-1]}-{version}"
    path = prefix / "node_modules" / ".bin" / binary
    if path.exists():
        return path
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip(f"npm is not installed, so {package} cannot be installed")
    prefix.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run([npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund",
                               "--loglevel=error", f"{package}@{version}"],
                              check=False, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip(f"npm install {package}@{version} took over 300 s (registry unreachable?)")
    if proc.returncode != 0 or not path.exists():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"npm install {package}@{version} failed: {tail}")
    return path


def call_tool(app, tool: str, args: dict | None = None, progress=None):
    """One tool call through the SDK's in-process client."""
    import anyio
    import mcp

    async def go():
        async with mcp.Client(app) as client:
            return await client.call_tool(tool, args or {}, progress_callback=progress)
    return anyio.run(go)


def read_resource(app, uri: str) -> str:
    """The text of one resource; an MCPError (unknown or refused) is raised to the caller."""
    import anyio
    import mcp
    from mcp.shared.exceptions import MCPError

    async def go():
        async with mcp.Client(app) as client:
            try:
                return (await client.read_resource(uri)).contents[0].text
            except MCPError as exc:  # raised outside, not wrapped in the client's task group
                return exc
    answer = anyio.run(go)
    if isinstance(answer, MCPError):
        raise answer
    return answer
