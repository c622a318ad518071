"""The payment ledger: every signature the gateway makes, recorded before it leaves the process.

Signing is settlement (x402.md §9): once a signed request is out, the money may be gone. So a
payment is written here, durably (SQLite WAL, `synchronous=FULL`), *before* the request is sent,
and updated with its outcome afterwards. A crash between the two leaves the row `signed`; the
next start marks it `unknown`, and it keeps counting against the budgets until someone learns
otherwise. Nothing that was signed ever disappears.

The ledger also keeps running totals in memory (per local calendar day and overall) so the
budget check on the hot path never runs a SQL query. Days are the user's **local** calendar
days (the process's time zone, `TZ`), because that is what "per day" means to the user.

Threading: every method is synchronous and thread-safe. From asyncio, call the writing and
reading methods through `await ledger.call(ledger.method, ...)`, which runs them on the ledger's
own single worker thread so the event loop never waits for an fsync.
"""

from __future__ import annotations

import asyncio
import functools
import re
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import IO, Any, Callable, Protocol, TypeVar

from clawrouter.catalog import MICRO

try:  # POSIX: one gateway per ledger, or two processes would each enforce budgets alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

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
#: already gave its budget room to other requests
FINAL = (SETTLED, REJECTED)

NOTE_MAX = 300
# Runs this long are keys, nonces, tx hashes or base64 payment headers: never stored in a note.
_SECRETISH = re.compile(r"[A-Za-z0-9+/_-]{64,}=*")

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
    attempt       INTEGER NOT NULL CHECK (attempt IN (1, 2))
);
CREATE INDEX IF NOT EXISTS payments_time ON payments (time);
CREATE INDEX IF NOT EXISTS payments_status ON payments (status);
PRAGMA user_version = 1;
"""
_COLUMNS = ('id, time, request_id, route, model, size, n, amount, payee, network, nonce, '
            'status, "transaction", latency_ms, note, attempt')

T = TypeVar("T")


class LedgerBusy(RuntimeError):
    """Another gateway process has this ledger open."""


class Convertible(Protocol):
    """What `record_signed` needs from a budget reservation (see `budget.Reservation`)."""

    def check_recordable(self, amount: int) -> None: ...
    def paid(self, payment_id: int) -> None: ...


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

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "usd": _usd(self.amount)}


def local_day(t: float) -> str:
    """The user's local calendar day of a unix time, as YYYY-MM-DD."""
    return date.fromtimestamp(t).isoformat()


def day_start(day: date) -> float:
    """Unix time of local midnight starting `day` (mktime handles DST)."""
    return time.mktime((day.year, day.month, day.day, 0, 0, 0, 0, 0, -1))


def clean_note(note: str | None) -> str | None:
    """Short, single-line, and without anything that could be a key or a payment header."""
    if note is None:
        return None
    note = _SECRETISH.sub("[redacted]", " ".join(str(note).split()))
    return note[:NOTE_MAX] or None


class Ledger:
    """The SQLite ledger at `path` (normally `$CLAWROUTER_HOME/ledger.sqlite3`).

    Opening it creates the schema, takes an exclusive process lock, and turns rows left
    `signed` by a previous run into `unknown`.
    """

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        #: guards the running totals; `Budget` shares it so turning a reservation into a
        #: ledger row is one atomic step (never counted twice, never zero times)
        self.lock = threading.RLock()
        self._db_lock = threading.Lock()  # one statement sequence at a time on the connection
        self._executor: ThreadPoolExecutor | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lockfile = _exclusive_lock(self.path.with_name(self.path.name + ".lock"))
        try:
            self._conn = self._connect()
            self.recovered = self._recover()
            self._total, self._by_day = self._load_totals()
        except BaseException:
            self._lockfile.close()
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
        return conn

    def _recover(self) -> int:
        """Rows still `signed` were in flight when the last run died: their fate is unknown."""
        cur = self._conn.execute(
            "UPDATE payments SET status = ?, note = COALESCE(note, ?) WHERE status = ?",
            (UNKNOWN, "gateway stopped before the outcome was known", SIGNED))
        return cur.rowcount

    def _load_totals(self) -> tuple[int, dict[str, int]]:
        rows = self._conn.execute(
            "SELECT local_day(time), SUM(amount) FROM payments WHERE status != ? "
            "GROUP BY local_day(time)", (REJECTED,)).fetchall()
        by_day = {day: int(amount) for day, amount in rows}
        return sum(by_day.values()), by_day

    # --- writing ------------------------------------------------------------------------------
    def record_signed(self, *, request_id: str, route: str, model: str, size: str, n: int,
                      amount: int, payee: str, network: str, nonce: str, attempt: int = 1,
                      reservation: Convertible | None = None) -> int:
        """Record a payment that was just signed; durable on disk when this returns.

        Call it before the signed request leaves the process, and send nothing if it raises.
        Pass the budget `reservation` that admitted this signature: it is converted into the
        ledger row in the same step that adds the row to the running totals.
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
        with self._db_lock:
            try:
                cur = self._conn.execute(
                    "INSERT INTO payments (time, request_id, route, model, size, n, amount, "
                    "payee, network, nonce, status, attempt) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (now, request_id, route, model, size, n, amount, payee, network, nonce,
                     SIGNED, attempt))
            except sqlite3.IntegrityError as exc:
                raise ValueError(f"nonce {nonce} is already in the ledger: {exc}") from exc
        payment_id = int(cur.lastrowid)
        with self.lock:
            self._add(now, amount)
            if reservation is not None:
                reservation.paid(payment_id)
        return payment_id

    def finish(self, payment_id: int, status: str, *, transaction: str | None = None,
               latency_ms: float | None = None, note: str | None = None) -> None:
        """Record the outcome of a payment. Fields left None keep their stored value.

        Allowed: from `signed`, `unknown` or `failed_after_payment` to any outcome, and a
        settled/rejected row to the same status (to add a detail). Anything else raises.
        """
        if status not in STATUSES or status == SIGNED:
            raise ValueError(f"cannot finish a payment as {status!r}")
        with self._db_lock:
            row = self._conn.execute(
                "SELECT status, time, amount FROM payments WHERE id = ?",
                (payment_id,)).fetchone()
            if row is None:
                raise KeyError(f"no payment {payment_id} in the ledger")
            old, when, amount = row
            if old in FINAL and status != old:
                raise ValueError(f"payment {payment_id} is already {old}; cannot become "
                                 f"{status}")
            self._conn.execute(
                'UPDATE payments SET status = ?, "transaction" = COALESCE(?, "transaction"), '
                "latency_ms = COALESCE(?, latency_ms), note = COALESCE(?, note) WHERE id = ?",
                (status, transaction, latency_ms, clean_note(note), payment_id))
            if status == REJECTED and old != REJECTED:
                with self.lock:
                    self._add(when, -amount)

    def _add(self, when: float, amount: int) -> None:
        day = local_day(when)
        self._by_day[day] = self._by_day.get(day, 0) + amount
        self._total += amount

    # --- reading ------------------------------------------------------------------------------
    def spent(self, since: float | None = None) -> int:
        """Micro-USDC that may have cost money (every status but `rejected`).

        Without `since` this is the in-memory running total (cheap); with it, a SQL sum.
        """
        if since is None:
            with self.lock:
                return self._total
        with self._db_lock:
            (amount,) = self._conn.execute(
                "SELECT COALESCE(SUM(amount), 0) FROM payments WHERE status != ? AND time >= ?",
                (REJECTED, since)).fetchone()
        return int(amount)

    def spent_on(self, day: str) -> int:
        """Running total for one local day (YYYY-MM-DD), from memory. Call under `lock` to
        combine it atomically with other state."""
        with self.lock:
            return self._by_day.get(day, 0)

    def get(self, payment_id: int) -> Payment:
        with self._db_lock:
            row = self._conn.execute(f"SELECT {_COLUMNS} FROM payments WHERE id = ?",
                                     (payment_id,)).fetchone()
        if row is None:
            raise KeyError(f"no payment {payment_id} in the ledger")
        return Payment(*row)

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
        Rejected payments cost nothing and appear only in `latest`. Days are local days.
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
        """Run a ledger method on the ledger's single worker thread (no fsync on the loop).

        The write completes even if the awaiting task is cancelled.
        """
        if self._executor is None:
            with self.lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="ledger")
        loop = asyncio.get_running_loop()
        # shield: cancelling the caller must not cancel a write still queued behind others
        return await asyncio.shield(
            loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs)))

    def close(self) -> None:
        """Wait for queued writes, then close the database and release the process lock."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        with self._db_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None  # type: ignore[assignment]
        self._lockfile.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _usd(micro: int) -> float:
    return round(micro / MICRO, 6)


def _window(settled: int, settled_n: int, pending: int, pending_n: int) -> dict[str, Any]:
    return {"usd": _usd(settled), "micro": settled, "payments": settled_n,
            "pending": {"usd": _usd(pending), "micro": pending, "payments": pending_n}}


def _exclusive_lock(path: Path) -> IO[bytes]:
    """Hold an advisory lock for the ledger's lifetime (released by the OS even on kill -9)."""
    handle = open(path, "a+b")
    if fcntl is not None:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise LedgerBusy(f"{path.parent}: another clawrouter process is using this "
                             "ledger; stop it or use a different CLAWROUTER_HOME") from None
    return handle
