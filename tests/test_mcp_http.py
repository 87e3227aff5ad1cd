"""The streamable-HTTP transport: it needs a bearer token to start, refuses requests without
the right one (401) and serves those with it. Everything on 127.0.0.1, bounded in time, and
the server is always stopped (SIGTERM, then SIGKILL) at the end."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys

import anyio
import httpx
import httpx2
import mcp
from mcp.client.streamable_http import streamable_http_client
from mcp_helpers import TOOLS, wait_until

from oml_core.localhost import free_port


def server_env(home, token: str | None) -> dict:
    env = {**os.environ, "OML_HOME": str(home)}
    env.pop("OML_MCP_TOKEN", None)
    if token is not None:
        env["OML_MCP_TOKEN"] = token
    return env


def test_http_refuses_to_start_without_a_token(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "oml_mcp", "--transport", "streamable-http",
                           "--port", str(free_port())], check=False, capture_output=True,
                          text=True, timeout=60, env=server_env(tmp_path, None))
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "OML_MCP_TOKEN" in lines[0], proc.stderr


def test_http_requires_the_bearer_token(tmp_path):
    token, port = secrets.token_urlsafe(24), free_port()
    url = f"http://127.0.0.1:{port}/mcp"
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "oml_mcp", "--transport", "streamable-http", "--host",
             "127.0.0.1", "--port", str(port)], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            env=server_env(tmp_path, token), start_new_session=True)
    try:
        def up():
            assert server.poll() is None, (tmp_path / "server.log").read_text()
            try:
                return httpx.get(url, timeout=2).status_code
            except httpx.TransportError:
                return None
        assert wait_until(up, 60, "the HTTP server to listen") == 401

        hello = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
        headers = {"Accept": "application/json, text/event-stream"}
        for auth in (None, "Bearer wrong-token", f"Basic {token}", f"Bearer {token}x"):
            extra = {"Authorization": auth} if auth else {}
            response = httpx.post(url, json=hello, headers={**headers, **extra}, timeout=10)
            assert response.status_code == 401, (auth, response.text)
            assert "Authorization: Bearer" in response.text and token not in response.text

        async def with_token():
            auth = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30)
            with anyio.fail_after(60):
                async with auth, mcp.Client(streamable_http_client(url, http_client=auth)) as client:
                    tools = {t.name for t in (await client.list_tools()).tools}
                    listed = await client.call_tool("list_jobs", {"limit": 2})
                    return tools, listed
        tools, listed = anyio.run(with_token)
        assert tools == TOOLS
        assert not listed.is_error and listed.structured_content == {"jobs": [], "total": 0}
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=15)
            stopped_by_sigterm = True
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)
            stopped_by_sigterm = False
    assert stopped_by_sigterm, "the HTTP server ignored SIGTERM"
