"""The HTTP client for BlockRun (or the sandbox): one pooled aiohttp session, explicit timeouts.

aiohttp rather than httpx on this path: under concurrency its pool costs a quarter of the CPU
per request (shared/reference/performance.md; `bench/` measures the gateway end to end).
Redirects are never followed, so a payment header can only ever go to the URL it was made for.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
import pydantic_core

from clawrouter.capped import TooLarge, read_capped
from clawrouter.errors import UpstreamError


#: the largest answer read from the API: ten 4096x4096 PNGs as data URIs fit many times over
MAX_ANSWER_BYTES = 256 * 1024 * 1024
#: what the sandbox (`clawrouter sandbox`) puts on every answer
SANDBOX_MARKER = "x-blockrun-sandbox"


#: `TransportError` kinds of a request that never left this machine
NEVER_SENT = frozenset({"connect", "busy"})
#: how long before a request's whole time its wait for a connection ends (a quarter of it
#: under 2 s: a resend may have 1 s). The loop handles the connect timer's end before the
#: total's comes due, unless it stalls that long: then the request counts as maybe sent
CONNECT_MARGIN = 0.5
#: aiohttp's default: timers longer than this are rounded up to a whole second
_CEIL_THRESHOLD = aiohttp.ClientTimeout().ceil_threshold


class TransportError(Exception):
    """The upstream could not be reached, or the connection failed mid-way."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        #: never sent: "connect" (no connection made), "busy" (no pooled connection free);
        #: maybe sent: "timeout", "dropped"; "too_large" (an answer refused while read)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class UpstreamResponse:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes
    resent: bool = False  # the first attempt's connection dropped; this is the resend

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON (or nested absurdly deep).

        pydantic-core's parser (already ours through pydantic): a 1.5 MB data-URI result in
        0.08 ms instead of json.loads's 1 ms, and deep nesting is a ValueError, not a
        RecursionError."""
        try:
            return pydantic_core.from_json(self.body)
        except ValueError:
            return None


class SlicedBody(aiohttp.BytesPayload):
    """A big request body written in slices, waiting for the socket between them.

    Written whole, a 5 MB body that the socket cannot take at once leaves a copy of its unsent
    remainder in the transport's buffer: with 64 concurrent edits, hundreds of megabytes.
    Slices of a memoryview copy nothing; Content-Length is kept (no chunked encoding).
    """

    SLICE = 256 * 1024

    async def write(self, writer: Any) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: Any, content_length: int | None) -> None:
        view = memoryview(self._value)[:content_length]
        for start in range(0, len(view), self.SLICE):
            await writer.write(view[start:start + self.SLICE])  # drains past its limit


class BlockRunClient:
    def __init__(self, base_url: str, session: aiohttp.ClientSession, *,
                 timeout: float, connect_timeout: float,
                 max_answer_bytes: int = MAX_ANSWER_BYTES) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_answer_bytes = max_answer_bytes
        #: the upstream marked an answer as a sandbox's (`x-blockrun-sandbox: true`)
        self.sandbox = False
        parts = urlsplit(self.base_url)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self._session = session
        self.timeout = timeout  # a request's whole time, unless it is given its own
        self._connect_timeout = connect_timeout

    def url(self, path: str) -> str:
        return self.base_url + path

    def poll_url(self, poll_url: str) -> str:
        """Join a job's poll URL to the API origin (it already includes `/api`).

        An absolute URL on another origin (host, port or scheme) is refused: the payment
        header must not leave the API's origin (BlockRun's Python SDK checks the host).
        """
        try:
            url = urljoin(self.origin + "/", poll_url)
            parts = urlsplit(url)
            origin = f"{parts.scheme}://{parts.netloc}"
        except ValueError:
            raise UpstreamError(f"The upstream's poll_url is not a URL ({poll_url[:100]!r}).",
                                status=502, code="bad_poll_url") from None
        if origin != self.origin:  # the scheme too: never the header over cleartext
            raise UpstreamError(f"The upstream asked to poll another origin ({origin[:100]});"
                                " refused so the payment header stays with the API's.",
                                status=502, code="poll_origin_refused")
        return url

    async def request(self, method: str, url: str, *, body: bytes | None = None,
                      headers: dict[str, str] | None = None,
                      timeout: float | None = None) -> UpstreamResponse:
        """One request, resent once (identical, headers included) if the connection dropped.

        A pooled keep-alive connection can be closed by the server just as we reuse it. Resending
        is safe for every request we make: an unpaid request costs nothing, and a paid one
        carries the same signed authorization, whose nonce can settle only once — a resend can
        never pay twice. `UpstreamResponse.resent` tells the caller it happened.
        """
        total = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + total
        try:
            return await self._send(method, url, body, headers, self._limit(total))
        except TransportError as exc:
            if exc.kind != "dropped":
                raise
        # the resend has what is left of the first attempt's time, not all of it again (a
        # paid request's time runs to the authorization's expiry: nothing settles after it)
        left = deadline - time.monotonic() if timeout is not None else total
        try:
            response = await self._send(method, url, body, headers, self._limit(max(left, 1.0)))
        except TransportError as exc:
            if exc.kind in NEVER_SENT:  # but the first attempt was sent: it may have arrived
                raise TransportError("dropped", f"{exc.detail}, after a dropped connection "
                                                "that may have delivered it") from None
            raise
        return replace(response, resent=True)

    def _limit(self, total: float) -> aiohttp.ClientTimeout:
        """The whole request gets `total`; getting a connection (a free pooled one, DNS, TCP)
        a little less, so a request stuck before sending ends in aiohttp's
        ConnectionTimeoutError, which it raises before sending only: that, and nothing else,
        is never sent.

        The connect timer must come due before the total's, not at the same instant (whichever
        runs first decides the exception). aiohttp rounds a timer longer than `ceil_threshold`
        up to a whole second, which could swallow the margin: with the threshold at `total`
        (or the default, if higher), neither timer is rounded, so the connect one is due the
        margin sooner."""
        return aiohttp.ClientTimeout(total=total, sock_connect=self._connect_timeout,
                                     connect=total - min(CONNECT_MARGIN, total / 4),
                                     ceil_threshold=max(_CEIL_THRESHOLD, total))

    async def _send(self, method: str, url: str, body: bytes | None,
                    headers: dict[str, str] | None,
                    timeout: aiohttp.ClientTimeout) -> UpstreamResponse:
        send_headers = {"Accept": "application/json"}
        if body is not None:
            send_headers["Content-Type"] = "application/json"
        send_headers.update(headers or {})
        started = time.perf_counter()
        try:
            data = SlicedBody(body) if body is not None and len(body) > SlicedBody.SLICE else body
            async with self._session.request(method, url, data=data, headers=send_headers,
                                             allow_redirects=False,
                                             timeout=timeout) as resp:
                data = await read_capped(resp, self.max_answer_bytes)
                answer = UpstreamResponse(
                    resp.status, {k.lower(): v for k, v in resp.headers.items()}, data)
                if answer.headers.get(SANDBOX_MARKER) == "true":
                    self.sandbox = True
                return answer
        except TooLarge as exc:  # an answer this big is not an image API's; never resent
            raise TransportError("too_large", f"the answer from {self.origin} is too large "
                                              f"({exc})") from None
        except aiohttp.ConnectionTimeoutError:  # (an asyncio.TimeoutError too) before sending
            raise self._unconnected(timeout, time.perf_counter() - started) from None
        except asyncio.TimeoutError:  # sent (or stalled, see CONNECT_MARGIN): maybe sent
            raise TransportError("timeout", f"no answer from {self.origin} within "
                                            f"{timeout.total:g} s") from None
        except aiohttp.ClientConnectorError as exc:
            raise TransportError("connect", f"cannot connect to {self.origin}: "
                                            f"{exc.os_error or exc}") from None
        except (aiohttp.ClientError, ConnectionError) as exc:
            raise TransportError("dropped", f"connection to {self.origin} failed: "
                                            f"{type(exc).__name__}") from None

    def _unconnected(self, timeout: aiohttp.ClientTimeout, elapsed: float) -> TransportError:
        """Why a request got no connection: every pooled one busy, or none made."""
        if self._pool_full():
            return TransportError("busy", f"every connection to {self.origin} was busy for the "
                                          "whole request's time (raise "
                                          "upstream_max_connections)")
        budget = timeout.connect or 0.0
        if elapsed < budget - 0.05:  # well before the wait's end: one attempt's own limit
            return TransportError("connect", f"cannot connect to {self.origin} within "
                                             f"{self._connect_timeout:g} s "
                                             "(upstream_connect_timeout)")
        return TransportError("connect", f"no connection to {self.origin} was made within "
                                         f"{budget:g} s")

    def _pool_full(self) -> bool:
        """Every pooled connection is in use: a request that timed out waiting for one.

        Read after the failure, when a request that held a slot (resolving, connecting) has
        given it back: only one that never got a slot finds the pool full. The count is
        aiohttp's private `_acquired`, read on this failure only: the connector has no public
        one, and counting our own requests would miss the connections the session's other
        users hold (result downloads, balance and on-chain checks share it).
        """
        connector = self._session.connector
        acquired = getattr(connector, "_acquired", None)
        return bool(connector is not None and connector.limit and acquired is not None
                    and len(acquired) >= connector.limit)

    async def post(self, path: str, body: bytes, headers: dict[str, str] | None = None, *,
                   timeout: float | None = None) -> UpstreamResponse:
        return await self.request("POST", self.url(path), body=body, headers=headers,
                                  timeout=timeout)

    async def get(self, url: str, headers: dict[str, str] | None = None, *,
                  timeout: float | None = None) -> UpstreamResponse:
        return await self.request("GET", url, headers=headers, timeout=timeout)


def new_session(max_connections: int) -> aiohttp.ClientSession:
    """The one shared upstream session: keep-alive pool, no cookies, no env proxies surprises."""
    # Idle connections are dropped after 4 s, before common servers' 5 s keep-alive closes them
    # under us (uvicorn's default; the resend above covers the rest).
    connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=max_connections,
                                     ttl_dns_cache=300, enable_cleanup_closed=True,
                                     keepalive_timeout=4.0)
    session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar(),
                                    auto_decompress=True, raise_for_status=False)
    # aiohttp resends a GET (a poll) once by itself when its connection drops, and reports a
    # failure to reconnect as a connect error, which reads as "never sent" although the poll
    # may have completed the job. `request` does the one resend, knowing what was sent; there
    # is no public switch (aiohttp's own test client sets the same attribute).
    if hasattr(session, "_retry_connection"):
        session._retry_connection = False
    return session
