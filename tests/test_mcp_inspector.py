"""A third-party client drives the server: the MCP Inspector CLI (npm, pinned version).

The set-up installs `@modelcontextprotocol/inspector` once into a cache folder outside the
repository (`mcp_helpers.npm_tool`); where npm is missing or the registry is unreachable the
tests are skipped, saying why.
`--strict` makes the Inspector also judge our tool schemas for portability across clients.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mcp_helpers import TOOLS, npm_tool

INSPECTOR = "@modelcontextprotocol/inspector"
VERSION = "2.12.0"


@pytest.fixture(scope="module")
def inspector() -> Path:
    return npm_tool(INSPECTOR, VERSION, "mcp-inspector")


def inspect(inspector: Path, home: Path, *args: str) -> subprocess.CompletedProcess:
    command = [str(inspector), "--cli", "-e", f"OML_HOME={home}", sys.executable, "-m",
               "oml_mcp", *args]
    env = {**os.environ, "MCP_CATALOG_PATH": str(home / "inspector-catalog.json")}
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=120,
                          env=env, cwd=home)


def test_inspector_lists_tools_with_portable_schemas(inspector, tmp_path):
    proc = inspect(inspector, tmp_path, "--method", "tools/list", "--strict")
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = json.loads(proc.stdout)
    assert {tool["name"] for tool in listed["tools"]} == TOOLS
    assert all(tool.get("outputSchema") and tool.get("annotations") for tool in listed["tools"])


def test_inspector_calls_tools(inspector, tmp_path):
    proc = inspect(inspector, tmp_path, "--method", "tools/call", "--tool-name", "list_jobs",
                   "--tool-arg", "limit=3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["isError"] is False and result["structuredContent"] == {"jobs": [], "total": 0}

    proc = inspect(inspector, tmp_path, "--method", "tools/call", "--tool-name",
                   "list_fingerprint_sets", "--tool-arg", "folder=../../etc")
    result = json.loads(proc.stdout)
    assert result["isError"] is True
    assert "'..'" in result["content"][0]["text"]
