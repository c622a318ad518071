"""Turn an upstream failure into the error a client sees.

BlockRun answers errors in three shapes (nested OpenAI, flat `{"error": "…"}`, and
`{error, message, hint}`); we keep the message, never its `debug` field, and say plainly
whether a payment had been signed. Whatever the upstream says is `scrub`bed of the payment
we sent it: a message quoting our header would hand a settleable authorization to the
client, an agent's context and the ledger's readers.
"""

from __future__ import annotations

import re
from email.utils import parsedate_tz
from typing import Any

from clawrouter.catalog import format_usd
from clawrouter.errors import ClawError, PaidRequestFailed, UpstreamError
from clawrouter.payment.wire import read_receipt
from clawrouter.plaintext import one_line, scrub
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
            return shown(msg), _str(err.get("code")), _str(err.get("param"))
        parts = [p for p in (err, data.get("message"), data.get("details"), data.get("hint"))
                 if isinstance(p, str) and p]
        if parts:
            return shown(" — ".join(dict.fromkeys(parts))), _str(data.get("code")), None
    text = shown(resp.body[:300].decode("utf-8", "replace"))
    return (text or f"upstream answered {resp.status}"), None, None


def shown(value: Any, limit: int | None = None) -> str:
    """An upstream's words as we pass them on: scrubbed, then one bounded line."""
    return one_line(scrub(value), limit or MESSAGE_MAX)


#: characters of an upstream's message we pass on; its codes and params are shorter still
MESSAGE_MAX, CODE_MAX = 500, 100
#: characters of our account of a failure, which may quote one such message
DETAIL_MAX = 1500


def _str(value: Any) -> str | None:
    return shown(value, CODE_MAX) if value is not None else None


_SECONDS = re.compile(r"[0-9]{1,10}(\.[0-9]{1,6})?")


def _kept_headers(resp: UpstreamResponse) -> dict[str, str]:
    """The upstream's Retry-After headers, when they hold what they should (seconds, or an
    HTTP date for Retry-After): anything else is its text, which we do not pass on."""
    return {k: v for k, v in resp.headers.items() if k in KEPT_HEADERS and v.isascii() and (
        _SECONDS.fullmatch(v.strip()) or (k == "retry-after" and len(v) <= 40
                                          and parsedate_tz(v) is not None))}


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
    headers = _kept_headers(resp)
    if ours:
        message = _refused_access(resp, message)
        # a 502, which the OpenAI SDK would retry twice: the same access is refused again
        headers["x-should-retry"] = "false"
    return UpstreamError(f"Upstream error: {message}", status=status,
                         code=ours or code or "upstream_error", param=param,
                         headers=headers, extra={"payment": "none"})


def paid_error(resp: UpstreamResponse | None, amount: int, *, transaction: str | None = None,
               detail: str | None = None, may_have_settled: bool = False) -> PaidRequestFailed:
    """A failure after a payment was signed and sent: say so, and forbid automatic retries.
    `may_have_settled`: the upstream may have used the authorization (its answer was lost, or
    it says so), so the client must not read that it was not charged. `transaction`: it
    settled there, as a receipt on `resp` also says (`settled_failure`)."""
    if resp is not None:
        message, code, param = upstream_message(resp)
        status, ours = _passed_status(resp)
        if ours:
            code, message = ours, _refused_access(resp, message)
        transaction = transaction or settlement(resp)
    else:
        # `detail` may quote the upstream too (a job's error, a refusal)
        message = shown(detail, DETAIL_MAX) if detail else "the connection failed"
        code, param, status = None, None, 502
    if transaction:
        return settled_failure(f"Upstream failed after payment: {message}.", amount, transaction,
                               code=code, param=param)
    paid = f"A payment of {format_usd(amount)} was signed and sent for this request"
    paid += (
        "; no settlement receipt was received, and it may have settled. It is pending until "
        "the chain tells (`clawrouter stats`)." if may_have_settled else
        "; no settlement receipt was received. BlockRun settles on Base only when the image is "
        "delivered, so it should not have been charged, but check `clawrouter stats`.")
    return PaidRequestFailed(
        f"Upstream failed after payment: {message}. {paid} Not retried, so nothing is paid twice.",
        status=status, code=code or "failed_after_payment", param=param,
        # no Retry-After: a client that honours it, and not `x-should-retry`, would pay again
        extra={"payment": "signed", "transaction": None})


def settlement(resp: UpstreamResponse) -> str | None:
    """The transaction of a receipt on `resp` proving that the payment settled, if any: read
    on failures too, where the user's money moved whatever the answer says (x402.md §8)."""
    receipt = read_receipt(resp.headers)
    return receipt.transaction if receipt is not None and receipt.settled else None


def settled_failure(what: str, amount: int, transaction: str, *, code: str | None = None,
                    param: str | None = None) -> PaidRequestFailed:
    """A failure whose payment settled (`settlement`): the client is told it was charged, and
    the ledger records it `settled` with `transaction` (`extra`). A 502 whatever the upstream
    answered: a 402 would read as a payment still to make."""
    return PaidRequestFailed(
        f"{what} Yet the upstream's settlement receipt says the payment of "
        f"{format_usd(amount)} settled (transaction {transaction}): it was charged. Not "
        "retried, so nothing is paid twice.", code=code or "failed_after_payment", param=param,
        extra={"payment": "settled", "transaction": transaction})


def already_used(resp: UpstreamResponse) -> bool:
    """A 402 saying this authorization was already used (blockrun-api.md §6: code
    `PAYMENT_REPLAY`, or `recoverable`/`job_id` present): not a refusal to pay, and a sign
    that it may have settled."""
    body = resp.json()
    return isinstance(body, dict) and (
        body.get("code") == "PAYMENT_REPLAY" or bool(body.get("recoverable"))
        or body.get("job_id") is not None)


_SHORT = re.compile(r'"invalidReason"\s*:\s*"insufficient_funds"')


def unfunded(resp: UpstreamResponse) -> bool:
    """A 402 refusing a payment because the wallet is short (blockrun-api.md §6: code
    `PAYMENT_UNFUNDED`, flat or OpenAI-nested, or `insufficient_funds` as the reason, top
    level or in the VerifyResponse of `details`, quoted or as an object): a fresh payment
    from that wallet would be refused the same way."""
    body = resp.json()
    if not isinstance(body, dict):
        return False
    details = body.get("details")
    return (upstream_message(resp)[1] == "PAYMENT_UNFUNDED"
            or "insufficient_funds" in (body.get("reason"), body.get("invalidReason"))
            or (isinstance(details, str) and _SHORT.search(details) is not None)
            or (isinstance(details, dict) and details.get("invalidReason") == "insufficient_funds"))
