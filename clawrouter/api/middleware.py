"""Pure ASGI middleware (cheaper than BaseHTTPMiddleware on the hot path).

Order, outermost first: `RequestId` (every response carries `x-request-id`), `Observe`
(metrics and the one-line JSON log), `BrowserGuard`, `ApiKey` (when configured), `BodyLimit`,
`HeadAsGet`.
"""

from __future__ import annotations

import hmac
import re
import secrets
from collections.abc import Callable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clawrouter.config import is_loopback_authority
from clawrouter.errors import BodyTooLarge, ClawError, Forbidden, InvalidRequest, Unauthorized

_SAFE_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
HEALTH_PATHS = frozenset({"/health", "/healthz", "/readyz"})
_IMAGE_URL = re.compile(r"/images/[^/]+")  # one stored image (`/images/` lists nothing)


def new_request_id() -> str:
    return "req_" + secrets.token_hex(12)


def state(scope: Scope) -> dict:
    return scope.setdefault("state", {})


def note_error(into: dict, error: ClawError) -> None:
    """What the request log says of a failed request (`observe`): its code and, when a
    payment was involved, what became of it (`signed`, `settled`, `rejected`,
    `not_settled`, `none`)."""
    into["error_code"] = error.code
    if error.extra.get("payment") is not None:
        into["payment"] = error.extra["payment"]


async def send_error(scope: Scope, send: Send, error: ClawError) -> None:
    """Answer with `error` below FastAPI, noting it for the request log as its handlers do."""
    note_error(state(scope), error)
    body, headers = error.rendered()
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestId:
    """Echo a well-formed `x-request-id` or generate one; put it in scope and on every response."""

    def __init__(self, app: ASGIApp, *, sandbox: Callable[[], bool] = lambda: False) -> None:
        self.app = app
        self.sandbox = sandbox  # asked per response: an upstream may turn out to be a sandbox

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = b""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                rid = value if _SAFE_ID.fullmatch(value) else b""
                break
        rid = rid or new_request_id().encode()
        state(scope)["request_id"] = rid.decode()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid))
                if self.sandbox():
                    headers.append((b"x-clawrouter-sandbox", b"true"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_id)


class BrowserGuard:
    """Keep web pages from spending the user's money. Any page the user visits can send a
    simple cross-site POST to localhost (CSRF), and DNS rebinding even makes its reads
    same-origin. So, when the gateway listens on loopback, the Host header must name loopback
    (or `public_url`'s host); and a request that changes anything, when it comes from a browser
    (which says so in `Origin` or `Sec-Fetch-Site`), must come from a page this gateway
    served. Programs (curl, SDKs, agents) send neither header and are not affected."""

    def __init__(self, app: ASGIApp, *, loopback_only: bool,
                 public_url: str | None = None) -> None:
        self.app = app
        self.loopback_only = loopback_only
        self.public = urlsplit(public_url).netloc.lower() if public_url else ""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k: v for k, v in scope["headers"]
                   if k in (b"host", b"origin", b"sec-fetch-site")}
        host = headers.get(b"host", b"").decode("latin-1").lower()
        hosts = sum(1 for k, _ in scope["headers"] if k == b"host")
        error = None
        if hosts > 1 or (hosts == 0 and scope.get("http_version") == "1.1"):
            # RFC 9112 §3.2: exactly one; with two, which one names this gateway?
            error = InvalidRequest("An HTTP/1.1 request must carry exactly one Host header.",
                                   code="malformed_http")
        elif self.loopback_only and host and not self._host_allowed(host):
            error = Forbidden(f"Host {host!r} is not this gateway's: it answers on loopback "
                              "names only (behind a proxy, set public_url and an API key).",
                              code="forbidden_host")
        elif scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            origin = headers.get(b"origin", b"").decode("latin-1").lower()
            site = headers.get(b"sec-fetch-site", b"same-origin")
            if (origin and urlsplit(origin).netloc not in {host, self.public} - {""}) \
                    or site not in (b"same-origin", b"none"):
                error = Forbidden("Requests from other web pages are refused: a page could "
                                  "spend your money through this gateway.",
                                  code="cross_origin_refused")
        if error is not None:
            await send_error(scope, send, error)
            return
        await self.app(scope, receive, send)

    def _host_allowed(self, host: str) -> bool:
        return host == self.public or is_loopback_authority(host)


class ApiKey:
    """Require `Authorization: Bearer <key>` on every route but the health checks, which
    answer anyone (load balancers, container probes) but tell only the key's holders more
    than "ok" (`state["authorized"]`, read by `/health`), and the images' own URLs. Those are
    capabilities, as OpenAI's result URLs are: handed only to the key's holders, named by 128
    bits of their content's hash, and fetched by browsers (`<img>`), viewers and other
    programs that cannot send the key."""

    def __init__(self, app: ASGIApp, *, key: str) -> None:
        self.app = app
        self.expected = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        scheme, _, credentials = given.partition(b" ")
        authorized = scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(),
                                                                         self.expected)
        if scope["path"] in HEALTH_PATHS:
            state(scope)["authorized"] = authorized
            await self.app(scope, receive, send)
            return
        if _IMAGE_URL.fullmatch(scope["path"]) and scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        if not authorized:
            await send_error(scope, send, Unauthorized(
                "Missing or wrong API key: send 'Authorization: Bearer <CLAWROUTER_API_KEY>'.",
                headers={"www-authenticate": "Bearer"}))
            return
        await self.app(scope, receive, send)


class BodyLimit:
    """Refuse bodies over `limit` bytes, by declared length at once and by streamed length
    while reading, so an oversized upload is never buffered whole."""

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await send_error(scope, send, self._too_large())
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self._too_large()
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as exc:
            if not started:
                await send_error(scope, send, exc)

    def _too_large(self) -> BodyTooLarge:
        mb = self.limit / 1024 / 1024
        return BodyTooLarge(f"The request body is larger than {mb:.0f} MB (4 × "
                            "CLAWROUTER_MAX_IMAGE_MB).")


class HeadAsGet:
    """Answer HEAD wherever GET is answered (RFC 9110 §9.3.2: a server that answers GET must
    answer HEAD): probes such as `curl -I /health` and uptime checkers use it. The request runs
    as the GET it stands for and its body is dropped here, whatever the server does. Stored
    images answer HEAD themselves, without reading the file."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD" \
                or _IMAGE_URL.fullmatch(scope["path"]):
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)
