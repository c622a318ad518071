"""The ledger: durable records of every signature, outcomes, totals, and crash recovery."""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from datetime import date, timedelta
from pathlib import Path

import pytest

from clawrouter.cli.common import file_problem
from clawrouter.payment.ledger import (
    CHAIN_PATIENCE, EXPIRY_MARGIN, NOTE_MAX, Holder, Ledger, LedgerBusy, clean_note, day_start,
    holder, in_use, local_day, lock_path,
)

REPO = Path(__file__).resolve().parents[1]
TODAY = date(2026, 3, 14)
NOON = day_start(TODAY) + 12 * 3600


class Clock:
    """A controllable wall clock."""

    def __init__(self, now: float = NOON) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


_nonces = iter(range(10**9))


def record(ledger: Ledger, amount: int = 53_500, **fields) -> int:
    values = dict(request_id="req-1", route="/v1/images/generations", model="google/nano-banana",
                  size="1024x1024", n=1, amount=amount,
                  payee="0xe9030014F5DAe217d0A152f02A043567b16c1aBf", network="eip155:8453",
                  nonce=f"0x{next(_nonces):064x}")
    values.update(fields)
    return ledger.commit(ledger.signed(**values))


def test_schema_is_wal_with_full_sync(ledger: Ledger) -> None:
    raw = sqlite3.connect(ledger.path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 3
        columns = [row[1] for row in raw.execute("PRAGMA table_info(payments)")]
    finally:
        raw.close()
    assert columns == ["id", "time", "request_id", "route", "model", "size", "n", "amount",
                       "payee", "network", "nonce", "status", "transaction", "latency_ms",
                       "note", "attempt", "payer", "valid_before", "idempotency", "unspendable"]
    assert ledger._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_record_then_finish(ledger: Ledger, clock: Clock) -> None:
    pid = record(ledger, request_id="req-9", attempt=2)
    row = ledger.get(pid)
    assert (row.status, row.time, row.request_id, row.attempt, row.amount) == \
        ("signed", clock.now, "req-9", 2, 53_500)
    assert row.transaction is None and row.latency_ms is None and row.note is None

    ledger.commit(ledger.outcome(pid, "settled", transaction="0xabc", latency_ms=812.5))
    # a detail; keeps the rest
    ledger.commit(ledger.outcome(pid, "settled", note="receipt read twice"))
    row = ledger.get(pid)
    assert (row.status, row.transaction, row.latency_ms, row.note) == \
        ("settled", "0xabc", 812.5, "receipt read twice")

    with pytest.raises(ValueError, match="already settled"):
        ledger.commit(ledger.outcome(pid, "rejected"))
    with pytest.raises(ValueError):
        ledger.commit(ledger.outcome(pid, "signed"))
    with pytest.raises(ValueError):
        ledger.commit(ledger.outcome(pid, "lost"))
    with pytest.raises(KeyError):
        ledger.commit(ledger.outcome(pid + 100, "settled"))


def test_outcomes_move_the_running_total(ledger: Ledger) -> None:
    a, b, c = record(ledger, 10_000), record(ledger, 20_000), record(ledger, 40_000)
    assert ledger.spent() == 70_000
    ledger.commit(ledger.outcome(a, "rejected", note="PAYMENT_INVALID"))  # costs nothing
    ledger.commit(ledger.outcome(a, "rejected"))  # again: not subtracted twice
    ledger.commit(ledger.outcome(b, "failed_after_payment", note="upstream 500 after payment"))
    ledger.commit(ledger.outcome(c, "unknown"))
    assert ledger.spent() == 60_000
    ledger.commit(ledger.outcome(b, "settled", transaction="0x1"))  # a later receipt resolves it
    ledger.commit(ledger.outcome(c, "rejected"))  # reconciliation found it never settled
    assert ledger.spent() == 20_000
    assert ledger.spent() == ledger.spent(since=0)
    with pytest.raises(ValueError):
        ledger.commit(ledger.outcome(a, "settled"))  # rejected already gave its room away


def test_nonce_is_unique(ledger: Ledger) -> None:
    record(ledger, nonce="0xsame")
    with pytest.raises(ValueError, match="already in the ledger"):
        record(ledger, nonce="0xsame")
    assert len(ledger.payments()) == 1
    assert ledger.spent() == 53_500


@pytest.mark.parametrize("bad", [dict(amount=0), dict(amount=True), dict(amount=1.5),
                                 dict(n=0), dict(attempt=3), dict(nonce="")])
def test_invalid_rows_are_refused(ledger: Ledger, bad: dict) -> None:
    with pytest.raises(ValueError):
        record(ledger, **bad)
    assert ledger.payments() == [] and ledger.spent() == 0


def test_notes_never_hold_keys_or_headers(ledger: Ledger) -> None:
    key = "0x" + "ab" * 32
    header = "eyJ4NDAyVmVyc2lvbiI6Miwi" * 10
    pid = record(ledger)
    note = f"boom key={key}\nheader {header} " + "word " * 99
    ledger.commit(ledger.outcome(pid, "failed_after_payment", note=note))
    note = ledger.get(pid).note
    assert key not in note and header[:64] not in note and "\n" not in note
    assert note.startswith("boom key=[redacted] header [redacted]") and len(note) == 300


def test_spent_since(ledger: Ledger, clock: Clock) -> None:
    record(ledger, 1_000)
    clock.now += 100
    record(ledger, 2_000)
    assert ledger.spent(since=clock.now) == 2_000
    assert ledger.spent(since=clock.now + 1) == 0


def test_summary(ledger: Ledger, clock: Clock) -> None:
    def at(day: date, status: str, amount: int, model: str = "google/nano-banana") -> int:
        clock.now = day_start(day) + 9 * 3600
        pid = record(ledger, amount, model=model)
        if status != "signed":
            ledger.commit(ledger.outcome(
                pid, status, transaction="0xt" if status == "settled" else None))
        return pid

    at(TODAY, "settled", 53_500)
    at(TODAY, "settled", 16_750, model="zai/cogview-4")
    at(TODAY, "signed", 53_500)
    at(TODAY, "failed_after_payment", 1_000)
    at(TODAY, "rejected", 99_000)  # free: nowhere but `latest`
    at(TODAY.replace(day=2), "settled", 100_000)
    at(TODAY.replace(day=2), "unknown", 7_000, model="zai/cogview-4")
    at(date(2026, 2, 20), "settled", 200_000)  # last month, within 30 days
    at(date(2026, 1, 1), "settled", 400_000)  # outside the 30 days
    last = at(TODAY, "settled", 1)

    s = ledger.summary(now=NOON)
    json.dumps(s)  # JSON-ready
    assert s["today"] == {"usd": 0.070251, "micro": 70_251, "payments": 3,
                          "pending": {"usd": 0.0545, "micro": 54_500, "payments": 2}}
    assert s["month"] == {"usd": 0.170251, "micro": 170_251, "payments": 4,
                          "pending": {"usd": 0.0615, "micro": 61_500, "payments": 3}}
    assert s["total"]["micro"] == 770_251 and s["total"]["payments"] == 6
    assert s["total"]["pending"]["micro"] == 61_500
    assert s["by_model"] == [
        {"model": "google/nano-banana", "usd": 0.753501, "micro": 753_501, "payments": 5,
         "pending": {"usd": 0.0545, "micro": 54_500, "payments": 2}},
        {"model": "zai/cogview-4", "usd": 0.01675, "micro": 16_750, "payments": 1,
         "pending": {"usd": 0.007, "micro": 7_000, "payments": 1}},
    ]
    assert [(d["day"], d["micro"], d["pending"]["micro"]) for d in s["by_day"]] == [
        ("2026-03-14", 70_251, 54_500), ("2026-03-02", 100_000, 7_000),
        ("2026-02-20", 200_000, 0)]
    assert len(s["latest"]) == 10 and s["latest"][0]["id"] == last
    assert [p["status"] for p in s["latest"][5:7]] == ["rejected", "failed_after_payment"]
    assert s["latest"][-1]["transaction"] == "0xt" and s["latest"][-1]["usd"] == 0.0535
    assert len(ledger.summary(now=NOON, latest=2)["latest"]) == 2

    # the next day: today is empty, the month is not
    s = ledger.summary(now=day_start(TODAY + timedelta(days=1)) + 1)
    assert s["today"]["micro"] == 0 and s["today"]["pending"]["payments"] == 0
    assert s["month"]["micro"] == 170_251


def test_days_are_local(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "XYZ-10")  # POSIX spelling of UTC+10, no tz database needed
    time.tzset()
    try:
        utc_evening = 1_773_518_400.0  # 2026-03-14 20:00 UTC = 2026-03-15 06:00 local
        with Ledger(tmp_path / "l.sqlite3", clock=lambda: utc_evening) as ledger:
            record(ledger, 5_000)
            assert local_day(utc_evening) == "2026-03-15"
            s = ledger.summary()
            assert s["by_day"][0]["day"] == "2026-03-15"
            assert s["today"]["pending"]["micro"] == 5_000
            assert s["timezone"] == "XYZ"
            assert ledger.spent_since_day("2026-03-15") == 5_000
    finally:
        monkeypatch.undo()
        time.tzset()


def test_a_refused_authorization_counts_until_it_expires(tmp_path: Path, clock: Clock) -> None:
    """Without the chain to ask: the upstream's refusal does not unsign it, so until validBefore
    (plus a margin for the chain's clock) it keeps counting, across a restart too."""
    path = tmp_path / "ledger.sqlite3"
    expires = int(clock.now) + 300
    with Ledger(path, clock=clock) as ledger:
        refused = record(ledger, 4_000, valid_before=expires)
        unsent = record(ledger, 2_000, valid_before=expires)
        ledger.commit(ledger.outcome(refused, "rejected", note="PAYMENT_INVALID"))
        ledger.commit(ledger.outcome(unsent, "rejected", can_settle=False))  # never left
        assert ledger.spent() == ledger.spent(since=0) == 4_000
        assert ledger.spent_since_day(local_day(clock.now)) == 4_000
        assert ledger.held() == [(clock.now, 4_000)]
        assert [p.id for p in ledger.unresolved(ledger.get(refused).network)] == []  # no payer
    with Ledger(path, clock=clock) as again:
        assert again.spent() == again.spent(since=0) == 4_000
        clock.now = expires + EXPIRY_MARGIN - 1
        assert again.spent() == 4_000
        clock.now += 1
        assert again.spent() == again.spent(since=0) == 0
        assert again.spent_since_month(local_day(clock.now)[:7]) == 0 and again.held() == []
    with Ledger(path, clock=clock) as expired:
        assert expired.spent() == 0


def test_with_the_chain_asked_a_refused_authorization_counts_until_it_answers(
        tmp_path: Path, clock: Clock) -> None:
    """Expiry alone frees nothing then: the chain says whether it expired unused (freed) or
    was used after all (`settled`, still counted, its record corrected). RPCs that never
    answer hold it `CHAIN_PATIENCE` at most; another network's refusal only until it expires."""
    path = tmp_path / "ledger.sqlite3"
    expires = int(clock.now) + 300
    payer = "0x" + "ab" * 20
    base = "eip155:8453"
    with Ledger(path, clock=clock, chain_network=base) as ledger:
        unused = record(ledger, 4_000, valid_before=expires, payer=payer)
        used = record(ledger, 2_000, valid_before=expires, payer=payer)
        unanswered = record(ledger, 1_000, valid_before=expires, payer=payer)
        elsewhere = record(ledger, 500, valid_before=expires, payer=payer, network="eip155:84532")
        failed = record(ledger, 300, valid_before=expires, payer=payer)
        for pid in (unused, used, unanswered, elsewhere):
            ledger.commit(ledger.outcome(pid, "rejected", note="PAYMENT_INVALID"))
        ledger.commit(ledger.outcome(failed, "failed_after_payment"))
        # the rows whose fate is unknown and the refusals apart, each paged by id
        assert [p.id for p in ledger.unresolved(base)] == [failed]
        assert [p.id for p in ledger.unresolved(base, refused=True)] == [unused, used, unanswered]
        assert [p.id for p in ledger.unresolved(base, refused=True, limit=2)] == [unused, used]
        assert [p.id for p in ledger.unresolved(base, refused=True, after_id=used)] == \
            [unanswered]
        clock.now = expires + 10 * EXPIRY_MARGIN
        assert ledger.spent() == 7_300 and len(ledger.held()) == 3  # only `elsewhere` let go
    with Ledger(path, clock=clock, chain_network=base) as again:  # held across a restart
        assert again.spent() == again.spent(since=0) == 7_300
        again.commit(again.outcome(unused, "rejected", can_settle=False, expected="rejected"))
        again.commit(again.outcome(used, "settled", transaction="0xfeed", expected="rejected"))
        assert again.spent() == again.spent(since=0) == 3_300
        assert again.get(used).status == "settled"
        with pytest.raises(ValueError, match="already rejected"):  # settled only from the chain
            again.commit(again.outcome(unused, "settled"))
        clock.now = expires + CHAIN_PATIENCE
        assert again.spent() == again.spent(since=0) == 2_300 and again.held() == []
        # no longer counted, still asked about: a late "used" still corrects the record
        assert [p.id for p in again.unresolved(base)] == [failed]
        assert [p.id for p in again.unresolved(base, refused=True)] == [unanswered]
        again.commit(again.outcome(unanswered, "settled", expected="rejected"))
        assert again.spent() == again.spent(since=0) == 3_300
    with Ledger(path, clock=clock, chain_network=base) as reopened:
        assert reopened.spent() == 3_300


def test_refusals_from_before_holds_stay_final_unless_still_spendable(tmp_path: Path,
                                                                        clock: Clock) -> None:
    path = tmp_path / "ledger.sqlite3"
    with Ledger(path, clock=clock) as ledger:
        spendable = record(ledger, 4_000, valid_before=int(clock.now) + 300)
        expired = record(ledger, 2_000, valid_before=int(clock.now) - 300)
        for pid in (spendable, expired):
            ledger.commit(ledger.outcome(pid, "rejected"))
    raw = sqlite3.connect(path)  # as a version-2 ledger left them
    raw.executescript("ALTER TABLE payments DROP COLUMN unspendable; PRAGMA user_version = 2;")
    raw.close()
    with Ledger(path, clock=clock, chain_network="eip155:8453") as upgraded:
        assert upgraded.spent() == 4_000  # only the one a payee could still settle
        flags = dict(upgraded._conn.execute("SELECT id, unspendable FROM payments"))
        assert flags == {spendable: None, expired: 1}


def test_a_key_is_found_by_the_newest_payment_it_signed(ledger: Ledger, clock: Clock) -> None:
    refused = record(ledger, 1_000, idempotency="k")
    ledger.commit(ledger.outcome(refused, "rejected"))
    assert ledger.paid_for("k", since=0).id == refused  # its outcome, kept across a restart
    kept_here = record(ledger, 1_000, idempotency="k2")
    ledger.commit(ledger.outcome(kept_here, "rejected", note="never sent: the client left",
                                 can_settle=False))
    assert ledger.paid_for("k2", since=0) is None  # it cost nothing: the key may run again
    # an upstream's refusal that reads the same is still a signature it holds
    sent = record(ledger, 1_000, idempotency="k3")
    ledger.commit(ledger.outcome(sent, "rejected", note="never sent to the facilitator"))
    assert ledger.paid_for("k3", since=0).id == sent
    paid = record(ledger, 2_000, idempotency="k", attempt=2)
    assert ledger.paid_for("k", since=0).id == paid
    assert ledger.paid_for("k", since=clock.now + 1) is None  # older than the key's 24 h
    assert ledger.paid_for("other", since=0) is None


def test_one_process_per_ledger_and_totals_reload(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "ledger.sqlite3"
    first = Ledger(path, clock=clock)
    record(first, 3_000)
    pid = record(first, 4_000)
    first.commit(first.outcome(pid, "rejected"))
    lock = lock_path(path)
    assert re.fullmatch(r"[0-9a-f]{16}", first.instance)
    assert in_use(lock) and holder(lock) == Holder(os.getpid(), None, first.instance)
    with pytest.raises(LedgerBusy) as busy:
        Ledger(path)
    assert busy.value.holder == Holder(os.getpid(), None, first.instance)
    assert f"(pid {os.getpid()})" in str(busy.value)
    first.advertise("http://127.0.0.1:8402")  # a gateway others may use says where it is
    with pytest.raises(LedgerBusy) as busy:
        Ledger(path)
    assert busy.value.holder == Holder(os.getpid(), "http://127.0.0.1:8402", first.instance)
    assert f"(pid {os.getpid()}, serving http://127.0.0.1:8402)" in str(busy.value)
    first.close()
    assert not in_use(lock)
    with Ledger(path, clock=clock) as again:
        assert again.spent() == 3_000
        assert again.spent_since_day(local_day(clock.now)) == 3_000


def test_a_filesystem_without_locks_is_named_not_taken_for_another_gateway(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """flock failing for another reason than a holder (ENOLCK: NFS without lockd) is not
    "another clawrouter process is using this ledger": a command would wait for that process
    to its deadline. It is a file the command cannot use, said in one line."""
    def no_locks(*_: object) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    path = tmp_path / "ledger.sqlite3"
    with pytest.raises(OSError) as failed:
        Ledger(path)
    assert not isinstance(failed.value, LedgerBusy)
    assert failed.value.filename == str(lock_path(path))
    assert file_problem(failed.value) == (f"cannot use {lock_path(path)}: cannot lock it "
                                          f"({os.strerror(errno.ENOLCK)})")


def test_a_process_testing_the_lock_never_fails_a_gateway_starting_meanwhile(
        tmp_path: Path) -> None:
    """A command waiting for the ledger takes its lock for an instant to see if it is free; a
    gateway opening the ledger in that instant must open it, not report it busy."""
    path = tmp_path / "ledger.sqlite3"
    Ledger(path).close()
    with open(lock_path(path), "rb") as tester:
        fcntl.flock(tester, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as in_use() does
        threading.Timer(0.03, fcntl.flock, (tester, fcntl.LOCK_UN)).start()
        with Ledger(path) as opened:
            assert opened.spent() == 0


def test_async_call_runs_on_the_ledger_thread(ledger: Ledger) -> None:
    async def main() -> int:
        pid = await ledger.call(record, ledger, 7_000)
        await ledger.call(ledger.commit, ledger.outcome(pid, "settled", transaction="0x2"))
        return pid

    pid = asyncio.run(main())
    assert ledger.get(pid).status == "settled"


def test_a_cancelled_caller_does_not_cancel_a_queued_write(ledger: Ledger) -> None:
    """The single ledger thread queues writes; cancelling the task that waits for one (a
    client that left) must not drop it from the queue."""
    pid = record(ledger, 7_000)
    gate = threading.Event()

    async def main() -> None:
        blocker = asyncio.ensure_future(ledger.call(gate.wait, 5))
        waiter = asyncio.ensure_future(ledger.call(
            ledger.commit, ledger.outcome(pid, "settled", transaction="0x3")))
        await asyncio.sleep(0.05)
        waiter.cancel()  # the finish is still queued behind the blocker
        gate.set()
        await blocker
        await asyncio.sleep(0.2)

    asyncio.run(main())
    assert ledger.get(pid).status == "settled"


def test_concurrent_writes_share_commits_and_fail_alone(ledger: Ledger) -> None:
    """The gateway's path: writes from many tasks are group committed, yet each gets its own
    answer — a repeated nonce fails that write only, and its neighbours in the batch land."""
    fields = dict(request_id="req-b", route="/v1/images/generations", model="zai/cogview-4",
                  size="512x512", n=1, payee="0xe9030014F5DAe217d0A152f02A043567b16c1aBf",
                  network="eip155:8453")
    commits: list[int] = []
    commit = ledger._commit

    def counting(writes):
        commits.append(len(writes))
        return commit(writes)

    ledger._commit = counting  # type: ignore[method-assign]

    async def main() -> list[object]:
        writes = [ledger.write(ledger.signed(amount=1_000 + i, nonce=f"0x{i % 40:064x}",
                                             **fields)) for i in range(41)]
        return await asyncio.gather(*writes, return_exceptions=True)

    results = asyncio.run(main())
    ids, errors = results[:40], results[40:]
    assert all(isinstance(i, int) for i in ids) and len(set(ids)) == 40
    [error] = errors
    assert isinstance(error, ValueError) and "already in the ledger" in str(error)
    assert sum(commits) == 41 and len(commits) < 41  # batched: fewer commits than writes
    assert len(ledger.payments()) == 40
    assert ledger.spent() == sum(1_000 + i for i in range(40))  # the refused one never counted


def test_a_failed_commit_fails_the_whole_batch_and_counts_nothing(ledger: Ledger) -> None:
    """A commit that fails (disk full) reaches every write of its batch as an error, and
    none of them enters the running totals or the budget's accounts."""
    pid = record(ledger, 5_000)

    class Full:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn
            self.in_transaction = False

        def execute(self, sql: str, *args):
            if sql == "COMMIT":
                raise sqlite3.OperationalError("database or disk is full")
            cursor = self.conn.execute(sql, *args)
            self.in_transaction = self.conn.in_transaction
            return cursor

    real = ledger._conn
    ledger._conn = Full(real)  # type: ignore[assignment]
    try:
        with pytest.raises(sqlite3.OperationalError, match="disk is full"):
            record(ledger, 7_000)
        with pytest.raises(sqlite3.OperationalError, match="disk is full"):
            ledger.commit(ledger.outcome(pid, "rejected"))
    finally:
        ledger._conn = real
    assert not real.in_transaction
    assert [(p.amount, p.status) for p in ledger.payments()] == [(5_000, "signed")]
    assert ledger.spent() == 5_000


def test_a_cancelled_write_is_still_made_durable(ledger: Ledger) -> None:
    """A client leaving while its signed payment is recorded must not un-record it."""
    gate = threading.Event()

    async def main() -> None:
        blocker = asyncio.ensure_future(ledger.call(gate.wait, 5))
        waiter = asyncio.ensure_future(ledger.write(ledger.signed(
            request_id="req-c", route="/v1/images/generations", model="zai/cogview-4",
            size="512x512", n=1, amount=2_000, payee="0xe9030014F5DAe217d0A152f02A043567b16c1aBf",
            network="eip155:8453", nonce="0x" + "c" * 64)))
        await asyncio.sleep(0.05)
        waiter.cancel()
        gate.set()
        await blocker
        with pytest.raises(asyncio.CancelledError):
            await waiter

    asyncio.run(main())
    ledger.close()  # waits for the queue
    with Ledger(ledger.path) as again:
        [row] = again.payments()
        assert (row.amount, row.status) == (2_000, "unknown")  # signed, outcome never known


# --- crashes: real processes, real kill -9 ------------------------------------------------------

_CHILD = """
import sys, time
from pathlib import Path
from clawrouter.payment.ledger import Ledger
ledger = Ledger(Path(sys.argv[1]))
def rec(i):
    return ledger.commit(ledger.signed(request_id=f"req-{i}", route="/v1/images/generations",
        model="openai/gpt-image-1", size="1024x1024", n=2, amount=43_000 + i,
        payee="0xe9030014F5DAe217d0A152f02A043567b16c1aBf", network="eip155:8453",
        nonce=f"0x{i:064x}"))
if sys.argv[2] == "one":
    rec(0)
    print("ready", flush=True)
    time.sleep(60)
elif sys.argv[2] == "batched":  # the gateway's path: concurrent writes, group committed
    import asyncio
    counter = iter(range(10**9))
    async def writer():
        while True:
            i = next(counter)
            pid = await ledger.write(ledger.signed(
                request_id=f"req-{i}", route="/v1/images/generations", model="openai/gpt-image-1",
                size="1024x1024", n=2, amount=43_000 + i,
                payee="0xe9030014F5DAe217d0A152f02A043567b16c1aBf", network="eip155:8453",
                nonce=f"0x{i:064x}"))
            print("recorded", pid, i, flush=True)
            if i % 3 == 0:
                await ledger.write(ledger.outcome(pid, "settled", transaction=f"0xtx{i}",
                                                  latency_ms=1.5))
                print("settled", pid, flush=True)
    async def main():
        await asyncio.gather(*(writer() for _ in range(16)))
    asyncio.run(main())
else:
    i = 0
    while True:
        pid = rec(i)
        print("recorded", pid, i, flush=True)
        if i % 3 == 0:
            ledger.commit(ledger.outcome(pid, "settled", transaction=f"0xtx{i}", latency_ms=1.5))
            print("settled", pid, flush=True)
        i += 1
"""


def _child(path: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(path), mode], env=env,
                            stdout=subprocess.PIPE, text=True)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=10) == -signal.SIGKILL
    proc.stdout.close()


def test_kill_9_after_signing_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite3"
    proc = _child(path, "one")
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        _kill(proc)
    with Ledger(path) as ledger:
        (row,) = ledger.payments()
        assert ledger.interrupted == {row.id: row.time}  # in flight when it died: retried?
        assert (row.status, row.request_id, row.amount, row.n, row.nonce) == \
            ("unknown", "req-0", 43_000, 2, "0x" + "0" * 64)
        assert "stopped" in row.note
        assert ledger.spent() == 43_000  # still counted: it may have cost money
    with Ledger(path) as ledger:  # and it stays visible as unknown
        assert ledger.interrupted == {} and ledger.payments()[0].status == "unknown"


@pytest.mark.parametrize("mode", ["many", "batched"])
def test_kill_9_during_many_writes_loses_no_committed_row(tmp_path: Path, mode: str) -> None:
    """Every write reported done (one by one, or 16 at a time through the group commit) is
    in the ledger after a kill -9, with its outcome if that was reported too."""
    path = tmp_path / "ledger.sqlite3"
    proc = _child(path, mode)
    recorded: dict[int, int] = {}
    settled: set[int] = set()
    try:
        while len(recorded) < 150:
            line = proc.stdout.readline().split()
            if line[0] == "recorded":
                recorded[int(line[1])] = int(line[2])
            else:
                settled.add(int(line[1]))
    finally:
        _kill(proc)  # while it keeps writing
    with Ledger(path) as ledger:
        assert ledger._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = {p.id: p for p in ledger.payments()}
        assert set(recorded) <= set(rows)
        for pid, i in recorded.items():
            assert (rows[pid].request_id, rows[pid].amount) == (f"req-{i}", 43_000 + i)
        for pid in settled:
            assert (rows[pid].status, rows[pid].transaction) == ("settled", f"0xtx{recorded[pid]}")
        assert {p.status for p in rows.values()} <= {"settled", "unknown"}
        assert ledger.spent() == sum(p.amount for p in rows.values())


def test_a_note_is_plain_one_line_text_without_secrets() -> None:
    """Notes quote upstreams and reach `clawrouter stats` and agents: no terminal escapes,
    no line breaks, nothing that could be a key, bounded."""
    key = "ab" * 32
    note = clean_note(f"refused\x1b]52;c;ZXZpbA==\x07\x1b[2J\r\n\u2028key {key} " + "x" * 999)
    assert note is not None and note.startswith("refused") and key not in note
    assert "[redacted]" in note and len(note) <= NOTE_MAX
    assert not any(ord(c) < 32 or 0x7f <= ord(c) <= 0x9f or c == "\u2028" for c in note)
    assert clean_note(" \r\n ") is None


def test_the_ledger_is_the_owners_only_whatever_the_umask(tmp_path: Path) -> None:
    """Every payment is in it: like the image index, the ledger and its -wal and -shm are made
    0600 (they were 0644 under a usual umask, readable by all in a data directory that is
    not private), and one an older version made readable is tightened."""
    old = tmp_path / "old" / "ledger.sqlite3"
    old.parent.mkdir()
    old.touch(mode=0o644)
    old.chmod(0o644)
    previous = os.umask(0o022)
    try:
        for path in (tmp_path / "new" / "ledger.sqlite3", old):
            with Ledger(path, clock=Clock(NOON)) as ledger:
                record(ledger, 5000)
                for part in ("", "-wal", "-shm"):
                    made = path.with_name(path.name + part)
                    assert stat.S_IMODE(made.stat().st_mode) == 0o600, made
    finally:
        os.umask(previous)


@pytest.mark.parametrize("damage", ["recovery", "file"])
def test_a_ledger_that_fails_to_open_leaves_no_file_open(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         damage: str) -> None:
    """Opening fails after a connection opened (recovery meets a damaged row; the file is not
    a database): every connection is closed at once, not when the exception is collected (a
    caller may keep it: the CLI's in-process gateway does), so failures leak no file."""
    def damaged(self: Ledger) -> dict[int, float]:
        raise sqlite3.DatabaseError("database disk image is malformed")

    if damage == "recovery":
        monkeypatch.setattr(Ledger, "_recover", damaged)
    else:
        (tmp_path / "ledger.sqlite3").write_bytes(b"not a database " * 1000)
    kept: list[BaseException] = []
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(sqlite3.DatabaseError) as failed:
            Ledger(tmp_path / "ledger.sqlite3", clock=Clock(NOON))
        kept.append(failed.value)
    assert len(os.listdir("/proc/self/fd")) == before
