"""The registration the README documents, done by Claude Code's own CLI (npm, pinned version):
`claude mcp add oml -e OML_HOME=... -- python -m oml_mcp`, then `claude mcp list`, which starts
the server and health-checks it. Runs with a throw-away HOME, offline."""

from __future__ import annotations

import os
import subprocess
import sys

from mcp_helpers import npm_tool

CLAUDE_CODE = "@anthropic-ai/claude-code"
VERSION = "2.1.197"


def test_claude_code_registers_and_connects(tmp_path):
    claude = npm_tool(CLAUDE_CODE, VERSION, "claude")
    home, workspace = tmp_path / "home", tmp_path / "oml_home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}

    def run(*args):
        return subprocess.run([str(claude), *args], check=False, capture_output=True, text=True,
                              timeout=120, env=env, cwd=tmp_path)

    added = run("mcp", "add", "oml", "-e", f"OML_HOME={workspace}", "--", sys.executable, "-m",
                "oml_mcp")
    assert added.returncode == 0, added.stderr[-2000:]
    listed = run("mcp", "list")
    assert listed.returncode == 0, listed.stderr[-2000:]
    line = next(row for row in listed.stdout.splitlines() if row.startswith("oml:"))
    assert "Connected" in line and "Failed" not in line, listed.stdout
