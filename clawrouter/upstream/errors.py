"""Turn an upstream failure into the error a client sees.

BlockRun answers errors in three shapes (nested OpenAI, flat `{"error": "…"}`, and
`{error, message, hint}`); we keep the message, never its `debug` field, and say plainly
whether a payment had been signed.
"""

from __future__ import annotations

from typing import Any

from clawrouter.catalog import format_usd
from clawrouter.errors import ClawError, PaidRequestFailed, UpstreamError
from clawrouter.plaintext import one_line
from clawrouter.upstream.client import UpstreamResponse

KEPT_HEADERS = ("retry-after", "retry-after-ms")


def upstream_message(resp: UpstreamResponse) -> tuple[str, str | None, str | None]:
    """(message, code, param) from any BlockRun error body, as plain bounded one-line text
    (`plaintext`): it reaches terminals, agents' contexts and the ledger's notes."""
    data: Any = resp.json()
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            msg = err.get("message") or data.get("message") or "upstream error"
            return one_line(msg, MESSAGE_MAX), _str(err.get("code")), _str(err.get("param"))
        parts = [p for p in (err, data.get("message"), data.get("details"), data.get("hint"))
                 if isinstance(p, str) and p]
        if parts:
            return (one_line(" — ".join(dict.fromkeys(parts)), MESSAGE_MAX),
                    _str(data.get("code")), None)
    text = one_line(resp.body[:300].decode("utf-8", "replace"), MESSAGE_MAX)
    return (text or f"upstream answered {resp.status}"), None, None


#: characters of an upstream's message we pass on; its codes and params are shorter still
MESSAGE_MAX, CODE_MAX = 500, 100


def _str(value: Any) -> str | None:
    return one_line(value, CODE_MAX) if value is not None else None


def _kept_headers(resp: UpstreamResponse) -> dict[str, str]:
    return {k: v for k, v in resp.headers.items() if k in KEPT_HEADERS}


def _passed_status(resp: UpstreamResponse) -> tuple[int, str | None]:
    """The status a client gets for the upstream's, and a code of our own if it is changed.
    A 401 or 403 is the upstream's word about *our* access to it (a wrong `upstream_url`, say):
    passed through, the OpenAI SDK would raise `AuthenticationError`, and the user would
    suspect this gateway's API key. It is a 502, like any upstream failure of ours."""
    if resp.status in (401, 403):
        return 502, "upstream_auth"
    return (resp.status, None) if 400 <= resp.status <= 599 else (502, None)


def _refused_access(resp: UpstreamResponse, message: str) -> str:
    return f"it refused this gateway's access (HTTP {resp.status}: {message})"


def unpaid_error(resp: UpstreamResponse) -> ClawError:
    """An upstream refusal before any payment: pass the status through."""
    message, code, param = upstream_message(resp)
    status, ours = _passed_status(resp)
    if ours:
        message = _refused_access(resp, message)
    return UpstreamError(f"Upstream error: {message}", status=status,
                         code=ours or code or "upstream_error", param=param,
                         headers=_kept_headers(resp), extra={"payment": "none"})


def paid_error(resp: UpstreamResponse | None, amount: int, *, transaction: str | None = None,
               detail: str | None = None) -> PaidRequestFailed:
    """A failure after a payment was signed and sent: say so, and forbid automatic retries."""
    if resp is not None:
        message, code, param = upstream_message(resp)
        status, ours = _passed_status(resp)
        if ours:
            code, message = ours, _refused_access(resp, message)
    else:
        message, code, param, status = detail or "the connection failed", None, None, 502
    paid = f"A payment of {format_usd(amount)} was signed and sent for this request"
    paid += f" (transaction {transaction})." if transaction else (
        "; no settlement receipt was received. BlockRun settles on Base only when the image is "
        "delivered, so it should not have been charged, but check `clawrouter stats`.")
    return PaidRequestFailed(
        f"Upstream failed after payment: {message}. {paid} Not retried, so nothing is paid twice.",
        status=status, code=code or "failed_after_payment", param=param,
        # no Retry-After: a client that honours it, and not `x-should-retry`, would pay again
        extra={"payment": "signed", "transaction": transaction})
