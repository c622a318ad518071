"""The payment ledger: every signature the gateway makes, recorded before it leaves the process.

Signing is settlement (x402.md §9): once a signed request is out, the money may be gone. So a
payment is written here, durably (SQLite WAL, `synchronous=FULL`), *before* the request is sent,
and updated with its outcome afterwards. A crash between the two leaves the row `signed`; the
next start marks it `unknown`, and it keeps counting against the budgets until the chain says
otherwise (`reconcile`: each row keeps its payer and validBefore for that). Nothing that was
signed ever disappears. A payment the upstream refused (`rejected`) after the signature left
keeps counting until nothing can settle it: until the chain says its authorization expired
unused (or was used: then it is `settled` after all), or, when no chain is asked, until it
expires.

The ledger also keeps running totals in memory (per local calendar day, per month and
overall) so the budget check on the hot path never runs a SQL query. Days and months are the
user's **local** calendar ones (the process's time zone, `TZ`), because that is what "per day"
means to the user.

Threading: every blocking method is thread-safe. From asyncio, writes go through
`await ledger.write(ledger.signed(...))` / `ledger.outcome(...)`: concurrent writes are group
committed by the ledger's own thread (one transaction and one fsync per batch, see
`groupcommit`), so the event loop never waits for an fsync. Reads go through
`await ledger.call(ledger.method, ...)` on the same thread. Reports (`summary`, `payments`:
every row, not one) do not: they read on a read-only connection of their own, in one read
transaction each (`await ledger.report(...)` runs one on the reports' own thread), so however
many rows they scan, a payment's record never waits for them (WAL: readers and the writer do
not block each other).

The parts it is made of, each in a module of its own (their public names are re-exported here):
`ledgerdb` (the file: rows, statuses, schema, migrations), `ledgerlock` (one process per
ledger), `ledgertotals` (the running totals) and `ledgerreport` (spending as the user reads it).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, TypeVar

from clawrouter.errors import LedgerUnavailable
from clawrouter.groupcommit import GroupCommit, Outcome
from clawrouter.payment.ledgerdb import (
    CHAIN_PATIENCE, COLUMNS, EXPIRY_MARGIN, FAILED_AFTER_PAYMENT, FINAL, HELD, PENDING, REJECTED,
    SCHEMA_VERSION, SETTLED, SIGNED, STATUSES, UNKNOWN, LedgerUnusable, Payment, connect,
    day_start, held_params, local_day, open_reader,
)
from clawrouter.payment.ledgerlock import (
    Holder, LedgerBusy, describe, exclusive_lock, holder, in_use, lock_path,
)
from clawrouter.payment.ledgerreport import spending
from clawrouter.payment.ledgertotals import Change, RunningTotals
from clawrouter.plaintext import one_line, scrub

__all__ = [
    "CHAIN_PATIENCE", "EXPIRY_MARGIN", "FAILED_AFTER_PAYMENT", "FILENAME", "FINAL", "NEVER_SENT",
    "NOTE_MAX", "PENDING", "REJECTED", "SCHEMA_VERSION", "SETTLED", "SIGNED", "STATUSES",
    "UNKNOWN", "Convertible", "Holder", "Ledger", "LedgerBusy", "LedgerUnusable", "Payment",
    "Releasable", "Write", "clean_note", "day_start", "holder", "in_use", "local_day", "lock_path",
]

log = logging.getLogger(__name__)

FILENAME = "ledger.sqlite3"

#: how a `rejected` row's note starts when its signature never left the process (its request
#: ended first): it cost nothing, and its Idempotency-Key may run again (`paid_for`)
NEVER_SENT = "never sent"
NOTE_MAX = 300

T = TypeVar("T")


class Convertible(Protocol):
    """What `signed` needs from a budget reservation (see `budget.Reservation`)."""

    def check_recordable(self, amount: int) -> None: ...
    def paid(self, payment_id: int) -> None: ...


class Releasable(Protocol):
    def release(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Write:
    """One ledger change: `sql` runs inside a batch's transaction; `durable` runs with its value
    once that transaction is on disk (it moves the in-memory running totals)."""

    sql: Callable[[sqlite3.Connection], Any]
    durable: Callable[[Any], None] | None = None


def clean_note(note: str | None) -> str | None:
    """Short, single-line plain text (`plaintext`: an upstream's words reach terminals), and
    without anything that could be a key or a payment header (`scrub`: the payment this
    request sent, in any form, and long hex or base64 runs, split into words or not)."""
    if note is None:
        return None
    return one_line(scrub(note), NOTE_MAX) or None


def _check_signed(amount: int, n: int, attempt: int, nonce: str) -> None:
    """Refuse a payment record the table would refuse too, before anything is queued."""
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise ValueError(f"amount must be a positive int of micro-USDC, got {amount!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if attempt not in (1, 2):
        raise ValueError(f"attempt must be 1 or 2, got {attempt!r}")
    if not nonce:
        raise ValueError("nonce is required")


class Ledger:
    """The SQLite ledger at `path` (normally `$CLAWROUTER_HOME/ledger.sqlite3`).

    Opening it creates the schema, takes an exclusive process lock, and turns rows left
    `signed` by a previous run into `unknown`. `holding` is called once the lock is ours and
    before anything is read or changed: whatever else must be held for the ledger to be this
    process's (the wallet's lock). If it raises, the ledger is let go untouched, so the rows a
    crash left in flight are still there for the start that does get it (`interrupted`).
    What it returns is released by `close`.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time,
                 chain_network: str | None = None,
                 holding: Callable[[], Releasable] | None = None) -> None:
        self.path = Path(path)
        self._clock = clock
        #: the network (CAIP-2) whose chain is asked about refused authorizations (`reconcile`
        #: runs), if any: they count until it answers (`CHAIN_PATIENCE` at most), else until
        #: they expire
        self.chain_network = chain_network
        #: guards the running totals; `Budget` shares it so turning a reservation into a
        #: ledger row is one atomic step (never counted twice, never zero times)
        self.lock = threading.RLock()
        self._db_lock = threading.Lock()  # one statement sequence at a time on the connection
        #: the reports' read-only connection (`_reading`), one report at a time on it; never
        #: `_db_lock`, so the writer never waits for a report
        self._reader: sqlite3.Connection | None = None
        self._read_lock = threading.Lock()
        self._reports: ThreadPoolExecutor | None = None
        self._closed = False
        self._group: GroupCommit[Write] | None = None
        self._totals = RunningTotals(clock, chain_network)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        #: this process's hold on the ledger (see `Holder.instance`)
        self.instance = secrets.token_hex(8)
        #: when the last commit failed (disk full, locked), until one succeeds (`/readyz`)
        self.failed_at: float | None = None
        self._lockfile = exclusive_lock(lock_path(self.path), self.instance)
        self._holding: Releasable | None = None
        try:
            self._holding = holding() if holding is not None else None
            self._conn = connect(self.path, self._clock())
            # opened now, by path, while the file is surely where the writer found it
            self._reader = open_reader(self.path)
            #: the rows this process found left `signed` (id: time signed): in flight when
            #: the last run died, their clients may well retry them (`coalesce`)
            self.interrupted = self._recover()
            self._totals.load(self._conn)
        except BaseException:
            # (closed now, not when the exception is collected: a caller may keep it)
            for conn in (self._reader, getattr(self, "_conn", None)):  # the reader first
                if conn is not None:
                    conn.close()
            self._let_go()
            raise

    def _recover(self) -> dict[int, float]:
        """Rows still `signed` were in flight when the last run died: their fate is unknown."""
        ids = dict(self._conn.execute("SELECT id, time FROM payments WHERE status = ?",
                                      (SIGNED,)).fetchall())
        self._conn.execute(  # (the process lock keeps any other writer out meanwhile)
            "UPDATE payments SET status = ?, note = COALESCE(note, ?) WHERE status = ?",
            (UNKNOWN, "gateway stopped before the outcome was known", SIGNED))
        return ids

    # --- writing ------------------------------------------------------------------------------
    def signed(self, *, request_id: str, route: str, model: str, size: str, n: int,
               amount: int, payee: str, network: str, nonce: str, attempt: int = 1,
               payer: str | None = None, valid_before: int | None = None,
               idempotency: str | None = None,
               reservation: Convertible | None = None) -> Write:
        """The write that records a payment just signed; its value is the payment id.

        Apply it (`commit`, or `await write`) before the signed request leaves the process,
        and send nothing if that raises. Pass the budget `reservation` that admitted this
        signature: once the row is durable it is converted into the row in the same step that
        adds the row to the running totals. `payer` and `valid_before` let `reconcile` ask
        the chain about the row if its outcome is ever lost; `idempotency` lets a repeat of the
        request's key find it after a restart (`paid_for`). Arguments are checked here.
        """
        _check_signed(amount, n, attempt, nonce)
        if reservation is not None:
            with self.lock:
                reservation.check_recordable(amount)
        now = self._clock()
        row = (now, request_id, route, model, size, n, amount, payee, network, nonce, SIGNED,
               attempt, payer, valid_before, idempotency)

        def sql(conn: sqlite3.Connection) -> int:
            try:
                cur = conn.execute(
                    "INSERT INTO payments (time, request_id, route, model, size, n, amount, "
                    "payee, network, nonce, status, attempt, payer, valid_before, idempotency) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
            except sqlite3.IntegrityError as exc:
                raise ValueError(f"nonce {nonce} is already in the ledger: {exc}") from exc
            return int(cur.lastrowid)  # type: ignore[arg-type]

        def durable(payment_id: int) -> None:
            with self.lock:
                self._totals.add(now, amount)
                if reservation is not None:
                    reservation.paid(payment_id)

        return Write(sql, durable)

    def outcome(self, payment_id: int, status: str, *, transaction: str | None = None,
                latency_ms: float | None = None, note: str | None = None,
                expected: str | None = None, can_settle: bool = True) -> Write:
        """The write that records a payment's outcome. Fields left None keep their stored value.

        Allowed: from `signed`, `unknown` or `failed_after_payment` to any outcome, a
        settled/rejected row to the same status (to add a detail), and a rejected row that may
        still settle to `settled` (the chain saw it used: `reconcile`, which passes
        `expected`). Anything else fails, and so does a row whose status is no longer
        `expected` (when given).

        A refusal does not unsign: a `rejected` row keeps counting against the budgets while a
        dishonest payee could still settle it, until the chain says it expired unused (an
        outcome `rejected` with `can_settle=False`) or was used (`CHAIN_PATIENCE` at most), or,
        when the chain is not asked about its network (`chain_network`), until validBefore
        plus `EXPIRY_MARGIN`. A row rejected with `can_settle=False` (the signed request never
        left this process), or without a validBefore, stops counting at once.
        """
        if status not in STATUSES or status == SIGNED:
            raise ValueError(f"cannot finish a payment as {status!r}")
        details = (transaction, latency_ms, clean_note(note))

        def durable(change: Change) -> None:
            with self.lock:
                self._totals.finished(payment_id, status, change, can_settle)

        return Write(functools.partial(self._outcome_sql, payment_id, status, details, expected,
                                       can_settle), durable)

    @staticmethod
    def _outcome_sql(payment_id: int, status: str,
                     details: tuple[str | None, float | None, str | None],
                     expected: str | None, can_settle: bool,
                     conn: sqlite3.Connection) -> Change:
        """Returns the row's (old status, time, amount, valid_before, network), for the totals."""
        row = conn.execute("SELECT status, time, amount, valid_before, network, unspendable "
                           "FROM payments WHERE id = ?", (payment_id,)).fetchone()
        if row is None:
            raise KeyError(f"no payment {payment_id} in the ledger")
        old, when, amount, valid_before, network, unspendable = row
        if expected is not None and old != expected:
            raise ValueError(f"payment {payment_id} is {old} now, not {expected}")
        used_after_all = (old == REJECTED and status == SETTLED and not unspendable
                          and expected == REJECTED)
        if old in FINAL and status != old and not used_after_all:
            raise ValueError(f"payment {payment_id} is already {old}; cannot become {status}")
        conn.execute(
            'UPDATE payments SET status = ?, "transaction" = COALESCE(?, "transaction"), '
            "latency_ms = COALESCE(?, latency_ms), note = COALESCE(?, note), "
            "unspendable = CASE WHEN ? THEN 1 ELSE unspendable END WHERE id = ?",
            (status, *details, status == REJECTED and not can_settle, payment_id))
        return old, when, amount, valid_before, network

    def commit(self, write: Write) -> Any:
        """Apply one write now, on this thread: blocking, durable on disk when it returns (for
        tests; `commit(signed(...))` gives the payment id)."""
        value, error = self._commit([write])[0]
        if error is not None:
            raise error
        return value

    async def write(self, write: Write) -> Any:
        """Apply a write from asyncio, batched with concurrent ones (one fsync per batch)."""
        return await self._writer().write(write)

    def _commit(self, writes: list[Write]) -> list[Outcome]:
        """One transaction for the batch, a savepoint per write: a write that fails (a repeated
        nonce, an illegal transition) is undone alone; a commit that fails (disk full) fails
        them all, and nothing of the batch reaches the running totals."""
        with self._db_lock:
            try:
                outcomes = self._transaction(self._conn, writes)
            except Exception as exc:
                self.failed_at = time.time()
                return [(None, exc)] * len(writes)
            self.failed_at = None
        for write, (value, error) in zip(writes, outcomes):
            if error is None and write.durable is not None:
                try:
                    write.durable(value)
                except Exception:  # the row is on disk whatever happens here
                    log.exception("ledger: updating the running totals failed")
        return outcomes

    @staticmethod
    def _transaction(conn: sqlite3.Connection, writes: list[Write]) -> list[Outcome]:
        """Run the batch's writes in one transaction, committed (and fsynced) when it returns;
        if it raises, the transaction was rolled back. Under `_db_lock`."""
        outcomes: list[Outcome] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for write in writes:
                conn.execute("SAVEPOINT write")
                try:
                    outcomes.append((write.sql(conn), None))
                except Exception as exc:
                    conn.execute("ROLLBACK TO write")
                    outcomes.append((None, exc))
                conn.execute("RELEASE write")
            conn.execute("COMMIT")  # WAL + synchronous=FULL: fsynced before it returns
        except Exception:
            if conn is not None and conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise
        return outcomes

    # --- reading ------------------------------------------------------------------------------
    def spent(self, since: float | None = None) -> int:
        """Micro-USDC that may have cost money: every status but `rejected`, and refused
        authorizations until nothing can settle them (see `outcome`).

        Without `since` this is the in-memory running total (cheap); with it, a SQL sum that
        holds the refused authorizations a restart would hold (`HELD`).
        """
        if since is None:
            with self.lock:
                self._totals.expire()
                return self._totals.total
        with self._db_lock:
            (amount,) = self._conn.execute(
                "SELECT COALESCE(SUM(amount), 0) FROM payments WHERE time >= ? "
                f"AND (status != ? OR ({HELD}))",
                (since, REJECTED, *held_params(self._clock(), self.chain_network))).fetchone()
        return int(amount)

    def spent_since_day(self, day: str) -> int:
        """Running total from local day `day` (YYYY-MM-DD) on, from memory: as `spent(since=`
        its midnight`)`, rows dated later included (signed while the clock ran ahead). Call
        under `lock` to combine it atomically with other state."""
        with self.lock:
            self._totals.expire()
            return self._totals.since_day(day)

    def spent_since_month(self, month: str) -> int:
        """Running total from local calendar month `month` (YYYY-MM) on, from memory; as
        `spent_since_day`."""
        with self.lock:
            self._totals.expire()
            return self._totals.since_month(month)

    def held(self) -> list[tuple[float, int]]:
        """The refused authorizations still counted, as (time signed, amount)."""
        with self.lock:
            return self._totals.held()

    def get(self, payment_id: int) -> Payment:
        with self._db_lock:
            row = self._conn.execute(f"SELECT {COLUMNS} FROM payments WHERE id = ?",
                                     (payment_id,)).fetchone()
        if row is None:
            raise KeyError(f"no payment {payment_id} in the ledger")
        return Payment(*row)

    def unresolved(self, network: str, *, limit: int = 100,
                   orphaned_before: float | None = None, refused: bool = False,
                   after_id: int = 0) -> list[Payment]:
        """Rows whose money may or may not have moved and that carry what the chain needs to
        tell (payer, validBefore), by id from `after_id` (the caller pages through them, so
        rows the chain never answers for cannot keep the rest from being asked).

        Without `refused`: `unknown` and `failed_after_payment` rows, and `signed` rows whose
        authorization expired before `orphaned_before` (their request task died without an
        outcome, e.g. cancelled while the row was written). With it: refused (`rejected`)
        rows that may have settled, asked about until the chain answers, even once they no
        longer count (`CHAIN_PATIENCE`): a late answer still corrects the record."""
        which = ("status = ? AND unspendable IS NULL" if refused else
                 "(status IN (?, ?) OR (status = ? AND valid_before < ?))")
        params: tuple[Any, ...] = (REJECTED,) if refused else (
            UNKNOWN, FAILED_AFTER_PAYMENT, SIGNED,
            -1 if orphaned_before is None else orphaned_before)
        with self._db_lock:
            rows = self._conn.execute(
                f"SELECT {COLUMNS} FROM payments WHERE network = ? AND id > ? AND {which} "
                "AND length(payer) = 42 AND length(nonce) = 66 AND valid_before IS NOT NULL "
                "ORDER BY id LIMIT ?", (network, after_id, *params, limit)).fetchall()
        return [Payment(*row) for row in rows]

    def paid_for(self, idempotency: str, since: float) -> Payment | None:
        """The newest payment signed since `since` for a request with this hashed
        Idempotency-Key (or, without one, hashed client and content), if any: how a repeat
        is known to have signed after a restart. A `rejected` one counts too (the key's first
        outcome, refused or a slow job its client left, is kept for a day in memory, and a
        restart must not turn it into a second signature), unless it never left the process:
        that outcome is not kept."""
        with self._db_lock:
            row = self._conn.execute(
                f"SELECT {COLUMNS} FROM payments WHERE idempotency = ? AND time >= ? "
                # never sent: what only the request path writes, not an upstream's message
                "AND NOT (status = ? AND coalesce(unspendable, 0) = 1 "
                "AND substr(coalesce(note, ''), 1, ?) = ?) "
                "ORDER BY id DESC LIMIT 1",
                (idempotency, since, REJECTED, len(NEVER_SENT), NEVER_SENT)).fetchone()
        return None if row is None else Payment(*row)

    def settled_since(self, since: float) -> list[tuple[int, float, str, int]]:
        """(id, time, request id, n) of the rows signed since `since` (unix) that settled: the
        ones whose images a start checks the store for (`api.app.undelivered`)."""
        with self._db_lock:
            return self._conn.execute(  # (`+status`: by the time index, the span's rows only)
                "SELECT id, time, request_id, n FROM payments WHERE time >= ? AND +status = ?",
                (since, SETTLED)).fetchall()

    def payments(self, *, latest: int | None = None) -> list[Payment]:
        """Rows newest first (all of them unless `latest` is given), read as a report is."""
        with self._reading() as conn:
            return _newest(conn, latest)

    def summary(self, *, now: float | None = None, latest: int = 20) -> dict[str, Any]:
        """Spending for GET /v1/spend and `clawrouter stats` (JSON-ready).

        Each window reports settled money as `usd`/`micro`/`payments` and, apart from it, the
        `pending` money (signed, unknown or failed after payment) so every cent is visible.
        Rejected payments cost nothing and appear only in `latest` (while it may still settle,
        a refused one holds budget: `Budget.remaining`). Days are local days.
        """
        now = self._clock() if now is None else now
        with self._reading() as conn:  # one snapshot: the latest rows are the ones summed
            report = spending(conn, now)
            rows = _newest(conn, latest)
        return {**report, "latest": [p.to_json() for p in rows]}

    async def report(self, *, latest: int = 20) -> dict[str, Any]:
        """`summary` from asyncio (GET /v1/spend), on the reports' thread: neither the event
        loop nor the writer's queue (a payment's record) waits for it. One thread, because
        reports share one connection: concurrent ones queue there, not in the default
        executor the image work (`offloop`) shares."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._report_thread(),
                                          functools.partial(self.summary, latest=latest))

    def _report_thread(self) -> ThreadPoolExecutor:
        with self.lock:
            if self._closed:
                raise _closed_error()
            if self._reports is None:
                self._reports = ThreadPoolExecutor(1, thread_name_prefix="ledger-report")
            return self._reports

    @contextlib.contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """The reports' connection inside one read transaction: every query in it sees the
        same committed rows, whatever the writer commits meanwhile (without waiting for it)."""
        with self._read_lock:
            if self._closed:
                raise _closed_error()
            conn = self._reader
            assert conn is not None  # (open until `_closed`)
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                if conn.in_transaction:  # (only read: ending it lets the snapshot go)
                    conn.execute("ROLLBACK")

    # --- asyncio and lifetime -----------------------------------------------------------------
    async def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run a blocking ledger method (a read) on the ledger's writer thread, off the loop."""
        return await self._writer().call(fn, *args, **kwargs)

    def _writer(self) -> GroupCommit[Write]:
        if self._group is None:
            with self.lock:
                if self._group is None:
                    self._group = GroupCommit("ledger", self._commit)
        return self._group

    def advertise(self, url: str) -> None:
        """Tell processes that find this ledger busy where its gateway answers, so they use
        it (a long-lived gateway's; a one-shot command's would vanish under them)."""
        describe(self._lockfile, Holder(os.getpid(), url, self.instance))

    def close(self) -> None:
        """Wait for queued writes, then close the database and release the process lock."""
        if self._group is not None:
            self._group.close()
            self._group = None
        self._close_reports()
        with self._db_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None  # type: ignore[assignment]
        self._let_go()

    def _close_reports(self) -> None:
        """Let running reports finish, then close their connection (before the writer's,
        whose last close tidies the WAL away)."""
        with self.lock:
            self._closed = True
            reports, self._reports = self._reports, None
        if reports is not None:
            reports.shutdown(wait=True)
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def _let_go(self) -> None:
        """Release what `holding` took, then the process lock: in that order, whoever gets
        the ledger next (a command that waited for it) finds the wallet free too."""
        holding, self._holding = self._holding, None
        try:
            if holding is not None:
                holding.release()
        finally:
            self._lockfile.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _newest(conn: sqlite3.Connection, latest: int | None) -> list[Payment]:
    """Rows newest first, `latest` of them (all without it)."""
    sql = f"SELECT {COLUMNS} FROM payments ORDER BY id DESC"
    params: tuple[Any, ...] = ()
    if latest is not None:
        sql += " LIMIT ?"
        params = (latest,)
    return [Payment(*row) for row in conn.execute(sql, params).fetchall()]


def _closed_error() -> LedgerUnavailable:
    """A report asked of a closed ledger: the gateway is stopping (a 503, not a bug's 500)."""
    return LedgerUnavailable("The gateway is stopping: its ledger is closed. Ask again once "
                             "it runs.", code="ledger_closed")
