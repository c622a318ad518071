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
`await ledger.call(ledger.method, ...)` on the same thread.
"""

from __future__ import annotations

import functools
import heapq
import logging
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Callable, Protocol, TypeVar

from clawrouter.catalog import to_usd
from clawrouter.groupcommit import GroupCommit, Outcome
from clawrouter.plaintext import one_line, scrub

try:  # POSIX: one gateway per ledger, or two processes would each enforce budgets alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

FILENAME = "ledger.sqlite3"

SIGNED = "signed"
SETTLED = "settled"
REJECTED = "rejected"
FAILED_AFTER_PAYMENT = "failed_after_payment"
UNKNOWN = "unknown"
STATUSES = (SIGNED, SETTLED, REJECTED, FAILED_AFTER_PAYMENT, UNKNOWN)
#: statuses whose money may be gone but is not confirmed; shown apart from settled spend
PENDING = (SIGNED, UNKNOWN, FAILED_AFTER_PAYMENT)
#: outcomes that never change again: a settled payment cannot be un-spent, and a rejected one
#: already gave (or, once its authorization expires, gives) its budget room to other requests
FINAL = (SETTLED, REJECTED)
#: seconds a refused authorization keeps counting after its validBefore: USDC refuses it from
#: the first block stamped at validBefore, and this covers a chain clock ahead of ours
EXPIRY_MARGIN = 60
#: how long after its validBefore a refused authorization waits for the chain's answer (on
#: Base, final about 20 minutes later) before it is let go anyway: RPCs that stay down must
#: not hold the budgets for ever
CHAIN_PATIENCE = 24 * 3600

#: how a `rejected` row's note starts when its signature never left the process (its request
#: ended first): it cost nothing, and its Idempotency-Key may run again (`paid_for`)
NEVER_SENT = "never sent"
NOTE_MAX = 300

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS payments (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    time          REAL    NOT NULL,
    request_id    TEXT    NOT NULL,
    route         TEXT    NOT NULL,
    model         TEXT    NOT NULL,
    size          TEXT    NOT NULL,
    n             INTEGER NOT NULL CHECK (n >= 1),
    amount        INTEGER NOT NULL CHECK (amount > 0),
    payee         TEXT    NOT NULL,
    network       TEXT    NOT NULL,
    nonce         TEXT    NOT NULL UNIQUE,
    status        TEXT    NOT NULL CHECK (status IN {STATUSES!r}),
    "transaction" TEXT,
    latency_ms    REAL,
    note          TEXT,
    attempt       INTEGER NOT NULL CHECK (attempt IN (1, 2)),
    payer         TEXT,
    valid_before  INTEGER,
    idempotency   TEXT,
    unspendable   INTEGER
);
CREATE INDEX IF NOT EXISTS payments_time ON payments (time);
CREATE INDEX IF NOT EXISTS payments_status ON payments (status);
"""
#: schema version 2 added `payer` and `valid_before` (NULL in rows from version 1), version 3
#: `idempotency` (the request's Idempotency-Key hashed with its client, or without one its
#: client and content: see `coalesce`) and
#: `unspendable` (1 on a rejected row once nothing can settle it: see `Ledger.outcome`)
SCHEMA_VERSION = 3
_ADDED = {"payer": "TEXT", "valid_before": "INTEGER", "idempotency": "TEXT",
          "unspendable": "INTEGER"}
_COLUMNS = ('id, time, request_id, route, model, size, n, amount, payee, network, nonce, '
            'status, "transaction", latency_ms, note, attempt, payer, valid_before, idempotency')

T = TypeVar("T")

#: rejected rows that still count (parameters: `Ledger._held_params`): a refused authorization
#: that may still settle, until it expires or, on the network the chain is asked about, until
#: the chain answers for it (`CHAIN_PATIENCE` at most)
_HELD = ("status = ? AND unspendable IS NULL AND valid_before IS NOT NULL "
         "AND (valid_before > ? OR (network = ? AND valid_before > ?))")


@dataclass(frozen=True)
class Holder:
    """Who holds a ledger, as its lock file says: the pid, the URL of its gateway when it
    serves one that others may use (`serve`'s; not one started in-process by a command), and
    the holder's random `instance` id, which its gateway's `/health` also shows: how a command
    tells this data directory's gateway from another one answering at the same address."""

    pid: int
    url: str | None = None
    instance: str | None = None

    def __str__(self) -> str:
        return f"pid {self.pid}" + (f", serving {self.url}" if self.url else "")


class LedgerBusy(RuntimeError):
    """Another gateway process has this ledger open; `holder` says who, when known."""

    def __init__(self, lock: Path, holder: Holder | None) -> None:
        who = f" ({holder})" if holder else ""
        super().__init__(f"{lock.parent}: another clawrouter process{who} is using this ledger "
                         "(a `clawrouter serve`, or a `clawrouter mcp`, `generate` or `edit` "
                         "running a gateway of its own); use or stop it, or set a different "
                         "CLAWROUTER_HOME")
        self.lock = lock
        self.holder = holder


class Convertible(Protocol):
    """What `signed` needs from a budget reservation (see `budget.Reservation`)."""

    def check_recordable(self, amount: int) -> None: ...
    def paid(self, payment_id: int) -> None: ...


@dataclass(frozen=True, slots=True)
class Write:
    """One ledger change: `sql` runs inside a batch's transaction; `durable` runs with its value
    once that transaction is on disk (it moves the in-memory running totals)."""

    sql: Callable[[sqlite3.Connection], Any]
    durable: Callable[[Any], None] | None = None


@dataclass(frozen=True)
class Payment:
    """One signed payment (a ledger row)."""

    id: int
    time: float
    request_id: str
    route: str
    model: str
    size: str
    n: int
    amount: int  # micro-USDC, as signed
    payee: str
    network: str
    nonce: str
    status: str
    transaction: str | None
    latency_ms: float | None
    note: str | None
    attempt: int
    payer: str | None = None  # the signing wallet (None in rows older than schema 2)
    valid_before: int | None = None  # unix time the authorization stops being spendable
    idempotency: str | None = None  # the request's hashed repeat key (see `paid_for`)

    def to_json(self) -> dict[str, Any]:
        row = asdict(self)
        del row["idempotency"]  # a hash of the client's credentials among the rest: not shown
        return {**row, "usd": to_usd(self.amount)}


def local_day(t: float) -> str:
    """The user's local calendar day of a unix time, as YYYY-MM-DD."""
    return date.fromtimestamp(t).isoformat()


def day_start(day: date) -> float:
    """Unix time of local midnight starting `day` (mktime handles DST)."""
    return time.mktime((day.year, day.month, day.day, 0, 0, 0, 0, 0, -1))


def clean_note(note: str | None) -> str | None:
    """Short, single-line plain text (`plaintext`: an upstream's words reach terminals), and
    without anything that could be a key or a payment header (`scrub`: the payment this
    request sent, in any form, and long hex or base64 runs, split into words or not)."""
    if note is None:
        return None
    return one_line(scrub(note), NOTE_MAX) or None


class Releasable(Protocol):
    def release(self) -> None: ...


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
        self._group: GroupCommit[Write] | None = None
        #: refused authorizations that still count, by payment id: (time signed, amount)
        self._held: dict[int, tuple[float, int]] = {}
        #: (expiry plus margin, payment id), a heap: when each stops counting without a chain
        self._expiries: list[tuple[float, int]] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        #: this process's hold on the ledger (see `Holder.instance`)
        self.instance = secrets.token_hex(8)
        #: when the last commit failed (disk full, locked), until one succeeds (`/readyz`)
        self.failed_at: float | None = None
        self._lockfile = _exclusive_lock(lock_path(self.path), self.instance)
        self._holding: Releasable | None = None
        try:
            self._holding = holding() if holding is not None else None
            self._conn = self._connect()
            #: the rows this process found left `signed` (id: time signed): in flight when
            #: the last run died, their clients may well retry them (`coalesce`)
            self.interrupted = self._recover()
            self._total, self._by_day, self._by_month = self._load_totals()
        except BaseException:
            self._let_go()
            raise

    # --- opening ------------------------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: each statement commits by itself; with WAL + synchronous=FULL
        # the commit is fsynced before execute() returns, which is the durability we promise.
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=10.0)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            conn.close()
            raise RuntimeError(f"ledger {self.path}: cannot use WAL journal (got {mode!r})")
        conn.execute("PRAGMA synchronous=FULL")
        conn.create_function("local_day", 1, local_day, deterministic=True)
        conn.executescript(_SCHEMA)
        _migrate(conn, self._clock())
        return conn

    def _recover(self) -> dict[int, float]:
        """Rows still `signed` were in flight when the last run died: their fate is unknown."""
        ids = dict(self._conn.execute("SELECT id, time FROM payments WHERE status = ?",
                                      (SIGNED,)).fetchall())
        self._conn.execute(  # (the process lock keeps any other writer out meanwhile)
            "UPDATE payments SET status = ?, note = COALESCE(note, ?) WHERE status = ?",
            (UNKNOWN, "gateway stopped before the outcome was known", SIGNED))
        return ids

    def _load_totals(self) -> tuple[int, dict[str, int], dict[str, int]]:
        """In total, per local day (YYYY-MM-DD) and per local month (YYYY-MM), with every
        refused authorization that may still settle held (`_HELD`)."""
        rows = self._conn.execute(
            "SELECT local_day(time), SUM(amount) FROM payments WHERE status != ? "
            "GROUP BY local_day(time)", (REJECTED,)).fetchall()
        by_day = {day: int(amount) for day, amount in rows}
        for payment_id, when, amount, valid_before, network in self._conn.execute(
                f"SELECT id, time, amount, valid_before, network FROM payments WHERE {_HELD}",
                self._held_params()):
            self._hold(payment_id, when, amount, self._held_until(valid_before, network))
            by_day[local_day(when)] = by_day.get(local_day(when), 0) + amount
        by_month: dict[str, int] = {}
        for day, amount in by_day.items():
            by_month[day[:7]] = by_month.get(day[:7], 0) + amount
        return sum(by_day.values()), by_day, by_month

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
        if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
            raise ValueError(f"amount must be a positive int of micro-USDC, got {amount!r}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if attempt not in (1, 2):
            raise ValueError(f"attempt must be 1 or 2, got {attempt!r}")
        if not nonce:
            raise ValueError("nonce is required")
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
                self._add(now, amount)
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

        def durable(change: tuple[str, float, int, int | None, str]) -> None:
            old, when, amount, valid_before, network = change
            with self.lock:
                if status == REJECTED and old != REJECTED:
                    until = None if valid_before is None \
                        else self._held_until(valid_before, network)
                    if can_settle and until is not None and until > self._clock():
                        self._hold(payment_id, when, amount, until)  # still counted
                    else:
                        self._add(when, -amount)  # nothing can settle it: it moved no money
                elif old == REJECTED and status == SETTLED:  # used after all: it counts
                    if self._held.pop(payment_id, None) is None:
                        self._add(when, amount)
                elif old == REJECTED and not can_settle and payment_id in self._held:
                    self._release(payment_id)

        return Write(functools.partial(self._outcome_sql, payment_id, status, details, expected,
                                       can_settle), durable)

    @staticmethod
    def _outcome_sql(payment_id: int, status: str,
                     details: tuple[str | None, float | None, str | None],
                     expected: str | None, can_settle: bool,
                     conn: sqlite3.Connection) -> tuple[str, float, int, int | None, str]:
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
        outcomes: list[Outcome] = []
        with self._db_lock:
            conn = self._conn
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
            except Exception as exc:
                if conn is not None and conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
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

    def _add(self, when: float, amount: int) -> None:
        day = local_day(when)
        self._by_day[day] = self._by_day.get(day, 0) + amount
        self._by_month[day[:7]] = self._by_month.get(day[:7], 0) + amount
        self._total += amount

    def _held_until(self, valid_before: int, network: str) -> float:
        """When a refused authorization stops counting unless the chain answers first."""
        return valid_before + (CHAIN_PATIENCE if network == self.chain_network
                               else EXPIRY_MARGIN)

    def _hold(self, payment_id: int, when: float, amount: int, until: float) -> None:
        """Keep a refused authorization counted (it is already in the totals) until `until`,
        or the chain's answer; under `lock`."""
        self._held[payment_id] = (when, amount)
        heapq.heappush(self._expiries, (until, payment_id))

    def _release(self, payment_id: int) -> None:
        when, amount = self._held.pop(payment_id)
        self._add(when, -amount)

    def _expire(self) -> None:
        """Let go of the refused authorizations past the time they are held to; under `lock`."""
        now = self._clock()
        while self._expiries and self._expiries[0][0] <= now:
            _, payment_id = heapq.heappop(self._expiries)
            if payment_id in self._held:
                self._release(payment_id)

    def _held_params(self) -> tuple[Any, ...]:
        now = self._clock()
        return (REJECTED, now - EXPIRY_MARGIN, self.chain_network or "", now - CHAIN_PATIENCE)

    # --- reading ------------------------------------------------------------------------------
    def spent(self, since: float | None = None) -> int:
        """Micro-USDC that may have cost money: every status but `rejected`, and refused
        authorizations until nothing can settle them (see `outcome`).

        Without `since` this is the in-memory running total (cheap); with it, a SQL sum that
        holds the refused authorizations a restart would hold (`_HELD`).
        """
        if since is None:
            with self.lock:
                self._expire()
                return self._total
        with self._db_lock:
            (amount,) = self._conn.execute(
                "SELECT COALESCE(SUM(amount), 0) FROM payments WHERE time >= ? "
                f"AND (status != ? OR ({_HELD}))",
                (since, REJECTED, *self._held_params())).fetchone()
        return int(amount)

    def spent_on(self, day: str) -> int:
        """Running total for one local day (YYYY-MM-DD), from memory. Call under `lock` to
        combine it atomically with other state."""
        with self.lock:
            self._expire()
            return self._by_day.get(day, 0)

    def spent_in_month(self, month: str) -> int:
        """Running total for one local calendar month (YYYY-MM), from memory; as `spent_on`."""
        with self.lock:
            self._expire()
            return self._by_month.get(month, 0)

    def held(self) -> list[tuple[float, int]]:
        """The refused authorizations still counted, as (time signed, amount)."""
        with self.lock:
            self._expire()
            return list(self._held.values())

    def get(self, payment_id: int) -> Payment:
        with self._db_lock:
            row = self._conn.execute(f"SELECT {_COLUMNS} FROM payments WHERE id = ?",
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
                f"SELECT {_COLUMNS} FROM payments WHERE network = ? AND id > ? AND {which} "
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
                f"SELECT {_COLUMNS} FROM payments WHERE idempotency = ? AND time >= ? "
                # never sent: what only the request path writes, not an upstream's message
                "AND NOT (status = ? AND coalesce(unspendable, 0) = 1 "
                "AND substr(coalesce(note, ''), 1, ?) = ?) "
                "ORDER BY id DESC LIMIT 1",
                (idempotency, since, REJECTED, len(NEVER_SENT), NEVER_SENT)).fetchone()
        return None if row is None else Payment(*row)

    def payments(self, *, latest: int | None = None) -> list[Payment]:
        """Rows newest first (all of them unless `latest` is given)."""
        sql = f"SELECT {_COLUMNS} FROM payments ORDER BY id DESC"
        params: tuple[Any, ...] = ()
        if latest is not None:
            sql += " LIMIT ?"
            params = (latest,)
        with self._db_lock:
            rows = self._conn.execute(sql, params).fetchall()
        return [Payment(*row) for row in rows]

    def summary(self, *, now: float | None = None, latest: int = 20) -> dict[str, Any]:
        """Spending for GET /v1/spend and `clawrouter stats` (JSON-ready).

        Each window reports settled money as `usd`/`micro`/`payments` and, apart from it, the
        `pending` money (signed, unknown or failed after payment) so every cent is visible.
        Rejected payments cost nothing and appear only in `latest` (while it may still settle,
        a refused one holds budget: `Budget.remaining`). Days are local days.
        """
        now = self._clock() if now is None else now
        today = date.fromtimestamp(now)
        month_start = day_start(today.replace(day=1))
        days_start = day_start(today - timedelta(days=29))
        with self._db_lock:
            windows = {
                "today": self._aggregate("NULL", day_start(today)),
                "month": self._aggregate("NULL", month_start),
                "total": self._aggregate("NULL", None),
            }
            by_model = self._aggregate("model", None)
            by_day = self._aggregate("local_day(time)", days_start)
        return {
            "timezone": datetime.fromtimestamp(now).astimezone().tzname(),
            **{name: rows[0][1] if rows else _window(0, 0, 0, 0)
               for name, rows in windows.items()},
            "by_model": [{"model": key, **w} for key, w in
                         sorted(by_model, key=lambda kw: -(kw[1]["micro"]
                                                           + kw[1]["pending"]["micro"]))],
            "by_day": [{"day": key, **w} for key, w in sorted(by_day, reverse=True)],
            "latest": [p.to_json() for p in self.payments(latest=latest)],
        }

    def _aggregate(self, key: str, since: float | None) -> list[tuple[Any, dict[str, Any]]]:
        pending = ", ".join("?" * len(PENDING))
        sql = (f"SELECT {key}, "
               "COALESCE(SUM(CASE WHEN status = ? THEN amount END), 0), SUM(status = ?), "
               f"COALESCE(SUM(CASE WHEN status IN ({pending}) THEN amount END), 0), "
               f"SUM(status IN ({pending})) "
               "FROM payments WHERE status != ?")
        params: list[Any] = [SETTLED, SETTLED, *PENDING, *PENDING, REJECTED]
        if since is not None:
            sql += " AND time >= ?"
            params.append(since)
        sql += f" GROUP BY {key}"
        rows = self._conn.execute(sql, params).fetchall()
        return [(k, _window(int(s), int(sn or 0), int(p), int(pn or 0))) for k, s, sn, p, pn
                in rows]

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
        _describe(self._lockfile, Holder(os.getpid(), url, self.instance))

    def close(self) -> None:
        """Wait for queued writes, then close the database and release the process lock."""
        if self._group is not None:
            self._group.close()
            self._group = None
        with self._db_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None  # type: ignore[assignment]
        self._let_go()

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


def _window(settled: int, settled_n: int, pending: int, pending_n: int) -> dict[str, Any]:
    return {"usd": to_usd(settled), "micro": settled, "payments": settled_n,
            "pending": {"usd": to_usd(pending), "micro": pending, "payments": pending_n}}


def _migrate(conn: sqlite3.Connection, now: float) -> None:
    """Bring a ledger from an older schema up to `SCHEMA_VERSION` (columns are only added)."""
    have = {row[1] for row in conn.execute("PRAGMA table_info(payments)")}
    for column, kind in _ADDED.items():
        if column not in have:
            conn.execute(f"ALTER TABLE payments ADD COLUMN {column} {kind}")
            if column == "unspendable":  # rejected before refusals were held: final once
                conn.execute(  # expired (a still-spendable one is held like a new refusal)
                    "UPDATE payments SET unspendable = 1 WHERE status = 'rejected' "
                    "AND (valid_before IS NULL OR valid_before + ? <= ?)", (EXPIRY_MARGIN, now))
    conn.execute("CREATE INDEX IF NOT EXISTS payments_idempotency ON payments (idempotency) "
                 "WHERE idempotency IS NOT NULL")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


_LOCK_TRIES = 10  # 10 ms apart: see `_exclusive_lock`


def _exclusive_lock(path: Path, instance: str) -> IO[bytes]:
    """Hold an advisory lock for the ledger's lifetime (released by the OS even on kill -9).

    The holder writes its pid and `instance` into the lock file, so a process that finds the
    ledger busy can say who has it. A process waiting for the ledger tests the lock for an
    instant (`in_use`); the short retry here keeps such a test from ever failing a gateway
    that starts meanwhile.
    """
    handle = open(path, "a+b")
    if fcntl is not None:
        for attempt in range(_LOCK_TRIES):
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                if attempt + 1 == _LOCK_TRIES:
                    handle.close()
                    raise LedgerBusy(path, holder(path)) from None
                time.sleep(0.01)
        _describe(handle, Holder(os.getpid(), instance=instance))
    return handle


def _describe(handle: IO[bytes], holder: Holder) -> None:
    handle.truncate(0)
    handle.write(f"{holder.pid}\n{holder.url or ''}\n{holder.instance or ''}\n".encode())
    handle.flush()


def in_use(lock: Path) -> bool:
    """Whether a process holds the ledger lock at `lock`; takes it for an instant to tell.
    Only a lock held elsewhere counts: any other failure is for opening the ledger to report."""
    if fcntl is None:
        return False
    try:
        with open(lock, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def lock_path(ledger_path: Path) -> Path:
    return ledger_path.with_name(ledger_path.name + ".lock")


def holder(lock: Path) -> Holder | None:
    """Who last took the ledger's lock (it may have exited since)."""
    try:
        pid, url, instance = (lock.read_text().split("\n") + ["", ""])[:3]
        return Holder(int(pid), url.strip() or None, instance.strip() or None)
    except (OSError, ValueError):
        return None
