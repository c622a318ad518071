"""Races that could cost money twice or free a cap early: a poll resent after its connection
dropped, and a retry whose kept outcome is crowded out by newer ones."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from clawrouter.coalesce import SWEEP_EVERY, Coalescer
from clawrouter.context import RequestContext
from clawrouter.pipeline import Result
from tests.servers import leaving, until

COGVIEW = {"model": "cogview", "size": "1024x1024"}


def gen(gw, prompt, client="the agent", timeout=30.0):
    return httpx.post(gw.v1 + "/images/generations", json={**COGVIEW, "prompt": prompt},
                      headers={"user-agent": client}, timeout=timeout)


def rows(gw):
    return gw.http.get("/v1/spend", params={"latest": 50}).json()["latest"]


REPLAY = {"status": 402, "body": {"error": "Payment verification failed",
                                  "code": "PAYMENT_REPLAY", "recoverable": True}}


def test_a_poll_told_the_authorization_was_already_used_leaves_the_payment_pending(
        make_gateway, sandbox):
    """No answer was lost, but a poll refused because the authorization is already used says
    it may well have settled (by whom, only the chain can tell): pending and held, never
    called unsettled."""
    gw = make_gateway(poll_deadline=5)
    sandbox.faults({"kind": "job"}, {"kind": "respond", "phase": "poll", "times": 1, **REPLAY})
    r = gen(gw, "a poll refused as a replay")
    assert r.status_code == 402 and r.headers["x-should-retry"] == "false", r.text
    error = r.json()["error"]
    assert error["payment"] == "signed" and "may have settled" in error["message"]
    assert "already used" in error["message"]
    (row,) = rows(gw)
    assert row["status"] == "failed_after_payment"
    assert gw.http.get("/v1/spend").json()["today"]["pending"]["micro"] == row["amount"]


PAID_REFUSED_AS_USED = {
    "already used": {"kind": "respond", "phase": "paid", "times": 1, **REPLAY},
    "resend refused": {"kind": "drop", "phase": "paid", "settle": True, "times": 1},
}


@pytest.mark.parametrize("case", list(PAID_REFUSED_AS_USED))
def test_a_paid_request_refused_as_already_used_says_it_may_have_settled(make_gateway, sandbox,
                                                                          case):
    """The paid POST is refused because its authorization is already used (said outright, or
    to the resend after the first attempt's connection dropped): whoever used it may have
    settled it, so the client is told the payment is pending, never that it was not charged."""
    gw = make_gateway()
    sandbox.faults(PAID_REFUSED_AS_USED[case])
    r = gen(gw, f"paid, then {case}")
    assert r.status_code == 502 and r.headers["x-should-retry"] == "false", r.text
    error = r.json()["error"]
    assert error["payment"] == "signed" and "already used" in error["message"]
    assert "may have settled" in error["message"]
    assert "pending until the chain tells" in error["message"]
    assert "should not have been charged" not in error["message"]
    (row,) = rows(gw)
    assert row["status"] == "failed_after_payment"


RESEND_ANSWERS = {
    "settlement refused": {"status": 402, "body": {
        "error": "Payment settlement failed", "details": "transaction_simulation_failed"}},
    "job failed": {"status": 200, "body": {"status": "failed", "error": "provider error"}},
}


@pytest.mark.parametrize("then", list(RESEND_ANSWERS))
def test_a_poll_resent_after_its_connection_dropped_leaves_the_payment_pending(
        make_gateway, sandbox, then):
    """The poll that completed the job settled it, but its connection dropped; the client's
    automatic resend is then refused (the authorization is spent) or told the job failed.
    The first attempt's answer was lost, so the payment may have settled: it stays pending
    and held, never called unsettled (which would free the cap once it expires)."""
    gw = make_gateway(poll_deadline=5)
    sandbox.faults({"kind": "job"},
                   {"kind": "drop", "phase": "poll", "settle": True, "times": 1},
                   {"kind": "respond", "phase": "poll", "times": 1, **RESEND_ANSWERS[then]})
    r = gen(gw, f"resent poll, then {then}")
    assert r.status_code in (402, 502) and r.headers["x-should-retry"] == "false", r.text
    error = r.json()["error"]
    assert error["payment"] == "signed" and "may have settled" in error["message"]
    assert "resent" in error["message"]
    assert sandbox.stats()["settled_count"] == 1
    (row,) = rows(gw)
    assert row["status"] == "failed_after_payment"
    assert gw.http.get("/v1/spend").json()["today"]["pending"]["micro"] == row["amount"]


def test_a_retry_within_the_window_is_shared_however_many_outcomes_were_kept_since(
        make_gateway, sandbox):
    """The SDK retries a request whose client timed out after it paid: within
    coalesce_window_seconds it gets that result, even when more outcomes than the cache's
    cap were kept since (the cap, 10,000, is shrunk here; 167 paid images a second would
    fill it within the default 60 s window)."""
    gw = make_gateway()
    gw.gw.coalescer._max = 2
    sandbox.faults({"kind": "delay", "phase": "paid", "seconds": 2.0, "times": 1})
    with leaving(gw.v1 + "/images/generations", {**COGVIEW, "prompt": "timed out, then retried"},
                 headers={"user-agent": "the agent"}):
        until(lambda: sandbox.paid() == 1)  # it times out once its payment is on its way
    until(lambda: [row["status"] for row in rows(gw)] == ["settled"])
    for i in range(3):  # other programs' paid requests
        assert gen(gw, f"other {i}", client=f"other {i}").status_code == 200
    again = gen(gw, "timed out, then retried")
    assert again.status_code == 200 and again.headers.get("x-clawrouter-shared") == "true"
    assert sandbox.stats()["payments_count"] == 4


def test_keyless_outcomes_outlive_the_cap_in_their_window_and_are_swept_after_it():
    """Only keyed outcomes are capped (the ledger recalls a dropped key); keyless ones are
    bounded by the window instead: kept all of it, however many, then swept."""
    now = [0.0]
    coalescer = Coalescer(60, clock=lambda: now[0], max_entries=3)
    runs: list[str] = []

    def paid(name):
        async def work(shared):
            runs.append(name)
            return Result(1, [], 1000, None)
        return work

    async def run(fingerprint, key=None):
        await coalescer.run(RequestContext("req", "http://localhost", "c"), fingerprint, key,
                            paid(fingerprint))

    async def main():
        await run("first")
        for i in range(10):  # past the cap, keyless and keyed alike
            await run(f"keyless {i}")
            await run(f"keyed {i}", key=f"k{i}")
        now[0] = 59
        await run("first")  # still in its window: shared, not run again
        assert runs.count("first") == 1
        assert len(coalescer) == 11 + 3  # every keyless outcome; the keyed ones capped
        now[0] = 61
        for i in range(SWEEP_EVERY):
            await run(f"later {i}")
        assert len(coalescer) <= SWEEP_EVERY + 3  # the expired keyless ones are gone

    asyncio.run(main())
