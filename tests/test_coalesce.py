"""The coalescer on its own: sharing, expiry, and memory that follows the rate, not the cap."""

import asyncio
import time

import pytest

from clawrouter.coalesce import REPLAYED, SWEEP_EVERY, Coalescer
from clawrouter.context import RequestContext
from clawrouter.errors import ClientGone, Conflict, PaidRequestFailed
from clawrouter.payment.ledger import Payment
from clawrouter.pipeline import Result


PAYMENT = Payment(7, 0.0, "req", "/v1/images/generations", "zai/cogview-4", "512x512", 1,
                  16_750, "0xpayee", "base", "0x" + "11" * 32, "unknown", None, None, None, 1)


def ctx(client="c"):
    return RequestContext("req", "http://localhost", client)


def paid(amount=1000):
    async def work(shared):
        await asyncio.sleep(0)
        return Result(1, [], amount, None)
    return work


def test_identical_requests_share_one_run_and_expired_entries_are_swept():
    now = [0.0]
    coalescer = Coalescer(60, clock=lambda: now[0])
    runs = []

    async def counted(shared):
        runs.append(1)
        await asyncio.sleep(0.01)
        return Result(1, [], 1000, None)

    async def main():
        await asyncio.gather(*(coalescer.run(ctx(), "same", None, counted) for _ in range(5)))
        assert len(runs) == 1
        await coalescer.run(ctx(), "same", None, counted)  # within the window: shared
        assert len(runs) == 1
        now[0] = 61
        await coalescer.run(ctx(), "same", None, counted)  # after it: a fresh run
        assert len(runs) == 2
        for i in range(SWEEP_EVERY * 2):
            await coalescer.run(ctx(), f"fp{i}", None, paid())
        now[0] = 200
        for i in range(SWEEP_EVERY):
            await coalescer.run(ctx(), f"late{i}", None, paid())
        assert len(coalescer) <= SWEEP_EVERY + 1  # the expired ones are gone

    asyncio.run(main())


def test_unpaid_outcomes_are_not_kept_and_keys_conflict_on_other_bodies():
    coalescer = Coalescer(60)

    async def main():
        await coalescer.run(ctx(), "free", None, paid(amount=0))
        assert len(coalescer) == 0
        await coalescer.run(ctx(), "one", "key-1", paid())
        with pytest.raises(Conflict):
            await coalescer.run(ctx(), "two", "key-1", paid())

    asyncio.run(main())


def test_a_repeat_that_joins_just_as_every_earlier_client_left_keeps_the_work_going():
    """The SDK times out, closes its socket and retries at once: the retry joins work whose
    only client just left, before the work reached a safe point. The work goes on for the
    retry (one run, one payment), and the retry does not get that client's 'gone'."""
    coalescer = Coalescer(60)
    runs = []

    async def work(shared):
        runs.append(1)
        await asyncio.sleep(0.05)
        shared.check()
        return Result(1, [], 1000, None)

    async def main():
        first = ctx()
        abandoned = asyncio.create_task(coalescer.run(first, "fp", None, work))
        await asyncio.sleep(0.01)
        first.leave()
        retry = await coalescer.run(ctx(), "fp", None, work)
        assert retry.amount == 1000 and retry.shared and len(runs) == 1
        assert (await abandoned).amount == 1000

    asyncio.run(main())


def test_a_repeat_that_joins_after_the_work_stopped_for_good_runs_again():
    """If the work already stopped at a safe point (nothing paid), the retry runs afresh."""
    coalescer = Coalescer(60)
    runs = []

    async def work(shared):
        runs.append(1)
        try:
            await shared.sleep(1)  # a safe point: wakes at once when every client has left
        finally:
            if len(runs) == 1:
                await asyncio.sleep(0.05)  # stopping, past the point of no return
        return Result(1, [], 1000, None)

    async def main():
        first = ctx()
        abandoned = asyncio.create_task(coalescer.run(first, "fp", None, work))
        await asyncio.sleep(0.01)
        first.leave()
        await asyncio.sleep(0.01)  # the work has seen it and is stopping
        retry = asyncio.create_task(coalescer.run(ctx(), "fp", None, work))
        with pytest.raises(ClientGone):
            await abandoned
        assert (await retry).amount == 1000 and len(runs) == 2

    asyncio.run(main())


def test_a_paid_failure_kept_for_repeats_does_not_keep_its_requests_memory():
    """The error is kept (a day, for an Idempotency-Key) so that repeats get it instead of
    paying again; the frames it was raised through, below the coalescer (the upstream body)
    or above it (a handler's job and uploads), the first request's or a repeat's, are not."""
    import gc
    import weakref

    from clawrouter.errors import PaidRequestFailed

    class Body:  # stands for the upstream body, the images, the uploads: megabytes
        pass

    alive: dict[str, weakref.ref] = {}

    async def work(shared):
        body = Body()
        alive["upstream body"] = weakref.ref(body)
        raise PaidRequestFailed("paid, then failed", extra={"payment": "signed"})

    async def handler(coalescer, name):  # as the route: its job lives in its frame
        job = Body()
        alive[name] = weakref.ref(job)
        try:  # (not pytest.raises: it would keep the error, and so these frames, itself)
            await coalescer.run(ctx(), "fp", "key-1", work)
        except PaidRequestFailed as exc:
            return exc.message
        raise AssertionError("not raised")

    async def scenario():
        coalescer = Coalescer(60)
        first = await handler(coalescer, "first request")
        repeat = await handler(coalescer, "repeat")  # gets it, and pays nothing
        assert first == "paid, then failed" and repeat == REPLAYED + first
        assert len(coalescer) == 1
        return coalescer

    gc.disable()
    try:
        coalescer = asyncio.run(scenario())
        assert {name: ref() for name, ref in alive.items()} == {
            "upstream body": None, "first request": None, "repeat": None}
        assert len(coalescer) == 1  # still kept
    finally:
        gc.enable()


@pytest.mark.parametrize("waiting", ["sleep", "unless_gone"])
def test_a_leave_undone_by_a_joining_client_before_the_work_wakes_does_not_stop_it(waiting):
    """`_Entry.attach` clears `gone` when a repeat joins work whose only client just left; a
    sleeper that `set()` had already woken must go on, or polling stops (and the repeat pays
    again) though a client is waiting."""
    async def main():
        c = ctx()
        job = (c.sleep(0.1) if waiting == "sleep"
               else c.unless_gone(asyncio.sleep(0.1, result="done")))
        task = asyncio.ensure_future(job)
        await asyncio.sleep(0.01)
        c.gone.set()  # the client left...
        c.gone.clear()  # ...and a repeat joined before the work ran again
        assert await task in (None, "done")
        c.gone.set()
        with pytest.raises(ClientGone):
            await (c.sleep(1) if waiting == "sleep" else c.unless_gone(asyncio.sleep(1)))

    asyncio.run(main())


def test_a_window_override_shortens_how_long_results_are_shared_but_not_paid_failures():
    """Results of requests that read their images from paths or URLs are shared only in
    flight (the bytes behind them may change); a paid failure still stops a second payment
    for the whole window."""
    now = [0.0]
    coalescer = Coalescer(60, clock=lambda: now[0])
    runs = []

    async def counted(shared):
        runs.append(1)
        return Result(1, [], 1000, None)

    async def failing(shared):
        runs.append(1)
        raise PaidRequestFailed("paid, then failed", extra={"payment": "not_settled"})

    async def main():
        await coalescer.run(ctx(), "ref", None, counted, window=0)
        await coalescer.run(ctx(), "ref", None, counted, window=0)
        assert len(runs) == 2  # done: not shared
        for _ in range(2):
            with pytest.raises(PaidRequestFailed):
                await coalescer.run(ctx(), "failed", None, failing, window=0)
        assert len(runs) == 3  # the paid failure was kept
        await coalescer.run(ctx(), "keyed", "k1", counted, window=0)
        await coalescer.run(ctx(), "keyed", "k1", counted, window=0)
        assert len(runs) == 4  # an Idempotency-Key keeps its result

    asyncio.run(main())


def test_an_idempotency_key_is_kept_a_day_and_the_cache_holds_at_most_its_cap():
    """SECURITY.md: Idempotency-Key results are kept 24 h, up to `max_entries` finished ones
    (10,000 by default; the oldest go first). Beyond either, a repeat falls back to the
    ledger's record of the key (`recall`), never to a second payment while it is there."""
    now = [0.0]
    coalescer = Coalescer(60, clock=lambda: now[0], max_entries=3)
    assert Coalescer(60)._max == 10_000 and coalescer.idempotency_ttl == 24 * 3600
    runs = []

    async def counted(shared):
        runs.append(1)
        return Result(1, [], 1000, None)

    async def main():
        await coalescer.run(ctx(), "fp", "order-1", counted)
        now[0] = 24 * 3600 - 1  # long past the 60 s window, within the key's day
        await coalescer.run(ctx(), "fp", "order-1", counted)
        assert len(runs) == 1
        now[0] = 24 * 3600
        await coalescer.run(ctx(), "fp", "order-1", counted)  # a day on: forgotten
        assert len(runs) == 2
        for key in ("order-2", "order-3", "order-4"):  # the cap: order-1's entry goes
            await coalescer.run(ctx(), "fp", key, counted)
        assert len(coalescer) == 3
        await coalescer.run(ctx(), "fp", "order-4", counted)  # still kept
        assert len(runs) == 5
        await coalescer.run(ctx(), "fp", "order-1", counted)  # evicted: runs again here
        assert len(runs) == 6

    asyncio.run(main())


def test_without_a_key_only_a_request_the_last_run_left_in_flight_is_refused_after_a_restart():
    """A request without an Idempotency-Key is repeated by the SDK after a crash: its ledger
    row (tagged with its client and content) was left in flight, and makes the repeat a 409
    while the window since the restart lasts. A request that ended before (the same command
    run twice, each with its own gateway) is no reason to refuse; with nothing left in flight,
    or once the window since the start has passed, the ledger is not read at all; nor for a
    request its user asked for anew."""
    asked: list[str] = []
    payment: list[Payment] = []  # what the ledger holds for the first client's request

    async def recall(tag: str, since: float) -> Payment | None:
        asked.append(tag)
        return payment[0] if tag == asked[0] else None  # the first client's payment

    def coalescer(interrupted: dict[int, float]) -> Coalescer:
        return Coalescer(60, recall=recall, interrupted=interrupted)

    async def main():
        payment.append(PAYMENT)
        cut_off = coalescer({PAYMENT.id: PAYMENT.time})
        with pytest.raises(Conflict) as refused:
            await cut_off.run(ctx(), "fp", None, paid())
        assert refused.value.code == "repeat_paid_before_restart"
        assert refused.value.headers["x-should-retry"] == "false"
        # a first try (`x-stainless-retry-count: 0`) is refused too: an app's own retry loop
        # sends nothing else; a request its user asked for anew (`NEW_CALL`: `clawrouter
        # generate` run again after Ctrl-C) is paid, without asking the ledger
        with pytest.raises(Conflict):
            await cut_off.run(ctx(), "fp", None, paid(), first_try=True)
        assert len(asked) == 2
        await cut_off.run(ctx(), "fp", None, paid(), first_try=True, new_call=True)
        assert len(asked) == 2
        await cut_off.run(ctx("other client"), "fp", None, paid())  # another tag
        assert len(asked) == 3 and asked[2] != asked[0]
        await coalescer({PAYMENT.id + 1: 0.0}).run(ctx(), "fp", None, paid())  # ended
        assert len(asked) == 4
        await coalescer({}).run(ctx(), "fp", None, paid())  # a clean stop: no read
        late = coalescer({PAYMENT.id: PAYMENT.time})
        late.started -= 61  # a minute after the start: nothing to ask the ledger
        await late.run(ctx(), "fp", None, paid())
        assert len(asked) == 4
        # a payment left in flight long before this start (a crash a week ago) has no client
        # retrying it: the same request now is a new one
        old = Coalescer(60, recall=recall, interrupted={PAYMENT.id: time.time() - 7 * 86400},
                        in_flight_for=420)
        await old.run(ctx(), "fp", None, paid())
        assert len(asked) == 4

    asyncio.run(main())


def test_a_payment_in_flight_for_as_long_as_a_paid_call_may_wait_is_still_recalled():
    """A fast model's paid call waits up to its authorization's life (`max_timeout_seconds`,
    600 s at most): a crash 450 s into it leaves a payment whose client may still retry."""
    from clawrouter.api.app import longest_in_flight
    from clawrouter.config import Settings

    coalescer = Coalescer(60, interrupted={7: time.time() - 590},
                          in_flight_for=longest_in_flight(Settings(max_timeout_seconds=600)))
    assert 7 in coalescer.interrupted


def test_a_first_try_runs_anew_after_a_delivered_result_and_shares_everything_else():
    """`x-stainless-retry-count: 0` (`first_try`) is a new call, not a retry: it does not take
    a result a client received, and its own result replaces that one. It still joins work in
    flight, takes a paid failure or a result every client left (once: then it is delivered),
    and its unpaid failure puts
    back the result it passed over (whose own retries must still find it); retries, requests
    that do not say, and Idempotency-Keys share as before."""
    coalescer = Coalescer(60)
    runs: list[str] = []

    def work(tag, amount=1000, fail=None, wait=0.0):
        async def run(shared):
            runs.append(tag)
            await asyncio.sleep(wait)
            if fail:
                raise fail
            return Result(1, [], amount, tag)
        return run

    async def main():
        first = await coalescer.run(ctx(), "fp", None, work("a"))
        again = await coalescer.run(ctx(), "fp", None, work("b"), first_try=True)
        assert (first.transaction, again.transaction, again.shared) == ("a", "b", False)
        retry = await coalescer.run(ctx(), "fp", None, work("c"))  # a retry: shares b's
        assert (retry.transaction, retry.shared) == ("b", True)
        # in flight: a first try joins
        both = await asyncio.gather(*(coalescer.run(ctx(), "flight", None, work("f", wait=0.02),
                                                    first_try=True) for _ in range(2)))
        assert [r.transaction for r in both] == ["f", "f"] and runs.count("f") == 1
        # an unpaid failure of a first try puts back the delivered result it passed over
        with pytest.raises(ClientGone):
            await coalescer.run(ctx(), "fp", None, work("d", fail=ClientGone("gone")),
                                first_try=True)
        assert (await coalescer.run(ctx(), "fp", None, work("e"))).transaction == "b"
        # a paid failure is shared with a first try
        failed = PaidRequestFailed("paid, then failed", extra={"payment": "signed"})
        for _ in range(2):
            with pytest.raises(PaidRequestFailed):
                await coalescer.run(ctx(), "failed", None, work("p", fail=failed),
                                    first_try=True)
        assert runs.count("p") == 1
        # a result whose every client left is shared with a first try
        left = ctx()
        abandoned = asyncio.create_task(coalescer.run(left, "left", None, work("l", wait=0.02)))
        await asyncio.sleep(0.005)
        left.leave()
        assert (await abandoned).transaction == "l"
        kept = await coalescer.run(ctx(), "left", None, work("m"), first_try=True)
        assert (kept.transaction, kept.shared) == ("l", True)
        # ... once: received so, it is delivered, and the next first try is a new call
        fresh = await coalescer.run(ctx(), "left", None, work("n"), first_try=True)
        assert (fresh.transaction, fresh.shared) == ("n", False)
        # an Idempotency-Key keeps its one outcome whatever the try
        await coalescer.run(ctx(), "keyed", "k1", work("k"))
        keyed = await coalescer.run(ctx(), "keyed", "k1", work("x"), first_try=True)
        assert keyed.transaction == "k" and "x" not in runs
        assert runs == ["a", "b", "f", "d", "p", "l", "n", "k"]

    asyncio.run(main())


def test_a_shared_result_keeps_the_bytes_of_an_unstored_image_only_when_they_are_all_of_it():
    """With the disk full every result is unstored: holding all their bytes for the window
    would fill memory next. The upstream's URL stands in for bytes it can give again."""
    from clawrouter.pipeline import ResultImage

    coalescer = Coalescer(60)
    with_url = ResultImage(None, b"png" * 1000, "http://upstream/img.png")
    bytes_only = ResultImage(None, b"png" * 1000, None)

    async def work(shared):
        return Result(1, [with_url, bytes_only], 1000, None)

    async def main():
        await coalescer.run(ctx(), "same", None, work)
        return await coalescer.run(ctx(), "same", None, work)

    again = asyncio.run(main())
    assert again.shared
    assert [i.data for i in again.images] == [None, bytes_only.data]
    assert again.images[0].remote_url == "http://upstream/img.png"
