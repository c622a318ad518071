"""Ask the chain what became of payments whose outcome the gateway never learned.

A row is `unknown` when the gateway died between signing and hearing back (or still `signed`
long after its authorization expired, when its request died without an outcome), and
`failed_after_payment` when the upstream failed after the payment left. Either way the money
may or may not have moved, so the row counts against the budgets and shows as pending. USDC
settles the question for good:

- `authorizationState(payer, nonce)` is true once the authorization was used (we never cancel
  one, so used means transferred): the row becomes `settled`, with the transaction from its
  `AuthorizationUsed` log when the RPC finds it;
- USDC only accepts an authorization while `block.timestamp < validBefore`, so one still unused
  at a block stamped at or after its validBefore can never be used: the row becomes `rejected`
  (no money moved) and the budgets get its amount back;
- otherwise the row stays as it is and is asked about again next round.

A wrong answer would mis-state money, so each RPC is asked at its *finalized* block (what no
reorg can undo; on Base about 20 minutes behind the latest) after its chain id was checked —
or, once that block is past the authorization's validBefore, at its latest: every block that
could have used it is final then, and the latest state is what a pruned node still has — a
round asks every configured RPC at once and keeps only what their answers prove together, and
nothing changes for a row they disagree on or when anything fails. Handing an amount back to
the budgets is the one outcome that loosens a spending cap, so a row becomes `rejected` only
when two RPCs (or the only one configured) saw it expired unused — one, for a payment the
upstream itself refused, which the chain only confirms (and no RPC may say it was used).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp

from clawrouter.catalog import format_usd
from clawrouter.config import Settings
from clawrouter.payment.balance import rpc_urls_for
from clawrouter.payment.ledger import FAILED_AFTER_PAYMENT, REJECTED, SETTLED, Ledger, Payment
from clawrouter.payment.networks import NETWORKS, Network
from clawrouter.payment.onchain import Block, ChainUnavailable, Rpc, askable, every_answer
from clawrouter.wake import stop

log = logging.getLogger(__name__)

#: blocks searched on either side of a payment's window for its AuthorizationUsed log
LOG_MARGIN_BLOCKS = 30
#: a row still `signed` this long after its validBefore belongs to no live request any more
#: (with the default timeouts a request ends within 500 s), so it is asked about like `unknown`.
#: Even a request still alive could not change what the chain proves by then: an unused
#: authorization past its validBefore never settles, a used one is spent.
ORPHANED_AFTER = 3600.0
#: the block every answer is read at
FINALIZED = "finalized"
#: RPCs that must agree an authorization expired unused before its amount goes back to the
#: budgets (fewer when fewer are configured)
REFUND_QUORUM = 2


@dataclass(frozen=True)
class Resolution:
    payment: Payment
    status: str  # SETTLED or REJECTED
    note: str
    transaction: str | None = None


def chain_network(settings: Settings) -> str | None:
    """The network (CAIP-2) a gateway with these settings asks the chain about (a `Reconciler`
    runs), or None."""
    asks = bool(rpc_urls_for(settings.network, settings.rpc_urls)) \
        and settings.reconcile_interval > 0
    return NETWORKS[settings.network].caip2 if asks else None


def decide(payment: Payment, used: bool, block: Block) -> tuple[str, str] | None:
    """What the chain's answer at `block` proves about `payment`, or None for "not yet"."""
    assert payment.valid_before is not None
    was = f"; was: {payment.note}" if payment.note else ""
    if used:
        how = {FAILED_AFTER_PAYMENT: "although the request failed",
               REJECTED: "although the upstream refused it"}.get(payment.status,
                                                                  "the authorization was used")
        return SETTLED, f"confirmed on chain at block {block.number}: {how}{was}"
    if block.timestamp >= payment.valid_before:
        return REJECTED, (f"confirmed on chain at block {block.number}: never used, and it "
                          f"expired at {payment.valid_before}; no money moved{was}")
    return None


async def resolve(rpc: Rpc, network: Network,
                  payments: Sequence[Payment]) -> dict[int, Resolution | None]:
    """What one RPC's finalized block proves about each askable payment (None: nothing yet),
    by payment id; raises on any failure."""
    await rpc.check_chain(network)
    block = await rpc.block(FINALIZED)
    head = await rpc.block("latest")
    if head.number < block.number:  # answers from two nodes of a pool, one of them behind
        raise ValueError(f"latest block {head.number} is behind finalized {block.number}")
    verdicts: dict[int, Resolution | None] = {}
    for payment in payments:
        if not askable(payment.payer, payment.nonce):
            continue  # not from our signer; a malformed row must not stall every other
        assert payment.payer is not None and payment.valid_before is not None
        if block.timestamp >= payment.valid_before:
            # Every block that could have used it is final: the recent state (which any node
            # keeps) says for good. A pruned node has no state 20 minutes back.
            used = await rpc.authorization_used(network, payment.payer, payment.nonce,
                                                head.number)
        else:
            try:  # still live: only a use in the finalized state is for good (archive nodes)
                used = await rpc.authorization_used(network, payment.payer, payment.nonce,
                                                    block.number)
            except ValueError:  # that state is pruned here: decided once it expires
                used = False
        decision = decide(payment, used, block)
        if decision is None:
            verdicts[payment.id] = None
            continue
        status, note = decision
        tx = await _transaction(rpc, network, payment, block) if used else None
        verdicts[payment.id] = Resolution(payment, status, note, tx)
    return verdicts


def agree(payments: Sequence[Payment], answers: Sequence[dict[int, Resolution | None]],
          quorum: int) -> list[Resolution]:
    """What the RPCs' answers prove together: `settled` when one saw the authorization used
    and none saw it expired unused; `rejected` only when `quorum` saw it expired unused and
    none saw it used — one is enough for a row the upstream already refused (the chain only
    confirms it). A row they disagree on stays as it is (and is logged)."""
    agreed = []
    for payment in payments:
        verdicts = [v for answer in answers if (v := answer.get(payment.id)) is not None]
        statuses = {v.status for v in verdicts}
        if statuses == {SETTLED}:
            agreed.append(next((v for v in verdicts if v.transaction), verdicts[0]))
        elif statuses == {REJECTED} and len(verdicts) >= (
                1 if payment.status == REJECTED else quorum):
            agreed.append(verdicts[0])
        elif len(statuses) > 1:
            log.warning("payment %d: the RPCs disagree (used on one, expired unused on "
                        "another); it stays %s", payment.id, payment.status)
    return agreed


async def _transaction(rpc: Rpc, network: Network, payment: Payment, block: Block) -> str | None:
    """Best effort: the transaction that used the authorization, searched only in the blocks
    of the window it could have been used in (public RPCs limit log ranges)."""
    assert payment.payer is not None and payment.valid_before is not None

    def block_at(t: float) -> int:
        return block.number - math.ceil((block.timestamp - t) / network.block_seconds)

    low = max(0, block_at(payment.time) - LOG_MARGIN_BLOCKS)
    high = min(block.number, block_at(payment.valid_before) + LOG_MARGIN_BLOCKS)
    try:
        return await rpc.authorization_transaction(network, payment.payer, payment.nonce,
                                                   low, high)
    except (aiohttp.ClientError, OSError, ValueError, asyncio.TimeoutError) as exc:
        log.info("payment %d: settled on chain; its transaction was not found (%s)",
                 payment.id, exc)
        return None


class Reconciler:
    """Runs `reconcile_once` every `interval` seconds in the background (from `start()`)."""

    def __init__(self, ledger: Ledger, network: Network, rpc_urls: Sequence[str],
                 session: aiohttp.ClientSession, *, interval: float = 60.0,
                 timeout: float = 5.0, batch: int = 100,
                 on_payment: Callable[[str, int, str], None] | None = None) -> None:
        self.ledger = ledger
        self.on_payment = on_payment  # (outcome, amount, model) for metrics, as the exchange
        self.network = network
        self.rpc_urls = list(dict.fromkeys(rpc_urls))  # one URL twice is not two RPCs
        self.session = session
        self.interval = interval
        self.timeout = timeout
        self.batch = batch
        self._task: asyncio.Task[None] | None = None
        self._failing = ""
        #: where each round goes on from, per kind (pending, refused): rows the chain never
        #: answers for must not keep the next ones from being asked
        self._after = {False: 0, True: 0}

    async def reconcile_once(self) -> list[Resolution]:
        """One round: read the open rows, ask the chain, record what it proves.

        A round asks about up to `batch` rows whose fate is unknown, then fills the rest of
        its `batch` with refused ones (a quarter at least, one at the very least, so neither
        kind starves the other), each kind going on after the last row the previous round
        asked about."""
        pending = await self._next(False, self.batch)
        refused = await self._next(True, max(1, self.batch // 4, self.batch - len(pending)))
        payments = pending + refused
        if not payments:
            return []
        answers, failures = await every_answer(
            self.rpc_urls, lambda rpc: resolve(rpc, self.network, payments),
            session=self.session, timeout=self.timeout)
        self._report(f"{'; '.join(failures)} (the other RPCs answered)" if failures else "")
        done = []
        for r in agree(payments, answers, min(REFUND_QUORUM, len(self.rpc_urls))):
            try:
                await self.ledger.write(self.ledger.outcome(
                    r.payment.id, r.status, transaction=r.transaction, note=r.note,
                    expected=r.payment.status, can_settle=False))
            except (ValueError, KeyError) as exc:  # changed meanwhile: leave it to next round
                log.warning("payment %d: not reconciled (%s)", r.payment.id, exc)
                continue
            log.info("payment %d (%s, %s): %s, from the chain", r.payment.id, r.payment.status,
                     format_usd(r.payment.amount), r.status)
            if self.on_payment:
                self.on_payment(r.status, r.payment.amount, r.payment.model)
            done.append(r)
        return done

    async def _next(self, refused: bool, limit: int) -> list[Payment]:
        rows = await self.ledger.call(self.ledger.unresolved, self.network.caip2, limit=limit,
                                      orphaned_before=time.time() - ORPHANED_AFTER,
                                      refused=refused, after_id=self._after[refused])
        # a full page: go on after it next round; else the end was reached: start over
        self._after[refused] = rows[-1].id if rows and len(rows) == limit else 0
        return rows

    def start(self) -> None:
        """Launch the loop (from a running event loop; idempotent). Without RPC URLs or with
        `interval` 0 nothing runs, and open rows stay pending."""
        if self.rpc_urls and self.interval > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="reconcile")

    async def _run(self) -> None:
        await asyncio.sleep(min(self.interval, 2.0))  # let the gateway finish starting first
        while True:
            try:
                await self.reconcile_once()
            except ChainUnavailable as exc:
                self._report(f"no RPC answered ({exc}); payments with an unknown outcome "
                             "stay pending")
            except Exception:  # noqa: BLE001 - the loop must survive anything
                log.exception("reconcile: round failed")
            await asyncio.sleep(self.interval)

    def _report(self, failing: str) -> None:
        """Log RPC failures once per change, not once per round."""
        if failing and failing != self._failing:
            log.warning("reconcile: %s", failing)
        self._failing = failing

    async def aclose(self) -> None:
        task, self._task = self._task, None
        await stop(task)
