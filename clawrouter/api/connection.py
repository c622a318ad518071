"""What happens on a connection before a request reaches the app: uvicorn's HTTP/1.1 protocol
(httptools) with the gateway's manners.

Left alone, uvicorn answers a request it cannot parse in plain text, buffers request headers
of any size for as long as a client cares to send them, and logs advice to install a WebSocket
library for every upgrade request. Here:

- a request that cannot be parsed gets the OpenAI envelope (400, `malformed_http`);
- a request head (request line and headers) may be at most `MAX_HEAD_BYTES` (431,
  `headers_too_large`), and so may the bytes of a chunked body that are not data (chunk sizes,
  trailers), which httptools would otherwise buffer without limit;
- a head must be complete `head_timeout` seconds after the connection opened or the request's
  first byte arrived (408, `request_timeout`; a connection that sent nothing is just closed):
  endless headers cannot hold a connection;
- a body is read at the client's pace, its memory bounded by uvicorn's flow control and the
  app's body limit, but not slower than `MIN_BODY_RATE` over each `head_timeout` window in
  which the app waits for it (408): a trickled body cannot hold one of the few places big
  requests get (`api/heavy.py`), nor a connection whose answer was already sent;
- an answer the client reads slower than `MIN_BODY_RATE` over a `head_timeout` window (while
  our buffer for it is full) is dropped: a client that (nearly) never reads cannot keep
  megabytes of `b64_json` in memory, nor a stream (and its big-request place) open;
- at most `max_connections` connections are kept open (every one holds a file descriptor,
  and a process out of them serves nobody): past it, the connection that has waited longest
  with no request in the app (an idle keep-alive, or one still sending its head) is closed
  to make room, and when every one is busy the new one gets a 503 (`server_busy`);
- WebSocket (and other) upgrade requests are ordinary requests (uvicorn runs with `ws="none"`):
  the gateway has no WebSocket routes, so they get the app's own 404 or 405 envelope. httptools
  never reads the body of an upgrade request, so one that declares a body is a 400
  (`upgrade_with_body`) rather than a request answered without it.
"""

from __future__ import annotations

import asyncio
import logging
import time

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from clawrouter.api.middleware import new_request_id
from clawrouter.errors import ClawError, InvalidRequest

#: The whole request head. Browsers send a few KB (cookies for `localhost` are shared by every
#: local app, so they can grow); h11 and Node stop at 16 KB, nginx at 32 KB.
MAX_HEAD_BYTES = 64 * 1024
#: bytes a second a body must keep arriving at while the app waits for it: a phone line's
#: speed, far below any client of a local gateway
MIN_BODY_RATE = 16 * 1024

log = logging.getLogger("clawrouter.api")
#: how often (s) at most the gateway says that it closed or refused connections to stay under
#: `max_connections`
CROWDED_WARN_SECONDS = 60.0
_crowded_warned = -CROWDED_WARN_SECONDS


def raw_error(error: ClawError, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection."""
    body, own = error.rendered()
    headers = [*default_headers, *own, (b"x-request-id", new_request_id().encode()),
               (b"connection", b"close")]
    return b"".join([STATUS_LINE[error.status],
                     *(name + b": " + value + b"\r\n" for name, value in headers),
                     b"\r\n", body])


class GatewayHttpProtocol(HttpToolsProtocol):
    """One connection. Set `head_timeout` with `protocol_class()`."""

    head_timeout: float = 30.0
    max_connections: int | None = None  # None: no cap
    _waiting_since = 0.0  # loop time of the connect, or of the last answer's end
    _reading_head = False  # between a request's first byte and the end of its headers
    _in_body = False  # between the end of its headers and the end of the message
    _upgraded = False  # an upgrade request was read: httptools parses nothing after it
    _progress = False  # this read began a message, ended a head or carried body data
    _unparsed = 0  # bytes read since that last happened
    _head_error: ClawError | None = None
    _head_timer: asyncio.TimerHandle | None = None
    _body_timer: asyncio.TimerHandle | None = None
    _body_bytes = 0  # body bytes in the current window
    _app_waited = False  # the app was waiting for the body when the current window began
    _write_timer: asyncio.TimerHandle | None = None
    _unsent = 0  # bytes the transport still held when the last write check ran

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._waiting_since = self.loop.time()
        self._arm()
        if self.max_connections is not None and len(self.connections) > self.max_connections:
            self._make_room()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._waiting_since = self.loop.time()

    def _waiting(self) -> bool:
        """No request of this connection is in the app: it is idle, or sending a head."""
        return ((self.cycle is None or self.cycle.response_complete) and not self._in_body
                and not self.pipeline and not self.transport.is_closing())

    def _make_room(self) -> None:
        """Over the cap: close the connection that has waited longest with no request in the
        app, or, when every other one is busy, refuse this one."""
        waiting = [c for c in self.connections if c is not self
                   and isinstance(c, GatewayHttpProtocol) and c._waiting()]
        if waiting:
            min(waiting, key=lambda c: c._waiting_since).transport.close()
            what = "closed the longest-waiting idle one"
        else:
            self.transport.write(raw_error(ClawError(
                "The gateway has as many connections open as it can keep; try again in a "
                "moment.", status=503, code="server_busy", headers={"Retry-After": "1"}),
                self.server_state.default_headers))
            self.transport.close()
            what = "refused new ones with 503 server_busy"
        global _crowded_warned
        if time.monotonic() - _crowded_warned >= CROWDED_WARN_SECONDS:
            _crowded_warned = time.monotonic()
            log.warning("more than %d connections open at once (the most this process's file "
                        "descriptor limit allows): %s. A client is holding many connections "
                        "open; raise the limit (`ulimit -n`) if they are wanted.",
                        self.max_connections, what)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._body_timer = _cancel(self._body_timer)
        self._write_timer = _cancel(self._write_timer)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._upgraded or self.transport.is_closing():
            return  # the other protocol's bytes, or a refused connection's: never parsed
        self._progress = False
        super().data_received(data)
        if self._progress or self.transport.is_closing():
            return
        if self._reading_head or self._in_body:
            # A read that moved nothing forward: httptools is buffering a header or trailer
            # (it keeps each to itself until it ends), or reading chunk sizes. Bounded here,
            # to the limit plus one read; a whole head is also measured exactly below.
            self._unparsed += len(data)
            if self._unparsed > MAX_HEAD_BYTES:
                self._refuse(_head_too_large())

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._moved()
        self._reading_head = True
        if self._head_timer is None:  # the first request's clock runs from the connect
            self._arm()

    def on_headers_complete(self) -> None:
        self._moved()
        self._reading_head = False
        self._disarm()
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > MAX_HEAD_BYTES:
            self._head_error = _head_too_large()
        elif self.parser.should_upgrade() and any(
                name in (b"content-length", b"transfer-encoding") and value.strip() != b"0"
                for name, value in self.headers):
            self._head_error = InvalidRequest(
                "An upgrade request (Connection: Upgrade) cannot carry a body here: the "
                "gateway speaks HTTP/1.1 only. Send it without the Upgrade headers.",
                code="upgrade_with_body")
        if self._head_error is not None:
            raise self._head_error  # stops httptools; uvicorn then calls send_400_response
        super().on_headers_complete()
        if self.parser.should_upgrade():
            # httptools parses nothing after an upgrade request: answer it, then close.
            self._upgraded = True
            self.cycle.keep_alive = False
        else:
            self._in_body = True
            self._app_waited = False
            self._body_window()

    def on_body(self, body: bytes) -> None:
        self._moved()
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        self._body_timer = _cancel(self._body_timer)
        super().on_message_complete()

    def _body_window(self) -> None:
        """Start a window in which the body must arrive at `MIN_BODY_RATE`."""
        self._body_bytes = 0
        self._body_timer = _cancel(self._body_timer)
        self._body_timer = self.loop.call_later(self.head_timeout, self._body_window_ended)

    def _body_window_ended(self) -> None:
        self._body_timer = None
        if not self._in_body or self.transport.is_closing() or self.cycle is None:
            return
        # the app waits for it: nothing of it is buffered unread, reading is not paused, and
        # a client that asked to be told to send (Expect: 100-continue) has been told
        waiting = not (self.cycle.body or self.flow.read_paused
                       or self.cycle.waiting_for_100_continue)
        if self.cycle.response_complete:  # answered already: the rest would be thrown away
            self.transport.close()
        elif (waiting and self._app_waited
              and self._body_bytes < MIN_BODY_RATE * self.head_timeout):
            # judged only on a window the app waited for from its start: one in which the
            # gateway held the body back (a big request waiting for its place) is not the
            # client's slowness
            self._refuse(InvalidRequest(
                f"The request body arrived slower than {MIN_BODY_RATE // 1024} KB a second.",
                status=408, code="request_timeout"))
        else:
            self._app_waited = waiting
            self._body_window()

    def pause_writing(self) -> None:
        """The transport holds more than its high-water mark of our answer: watch it drain."""
        super().pause_writing()
        self._unsent = self.transport.get_write_buffer_size()
        self._write_timer = _cancel(self._write_timer)
        self._write_timer = self.loop.call_later(self.head_timeout, self._write_check)

    def resume_writing(self) -> None:
        self._write_timer = _cancel(self._write_timer)
        super().resume_writing()

    def _write_check(self) -> None:
        self._write_timer = None
        unsent = self.transport.get_write_buffer_size()
        if unsent and self._unsent - unsent < MIN_BODY_RATE * self.head_timeout:
            # (while writing is paused nothing is added: the buffer only drains)
            log.warning("dropped a connection from %s: its client read its answer slower than "
                        "%d KB a second for %g s (%d bytes waiting)",
                        self.client[0] if self.client else "?", MIN_BODY_RATE // 1024,
                        self.head_timeout, unsent)
            self.transport.abort()  # frees the buffer; the app sees the client gone
            return
        self._unsent = unsent
        if unsent:
            self._write_timer = self.loop.call_later(self.head_timeout, self._write_check)

    def _moved(self) -> None:
        self._progress = True
        self._unparsed = 0

    def send_400_response(self, msg: str) -> None:
        self._refuse(self._head_error or InvalidRequest(
            "Malformed request: it cannot be parsed as HTTP/1.1.", code="malformed_http"))

    def _unsupported_upgrade_warning(self) -> None:
        """An upgrade (WebSocket or other) is served as a plain request; nothing to warn of."""

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if not self._reading_head:  # connected and sent nothing
            self.transport.close()
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm()  # a pipelined head behind a response in progress: its clock restarts
            return
        self._refuse(InvalidRequest(
            f"The request headers did not arrive within {self.head_timeout:g} seconds.",
            status=408, code="request_timeout"))

    def _refuse(self, error: ClawError) -> None:
        log.warning("refused a request from %s at the connection: %s",
                    self.client[0] if self.client else "?", error.code)
        self._disarm()
        self._reading_head = False
        idle = self.cycle is None or self.cycle.response_complete
        # a body of the request being run, whose answer has not begun (nor is another's due)
        own_body = (self._in_body and not self.pipeline and self.cycle is not None
                    and not self.cycle.response_started)
        if idle or own_body:
            # (else the bytes would land inside, or before, an answer: only close)
            self.transport.write(raw_error(error, self.server_state.default_headers))
            if own_body:  # the app hears "client gone": the log and metrics, what was sent
                note = self.cycle.scope.setdefault("state", {})
                note.update(error_code=error.code, refused_status=error.status)
        self.transport.close()


def _cancel(timer: asyncio.TimerHandle | None) -> None:
    if timer is not None:
        timer.cancel()


def _head_too_large() -> InvalidRequest:
    return InvalidRequest(f"The request line and headers (or a chunked body's sizes and "
                          f"trailers) exceed {MAX_HEAD_BYTES // 1024} KB.",
                          status=431, code="headers_too_large")


def protocol_class(head_timeout: float,
                   max_connections: int | None = None) -> type[GatewayHttpProtocol]:
    """uvicorn builds protocols itself (`Config(http=...)`), so settings travel on a subclass."""
    return type("GatewayHttpProtocol", (GatewayHttpProtocol,),
                {"head_timeout": head_timeout, "max_connections": max_connections})
