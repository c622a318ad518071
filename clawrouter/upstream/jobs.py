"""Slow jobs: BlockRun answers 202 with a `poll_url`; we poll it with the same payment header.

On Base the payment settles on the first completed poll, so giving up (deadline, client gone)
costs nothing. When every client has left, polling pauses for `REJOIN_SECONDS` before it
gives up: the OpenAI SDK resends a request that outlived its own timeout half a second later,
and that resend joins the job (`coalesce`) instead of finding it abandoned. Nothing is polled
meanwhile, so nothing can settle for a client that is not there. Giving up costs nothing —
unless a poll's answer was lost (a timeout, a dropped connection, a resent poll, a 5xx, a 200
without a status) or a poll was told the authorization is already used: that poll, or another,
may have completed the job and settled, so the payment is then left pending for the chain to
tell. Polls never sign anything new. A settlement receipt (`errors.settlement`) on the
accepted 202 or on any poll is a payment that settled, whatever follows: a later failure,
the deadline, or a client that left is then reported as settled with its transaction, and a
completed poll without a receipt keeps that transaction.

A request that asked to keep its paid job (`context.KEEP_PAID_JOB`: `clawrouter mcp`, whose
agent's timeout cancels a call long before a slow model is done, and which retries it) is
polled to its deadline whether or not a client is there: its result is kept for that retry
(`coalesce` keeps a result whose clients all left for its window). Before the payment, nothing
differs: its client leaving still stops it at no cost.

A poll ends on what the job says, not on the HTTP status, as BlockRun's SDKs do
(blockrun-llm `jobs.py`): done on `status: "completed"` (or images with no status), failed on
`status: "failed"` at any HTTP status, and a 200 that brings images ends it whatever its status
says; a 200 with another status and no images is still running.
"""

from __future__ import annotations

import asyncio
import time

from clawrouter.catalog import format_usd
from clawrouter.context import RequestContext
from clawrouter.errors import (ClawError, ClientGone, PaidRequestFailed, UpstreamError,
                               UpstreamTimeout)
from clawrouter.upstream.client import NEVER_SENT, BlockRunClient, TransportError, UpstreamResponse
from clawrouter.upstream.errors import (already_used, paid_error, settled_failure, settlement,
                                        shown, unpaid_error, upstream_message)
from clawrouter.upstream.results import holds_an_image

TRANSIENT = {202, 408, 425, 429, 500, 502, 503, 504}
#: answers after which the poll may have completed (and settled) the job upstream
UNCERTAIN = {500, 502, 503, 504}
#: the last poll comes this long before the authorization expires: settling it takes a block
#: stamped before validBefore (Base: one every 2 s)
SETTLE_SECONDS = 2
#: how long polling waits, once every client has left, for one to join again (the SDK's
#: retries come 0.4–0.5 s after its timeout, then 0.75–1 s after the next)
REJOIN_SECONDS = 5.0


class JobAbandoned(ClientGone):
    """The client left during polling after a poll's answer was lost (`str()` says which):
    the payment may have settled."""


async def wait_for_job(client: BlockRunClient, accepted: UpstreamResponse,
                       headers: dict[str, str], ctx: RequestContext, *, amount: int,
                       delay: float, interval: float, deadline: float,
                       expires: int | None = None) -> tuple[UpstreamResponse, str | None]:
    """Poll until the job completes; return the completed 200 response, and the transaction
    of the first settlement receipt seen on the way (the 202 or any poll), if any.

    Polling stops after `deadline` seconds, or `SETTLE_SECONDS` before `expires` (the
    payment's validBefore, unix time) when that comes first: no later poll could settle it.
    `amount` 0: the upstream started the job without asking for payment (`_unpaid_ending`).
    """
    job = accepted.json() or {}
    poll_url = job.get("poll_url") if isinstance(job, dict) else None
    if not isinstance(poll_url, str) or not poll_url:
        if not amount:
            raise _unpaid_ending("Upstream error: it accepted the job (HTTP 202) without a "
                                 "poll_url to fetch its image from.", status=502,
                                 code="upstream_error")
        raise paid_error(accepted, amount, detail="202 without a poll_url")
    # the first receipt proving settlement: only for a payment we sent (`headers`)
    settled = settlement(accepted) if headers else None
    try:
        url = client.poll_url(poll_url)
    except UpstreamError as refused:  # (another origin: never polled with our header)
        if settled:
            raise settled_failure(refused.message, amount, settled, code=refused.code) from None
        raise
    valid_for = deadline if expires is None else expires - time.time() - SETTLE_SECONDS
    expiring = valid_for < deadline
    give_up = time.monotonic() + min(deadline, valid_for)
    await _between_polls(ctx, delay, give_up, lost=None, settled=settled)
    polls = 0
    lost: str | None = None  # the first poll whose answer was lost, if any
    while True:
        polls += 1
        try:  # never past the deadline by more than a poll's settling
            resp = await client.get(url, headers, timeout=max(1.0, min(
                client.timeout, give_up - time.monotonic() + SETTLE_SECONDS)))
        except TransportError as exc:
            resp = None  # a poll hiccup; the job is still running upstream
            if exc.kind not in NEVER_SENT and lost is None:  # sent: it may have completed it
                lost = f"poll {polls}: {exc.detail}"
        if resp is not None and resp.resent and lost is None:
            # The first attempt was sent before its connection dropped: it may have completed
            # the job and settled, so the resend's "not settled" (a used authorization) or
            # "failed" does not say nothing was paid.
            lost = f"poll {polls}: its connection dropped after it was sent, and it was resent"
        if resp is not None:
            settled = settled or (settlement(resp) if headers else None)
            body = resp.json()
            status = body.get("status") if isinstance(body, dict) else None
            if status == "failed" and resp.status != 402:  # whatever the HTTP status says
                reason = shown(body.get("error") or "the job failed")  # may quote our header
                raise _job_failed(f"The upstream job failed: {reason}.", amount, settled, lost)
            if resp.status == 200:
                # images end it, whatever its status says; it is judged by them from here
                if status == "completed" or holds_an_image(body):
                    return resp, settled
                if not isinstance(status, str) and lost is None:
                    # Neither a status nor images: not the completed job we know, yet a 200
                    # that may have been it (and settled). Polled on, it stays pending.
                    lost = f"poll {polls}: HTTP 200 without a job status"
            elif resp.status == 402:  # settlement failed: nothing was charged by this poll
                if not amount:  # (a job the upstream started unasked: nothing to settle)
                    raise unpaid_error(resp)
                error = paid_error(resp, amount, transaction=settled)
                if error.extra["payment"] == "settled":  # unless a receipt says otherwise
                    raise error
                error.extra["payment"] = "not_settled"
                what = f"The upstream did not settle the job: {upstream_message(resp)[0]}."
                if already_used(resp) and lost is None:  # spent: by whom, the chain will say
                    lost = f"poll {polls}: the upstream says the authorization was already used"
                raise _settled_unless_lost(error, what, amount, lost)
            elif resp.status not in TRANSIENT:
                raise (paid_error(resp, amount, transaction=settled) if amount else
                       unpaid_error(resp))
            elif resp.status in UNCERTAIN and lost is None:
                lost = f"poll {polls}: HTTP {resp.status}"
        remaining = give_up - time.monotonic()
        if remaining <= 0:
            raise _timed_out(deadline, amount, lost, expiring, settled)
        await _between_polls(ctx, min(interval, remaining), give_up, lost=lost, settled=settled)


async def _between_polls(ctx: RequestContext, seconds: float, give_up: float, *,
                         lost: str | None, settled: str | None) -> None:
    """`_pause`. Once a receipt said the payment `settled`, clients' leaving does not stop
    polling: polling on costs nothing more, and stopping would throw away an image that was
    paid for (kept, it is a repeat's: `coalesce`). Else, when every client has left, stop as
    what is known of the payment says: perhaps settled (`JobAbandoned`: a poll's answer was
    `lost`), or not (`ClientGone`)."""
    try:
        await _pause(ctx, seconds, give_up, keep=settled is not None)
    except ClientGone:
        if lost:
            raise JobAbandoned(lost) from None
        raise


async def _pause(ctx: RequestContext, seconds: float, give_up: float, *,
                 keep: bool = False) -> None:
    """Sleep between polls; `ClientGone` once every client has left and none has joined
    again within `REJOIN_SECONDS` (never past `give_up`, monotonic time), unless the job is
    to be kept (`keep`, or a request sharing it asked to keep its paid job, even one that
    joined during this sleep and left again): then its clients' leaving does not matter."""
    if keep or ctx.keep_paid_job:
        await asyncio.sleep(seconds)
        return
    until = time.monotonic() + seconds
    try:
        await ctx.sleep(seconds)
    except ClientGone:
        if ctx.keep_paid_job:  # joined (`coalesce`) since this sleep began
            await asyncio.sleep(max(0.0, until - time.monotonic()))
            return
        if not await ctx.rejoined(min(REJOIN_SECONDS, max(0.0, give_up - time.monotonic()))):
            raise


def _unpaid_ending(what: str, *, status: int, code: str,
                   headers: dict[str, str] | None = None) -> UpstreamError:
    """How a job the upstream started without asking for payment ends without its image:
    nothing was signed, so nothing can have settled, whatever poll answer was lost. Told as a
    paid failure, `coalesce` would keep it, and a retry would get it instead of running again."""
    return UpstreamError(f"{what} Nothing was paid (the upstream asked for no payment).",
                         status=status, code=code, headers=headers, extra={"payment": "none"})


def _job_failed(what: str, amount: int, settled: str | None,
                lost: str | None) -> ClawError:
    """The job says it failed: nothing was asked for (unpaid), a receipt says it was
    charged (`settled`), a lost poll answer leaves it open (`lost`), or nothing settled."""
    if not amount:
        return _unpaid_ending(what, status=502, code="job_failed")
    if settled:  # a receipt, now or before, says it was charged
        return settled_failure(what, amount, settled, code="job_failed")
    return _settled_unless_lost(PaidRequestFailed(
        f"{what} No payment was settled (BlockRun settles only completed jobs).",
        status=502, code="job_failed", extra={"payment": "not_settled"}), what, amount, lost)


def _settled_unless_lost(error: PaidRequestFailed, what: str, amount: int,
                         lost: str | None) -> PaidRequestFailed:
    """`error` says nothing was settled; after a lost poll answer that is not known: that poll
    may have completed the job and settled (a later poll then fails or finds the
    authorization used), so the payment stays pending for the chain to tell."""
    if lost is None:
        return error
    return PaidRequestFailed(
        f"{what} But the answer to an earlier poll was lost ({lost}), "
        f"and that poll may have completed the job: the payment of {format_usd(amount)} may "
        "have settled. It is pending until the chain tells (`clawrouter stats`). Not retried, "
        "so nothing is paid twice.", status=error.status, code=error.code, param=error.param,
        headers=error.headers, extra={"payment": "signed", "lost_poll": lost})


def _timed_out(deadline: float, amount: int, lost: str | None, expired: bool,
               settled: str | None) -> ClawError:
    """Polling gave up: nothing was asked for (`amount` 0), nothing settled, it may have (a
    `lost` poll answer), or a receipt already said it did (`settled`, its transaction). Never
    retried by the SDK: a retry would wait out a whole deadline again."""
    stopped = ("The payment's authorization was about to expire before the image was ready, "
               "so polling stopped" if expired else
               f"The image was not ready after {deadline:.0f} s, so polling stopped")
    if not amount:
        return _unpaid_ending(f"{stopped}.", status=504, code="upstream_timeout",
                              headers={"x-should-retry": "false"})
    if settled:
        return settled_failure(f"{stopped}.", amount, settled, code="upstream_timeout")
    stopped += ": no later poll could settle it." if expired else "."
    if lost is None:
        return UpstreamTimeout(
            f"{stopped} No payment was settled (BlockRun settles only when a poll completes).",
            extra={"payment": "not_settled"}, headers={"x-should-retry": "false"})
    return UpstreamTimeout(
        f"{stopped} The answer to one poll was lost ({lost}), and that poll may have "
        f"completed the job: the payment of {format_usd(amount)} may have settled. It is "
        "pending until the chain tells (`clawrouter stats`). Not retried, so nothing is paid "
        "twice.", extra={"payment": "signed", "lost_poll": lost},
        headers={"x-should-retry": "false"})
