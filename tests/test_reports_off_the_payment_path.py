"""Spending reports never delay a payment: they read apart from the ledger's writer.

A payment's `signed` row must be durable before the payment leaves, and the ledger's writer
thread commits it. A report (GET /v1/spend, which the gallery asks for after every image)
scans every row; on that thread, or under its lock, each payment queued behind it waited for
the whole scan. Reports now read on a read-only connection of their own, in one read
transaction: these tests hold one open mid-way and show a payment's record is not held with
it, and that what the report says is still one consistent moment of the ledger. No timings.

Also here: reports (and the totals loaded at start) count days in SQL, which must be the days
`local_day` counts; and the image store's eviction, which picks its victims off the event loop.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from clawrouter.payment import ledger as ledger_module
from clawrouter.payment import ledgerreport
from clawrouter.payment.ledger import Ledger, Write, local_day
from clawrouter.payment.ledgerdb import LOCAL_DAY
from tests.conftest import Gateway
from tests.test_ledger import NOON, Clock, record

#: seconds a test waits for something that must happen at once (never a timing assertion)
PATIENCE = 10


class Hold:
    """Stops the first call of a step (of a report, inside its read transaction; of an
    eviction's pick) after it ran, until released."""

    def __init__(self) -> None:
        self.held = threading.Event()
        self.release = threading.Event()

    def wrap(self, step: Callable[..., Any]) -> Callable[..., Any]:
        """`step`, then hold (once): the report's snapshot is taken, its answer not given."""
        def held(*args: Any, **kwargs: Any) -> Any:
            value = step(*args, **kwargs)
            if not self.held.is_set():
                self.held.set()
                self.release.wait(3 * PATIENCE)  # (the test gives up first)
            return value

        return held


@pytest.fixture
def hold(monkeypatch: pytest.MonkeyPatch) -> Iterator[Hold]:
    """Every report holds after its windows are summed (before `latest` is read)."""
    holding = Hold()
    monkeypatch.setattr(ledger_module, "spending", holding.wrap(ledgerreport.spending))
    yield holding
    holding.release.set()


def signed(ledger: Ledger, amount: int = 9_000) -> Write:
    return ledger.signed(request_id="req-r", route="/v1/images/generations",
                         model="zai/cogview-4", size="512x512", n=1, amount=amount,
                         payee="0xe9030014F5DAe217d0A152f02A043567b16c1aBf",
                         network="eip155:8453", nonce=f"0x{time.time_ns():064x}")


def test_a_payment_is_recorded_while_a_report_is_held(ledger: Ledger, hold: Hold) -> None:
    """The payment's row commits while the report is still inside its read; the report then
    answers from the moment it started (the row is not in it), and the next one has it."""
    first = record(ledger, 4_000)

    async def main() -> tuple[int, dict[str, Any], bool]:
        report = asyncio.ensure_future(ledger.report(latest=5))
        assert await asyncio.to_thread(hold.held.wait, PATIENCE), "the report never started"
        try:  # with the report on the writer's thread (or lock) this waits for it: times out
            payment = await asyncio.wait_for(ledger.write(signed(ledger)), PATIENCE)
            still_held = not report.done()
        finally:
            hold.release.set()
        return payment, await report, still_held

    payment, summary, still_held = asyncio.run(main())
    assert still_held
    assert [p["id"] for p in summary["latest"]] == [first]
    assert summary["total"]["pending"]["micro"] == 4_000
    after = ledger.summary(latest=5)
    assert [p["id"] for p in after["latest"]] == [payment, first]
    assert after["total"]["pending"]["micro"] == 13_000


def test_spend_over_http_does_not_hold_up_a_payment(gateway: Gateway, hold: Hold) -> None:
    """The same through GET /v1/spend, the gallery's call: the handler reads apart from the
    writer, and its answer is the usual one."""
    ledger: Ledger = gateway.gw.ledger
    loop = gateway.server.loop
    assert loop is not None
    answer: Future[httpx.Response] = Future()
    client = threading.Thread(target=lambda: answer.set_result(
        gateway.http.get("/v1/spend", params={"latest": 3})))
    client.start()
    try:
        assert hold.held.wait(PATIENCE), "the report never started"
        payment = asyncio.run_coroutine_threadsafe(ledger.write(signed(ledger)), loop)
        payment_id = payment.result(PATIENCE)  # TimeoutError if it waits for the report
        assert not answer.done()
    finally:
        hold.release.set()
        client.join(PATIENCE)
    response = answer.result(PATIENCE)
    assert response.status_code == 200
    body = response.json()
    assert body["latest"] == [] and body["total"]["pending"]["micro"] == 0  # its moment
    assert {"budget", "wallet", "network", "by_model", "by_day"} <= body.keys()
    again = gateway.http.get("/v1/spend").json()
    assert [p["id"] for p in again["latest"]] == [payment_id]


def test_a_report_is_one_moment_of_the_ledger(ledger: Ledger, clock: Clock,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows summed while payments change still agree (`today` <= `month` <= `total`) and
    match `latest`: a refusal and a new payment written between two of the report's queries
    are in none of them."""
    pending = record(ledger, 5_000)
    clock.now = NOON - 3 * 86400  # earlier this month
    earlier = record(ledger, 2_000)
    clock.now = NOON
    holding = Hold()
    monkeypatch.setattr(ledgerreport, "_aggregate", holding.wrap(ledgerreport._aggregate))
    with_report: Future[dict[str, Any]] = Future()
    reader = threading.Thread(target=lambda: with_report.set_result(ledger.summary()))
    reader.start()
    try:
        assert holding.held.wait(PATIENCE)  # `today` summed, `month` and `total` not yet
        ledger.commit(ledger.outcome(pending, "rejected", can_settle=False))  # costs nothing
        record(ledger, 7_000)
    finally:
        holding.release.set()
        reader.join(PATIENCE)
    summary = with_report.result(PATIENCE)
    today, month, total = (summary[name]["pending"]["micro"] for name in ("today", "month",
                                                                          "total"))
    assert today <= month <= total
    assert (today, month, total) == (5_000, 7_000, 7_000)  # as it was when the report began
    assert [(p["id"], p["status"]) for p in summary["latest"]] == [(earlier, "signed"),
                                                                   (pending, "signed")]


# --- days counted in SQL: the same as `local_day` ---------------------------------------------
#: POSIX spellings (no tz database needed): New York's rules, a half-hour change (Lord Howe),
#: a change at midnight (Havana: some days have no midnight) and a zone with no change at all
ZONES = ["EST5EDT,M3.2.0,M11.1.0", "LHST-10:30LHDT-11,M10.1.0,M4.1.0",
         "CST5CDT,M3.2.0/0,M11.1.0/1", "XYZ-3"]


@pytest.fixture(params=ZONES)
def zone(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("TZ", request.param)
    time.tzset()
    try:
        yield request.param
    finally:
        monkeypatch.undo()
        time.tzset()


def tricky_times() -> list[float]:
    """Unix times where a local day is easy to get wrong: every 20 minutes around this year's
    and 2040's clock changes (past 2038 SQLite borrows another year's rules), a hair before
    and after each local midnight of those weeks (SQLite rounds fractions to the millisecond),
    and before 1970."""
    times: list[float] = [-86400 * 400 + 3600 * h for h in range(48)]
    for year in (2026, 2040):
        for month in (3, 4, 10, 11):
            first = day_start_of(date(year, month, 1))
            times += [first + 1200 * k for k in range(31 * 72)]
            for day in range(31):
                midnight = day_start_of(date(year, month, 1) + timedelta(days=day))
                times += [midnight + d for d in (-1, -0.9999, -0.0004, -0.0001, 0, 0.0001, 0.9996)]
    return times


def day_start_of(day: date) -> float:
    return time.mktime((day.year, day.month, day.day, 0, 0, 0, 0, 0, -1))


def test_sql_days_are_local_day(zone: str) -> None:
    """`LOCAL_DAY` (the report's and the startup totals' grouping) is `local_day`, row for
    row, across DST changes, midnights and the years SQLite's own local time gets wrong."""
    conn = sqlite3.connect(":memory:")
    conn.create_function("local_day", 1, local_day, deterministic=True)
    conn.execute("CREATE TABLE payments (time REAL)")
    conn.executemany("INSERT INTO payments VALUES (?)", [(t,) for t in tricky_times()])
    wrong = [(t, day, local_day(t)) for t, day in
             conn.execute(f"SELECT time, {LOCAL_DAY} FROM payments") if day != local_day(t)]
    assert wrong == [], f"{zone}: {len(wrong)} differ, e.g. {wrong[:3]}"


def test_totals_loaded_at_start_are_the_ones_kept_while_running(tmp_path: Path,
                                                                zone: str) -> None:
    """Rows signed at those times count on the same local days after a restart (SQL) as
    they did while the gateway ran (Python): the budgets do not move when it restarts."""
    clock = Clock()
    path = tmp_path / "ledger.sqlite3"
    with Ledger(path, clock=clock) as ledger:
        for when in tricky_times()[::7]:
            clock.now = when
            record(ledger, 1_000)
        running = dict(ledger._totals.by_day)
    with Ledger(path, clock=clock) as again:
        assert again._totals.by_day == running
    assert len(running) > 100 and datetime.fromtimestamp(max(tricky_times())).year == 2040


# --- eviction picks its victims off the event loop --------------------------------------------
def test_eviction_picks_off_the_loop_and_spares_what_changed_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sorting the whole image index no longer holds the event loop: puts and serves run while
    the victims are picked, and a victim used meanwhile (served, put again, or just handed out
    fresh) is kept; only the untouched one goes."""
    from clawrouter.store import store as store_module
    from tests.test_store import META, png

    holding = Hold()
    monkeypatch.setattr(store_module, "choose_victims", holding.wrap(store_module.choose_victims))

    async def main() -> tuple[list[str], list[str], list[str]]:
        async with store_module.ImageStore(tmp_path, ttl_days=0, fresh_seconds=0) as store:
            data = [png(1000, seed) for seed in range(4)]  # ttl 0: each is a victim at once
            served, again, fresh, idle = [await store.put_bytes(d, META) for d in data]
            prune = asyncio.ensure_future(store.prune())
            try:
                assert await asyncio.to_thread(holding.held.wait, PATIENCE)
                store.mark_served(served.id)  # a client fetched it
                await store.put_bytes(data[1], META)  # generated again: its URL out again
                store._fresh[fresh.id] = time.monotonic()  # handed out, nothing else changed
                newcomer = await store.put_bytes(png(1000, 9), META)  # the loop is free
            finally:
                holding.release.set()
            removed = await prune
            images = (served, again, fresh, newcomer, idle)
            return (removed, [i.name for i in images if store.get(i.name) is not None],
                    [i.name for i in images])

    removed, kept, names = asyncio.run(main())
    assert removed == [names[-1]] and kept == names[:-1]


def test_a_report_of_a_closed_ledger_is_a_503_not_a_bug(tmp_path: Path) -> None:
    """A /v1/spend that comes as the gateway stops: the gateway is stopping (503, retry
    later), not an internal error with a traceback in the log."""
    from clawrouter.errors import LedgerUnavailable

    ledger = Ledger(tmp_path / "ledger.sqlite3", clock=Clock(NOON))
    ledger.close()
    with pytest.raises(LedgerUnavailable) as refused:
        asyncio.run(ledger.report())
    assert refused.value.status == 503 and refused.value.code == "ledger_closed"


def test_reports_still_read_a_ledger_whose_directory_was_moved(tmp_path: Path) -> None:
    """The reports' connection is opened with the writer's, by path, while the file is where
    the writer found it: a data directory moved or renamed later still reports (as the
    writer still writes), instead of failing to open a file that is gone."""
    home = tmp_path / "home"
    clock = Clock(NOON)
    ledger = Ledger(home / "ledger.sqlite3", clock=clock)
    try:
        record(ledger, 5000)
        home.rename(tmp_path / "moved")
        record(ledger, 7000)
        assert ledger.summary()["total"]["pending"]["micro"] == 12000  # (signed, unsettled)
    finally:
        ledger.close()
