"""Exactly-once: repeats of a request share the first one's outcome instead of paying again.

- With an `Idempotency-Key` header, a repeat within 24 h gets the first result (or waits for it
  while it is in flight); the same key with a different request is a 409. Results are kept in
  memory, but the key goes into the ledger with any payment it signs: a repeat that finds
  no outcome here (after a restart) but a payment there, even a refused one, is a 409 that
  names the payment, and is never signed for again.
- Without one, an identical request from the same client that arrives while the first is in
  flight, or within `window` seconds after it ended with a payment, gets the first outcome.
  This is what stops the OpenAI SDK's automatic retries (after a timeout or dropped connection)
  from paying twice: it sends no idempotency key of its own. It does number its tries
  (`x-stainless-retry-count`: 0 for a call's first, then 1, 2): a first try does not take a
  result already delivered to a client (`first_try`), so three calls in a loop are three
  images, paid three times, while each call's retries still pay nothing. A first try still
  joins work in flight, and takes a paid failure or a result whose clients all left (a call
  re-issued after its caller gave up, by a user or an agent's harness, gets what was paid for
  and never received); its own outcome replaces the delivered one it did not take. A request
  whose images are read from paths or URLs is shared only while in flight: the same words may
  name new bytes once it is done (an agent that edits a file in place, then asks again).
- Both survive a restart: the ledger row of every payment carries the request's hashed key
  (or, without one, its hashed client and content). A repeat of a key that finds no outcome
  here but a payment in the ledger (within 24 h) is a 409 that names the payment, and is
  never signed for again. Without a key, so is a repeat within `window` of this process's
  start of a request that was in flight when the last one died (`Ledger.interrupted`), or
  that settled but had not stored its images (`interrupt`): the SDK's retry after a crash
  and an immediate restart. A first try is refused too (an app's own retry loop makes every
  try a first one), but not a request marked as asked anew (`NEW_CALL`: `clawrouter
  generate` run again after Ctrl-C, which said a payment may have been made). A request that ended before a clean
  stop is not refused: its client had its answer (and each `clawrouter generate` runs its
  own short-lived gateway, which must not refuse the same command run twice).

The shared work stops early (client gone) only when every client waiting on it has left, and
goes on if one joins before it has noticed.
Outcomes that involved no payment are not kept without a key: retrying those costs nothing
(a key's outcome is kept whatever it was: the key promises one outcome).

Memory: an outcome kept without a key is never dropped inside its window (nothing else would
stop its retry from paying again), so those follow the rate, not a cap: at most the requests in
flight, plus the paid outcomes of the `window` seconds before the last sweep, plus the
`SWEEP_EVERY` made since (600 paid images a second for 60 s: about 36,000), each slimmed to
stored references, no image bytes. Keyed outcomes (24 h) are capped at `max_entries` finished
ones, the oldest dropped first: the ledger recalls a dropped key's payment.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from clawrouter.catalog import format_usd
from clawrouter.context import RequestContext
from clawrouter.errors import ClawError, ClientGone, Conflict
from clawrouter.payment.ledger import REJECTED, Payment
from clawrouter.pipeline import Result

IDEMPOTENCY_TTL = 24 * 3600.0
SWEEP_EVERY = 256


@dataclass
class _Entry:
    fingerprint: str
    future: asyncio.Future[Result]
    shared: RequestContext | None  # None once finished: only the outcome is kept
    clients: list[RequestContext] = field(default_factory=list)
    expires: float = float("inf")
    #: finished with a result a client received (not a failure, not one every client left)
    delivered: bool = False

    def attach(self, ctx: RequestContext) -> None:
        if self.shared is None:
            return  # finished: nobody's leaving can stop it any more
        self.clients.append(ctx)
        # One client that will retry for a slow job it paid (`KEEP_PAID_JOB`) keeps it for
        # all: the others' leaving must not abandon what it was promised.
        self.shared.keep_paid_job |= ctx.keep_paid_job
        if self.shared.gone.is_set() and not ctx.gone.is_set():
            # Every earlier client left, but the work has not stopped yet (it checks at its
            # safe points): it goes on for this one, rather than stop and be paid for again.
            self.shared.gone.clear()
        ctx.on_leave(self._maybe_abandon)

    def _maybe_abandon(self) -> None:
        if self.shared is not None and all(c.gone.is_set() for c in self.clients):
            self.shared.leave()

    def finished(self, expires: float) -> None:
        self.expires = expires
        self.shared = None
        self.clients = []


def _paid(error: BaseException) -> bool:
    return isinstance(error, ClawError) and error.extra.get("payment") not in (None, "none")


def _slim(result: Result) -> Result:
    """Keep stored references, not image bytes, in the cache (shaping re-reads files). An
    image the store could not keep keeps its bytes only when they are all there is of it: with
    the disk full, holding every result for the window would fill memory next."""
    images = [replace(i, data=None) if i.stored is not None or i.remote_url else i
              for i in result.images]
    return replace(result, images=images)


#: the payment a hashed Idempotency-Key signed within a time (unix) in the ledger, if any
Recall = Callable[[str, float], Awaitable[Payment | None]]


class Coalescer:
    def __init__(self, window: float, *, idempotency_ttl: float = IDEMPOTENCY_TTL,
                 clock: Callable[[], float] = time.monotonic, max_entries: int = 10_000,
                 recall: Recall | None = None,
                 interrupted: Mapping[int, float] | None = None,
                 in_flight_for: float = float("inf")) -> None:
        """`in_flight_for`: the longest a request can be in flight, so the longest before this
        start that a payment left in flight can have a client still waiting to retry it."""
        self.window = window
        self.idempotency_ttl = idempotency_ttl
        self.recall = recall
        self.started = time.time()
        #: since when (unix) a payment can have been in flight when the last run died
        self.in_flight_since = self.started - in_flight_for
        #: payments the last run left in flight when it died, and when each was signed
        #: (`Ledger.interrupted`; `interrupt`): those recent enough for a client to be
        #: retrying them
        self.interrupted: dict[int, float] = {}
        self.interrupt(interrupted or {})
        self._clock = clock
        self._max = max_entries
        #: Idempotency-Key entries (capped) and keyless ones (bounded by the window), apart so
        #: the cap's eviction never scans past, or drops, a keyless entry
        self._keyed: OrderedDict[tuple[str, ...], _Entry] = OrderedDict()
        self._same: dict[tuple[str, ...], _Entry] = {}
        self._puts = 0

    def __len__(self) -> int:
        return len(self._keyed) + len(self._same)

    def interrupt(self, payments: Mapping[int, float]) -> None:
        """Count these payments (id: time signed) as left in flight by the last run too: ones
        that settled but whose images never reached the store (`api.app.undelivered`). Called
        before the first request."""
        self.interrupted.update({i: t for i, t in payments.items()
                                 if t >= self.in_flight_since})

    def working(self) -> bool:
        """Whether any request's work is still in progress (safe from another thread)."""
        return any(not entry.future.done() for entry in self._entries())

    def keeps(self) -> bool:
        """Whether any outcome is kept for a repeat (a paid one, or an Idempotency-Key's):
        unpaid ones are dropped as they end, so a finished entry still in the tables is one
        (safe from another thread)."""
        now = self._clock()
        return any(entry.future.done() and now < entry.expires for entry in self._entries())

    def _entries(self) -> list[_Entry]:
        """Every entry, copied (`list` of a dict another thread may change is one C call)."""
        return [*list(self._keyed.values()), *list(self._same.values())]

    def _table(self, key: tuple[str, ...]) -> dict[tuple[str, ...], _Entry]:
        return self._keyed if key[0] == "key" else self._same

    async def run(self, ctx: RequestContext, fingerprint: str, idempotency_key: str | None,
                  work: Callable[[RequestContext], Awaitable[Result]], *,
                  window: float | None = None, first_try: bool = False,
                  new_call: bool = False) -> Result:
        """`window` shortens how long this request's result is shared once done (0: only
        while in flight) if a client received it; a paid failure, or a result whose clients
        all left, is kept for the whole window, and an Idempotency-Key keeps its own 24 h.
        `first_try`: the client says this is a new call, not a retry (the OpenAI SDK's
        `x-stainless-retry-count: 0`), so without a key it does not take a result already
        delivered: it runs anew, and its outcome stands in for that one. `new_call`: the
        client says its user asked anew (`NEW_CALL`), so without a key it is not refused for a
        payment the last run left in flight."""
        if idempotency_key:
            key = ("key", ctx.client, idempotency_key)
            tag = fingerprint_parts("idempotency", ctx.client, idempotency_key)
            since = time.time() - self.idempotency_ttl
        else:
            key = ("same", ctx.client, fingerprint)
            tag = fingerprint_parts("same", ctx.client, fingerprint)
            # Only the payments the last run left in flight matter (however long they were in
            # flight), and only for `window` seconds after this run started: no ledger read
            # otherwise.
            since = min(self.interrupted.values(), default=0.0)
        # (a new call, `NEW_CALL`, is not the retry of one the last run cut off: not refused)
        recalled = self.recall is None or (not idempotency_key and (
            new_call or not self.interrupted or time.time() - self.window >= self.started))
        fresh = first_try and not idempotency_key
        while True:
            while (entry := self._live(key, fresh)) is not None:
                if entry.fingerprint != fingerprint:
                    raise Conflict("This Idempotency-Key was already used for a different "
                                   "request; use a new key for a new request.",
                                   param="Idempotency-Key")
                entry.attach(ctx)
                try:
                    result = await asyncio.shield(entry.future)
                except ClientGone:
                    # Every client before us left just as we joined, and the work stopped (at
                    # no cost: outcomes that cost money are kept and re-raised as they are).
                    # We are still here, so the request runs again, as it would a moment later.
                    if ctx.gone.is_set():
                        raise
                except ClawError as kept:
                    kept.__traceback__ = None  # this raise attached our frames to it
                    raise _replayed(kept) from None
                else:
                    if not ctx.gone.is_set():  # received (a retry's): a new call is a new one
                        entry.delivered = True
                    return replace(result, shared=True)
            if recalled:
                break
            recalled = True
            assert self.recall is not None
            earlier = await self.recall(tag, since)
            if earlier is not None and (idempotency_key or earlier.id in self.interrupted):
                raise _paid_before(earlier, keyed=bool(idempotency_key))
            # and look again: a repeat may have started the work while the ledger was read
        shared = RequestContext(ctx.request_id, ctx.base_url, ctx.client,
                                body_built=ctx.body_built, job_accepted=ctx.job_accepted,
                                idempotency=tag)
        entry = _Entry(fingerprint, asyncio.get_running_loop().create_future(), shared)
        entry.attach(ctx)
        replaced = self._table(key).get(key)  # a delivered result `fresh` did not take
        self._put(key, entry)
        ttl = self.idempotency_ttl if idempotency_key else self.window
        try:
            result = await work(shared)
        except BaseException as exc:
            paid = _paid(exc)
            entry.future.set_exception(_detached(exc) if paid else exc)
            entry.future.exception()  # retrieved: joiners re-raise it, nobody else must
            if paid:
                entry.finished(self._clock() + ttl)
            else:
                self._forget(key, replaced)
            raise
        entry.future.set_result(_slim(result))
        if result.amount or idempotency_key:
            # Shortened only for a result someone received: one whose clients all left is
            # kept whole, for the retry that is surely coming (the SDK's, after its timeout).
            delivered = not shared.gone.is_set()
            short = window is not None and not idempotency_key and delivered
            entry.finished(self._clock() + (min(window, ttl) if short else ttl))
            entry.delivered = delivered
        else:  # nothing was paid: a repeat may simply run again (joiners hold the future)
            self._forget(key, replaced)
        return result

    def _forget(self, key: tuple[str, ...], replaced: _Entry | None) -> None:
        """Drop an outcome not worth keeping, putting back the delivered one it stood in for
        (`first_try`): that one's own retries must still find it, not pay again."""
        table = self._table(key)
        if replaced is None:
            table.pop(key, None)
        else:
            table[key] = replaced

    def _sweep(self) -> None:
        """Drop every expired entry (amortised: one pass per SWEEP_EVERY new entries), so
        memory follows the request rate over the window, not the entry cap."""
        now = self._clock()
        for table in (self._keyed, self._same):
            expired = [k for k, e in table.items() if e.future.done() and now >= e.expires]
            for k in expired:
                del table[k]

    def _live(self, key: tuple[str, ...], fresh: bool = False) -> _Entry | None:
        """The entry a request takes its outcome from; with `fresh`, none that was already
        delivered (it is left in place until the new outcome replaces it)."""
        table = self._table(key)
        entry = table.get(key)
        if entry is not None and entry.future.done() and self._clock() >= entry.expires:
            del table[key]
            return None
        return None if fresh and entry is not None and entry.delivered else entry

    def _put(self, key: tuple[str, ...], entry: _Entry) -> None:
        table = self._table(key)
        table[key] = entry
        self._puts += 1
        if self._puts % SWEEP_EVERY == 0:
            self._sweep()
        # Only keyed entries are capped, oldest finished first: the ledger recalls a dropped
        # key's payment. A keyless one dropped inside its window would be paid for again.
        while table is self._keyed and len(table) > self._max:
            oldest = next((k for k, e in table.items() if e.future.done()), None)
            if oldest is None:
                break
            del table[oldest]


def _detached(error: ClawError) -> ClawError:
    """A copy of an outcome to keep or raise, with no frames attached. An entry keeps a paid
    failure for repeats (a day, with an Idempotency-Key), and every raise attaches the frames
    it passes through (the request's job, its upload) to the object raised: each raise gets
    its own copy, so what is kept holds no request's memory."""
    detached = copy.copy(error)
    detached.__traceback__ = detached.__cause__ = detached.__context__ = None
    return detached


#: how a repeat's copy of an earlier identical request's failure begins (`_replayed`)
REPLAYED = "An identical request made just before ended so, and nothing more was paid: "


def _replayed(kept: ClawError) -> ClawError:
    """A repeat's copy of the failure it shares, saying so (in its message and the
    `x-clawrouter-shared` header, as a shared result says it): otherwise a retry that gets a
    kept paid failure reads as a new one, and the client concludes the upstream still fails."""
    copy = _detached(kept)
    copy.headers = {**kept.headers, "x-clawrouter-shared": "true"}
    copy.message = REPLAYED + kept.message
    copy.args = (copy.message,)
    return copy


def _paid_before(payment: Payment, *, keyed: bool) -> Conflict:
    what = ("signed a payment the upstream refused, or one for a slow job its client left "
            "(it should not settle)" if payment.status == REJECTED else "paid")
    paid = (f"payment {payment.id} of {format_usd(payment.amount)} ({payment.status}, "
            "`clawrouter stats`)")
    if keyed:
        return Conflict(
            f"This Idempotency-Key already {what}: {paid}. Its outcome is no longer kept "
            "(outcomes live in memory: the gateway restarted since, or forgot it); its images, "
            "if any, are in the gallery at /. Not paid again. Use a new key for a new request.",
            param="Idempotency-Key", code="idempotency_key_paid",
            headers={"x-should-retry": "false"}, extra={"payment": payment.status})
    return Conflict(
        f"An identical request from this client {what} {time.time() - payment.time:.0f} s "
        f"ago, and was cut off when the gateway stopped: {paid}. Its outcome was lost; "
        "its images, if any, are in the gallery at /. Not paid again (this is how a retry "
        "after a crash is kept from paying twice). For a new image, send it again once the "
        "gateway has run for coalesce_window_seconds since the restart, or with an "
        "Idempotency-Key.",
        code="repeat_paid_before_restart",
        headers={"x-should-retry": "false"}, extra={"payment": payment.status})


def fingerprint_parts(*parts: Any) -> str:
    import hashlib

    h = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode("utf-8", "surrogatepass")
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()
