"""Every error a client can see, in one place.

Each error knows its HTTP status and its OpenAI envelope fields, and renders itself as
`{"error": {"message", "type", "param", "code"}}` with its headers (`ClawError.rendered`) for
every way an error leaves: FastAPI's handlers (`api/errors.py`), the middleware below them
(`api/middleware.py`), the image server (`store/server.py`) and the raw connection.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

Headers = list[tuple[bytes, bytes]]


class ClawError(Exception):
    """Base of every error the gateway reports to a client."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None
    #: False when a retry can never help, or could pay twice (sent as `x-should-retry`).
    retryable: ClassVar[bool | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        if status is not None:
            self.status = status  # type: ignore[misc]
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def envelope(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "message": self.message,
            "type": self.type,
            "param": self.param,
            "code": self.code,
        }
        body.update(self.extra)
        return {"error": body}

    def response_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.retryable is not None and "x-should-retry" not in headers:
            headers["x-should-retry"] = "true" if self.retryable else "false"
        return headers

    def rendered(self) -> tuple[bytes, Headers]:
        """The envelope as compact JSON escaped to ASCII (it may quote client text that is not
        valid UTF-8, a lone surrogate, and rendering it must never fail), and the headers it
        is sent with: content type and length, then the error's own, names as it gives them
        (the FastAPI and image paths lowercase them, as ASGI wants)."""
        body = json.dumps(self.envelope(), separators=(",", ":")).encode("ascii")
        headers = [(b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode())]
        headers += [(k.encode("latin-1"), v.encode("latin-1"))
                    for k, v in self.response_headers().items()]
        return body, headers


class InvalidRequest(ClawError):
    """The request cannot be served as sent; nothing was sent upstream, nothing was paid."""

    status = 400
    type = "invalid_request_error"
    default_code = "invalid_request"
    retryable = False


class BodyTooLarge(InvalidRequest):
    status = 413
    default_code = "body_too_large"


class ModelNotFound(InvalidRequest):
    status = 404
    default_code = "model_not_found"


class Unauthorized(ClawError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"
    retryable = False


class Forbidden(ClawError):
    status = 403
    type = "invalid_request_error"
    default_code = "forbidden"
    retryable = False


class RouteNotFound(ClawError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"
    retryable = False


class MethodNotAllowed(ClawError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"
    retryable = False


class Conflict(ClawError):
    status = 409
    type = "invalid_request_error"
    default_code = "idempotency_conflict"
    retryable = False


class PaymentRefused(ClawError):
    """The upstream asked for a payment that fails our checks; nothing was signed."""

    status = 402
    type = "payment_error"
    default_code = "payment_refused"
    retryable = False


class PaymentRejected(ClawError):
    """The upstream refused a payment we signed (e.g. insufficient funds); never re-signed."""

    status = 402
    type = "payment_error"
    default_code = "payment_rejected"
    retryable = False


class InsufficientFunds(ClawError):
    """The wallet is known to hold less than the payment asks; nothing was signed."""

    status = 402
    type = "payment_error"
    default_code = "insufficient_funds"
    retryable = False


class BudgetExceeded(ClawError):
    """Paying would break a configured budget; nothing was signed."""

    status = 402
    type = "payment_error"
    default_code = "budget_exceeded"
    retryable = False


class UpstreamError(ClawError):
    """The upstream refused or failed the request (its status passed through, if it gave
    one). Whether anything was paid is the raiser's to say (`extra["payment"]`): raised while
    a paid job is polled (a bad `poll_url`), the exchange turns it into `PaidRequestFailed`."""

    type = "upstream_error"
    default_code = "upstream_error"


class UpstreamUnavailable(ClawError):
    status = 502
    type = "upstream_error"
    default_code = "upstream_unreachable"


class UpstreamTimeout(ClawError):
    status = 504
    type = "upstream_error"
    default_code = "upstream_timeout"


class PaidRequestFailed(ClawError):
    """A payment was signed and sent, then the request failed.

    Never retryable: a retry would sign a second payment. The message says a payment was made.
    """

    status = 502
    type = "upstream_error"
    default_code = "failed_after_payment"
    retryable = False


class LedgerUnavailable(ClawError):
    """The payment ledger could not record a payment before it was sent (disk full, locked):
    nothing left the gateway, so a retry is safe and costs nothing more."""

    status = 503
    type = "server_error"
    default_code = "ledger_unavailable"
    retryable = True


class GatewayStopping(ClawError):
    """The gateway is stopping (Ctrl-C, SIGTERM) and signs no new payment: nothing was paid."""

    status = 503
    type = "server_error"
    default_code = "gateway_stopping"


class GatewayStopped(ClawError):
    """Stopping cut this request off before it ended; a payment it signed stays in the ledger,
    and a retry after the restart is refused rather than paid twice."""

    status = 503
    type = "server_error"
    default_code = "gateway_stopped"


class ClientGone(Exception):
    """The client disconnected; stop work that costs money. Never shown to anyone."""


def internal_error(request_id: str, **kwargs: Any) -> ClawError:
    """What a client is told about a bug: the request id to find it in the log, nothing more."""
    return ClawError(f"Internal error in the gateway (request {request_id}). It has been "
                     "logged.", code="internal_error", **kwargs)


def forget_frames(error: BaseException) -> None:
    """Drop the tracebacks of an expected error (a `ClawError`, `ClientGone`) and of the errors
    it chains.

    They reach every frame of its request, whose locals hold the upstream body and the images,
    and an error outlives its request: in a reference cycle until the garbage collector runs
    (seconds or minutes), or kept by the coalescer for repeats (up to a day). Nobody prints an
    expected error's traceback; a bug keeps its own for the log. (Frames are not cleared: one
    error object can be shared by several requests, such as a failed group commit's, and
    clearing a frame suspended elsewhere would close that request's coroutine.)
    """
    if not isinstance(error, (ClawError, ClientGone)):
        return
    pending: list[BaseException | None] = [error]
    seen: set[int] = set()
    while pending:
        exc = pending.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        exc.__traceback__ = None
        pending += [exc.__cause__, exc.__context__]
