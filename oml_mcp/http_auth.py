"""A bearer-token gate in front of the streamable-HTTP app.

Over stdio only the client that started the server can talk to it; over HTTP anything that
reaches the port could, and these tools read files and start training. So every HTTP request
must carry `Authorization: Bearer <OML_MCP_TOKEN>`; anything else gets 401 before it reaches
the MCP app. Plain ASGI (not a Starlette BaseHTTPMiddleware) so streamed responses pass
through untouched, and lifespan events still reach the app (its session manager needs them).
"""

from __future__ import annotations

import hmac
import json

TOKEN_ENV = "OML_MCP_TOKEN"


class BearerTokenGate:
    def __init__(self, app, token: str):
        if not token:
            raise ValueError("an empty token would let everyone in")
        self.app = app
        self._expected = f"Bearer {token}".encode()

    def _authorised(self, scope) -> bool:
        for name, value in scope.get("headers") or ():
            if name.lower() == b"authorization":
                return hmac.compare_digest(value.strip(), self._expected)  # constant time
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket") or self._authorised(scope):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        body = json.dumps({"error": "unauthorized", "error_description":
                           f"send the header 'Authorization: Bearer <token>' with the token "
                           f"the server was started with ({TOKEN_ENV})"}).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b'Bearer realm="oml-mcp"')]})
        await send({"type": "http.response.body", "body": body})
