"""`python -m oml_mcp` / `oml-mcp`: serve the OML tools over stdio (default) or streamable HTTP.

stdio is what assistants launch (`claude mcp add oml -- .../python -m oml_mcp`): its stdout
carries only protocol messages, and everything else (our logs, library chatter) goes to
stderr. HTTP (`--transport streamable-http --host 127.0.0.1 --port P`) needs a bearer token
in OML_MCP_TOKEN and refuses to start without one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from oml_core.errors import OMLInputError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _fail(message: str) -> int:
    sys.stderr.write(f"oml-mcp: error: {message}\n")
    return 2


def serve_http(app, host: str, port: int, token: str) -> None:
    import uvicorn

    from oml_mcp.http_auth import BearerTokenGate

    gated = BearerTokenGate(app.streamable_http_app(host=host), token)
    if host not in LOOPBACK:
        logging.getLogger("oml_mcp").warning(
            "serving on %s, beyond this machine: the token is the only protection and plain "
            "HTTP does not encrypt it; prefer 127.0.0.1 behind an HTTPS proxy", host)
    uvicorn.Server(uvicorn.Config(gated, host=host, port=port, log_level="warning")).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="oml-mcp", description="OML fingerprinting as MCP tools.")
    parser.add_argument("--transport", choices=("stdio", "streamable-http"), default="stdio")
    parser.add_argument("--host", default="127.0.0.1", help="HTTP only (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8765, help="HTTP only (default 8765)")
    parser.add_argument("--root", action="append", default=[], metavar="DIR",
                        help="a further folder tools may read and write (repeatable; also "
                             "OML_MCP_ROOTS, separated by ':'); OML_HOME is always allowed")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="oml-mcp %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("OML_PROGRESS", "0")  # progress goes out as MCP notifications
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    token = None
    if args.transport == "streamable-http":
        from oml_mcp.http_auth import TOKEN_ENV

        token = os.environ.get(TOKEN_ENV, "").strip()
        if not token:
            return _fail(f"the HTTP transport needs a bearer token: set {TOKEN_ENV} to a long "
                         "random secret (e.g. `export OML_MCP_TOKEN=$(openssl rand -hex 32)`) "
                         "and have the client send 'Authorization: Bearer <token>'")
    from oml_mcp.paths import Workspace
    from oml_mcp.server import build_server

    try:
        workspace = Workspace.from_env(args.root)
    except OMLInputError as exc:
        return _fail(str(exc))
    app = build_server(workspace)
    logging.getLogger("oml_mcp").info("serving over %s; workspace: %s", args.transport,
                                      workspace.describe())
    if args.transport == "stdio":
        # While it serves, the SDK's stdio transport writes protocol messages through a private
        # copy of fd 1 and points fd 1 itself at stderr, so stray prints, C libraries and child
        # processes cannot corrupt the stream (tests/test_mcp_stdio.py checks every byte).
        app.run()
    else:
        serve_http(app, args.host, args.port, token)
    return 0


if __name__ == "__main__":
    sys.exit(main())
