"""The ledger's SQLite file: what a row says, which refused rows still count, the schema and
its migrations, and how the file is opened (WAL, `synchronous=FULL`: a commit is on disk
before it returns, which is the durability the ledger promises).

Kept apart from `ledger` so the on-disk format is read in one place; the rule for refused
authorizations lives here in both its forms (SQL for a restart or a query, `held_until` for the
running totals), which must agree.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import asdict, dataclass
from datetime import date
from pathlib import Path
from typing import Any

from clawrouter.catalog import to_usd
from clawrouter.ownerfiles import owner_only

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
#: the columns of a `Payment`, in its field order
COLUMNS = ('id, time, request_id, route, model, size, n, amount, payee, network, nonce, '
           'status, "transaction", latency_ms, note, attempt, payer, valid_before, idempotency')

#: rejected rows that still count (parameters: `held_params`): a refused authorization that
#: may still settle, until it expires or, on the network the chain is asked about, until the
#: chain answers for it (`CHAIN_PATIENCE` at most)
HELD = ("status = ? AND unspendable IS NULL AND valid_before IS NOT NULL "
        "AND (valid_before > ? OR (network = ? AND valid_before > ?))")


def held_params(now: float, chain_network: str | None) -> tuple[Any, ...]:
    """The parameters of `HELD` at `now`."""
    return (REJECTED, now - EXPIRY_MARGIN, chain_network or "", now - CHAIN_PATIENCE)


def held_until(valid_before: int, network: str, chain_network: str | None) -> float:
    """When a refused authorization stops counting unless the chain answers first (`HELD`)."""
    return valid_before + (CHAIN_PATIENCE if network == chain_network else EXPIRY_MARGIN)


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


class LedgerUnusable(RuntimeError):
    """The ledger file cannot be used as it is, for a reason the user must settle (not a bug)."""


def local_day(t: float) -> str:
    """The user's local calendar day of a unix time, as YYYY-MM-DD."""
    return date.fromtimestamp(t).isoformat()


#: where SQLite stops asking the C library for local time (2038-01-19 UTC): past it, and
#: before 1970, it borrows the rules of a year from 2000 to 2003, and its day can differ
_LOCALTIME_END = 2_147_385_600

#: `local_day(time)` as SQL, without a Python call per row (the reports and the startup totals
#: group thousands of rows by it). SQLite's `localtime` asks the C library, as
#: `date.fromtimestamp` does, so the day is the same, given whole seconds (SQLite rounds a
#: fraction to the millisecond, so 0.5 ms before midnight would be the next day: CAST floors
#: it, as Python does) and a time SQLite does not map to another year (else: Python's).
#: `tests/test_reports_off_the_payment_path.py` holds them to it across DST changes.
LOCAL_DAY = (f"CASE WHEN time >= 0 AND time < {_LOCALTIME_END} "
             "THEN date(CAST(time AS INTEGER), 'unixepoch', 'localtime') "
             "ELSE local_day(time) END")


def day_start(day: date) -> float:
    """Unix time of local midnight starting `day` (mktime handles DST)."""
    return time.mktime((day.year, day.month, day.day, 0, 0, 0, 0, 0, -1))


def connect(path: Path, now: float) -> sqlite3.Connection:
    """Open the ledger file, creating or migrating its schema; `now` dates the migration."""
    # isolation_level=None: each statement commits by itself; with WAL + synchronous=FULL
    # the commit is fsynced before execute() returns, which is the durability we promise.
    conn = sqlite3.connect(owner_only(path), isolation_level=None, check_same_thread=False,
                           timeout=10.0)
    try:
        _prepare(conn, path, now)
    except BaseException:  # (closed now, not when the exception is collected: a caller may
        conn.close()       # keep it, and a file it cannot open is tried again)
        raise
    return conn


def _prepare(conn: sqlite3.Connection, path: Path, now: float) -> None:
    """A schema this version knows (a newer one is refused before anything is written to
    it), WAL and full sync, and the schema created or migrated in one transaction: `_migrate`
    goes by the columns it finds, so a migration cut short (a crash, a full disk) must leave
    none of its steps behind, or the next start would skip the ones left undone."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise LedgerUnusable(
            f"ledger {path} was written by a newer clawrouter (schema {version}, this one "
            f"knows {SCHEMA_VERSION}): upgrade clawrouter to use it; reading it with this "
            "version could miscount the spend the budgets rest on")
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode.lower() != "wal":
        raise LedgerUnusable(f"ledger {path}: cannot use a WAL journal here (got {mode!r})")
    conn.execute("PRAGMA synchronous=FULL")
    conn.create_function("local_day", 1, local_day, deterministic=True)
    # (in the script: executescript would commit a transaction begun before it)
    conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}")
    _migrate(conn, now)
    conn.execute("COMMIT")  # (on an error, closing the connection rolls it all back)


def open_reader(path: Path) -> sqlite3.Connection:
    """A read-only connection to the ledger file for reports, beside the writer's. In WAL mode
    a reader sees committed rows only, never waits for the writer and never makes it wait, so
    a report over many rows cannot delay a payment's record (which must be durable before
    the payment leaves). Open it while the writer's connection is open (its WAL files)."""
    uri = f"{Path(path).resolve().as_uri()}?mode=ro"
    conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False,
                           timeout=10.0)
    conn.create_function("local_day", 1, local_day, deterministic=True)
    conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()  # opens the WAL files now
    return conn


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
