"""Pay and forward: one upstream call with at most one accepted payment.

unpaid request → 402 challenge → policy check → reserve budget → sign → record in the ledger →
paid request → (202 → poll) → result. With a learned price the unpaid probe is skipped; if the
upstream rejects that pre-authorised payment, one clean probe and one fresh payment follow,
unless no fresh one could fare better (the wallet is short); a refusal the new price does not
explain (the same amount asked again), or a second refusal (of a price learned after the first)
with no pre-authorised payment accepted in between (whatever the amounts: a quote that moves
each time), stops pre-auth for that request shape for a while (`PriceBook.refused`), so an
upstream that refuses pre-authorised payments costs a second signature once, not every time.
A paid attempt that fails any other way is reported, never re-signed: signing is settlement.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from clawrouter.catalog import (
    ImageModel, ceiling_micro, estimate_micro, format_usd, limit_micro, to_usd,
)
from clawrouter.config import Settings
from clawrouter.context import RequestContext
from clawrouter.errors import (
    ClawError, ClientGone, InsufficientFunds, LedgerUnavailable, PaidRequestFailed,
    PaymentRefused, PaymentRejected, UpstreamTimeout, UpstreamUnavailable,
)
from clawrouter.payment import policy
from clawrouter.payment.balance import BalanceMonitor
from clawrouter.payment.budget import Budget
from clawrouter.payment.ledger import NEVER_SENT, Ledger
from clawrouter.payment.networks import Network
from clawrouter.payment.prices import PriceBook, PriceKey
from clawrouter.payment.signer import SignedPayment, Signer
from clawrouter.payment.wire import Challenge, ChallengeError, Requirement, parse_challenge
from clawrouter.plaintext import scrub, withhold
from clawrouter.upstream.client import NEVER_SENT as TRANSPORT_NEVER_SENT
from clawrouter.upstream.client import BlockRunClient, TransportError, UpstreamResponse
from clawrouter.upstream.errors import (already_used, paid_error, settlement, shown, unfunded,
                                        unpaid_error, upstream_message)
from clawrouter.upstream.jobs import JobAbandoned, wait_for_job

log = logging.getLogger(__name__)

#: seconds a slow model's authorization outlives the poll deadline: the paid POST before the
#: first poll and the settlement after the last one
SETTLE_MARGIN_SECONDS = 60
#: how long pre-auth waits, for one request shape, after its pre-authorised payment was refused
#: at the very price the upstream then asked again (so not for a price change), or a price
#: learned after such a refusal was refused too, with none accepted in between
PREAUTH_HOLD_OFF_SECONDS = 600.0

#: writes a signed payment's outcome to the ledger: (status, note, tx, sent=True); never raises
_Finish = Callable[..., Awaitable[None]]


@dataclass
class UpstreamCall:
    route: str  # "/v1/images/generations" or "/v1/images/image2image"
    body: bytes  # the exact JSON we forward (an allowlist of fields, never the client's body)
    model: ImageModel
    size: str
    n: int
    #: what else may change the price: the quality forwarded, the input images and the mask
    variant: tuple[str | None, int, bool] = (None, 0, False)
    #: called once the body is sent for good (`accepted`)
    on_accepted: Callable[[], None] = field(default=lambda: None, repr=False)

    @property
    def price_key(self) -> PriceKey:
        return (self.route, self.model.id, self.size, self.n, *self.variant)

    def accepted(self) -> None:
        """The upstream took the job (202): nothing is sent again, so the body (megabytes for
        an edit) need not live through the polling, nor hold its inputs' share of memory."""
        self.body = b""
        self.on_accepted()


@dataclass
class Outcome:
    response: UpstreamResponse  # the final 200
    amount: int  # micro-USDC signed (0 when the upstream asked for nothing)
    transaction: str | None
    body: Any  # the response's JSON (None if it is not JSON), parsed once
    #: writes the payment's outcome to the ledger (status, note, transaction); None if unpaid
    finish: Callable[[str, str | None, str | None], Awaitable[None]] | None = None
    _recording: asyncio.Future[None] | None = None

    def judged(self, delivered: bool) -> None:
        """Start the ledger's write of the outcome, once the caller knows whether the answer
        `delivered` an image; it runs while the caller stores the images (the signed row is
        already durable, so nothing can be lost, and the fsync leaves the critical path).
        Settled if it delivered or a receipt proved its transaction; otherwise the upstream
        failed and may not have settled: pending (`failed_after_payment`) until the chain
        says. A task, so it completes even if the request is cancelled meanwhile."""
        if self.finish is None or self._recording is not None:
            return
        if delivered or self.transaction:
            write = self.finish("settled", None, self.transaction)
        else:
            write = self.finish("failed_after_payment",
                                "the upstream's 200 answer held no usable image", None)
        self._recording = asyncio.ensure_future(write)

    async def settled(self) -> None:
        """Wait until the ledger has the outcome (a no-op for unpaid calls; idempotent). A
        caller that failed before judging the answer found no image in it."""
        self.judged(False)
        if self._recording is not None:
            await asyncio.shield(self._recording)  # a cancelled caller must not cancel the write


def _unsent(exc: TransportError, what: str) -> UpstreamUnavailable:
    """A request that never left: unreachable (502), or every pooled connection busy (503, a
    moment later may do)."""
    if exc.kind == "busy":
        return UpstreamUnavailable(f"The gateway is busy: {exc.detail}. Nothing was paid: {what}.",
                                   status=503, code="upstream_busy",
                                   headers={"Retry-After": "5"}, extra={"payment": "none"})
    return UpstreamUnavailable(f"Upstream unreachable: {exc.detail}. Nothing was paid: {what}.",
                               extra={"payment": "none"})


def _abandoned(amount: int, window: float) -> PaidRequestFailed:
    return PaidRequestFailed(
        f"An identical request paid {format_usd(amount)} for a slow job, then left (it "
        "disconnected, timed out or was interrupted) while the job was in progress, so the "
        "gateway stopped polling it. BlockRun settles a slow job only when its result is "
        "fetched, so that payment should not settle (`clawrouter stats` shows it). Not paid "
        f"again: identical requests get this answer for {window:g} s (a day with the same "
        "Idempotency-Key). To make the image, send the request after that, and wait for it: "
        "the gateway polls a slow job for up to poll_deadline (5 minutes by default).",
        status=409, code="job_abandoned", extra={"payment": "not_settled"})


class _PreauthRejected(Exception):
    """The upstream refused a payment signed from a learned price: probe afresh, once."""

    def __init__(self, amount: int, reason: str) -> None:
        super().__init__(reason)
        self.amount, self.reason = amount, reason


def _after_refusal(error: ClawError, refused: _PreauthRejected) -> ClawError:
    """`error` ended a request after its pre-authorized payment was refused: that payment is
    part of its story (it holds budget, and the request's Idempotency-Key has spent it), so
    the client must not read "nothing was paid, retry"."""
    error.message += (
        f" Before that, the upstream refused this request's pre-authorized payment of "
        f"{format_usd(refused.amount)} ({refused.reason}); it should not settle, but it is "
        "held against the budgets until it expires. Not signed again: an identical request "
        "gets this answer for the coalescing window (a day with the same Idempotency-Key); "
        "change the request, or wait, to try again.")
    error.extra["payment"] = "rejected"
    error.headers["x-should-retry"] = "false"
    for name in [n for n in error.headers if n.lower() in ("retry-after", "retry-after-ms")]:
        del error.headers[name]  # a retry gets this answer, not another try
    return error


class Exchange:
    def __init__(self, client: BlockRunClient, signer: Signer, settings: Settings,
                 network: Network, ledger: Ledger, budget: Budget, prices: PriceBook, *,
                 balance: BalanceMonitor | None = None,
                 on_payment: Callable[[str, int, str], None] | None = None) -> None:
        self.client = client
        self.signer = signer
        self.settings = settings
        self.network = network
        self.ledger = ledger
        self.budget = budget
        self.prices = prices
        self.balance = balance  # refuses what the wallet is known not to hold (`_check_funds`)
        self.on_payment = on_payment  # (outcome, amount, model) for metrics

    async def run(self, call: UpstreamCall, ctx: RequestContext) -> Outcome:
        ctx.check()
        self.budget.check_request(estimate_micro(call.model, call.size, call.n))
        known = self.prices.get(call.price_key) if self.settings.preauth else None
        if known is None:
            return await self._probe_and_pay(call, ctx, attempt=1)
        try:
            return await self._pay(call, ctx, known.challenge, attempt=1, preauth=True)
        except _PreauthRejected as refused:
            self.prices.refused(call.price_key, known, hold_off=PREAUTH_HOLD_OFF_SECONDS)
            try:
                return await self._probe_and_pay(call, ctx, attempt=2, refused=refused.amount)
            except ClawError as exc:
                if exc.extra.get("payment") in (None, "none"):
                    raise _after_refusal(exc, refused) from None
                raise

    async def _probe_and_pay(self, call: UpstreamCall, ctx: RequestContext, *,
                             attempt: int, refused: int | None = None) -> Outcome:
        """`refused`: the amount of this request's pre-authorised payment the upstream just
        refused, if any."""
        probe = await self._send_unpaid(call)
        if probe.status in (200, 202):  # the upstream asked for nothing
            return await self._complete(call, probe, None, ctx)
        if probe.status != 402:
            raise unpaid_error(probe)
        challenge = self._read_challenge(probe)
        return await self._pay(call, ctx, challenge, attempt=attempt, preauth=False,
                               refused=refused)

    async def _send_unpaid(self, call: UpstreamCall) -> UpstreamResponse:
        try:
            return await self.client.post(call.route, call.body)
        except TransportError as exc:
            if exc.kind == "timeout":
                raise UpstreamTimeout(f"Upstream timed out: {exc.detail}. Nothing was paid.",
                                      extra={"payment": "none"}) from None
            if exc.kind == "too_large":
                raise UpstreamUnavailable(f"Upstream answer refused: {exc.detail}. Nothing was "
                                          "paid.", code="upstream_answer_too_large",
                                          extra={"payment": "none"}) from None
            if exc.kind in TRANSPORT_NEVER_SENT:
                raise _unsent(exc, "the request never left this machine") from None
            raise UpstreamUnavailable(f"Upstream unreachable: {exc.detail}. Nothing was paid "
                                      "(no payment was signed).",
                                      extra={"payment": "none"}) from None

    @staticmethod
    def _read_challenge(probe: UpstreamResponse) -> Challenge:
        try:
            return parse_challenge(probe.headers, probe.body)
        except ChallengeError as exc:
            raise PaymentRefused(f"Payment refused, nothing was signed: the upstream's 402 "
                                 f"challenge is unreadable ({shown(exc)}).",
                                 extra={"check": "challenge"}) from None

    def _select(self, call: UpstreamCall, challenge: Challenge) -> Requirement:
        try:
            return policy.select(
                challenge, network=self.network, pay_to=self.settings.pay_to,
                ceiling=ceiling_micro(call.model, call.size, call.n,
                                      self.settings.price_tolerance),
                cap=limit_micro(self.settings.max_usd_per_request),
                max_timeout=self.settings.max_timeout_seconds)
        except PaymentRefused as refused:  # it quotes the challenge, which may quote our header
            refused.message = scrub(refused.message)
            refused.args = (refused.message,)  # what str() and a traceback show
            raise

    async def _pay(self, call: UpstreamCall, ctx: RequestContext, challenge: Challenge, *,
                   attempt: int, preauth: bool, refused: int | None = None) -> Outcome:
        """Sign one payment for `challenge`, send the request with it, and see it through, in
        this order. Once the payment is recorded, every failure writes its outcome (`finish`)
        before it is raised; a success hands `finish` to the caller (`Outcome.judged`)."""
        requirement = self._requirement(call, challenge)
        payment, payment_id = await self._sign_and_record(call, ctx, challenge, requirement,
                                                          attempt=attempt)
        finish = self._finisher(call, payment, payment_id)
        resp = await self._send_paid(call, ctx, payment, finish)
        resp = await self._judge_paid(resp, payment, finish, preauth=preauth)
        outcome = await self._complete_paid(call, resp, payment, payment_id, ctx, finish)
        if preauth:
            self.prices.accepted(call.price_key)
        elif refused == payment.amount:  # refused for something other than the price
            self.prices.forget(call.price_key, hold_off=PREAUTH_HOLD_OFF_SECONDS)
        elif self.settings.preauth:
            self.prices.learn(call.price_key, challenge)
        return replace(outcome, finish=finish)

    def _requirement(self, call: UpstreamCall, challenge: Challenge) -> Requirement:
        """The option to sign, checked against policy (learned prices are re-checked too),
        with its validity widened for a slow job, which settles only on its completing poll."""
        requirement = self._select(call, challenge)
        # A slow job settles on the completing poll: sign for the poll window, where `accepted`
        # can tell the upstream so (v2; a v1 payment carries only the authorization).
        if call.model.slow and challenge.version >= 2:
            cap = self.settings.max_timeout_seconds
            window = min(float(cap), self.settings.poll_deadline + SETTLE_MARGIN_SECONDS)
            requirement = policy.outliving(requirement, math.ceil(window), cap)
        return requirement

    async def _sign_and_record(self, call: UpstreamCall, ctx: RequestContext,
                               challenge: Challenge, requirement: Requirement, *,
                               attempt: int) -> tuple[SignedPayment, int]:
        """Check funds, reserve the budget, sign, and make the signed payment durable in the
        ledger (returning its row id) before anything can send it: a payment with no record
        never leaves."""
        await self._check_funds(int(requirement.amount))
        with self.budget.reserve(int(requirement.amount)) as reservation:
            ctx.check()  # the last exit before money: a client that left pays nothing
            payment = self.signer.pay(challenge, requirement, self.network,
                                      self.client.url(call.route))
            withhold(payment.header)  # no upstream text this request passes on may quote it
            try:
                payment_id = await self.ledger.write(self.ledger.signed(
                    request_id=ctx.request_id, route=call.route, model=call.model.id,
                    size=call.size, n=call.n, amount=payment.amount, payee=payment.pay_to,
                    network=payment.network, nonce=payment.nonce, attempt=attempt,
                    payer=self.signer.address, valid_before=payment.valid_before,
                    idempotency=ctx.idempotency, reservation=reservation))
            # No durable record (as far as SQLite can tell: a failed fsync may still leave the
            # row in the WAL, read back as `unknown` after a crash, for reconcile to settle),
            # so the payment never leaves.
            except (sqlite3.Error, OSError) as exc:
                log.error("the ledger could not record a payment, so it was not sent: %s", exc)
                raise LedgerUnavailable(
                    f"Nothing was paid: the payment ledger ({self.ledger.path}) could not "
                    f"record the payment, so it was not sent ({exc}). Free disk space or stop "
                    "what holds the ledger, then retry.", headers={"Retry-After": "5"},
                    extra={"payment": "none"}) from None
        return payment, payment_id

    def _finisher(self, call: UpstreamCall, payment: SignedPayment,
                  payment_id: int) -> _Finish:
        """`finish(status, note, tx, sent=True)`: writes the outcome of the payment in row
        `payment_id` to the ledger, timed from now (just after it was recorded)."""
        started = time.perf_counter()

        async def finish(status: str, note: str | None = None, tx: str | None = None,
                         sent: bool = True) -> None:
            # Never raises: the signed row is already durable, and a failure to add the outcome
            # (disk full) must not replace what the client is told about its payment — a bare
            # 500 there gets retried by the SDK into another payment.
            try:
                await self.ledger.write(self.ledger.outcome(
                    payment_id, status, transaction=tx, note=note, can_settle=sent,
                    latency_ms=(time.perf_counter() - started) * 1000))
            except Exception:
                log.exception("payment %d: could not record its outcome (%s); the row stays "
                              "'signed' and reads as unknown after a restart", payment_id, status)
                return  # counted when reconcile records it, not twice
            if self.on_payment:
                self.on_payment(status, payment.amount, call.model.id)

        return finish

    async def _send_paid(self, call: UpstreamCall, ctx: RequestContext, payment: SignedPayment,
                         finish: _Finish) -> UpstreamResponse:
        """Send the request with the payment, unless its client already left; a transport
        failure is told apart by whether the authorization may have left this machine."""
        if ctx.gone.is_set():  # left while the ledger was written: the authorization stays here
            await finish("rejected", f"{NEVER_SENT}: the client left before the paid request",
                         sent=False)
            raise ClientGone()
        try:
            # Answered or not, the payment can settle until validBefore: waiting less, the
            # gateway could hang up on an image that is then paid for.
            return await self.client.post(
                call.route, call.body, payment.headers,
                timeout=max(self.client.timeout, payment.valid_before - time.time()))
        except TransportError as exc:
            if exc.kind in TRANSPORT_NEVER_SENT:  # the authorization never left this machine
                await finish("rejected", f"{NEVER_SENT}: {exc.detail}", sent=False)
                raise _unsent(exc, "the signed payment never left this machine") from None
            await finish("failed_after_payment", f"{exc.kind}: {exc.detail}")
            # sent, and its answer lost or cut short: the upstream may have settled it
            raise paid_error(None, payment.amount, detail=exc.detail,
                             may_have_settled=True) from None

    @staticmethod
    async def _judge_paid(resp: UpstreamResponse, payment: SignedPayment,
                          finish: _Finish, *,
                          preauth: bool) -> UpstreamResponse:
        """Sort a 402 to the paid request into its cases: a job this authorization already
        started (poll it), one whose receipt says it settled (charged, never signed again), a
        payment used already (may have settled), and a refusal (a pre-authorised one probes
        afresh, once). Any other answer passes through."""
        if resp.status == 402 and _started_job(resp):
            # The authorization was already used, by the job this answer names (our first
            # attempt, whose connection dropped): poll that job, with the same header.
            return replace(resp, status=202)
        if resp.status == 402 and (transaction := settlement(resp)):
            message, code, _ = upstream_message(resp)
            await finish("settled", f"the upstream failed after settling: {code or message}",
                         transaction)
            raise paid_error(resp, payment.amount, transaction=transaction)
        if resp.status == 402 and (resp.resent or already_used(resp)):
            # Used already (the first attempt's connection dropped and the resend was refused,
            # or the upstream says so): the upstream may well have settled it. Never re-signed.
            message, code, _ = upstream_message(resp)
            await finish("failed_after_payment", f"response lost; resend refused: {message}"
                         if resp.resent else f"authorization already used: {message}")
            raise paid_error(None, payment.amount, detail=(
                "the upstream refused this payment as already used "
                + ("(the connection dropped after it was sent, and the identical resend was "
                   "refused) " if resp.resent else "") + f"({code or message})"),
                may_have_settled=True)
        if resp.status == 402:
            message, code, _ = upstream_message(resp)
            await finish("rejected", f"{code or ''} {message}".strip())
            if preauth and not unfunded(resp):  # a fresh one would be refused alike
                raise _PreauthRejected(payment.amount, code or message)
            raise PaymentRejected(
                f"The upstream rejected the payment of {policy.usd(payment.amount)}: {message}. "
                "It was not re-signed.", extra={"upstream_code": code, "payment": "rejected"})
        return resp

    async def _complete_paid(self, call: UpstreamCall, resp: UpstreamResponse,
                             payment: SignedPayment, payment_id: int, ctx: RequestContext,
                             finish: _Finish) -> Outcome:
        """Poll and read the paid answer; any failure is told as one after a payment, with
        the outcome written first, so nothing invites a retry that would pay again."""
        try:
            return await self._complete(call, resp, payment, ctx)
        except JobAbandoned as exc:
            await finish("failed_after_payment", f"the client left during polling after {exc}")
            # Its client is gone, but a repeat of the request joining it must learn that a
            # payment may have settled, not start another one.
            raise paid_error(None, payment.amount, detail=(
                f"the client left during polling, after the answer to {exc} was lost"),
                may_have_settled=True) from None
        except ClientGone:
            # BlockRun settles a 202 job on the completed poll, which now never comes.
            await finish("rejected", "not settled: the client left during polling")
            # Nobody hears this but a repeat: the SDK resends a request that timed out on its
            # side, and must learn of this job (`coalesce` keeps paid outcomes), not pay anew.
            raise _abandoned(payment.amount, self.settings.coalesce_window_seconds) from None
        except ClawError as exc:
            await _finish_failure(exc, finish)
            if exc.extra.get("payment") in (None, "none"):  # not written for a paid request
                raise paid_error(None, payment.amount, detail=exc.message) from exc
            raise
        except Exception as exc:
            # A bug must not become a bare, retryable 500 once money left: the SDK would
            # retry it into a second payment.
            log.exception("payment %d: the gateway failed after the payment was sent",
                          payment_id)
            await finish("failed_after_payment", f"gateway error: {type(exc).__name__}")
            raise paid_error(None, payment.amount,
                             detail="the gateway failed on the upstream's answer") from exc

    async def _check_funds(self, amount: int) -> None:
        """Refuse, before signing, a payment the wallet is known not to cover: the upstream
        would refuse it after the signature left, and a refusal stays held against the budgets
        until the chain says it expired (README, Money safety)."""
        if self.balance is None or (self.network.testnet and self.client.sandbox):
            return  # a sandbox settles on its own stand-in chain, and never refuses for funds
        held = await self.balance.short_of(amount)
        if held is None:
            return
        chain = "Base Sepolia" if self.network.testnet else "Base"
        raise InsufficientFunds(
            f"Payment refused, nothing was signed: the wallet {self.signer.address} holds "
            f"{format_usd(held)} USDC on {chain}, less than the {format_usd(amount)} this "
            f"request costs. Send USDC on {chain} to that address (`clawrouter wallet` shows "
            "it and its balance), then retry.",
            extra={"balance_usd": to_usd(held), "amount_usd": to_usd(amount)})

    async def _complete(self, call: UpstreamCall, resp: UpstreamResponse,
                        payment: SignedPayment | None, ctx: RequestContext) -> Outcome:
        """The answer to a sent request, polled to its end if it is a 202 job. Its transaction
        comes only from a receipt proving settlement (`settlement`: a reverted one names a hash
        too), the final answer's or, for a job, the first one seen on the 202 or a poll."""
        amount = payment.amount if payment else 0
        transaction: str | None = None
        if resp.status == 202:
            call.accepted()
            headers = payment.headers if payment else {}
            resp, transaction = await wait_for_job(
                self.client, resp, headers, ctx, amount=amount, delay=self.settings.poll_delay,
                interval=self.settings.poll_interval, deadline=self.settings.poll_deadline,
                expires=payment.valid_before if payment else None)
        if resp.status == 200:
            transaction = transaction or (settlement(resp) if payment else None)
            return Outcome(resp, amount, transaction, resp.json())
        if payment is None:
            raise unpaid_error(resp)
        raise paid_error(resp, amount)


async def _finish_failure(error: ClawError, finish: _Finish) -> None:
    """Record a paid request's failure as what `error` says became of the payment: settled (a
    receipt named its transaction), not settled (rejected), or not known."""
    paid = error.extra.get("payment")
    if paid == "settled":
        await finish("settled", f"the upstream failed after settling: {error.message}",
                     error.extra.get("transaction"))
    else:
        await finish("rejected" if paid == "not_settled" else "failed_after_payment",
                     error.message)


def _rejection(resp: UpstreamResponse) -> dict[str, Any]:
    body = resp.json()
    return body if isinstance(body, dict) else {}


def _started_job(resp: UpstreamResponse) -> bool:
    """A 402 naming the job this authorization already started (BlockRun: `poll_url`)."""
    poll_url = _rejection(resp).get("poll_url")
    return isinstance(poll_url, str) and bool(poll_url)
