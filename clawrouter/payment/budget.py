"""Budgets: refuse to sign what the user did not allow, even under heavy concurrency.

Four limits (settings `max_usd_per_request`, `max_usd_per_day`, `max_usd_per_month`,
`max_usd_total`; 0 means no limit). Before signing, a request *reserves* its amount; the check
and the reservation are one atomic step, so concurrent requests can never together pass a
limit. What counts as used:

- per day: ledger rows from the start of the current local calendar day on that may have cost
  money (every status but `rejected`, and refused authorizations until nothing can settle
  them: see `Ledger.outcome`), plus every live reservation. Rows dated later than now (signed
  while the clock ran ahead, before it was set right) count too: else they would count in no
  day, and the day's limit could be spent twice;
- per month: the same from the start of the current local calendar month on;
- in total: all such ledger rows, plus every live reservation.

A reservation ends in one of two ways. `release()` when nothing was signed (or when the
request ends before signing). Or it becomes a ledger row: pass it to
`Ledger.signed(..., reservation=res)`, whose write adds the row to the ledger's running totals
and drops the reservation under the same lock, so the money is never counted twice nor, for
an instant, zero times. (Calling `res.paid(id)` yourself after that write also works; the
amount is then counted twice in between, which can only refuse, never over-admit.)

Reservations live in memory only; after a restart only ledger rows count.

Threading: `reserve`, `release`, `paid` and `remaining` only touch memory under a
`threading.RLock` shared with the ledger; they never wait on disk, so call them directly on the
event loop (there is no await inside the critical section) or from any thread.
"""

from __future__ import annotations

import threading
import time
from datetime import date
from typing import Any, Callable

from clawrouter.catalog import format_usd, limit_micro, to_usd
from clawrouter.errors import BudgetExceeded
from clawrouter.payment.ledger import Ledger

_SETTING = {"request": "CLAWROUTER_MAX_USD_PER_REQUEST", "day": "CLAWROUTER_MAX_USD_PER_DAY",
            "month": "CLAWROUTER_MAX_USD_PER_MONTH", "total": "CLAWROUTER_MAX_USD_TOTAL"}
_NAME = {"request": "per-request", "day": "daily", "month": "monthly", "total": "total"}
_RESETS = {"day": " (resets at local midnight)",
           "month": " (resets at local midnight on the 1st of the month)"}


class Budget:
    """The budget windows over one ledger; 0 (or less) for a limit means no limit."""

    def __init__(self, ledger: Ledger, *, per_request_usd: float, per_day_usd: float,
                 total_usd: float, per_month_usd: float = 0.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.ledger = ledger
        self.limits = {"request": limit_micro(per_request_usd), "day": limit_micro(per_day_usd),
                       "month": limit_micro(per_month_usd), "total": limit_micro(total_usd)}
        self._clock = clock
        self._lock: threading.RLock = ledger.lock
        self._reserved = 0  # sum of live reservations

    @classmethod
    def from_settings(cls, ledger: Ledger, settings: Any,
                      clock: Callable[[], float] = time.time) -> Budget:
        return cls(ledger, per_request_usd=settings.max_usd_per_request,
                   per_day_usd=settings.max_usd_per_day,
                   per_month_usd=settings.max_usd_per_month, total_usd=settings.max_usd_total,
                   clock=clock)

    def reserve(self, amount_micro: int) -> Reservation:
        """Hold `amount_micro` for one signature, or raise `BudgetExceeded` (nothing held).

        Reserve once per signature: a second attempt after a rejected one reserves again.
        """
        if isinstance(amount_micro, bool) or not isinstance(amount_micro, int) \
                or amount_micro <= 0:
            raise ValueError(f"amount must be a positive int of micro-USDC, got {amount_micro!r}")
        with self._lock:
            used = self._used()
            refusals = [(window, self.limits[window] - used[window]) for window in used
                        if self.limits[window] and amount_micro > self.limits[window]
                        - used[window]]
            if refusals:
                # The per-request limit first (no waiting fixes it), else the tightest window.
                window, left = min(refusals, key=lambda r: (r[0] != "request", r[1]))
                raise self._exceeded(window, amount_micro, max(0, left))
            self._reserved += amount_micro
            return Reservation(self, amount_micro)

    def check_request(self, estimate_micro: int) -> None:
        """Refuse, before anything is sent upstream, a request whose catalog price is above
        the per-request limit: no quote can fit it (the other windows are judged on the
        upstream's quote, when it is reserved)."""
        limit = self.limits["request"]
        if limit and estimate_micro > limit:
            raise self._exceeded("request", estimate_micro, limit)

    def remaining(self) -> dict[str, dict[str, Any]]:
        """Per window: limit, used (ledger + reservations), reserved, held (refused
        authorizations not yet expired, part of used) and what is left, in USD.

        `None` for a limit (and what is left) means no limit.
        """
        with self._lock:
            used = self._used()
            reserved = self._reserved
            today = date.fromtimestamp(self._clock()).isoformat()
        held = _held(self.ledger.held(), today)
        out: dict[str, dict[str, Any]] = {"request": {"limit_usd": _usd_or_none(
            self.limits["request"]), "remaining_usd": _usd_or_none(self.limits["request"])}}
        for window in ("day", "month", "total"):
            limit = self.limits[window]
            out[window] = {
                "limit_usd": _usd_or_none(limit),
                "used_usd": to_usd(used[window]),
                "reserved_usd": to_usd(reserved),
                "held_usd": to_usd(held[window]),
                "remaining_usd": to_usd(max(0, limit - used[window])) if limit else None,
            }
        out["day"]["day"] = today
        out["month"]["month"] = today[:7]
        return out

    def _used(self) -> dict[str, int]:
        """Used money per window; call under the lock. Live reservations count in the current
        day and month even if they were made just before midnight (conservative)."""
        today = date.fromtimestamp(self._clock()).isoformat()
        return {
            "request": 0,
            "day": self.ledger.spent_since_day(today) + self._reserved,
            "month": self.ledger.spent_since_month(today[:7]) + self._reserved,
            "total": self.ledger.spent() + self._reserved,
        }

    def _exceeded(self, window: str, amount: int, left: int) -> BudgetExceeded:
        limit = self.limits[window]
        if window == "request":
            why = (f"this payment is {format_usd(amount)}, above the per-request limit of "
                   f"{format_usd(limit)}")
        else:
            why = (f"this payment is {format_usd(amount)} but only {format_usd(left)} is left "
                   f"of the {_NAME[window]} limit of {format_usd(limit)}"
                   f"{_RESETS.get(window, '')}")
            held = _held(self.ledger.held(), date.fromtimestamp(self._clock()).isoformat())
            if held[window]:
                why += (f"; {format_usd(held[window])} of what is used is held by unsettled "
                        "payments (the upstream refused them, or their slow job's client "
                        "left), until nothing can settle them any more (the chain "
                        "sees the authorization expired, or it expires)")
        return BudgetExceeded(
            f"Budget exceeded, nothing was signed: {why}. Raise {_SETTING[window]} (or "
            f"{_SETTING[window].removeprefix('CLAWROUTER_').lower()} in the config file) to "
            "allow it.",
            extra={"window": window, "limit_usd": to_usd(limit), "remaining_usd": to_usd(left),
                   "requested_usd": to_usd(amount)})

    def _end(self, reservation: Reservation) -> None:
        """Stop counting a live reservation; call under the lock."""
        self._reserved -= reservation.amount


class Reservation:
    """Money held for one signature until it is recorded (`paid`) or freed (`release`).

    As a context manager it releases on exit unless it was paid, so every early return or
    exception before signing frees the room.
    """

    def __init__(self, budget: Budget, amount: int) -> None:
        self.amount = amount
        self.payment_id: int | None = None
        self._budget = budget
        self._state = "live"  # live -> paid | released

    @property
    def live(self) -> bool:
        return self._state == "live"

    def check_recordable(self, amount: int) -> None:
        """Called by `Ledger.signed` before writing: the signature must be covered."""
        with self._budget._lock:
            if self._state != "live":
                raise ValueError(f"reservation is {self._state}; a new signature needs a new "
                                 "reservation (do not send it)")
            if amount > self.amount:
                raise ValueError(f"signed amount {amount} is above the reserved {self.amount} "
                                 "(do not send it)")

    def paid(self, payment_id: int) -> None:
        """The signature is now a ledger row, which counts it; stop counting the reservation.

        Idempotent for the same payment id. After `release()` (a cancelled request whose
        recording still completed) it only notes the id: the ledger row already counts.
        """
        with self._budget._lock:
            if self._state == "paid":
                if payment_id != self.payment_id:
                    raise ValueError(f"reservation already paid as payment {self.payment_id}")
                return
            if self._state == "live":
                self._budget._end(self)
            self._state = "paid"
            self.payment_id = payment_id

    def release(self) -> None:
        """Free the room: nothing was signed with it. Idempotent; a no-op once paid."""
        with self._budget._lock:
            if self._state == "live":
                self._budget._end(self)
                self._state = "released"

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Reservation({format_usd(self.amount)}, {self._state})"


def _held(holds: list[tuple[float, int]], today: str) -> dict[str, int]:
    """Micro-USDC of refused authorizations still counted, per window (local days, each from
    its start on, as `Budget._used`)."""
    days = [(date.fromtimestamp(when).isoformat(), amount) for when, amount in holds]
    return {"day": sum(a for d, a in days if d >= today),
            "month": sum(a for d, a in days if d[:7] >= today[:7]),
            "total": sum(a for _, a in days)}


def _usd_or_none(micro: int) -> float | None:
    return to_usd(micro) if micro else None
