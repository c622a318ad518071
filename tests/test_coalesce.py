"""The coalescer on its own: sharing, expiry, and memory that follows the rate, not the cap."""

import asyncio

import pytest

from clawrouter.coalesce import SWEEP_EVERY, Coalescer
from clawrouter.context import RequestContext
from clawrouter.errors import ClientGone, Conflict
from clawrouter.pipeline import Result


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


def test_a_repeat_that_joins_just_as_every_earlier_client_left_runs_again():
    """The SDK times out, closes its socket and retries at once: the retry joins work that was
    just abandoned (and stops at its next safe point). It must not get that client's 'gone'."""
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
        assert retry.amount == 1000 and len(runs) == 2
        with pytest.raises(ClientGone):
            await abandoned

    asyncio.run(main())
