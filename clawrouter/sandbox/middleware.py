"""Connection-level behaviour: the sandbox marker header, simulated latency, dropped sockets.

Plain ASGI (no BaseHTTPMiddleware) so large bodies stream through untouched.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from clawrouter.sandbox.config import SandboxConfig

MARKER = (b"x-blockrun-sandbox", b"true")
DROP_KEY = "sandbox.drop"
CONTROL_PREFIX = "/_sandbox"


class SandboxMiddleware:
    def __init__(self, app: ASGIApp, config: SandboxConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope[DROP_KEY] = _dropper(receive)
        if self.config.latency_ms and not scope["path"].startswith(CONTROL_PREFIX):
            await asyncio.sleep(self.config.latency_ms / 1000)

        if not self.config.marked:
            await self.app(scope, receive, send)
            return

        async def marked(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), MARKER]
            await send(message)

        await self.app(scope, receive, marked)


class DropConnection(Response):
    """A 'response' that closes the socket without sending a byte."""

    def __init__(self) -> None:
        super().__init__(status_code=500)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        drop = scope.get(DROP_KEY)
        if drop is not None:
            await drop()
            return
        # Unknown server: start a response we never finish, so it has to cut the connection.
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"1")]})


def _dropper(receive: Receive) -> Callable[[], Any] | None:
    """Close the client's socket directly (uvicorn keeps the transport on the request cycle)."""
    cycle = getattr(receive, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is None:
        return None

    async def drop() -> None:
        transport.close()
        for _ in range(5):  # let the server notice, so it does not answer a 500 instead
            if getattr(cycle, "disconnected", True):
                return
            await asyncio.sleep(0)
        cycle.disconnected = True

    return drop
