"""Pure ASGI middleware (cheaper than BaseHTTPMiddleware on the hot path)."""

from __future__ import annotations

import re
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_SAFE_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


class RequestId:
    """Echo a well-formed `x-request-id` or generate one; put it in scope and on every response."""

    def __init__(self, app: ASGIApp, *, sandbox: bool = False) -> None:
        self.app = app
        self.sandbox = sandbox

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = b""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = value if _SAFE_ID.match(value) else b""
                break
        rid = rid or new_request_id().encode()
        scope.setdefault("state", {})["request_id"] = rid.decode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid))
                if self.sandbox:
                    headers.append((b"x-clawrouter-sandbox", b"true"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)
