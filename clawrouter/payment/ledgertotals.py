"""The ledger's running totals, in memory: spent overall, per local day and per local month.

The budget check runs on every paid request, so it reads these instead of running a SQL query.
A day's (or month's) window runs from its start on, as the SQL sums do (`time >= start`): rows
dated later, signed while the clock ran ahead, count in today's window, not in none.
They count what may have cost money: every row but a `rejected` one, and a refused
authorization for as long as it may still settle (`ledgerdb.HELD`, `held_until`). Not
thread-safe on its own: the ledger's `lock` guards every call (and `Budget` shares it).
"""

from __future__ import annotations

import heapq
import sqlite3
from typing import Callable

from clawrouter.payment.ledgerdb import (
    HELD, LOCAL_DAY, REJECTED, SETTLED, held_params, held_until, local_day,
)

#: what `Ledger._outcome_sql` returns of the row it changed:
#: (old status, time signed, amount, valid_before, network)
Change = tuple[str, float, int, int | None, str]


class RunningTotals:
    """Micro-USDC counted against the budgets, by local day and month and in total."""

    def __init__(self, clock: Callable[[], float], chain_network: str | None) -> None:
        self._clock = clock
        self._chain_network = chain_network
        self.total = 0
        self.by_day: dict[str, int] = {}
        self.by_month: dict[str, int] = {}
        #: the latest local day any row was counted on (rows dated later than today are rare)
        self._last_day = ""
        #: refused authorizations that still count, by payment id: (time signed, amount)
        self._held: dict[int, tuple[float, int]] = {}
        #: (expiry plus margin, payment id), a heap: when each stops counting without a chain
        self._expiries: list[tuple[float, int]] = []

    def load(self, conn: sqlite3.Connection) -> None:
        """Count the ledger's rows, holding every refused authorization that may still settle
        (as a restart must, `HELD`)."""
        rows = conn.execute(  # LOCAL_DAY: local_day(time), without Python per row
            f"SELECT {LOCAL_DAY} AS day, SUM(amount) FROM payments WHERE status != ? "
            "GROUP BY day", (REJECTED,)).fetchall()
        by_day = {day: int(amount) for day, amount in rows}
        for payment_id, when, amount, valid_before, network in conn.execute(
                f"SELECT id, time, amount, valid_before, network FROM payments WHERE {HELD}",
                held_params(self._clock(), self._chain_network)):
            self._hold(payment_id, when, amount, self._until(valid_before, network))
            by_day[local_day(when)] = by_day.get(local_day(when), 0) + amount
        by_month: dict[str, int] = {}
        for day, amount in by_day.items():
            by_month[day[:7]] = by_month.get(day[:7], 0) + amount
        self.total, self.by_day, self.by_month = sum(by_day.values()), by_day, by_month
        self._last_day = max(by_day, default="")

    def since_day(self, day: str) -> int:
        """Micro-USDC counted on local day `day` (YYYY-MM-DD) and any later one."""
        if self._last_day <= day:  # no row dated later: the common case, one lookup
            return self.by_day.get(day, 0)
        return sum(amount for d, amount in self.by_day.items() if d >= day)

    def since_month(self, month: str) -> int:
        """Micro-USDC counted in local month `month` (YYYY-MM) and any later one."""
        if self._last_day[:7] <= month:
            return self.by_month.get(month, 0)
        return sum(amount for m, amount in self.by_month.items() if m >= month)

    def add(self, when: float, amount: int) -> None:
        """Count `amount` (negative: stop counting it) on the local day of `when`."""
        day = local_day(when)
        self._last_day = max(self._last_day, day)
        self.by_day[day] = self.by_day.get(day, 0) + amount
        self.by_month[day[:7]] = self.by_month.get(day[:7], 0) + amount
        self.total += amount

    def finished(self, payment_id: int, status: str, change: Change, can_settle: bool) -> None:
        """Follow a payment's outcome: a refusal stops counting once nothing can settle it
        (held until then), and a refusal the chain saw used counts again."""
        old, when, amount, valid_before, network = change
        if status == REJECTED and old != REJECTED:
            until = None if valid_before is None else self._until(valid_before, network)
            if can_settle and until is not None and until > self._clock():
                self._hold(payment_id, when, amount, until)  # still counted
            else:
                self.add(when, -amount)  # nothing can settle it: it moved no money
        elif old == REJECTED and status == SETTLED:  # used after all: it counts
            if self._held.pop(payment_id, None) is None:
                self.add(when, amount)
        elif old == REJECTED and not can_settle and payment_id in self._held:
            self._release(payment_id)

    def held(self) -> list[tuple[float, int]]:
        """The refused authorizations still counted, as (time signed, amount)."""
        self.expire()
        return list(self._held.values())

    def expire(self) -> None:
        """Let go of the refused authorizations past the time they are held to."""
        now = self._clock()
        while self._expiries and self._expiries[0][0] <= now:
            _, payment_id = heapq.heappop(self._expiries)
            if payment_id in self._held:
                self._release(payment_id)

    def _until(self, valid_before: int, network: str) -> float:
        return held_until(valid_before, network, self._chain_network)

    def _hold(self, payment_id: int, when: float, amount: int, until: float) -> None:
        """Keep a refused authorization counted (it is already in the totals) until `until`,
        or the chain's answer."""
        self._held[payment_id] = (when, amount)
        heapq.heappush(self._expiries, (until, payment_id))

    def _release(self, payment_id: int) -> None:
        when, amount = self._held.pop(payment_id)
        self.add(when, -amount)
