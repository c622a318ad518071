"""Spending as the user reads it (GET /v1/spend, `clawrouter stats`): settled and pending money
per window, per model and per local day, from the ledger's rows.

Kept apart from `ledger` because it only reads: the budget never uses it (it reads the running
totals), and what it shows can change without touching how payments are recorded. It runs on
the ledger's read-only connection, inside one read transaction (`Ledger.summary`): its queries
all see the same rows, so `today` <= `month` <= `total` even while payments are written.
"""

from __future__ import annotations

import sqlite3
from datetime import date, datetime, timedelta
from typing import Any

from clawrouter.catalog import to_usd
from clawrouter.payment.ledgerdb import (
    LOCAL_DAY, PENDING, REJECTED, SETTLED, day_start,
)

#: days of `by_day`, today included
_DAYS = 30


def spending(conn: sqlite3.Connection, now: float) -> dict[str, Any]:
    """The report's windows (`today`, `month`, `total`), `by_model` (most spent first) and
    `by_day` (newest first), with the local time zone's name. Days are local days."""
    today = date.fromtimestamp(now)
    windows = {
        "today": _aggregate(conn, "NULL", day_start(today)),
        "month": _aggregate(conn, "NULL", day_start(today.replace(day=1))),
        "total": _aggregate(conn, "NULL", None),
    }
    by_model = _aggregate(conn, "model", None)
    by_day = _aggregate(conn, LOCAL_DAY, day_start(today - timedelta(days=_DAYS - 1)))
    return {
        "timezone": datetime.fromtimestamp(now).astimezone().tzname(),
        **{name: rows[0][1] if rows else _window(0, 0, 0, 0) for name, rows in windows.items()},
        "by_model": [{"model": key, **w} for key, w in
                     sorted(by_model, key=lambda kw: -(kw[1]["micro"]
                                                       + kw[1]["pending"]["micro"]))],
        "by_day": [{"day": key, **w} for key, w in sorted(by_day, reverse=True)],
    }


def _aggregate(conn: sqlite3.Connection, key: str,
               since: float | None) -> list[tuple[Any, dict[str, Any]]]:
    """Settled and pending money grouped by the SQL expression `key`, from `since` on."""
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
    rows = conn.execute(sql, params).fetchall()
    return [(k, _window(int(s), int(sn or 0), int(p), int(pn or 0))) for k, s, sn, p, pn
            in rows]


def _window(settled: int, settled_n: int, pending: int, pending_n: int) -> dict[str, Any]:
    return {"usd": to_usd(settled), "micro": settled, "payments": settled_n,
            "pending": {"usd": to_usd(pending), "micro": pending, "payments": pending_n}}
