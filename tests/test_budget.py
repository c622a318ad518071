"""Budgets: refusals before signing, atomic reservations under concurrency, day windows."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from clawrouter.cli.stats import render
from clawrouter.config import Settings
from clawrouter.errors import BudgetExceeded
from clawrouter.payment.budget import Budget
from clawrouter.payment.ledger import EXPIRY_MARGIN, Ledger, day_start

from tests.test_ledger import NOON, TODAY, Clock, record

IMAGE = 53_500  # nano-banana on Base: $0.0525 + $0.001 fee


def budget(ledger: Ledger, clock: Clock, *, request: float = 1.0, day: float = 0.0,
           month: float = 0.0, total: float = 0.0) -> Budget:
    return Budget(ledger, per_request_usd=request, per_day_usd=day, per_month_usd=month,
                  total_usd=total, clock=clock)


def pay(ledger: Ledger, b: Budget, amount: int = IMAGE) -> int:
    """The lead's flow: reserve, sign, record with the reservation, settle."""
    with b.reserve(amount) as res:
        pid = record(ledger, amount, reservation=res)
    ledger.commit(ledger.outcome(pid, "settled", transaction="0xt"))
    return pid


def used(b: Budget) -> tuple[float, float]:
    r = b.remaining()
    return r["day"]["used_usd"], r["total"]["used_usd"]


def test_per_request_limit(ledger: Ledger, clock: Clock) -> None:
    b = budget(ledger, clock, request=1.0)
    with pytest.raises(BudgetExceeded) as caught:
        b.reserve(1_200_000)
    err = caught.value
    assert (err.status, err.code, err.type) == (402, "budget_exceeded", "payment_error")
    assert err.message == ("Budget exceeded, nothing was signed: this payment is $1.20, above "
                           "the per-request limit of $1.00. Raise "
                           "CLAWROUTER_MAX_USD_PER_REQUEST (or max_usd_per_request in the "
                           "config file) to allow it.")
    assert err.extra == {"window": "request", "limit_usd": 1.0, "remaining_usd": 1.0,
                         "requested_usd": 1.2}
    assert err.envelope()["error"]["window"] == "request"
    assert used(b) == (0, 0)
    b.reserve(1_000_000).release()  # exactly the limit is allowed


def test_daily_limit(ledger: Ledger, clock: Clock) -> None:
    b = budget(ledger, clock, day=0.15)
    pay(ledger, b)
    pay(ledger, b)
    with pytest.raises(BudgetExceeded) as caught:
        b.reserve(IMAGE)
    assert caught.value.message == (
        "Budget exceeded, nothing was signed: this payment is $0.0535 but only $0.043 is left "
        "of the daily limit of $0.15 (resets at local midnight). Raise "
        "CLAWROUTER_MAX_USD_PER_DAY (or max_usd_per_day in the config file) to allow it.")
    assert caught.value.extra == {"window": "day", "limit_usd": 0.15, "remaining_usd": 0.043,
                                  "requested_usd": 0.0535}
    b.reserve(43_000).release()  # what is left still fits


def test_total_limit_counts_every_day(ledger: Ledger, clock: Clock) -> None:
    b = budget(ledger, clock, day=0.10, total=0.12)
    pay(ledger, b)
    clock.now += 86_400
    pay(ledger, b)
    with pytest.raises(BudgetExceeded) as caught:
        b.reserve(IMAGE)  # the day has room ($0.0465), the total does not ($0.013)
    assert caught.value.extra["window"] == "total"
    assert caught.value.extra["remaining_usd"] == 0.013
    assert "of the total limit of $0.12. Raise CLAWROUTER_MAX_USD_TOTAL" in caught.value.message


def test_monthly_limit_counts_the_calendar_month_and_resets_on_the_first(
        ledger: Ledger, clock: Clock) -> None:
    b = budget(ledger, clock, day=0.10, month=0.12)
    first = pay(ledger, b)  # 14 March
    clock.now += 6 * 86_400
    pay(ledger, b)  # 20 March: the day has room, the month has $0.013
    with pytest.raises(BudgetExceeded) as caught:
        b.reserve(IMAGE)
    assert caught.value.extra == {"window": "month", "limit_usd": 0.12, "remaining_usd": 0.013,
                                  "requested_usd": 0.0535}
    assert caught.value.message.endswith(
        "of the monthly limit of $0.12 (resets at local midnight on the 1st of the month). "
        "Raise CLAWROUTER_MAX_USD_PER_MONTH (or max_usd_per_month in the config file) to allow it.")
    ledger.commit(ledger.outcome(first, "settled", note="a detail"))  # settled stays counted
    with pytest.raises(BudgetExceeded):
        b.reserve(IMAGE)
    clock.now = day_start(TODAY.replace(month=4, day=1)) - 0.001  # 31 March, 23:59:59.999
    with pytest.raises(BudgetExceeded):
        b.reserve(IMAGE)
    clock.now += 0.001  # April
    assert b.remaining()["month"] == {"limit_usd": 0.12, "used_usd": 0.0, "reserved_usd": 0.0,
                                      "held_usd": 0.0,
                                      "remaining_usd": 0.12, "month": "2026-04"}
    pay(ledger, b)


def test_rejected_payments_free_their_month_room_and_months_survive_a_restart(
        tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "ledger.sqlite3"
    with Ledger(path, clock=clock) as ledger:
        b = budget(ledger, clock, month=0.11)
        pay(ledger, b)
        with b.reserve(IMAGE) as res:
            refused = record(ledger, IMAGE, reservation=res)
        with pytest.raises(BudgetExceeded):
            b.reserve(IMAGE)
        ledger.commit(ledger.outcome(refused, "rejected"))
        b.reserve(IMAGE).release()  # its room is back
        clock.now += 86_400
        pay(ledger, b)  # the 15th: $0.107 used this month
    with Ledger(path, clock=clock) as ledger:
        b = budget(ledger, clock, month=0.11)
        assert b.remaining()["month"]["used_usd"] == 0.107  # rebuilt from the rows
        with pytest.raises(BudgetExceeded):
            b.reserve(IMAGE)


def test_the_tightest_window_is_named(ledger: Ledger, clock: Clock) -> None:
    b = budget(ledger, clock, day=0.06, total=0.10)
    pay(ledger, b)
    with pytest.raises(BudgetExceeded) as caught:
        b.reserve(IMAGE)  # both fail; the day has less left
    assert caught.value.extra["window"] == "day"
    with pytest.raises(BudgetExceeded) as caught:
        b.reserve(2_000_000)  # the per-request limit comes first: waiting cannot fix it
    assert caught.value.extra["window"] == "request"


def test_zero_means_no_limit(ledger: Ledger, clock: Clock) -> None:
    b = budget(ledger, clock, day=0, total=0)
    for _ in range(30):
        pay(ledger, b, 990_000)
    r = b.remaining()
    assert r["day"]["limit_usd"] is None and r["day"]["remaining_usd"] is None
    assert r["total"]["limit_usd"] is None and r["total"]["used_usd"] == 29.7


def test_rejected_payments_free_their_room(ledger: Ledger, clock: Clock) -> None:
    b = budget(ledger, clock, day=0.06)
    with b.reserve(IMAGE) as res:
        pid = record(ledger, IMAGE, reservation=res)
    with pytest.raises(BudgetExceeded):
        b.reserve(IMAGE)
    # the pre-auth was refused
    ledger.commit(ledger.outcome(pid, "rejected", note="PAYMENT_INVALID"))
    with b.reserve(IMAGE) as res:  # the fresh attempt reserves again
        record(ledger, IMAGE, attempt=2, reservation=res)
    assert used(b) == (0.0535, 0.0535)


def test_a_refused_authorization_holds_its_room_until_it_expires(ledger: Ledger,
                                                                  clock: Clock) -> None:
    b = budget(ledger, clock, day=0.06)
    expires = int(clock.now) + 300
    with b.reserve(IMAGE) as res:
        pid = record(ledger, IMAGE, reservation=res, valid_before=expires)
    ledger.commit(ledger.outcome(pid, "rejected", note="PAYMENT_INVALID"))
    with pytest.raises(BudgetExceeded) as caught:
        b.reserve(IMAGE)
    assert "$0.0535 of what is used is held by unsettled payments" \
        in caught.value.message
    assert b.remaining()["day"]["held_usd"] == b.remaining()["day"]["used_usd"] == 0.0535
    clock.now = expires + EXPIRY_MARGIN
    assert b.remaining()["day"]["held_usd"] == 0.0
    with b.reserve(IMAGE) as res:
        record(ledger, IMAGE, attempt=2, reservation=res, valid_before=int(clock.now) + 300)


def test_stats_names_the_money_refused_payments_still_hold(ledger: Ledger,
                                                           clock: Clock) -> None:
    b = budget(ledger, clock, day=1.0)
    with b.reserve(IMAGE) as res:
        pid = record(ledger, IMAGE, reservation=res, valid_before=int(clock.now) + 300)
    ledger.commit(ledger.outcome(pid, "rejected"))
    summary = {**ledger.summary(), "budget": b.remaining()}
    assert "Held: $0.0535 of unsettled payments" in render(summary, "here")
    clock.now += 360
    assert "Held" not in render({**summary, "budget": b.remaining()}, "here")


def test_release_frees_room(ledger: Ledger, clock: Clock) -> None:
    b = budget(ledger, clock, day=0.06)
    res = b.reserve(IMAGE)
    with pytest.raises(BudgetExceeded):
        b.reserve(IMAGE)
    res.release()
    res.release()  # idempotent
    with pytest.raises(RuntimeError):
        with b.reserve(IMAGE):
            raise RuntimeError("upstream refused before any 402")  # released on the way out
    assert used(b) == (0, 0)
    b.reserve(IMAGE)


def test_paid_is_counted_once(ledger: Ledger, clock: Clock) -> None:
    b = budget(ledger, clock, day=1.0)
    with b.reserve(IMAGE) as res:
        assert used(b) == (0.0535, 0.0535)
        pid = record(ledger, IMAGE, reservation=res)  # converted in the same step
        assert not res.live and res.payment_id == pid
        assert used(b) == (0.0535, 0.0535)
        res.paid(pid)  # the caller may say it again
        with pytest.raises(ValueError):
            res.paid(pid + 1)
    res.release()  # a no-op once paid
    assert used(b) == (0.0535, 0.0535)
    assert b.remaining()["day"]["reserved_usd"] == 0

    # Without handing the reservation to the ledger, it counts twice until paid(): the
    # safe direction (it can only refuse, never over-admit).
    res = b.reserve(IMAGE)
    pid = record(ledger, IMAGE)
    assert used(b) == (0.1605, 0.1605)
    res.paid(pid)
    assert used(b) == (0.107, 0.107)


def test_a_signature_must_be_covered_by_a_live_reservation(ledger: Ledger,
                                                           clock: Clock) -> None:
    b = budget(ledger, clock)
    res = b.reserve(IMAGE)
    with pytest.raises(ValueError, match="above the reserved"):
        record(ledger, IMAGE + 1, reservation=res)
    record(ledger, IMAGE - 500, reservation=res)  # a smaller quote is fine: the row counts
    with pytest.raises(ValueError, match="reservation is paid"):
        record(ledger, IMAGE, attempt=2, reservation=res)  # attempt 2 needs a new one
    released = b.reserve(IMAGE)
    released.release()
    with pytest.raises(ValueError, match="reservation is released"):
        record(ledger, IMAGE, reservation=released)
    assert len(ledger.payments()) == 1 and used(b) == (0.053, 0.053)


def test_a_release_racing_a_recording_counts_once(ledger: Ledger, clock: Clock) -> None:
    """A cancelled request releases while its recording still finishes on the ledger thread."""
    b = budget(ledger, clock)
    res = b.reserve(IMAGE)
    res.release()
    res.paid(record(ledger, IMAGE))  # what the signed write does once it is durable
    assert used(b) == (0.0535, 0.0535)


def _covering_five(ledger: Ledger, clock: Clock, window: str = "day") -> Budget:
    """A budget whose `window` (day, month or total) covers exactly five images."""
    return budget(ledger, clock, **{window: 5 * IMAGE / 1_000_000})


WINDOWS = pytest.mark.parametrize("window", ["day", "month", "total"])


@WINDOWS
def test_race_threads(ledger: Ledger, clock: Clock, window: str) -> None:
    b = _covering_five(ledger, clock, window)
    start = threading.Barrier(50)
    outcomes: list[str] = []

    def request() -> None:
        start.wait()
        try:
            pay(ledger, b)
            outcomes.append("paid")
        except BudgetExceeded:
            outcomes.append("refused")

    threads = [threading.Thread(target=request) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("paid") == 5 and outcomes.count("refused") == 45
    assert len(ledger.payments()) == 5 and ledger.spent() == 5 * IMAGE
    assert b.remaining()[window]["remaining_usd"] == 0


@WINDOWS
def test_race_threads_holding_reservations(ledger: Ledger, clock: Clock, window: str) -> None:
    b = _covering_five(ledger, clock, window)
    start = threading.Barrier(50)
    held: list = []
    refused: list = []

    def request() -> None:
        start.wait()
        try:
            held.append(b.reserve(IMAGE))
        except BudgetExceeded as exc:
            refused.append(exc)

    threads = [threading.Thread(target=request) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (len(held), len(refused)) == (5, 45)
    for res in held:
        res.release()
    assert used(b) == (0, 0)


@WINDOWS
def test_race_asyncio_tasks(ledger: Ledger, clock: Clock, window: str) -> None:
    b = _covering_five(ledger, clock, window)

    async def request() -> int:
        await asyncio.sleep(0)
        with b.reserve(IMAGE) as res:
            await asyncio.sleep(0)  # the signer runs here
            pid = await ledger.call(record, ledger, IMAGE, reservation=res)
        await ledger.call(ledger.commit, ledger.outcome(pid, "settled"))
        return pid

    async def main() -> list:
        return await asyncio.gather(*(request() for _ in range(50)), return_exceptions=True)

    results = asyncio.run(main())
    assert sum(isinstance(r, int) for r in results) == 5
    assert sum(isinstance(r, BudgetExceeded) for r in results) == 45
    assert len(ledger.payments()) == 5 and ledger.spent() == 5 * IMAGE


def test_the_day_rolls_over_at_local_midnight(ledger: Ledger, clock: Clock) -> None:
    b = budget(ledger, clock, day=0.06, total=0.5)
    midnight = day_start(TODAY + timedelta(days=1))
    clock.now = midnight - 60
    pay(ledger, b)
    held = b.reserve(1_000)  # live at midnight: counts in whichever day is current
    with pytest.raises(BudgetExceeded):
        b.reserve(IMAGE)
    clock.now = midnight - 0.001
    with pytest.raises(BudgetExceeded):
        b.reserve(IMAGE)
    clock.now = midnight
    assert b.remaining()["day"] == {"limit_usd": 0.06, "used_usd": 0.001, "reserved_usd": 0.001,
                                    "held_usd": 0.0,
                                    "remaining_usd": 0.059, "day": "2026-03-15"}
    pay(ledger, b)
    assert used(b) == (0.0545, 0.1080)
    held.release()


def test_reservations_do_not_survive_a_restart(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "ledger.sqlite3"
    ledger = Ledger(path, clock=clock)
    b = budget(ledger, clock, day=1.0)
    pay(ledger, b)
    with b.reserve(IMAGE) as res:
        record(ledger, 20_000, reservation=res)  # signed, then the process "dies"
    b.reserve(300_000)  # held, never recorded
    ledger.close()

    ledger = Ledger(path, clock=clock)
    try:
        b = budget(ledger, clock, day=1.0)
        assert used(b) == (0.0735, 0.0735)  # both rows (one now unknown), no reservations
        assert [p.status for p in ledger.payments()] == ["unknown", "settled"]
    finally:
        ledger.close()


def test_from_settings(ledger: Ledger, clock: Clock, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, max_usd_per_request=0.5, max_usd_per_day=2.0,
                        max_usd_per_month=30, max_usd_total=0)
    b = Budget.from_settings(ledger, settings, clock=clock)
    assert b.limits == {"request": 500_000, "day": 2_000_000, "month": 30_000_000, "total": 0}
    assert b.remaining()["request"] == {"limit_usd": 0.5, "remaining_usd": 0.5}


@pytest.mark.parametrize("window", ["day", "month"])
def test_a_clock_that_ran_ahead_and_came_back_does_not_double_the_daily_limit(tmp_path,
                                                                            window):
    """Rows dated after now (signed while the clock ran ahead, then set right) count in the
    current day's and month's windows, which run from their start on, as the ledger's SQL
    sums (`spent(since=…)`, /v1/spend's `today`) do; across a restart too."""
    from datetime import date

    ahead = 86_400 if window == "day" else 40 * 86_400  # a day, or into the next month
    clock = Clock(NOON + ahead)  # an unsynced RTC, a wrong manual setting
    path = tmp_path / "ledger.sqlite3"
    limits = {"per_day_usd": 0.1 if window == "day" else 0, "per_month_usd": 0.1}

    def spend_all(ledger: Ledger) -> int:
        budget = Budget(ledger, per_request_usd=1, total_usd=0, clock=clock, **limits)
        paid = 0
        while True:
            try:
                reservation = budget.reserve(50_000)
            except BudgetExceeded:
                assert budget.remaining()[window]["used_usd"] == 0.1
                return paid
            with reservation:
                record(ledger, 50_000, reservation=reservation)
            paid += 50_000

    with Ledger(path, clock=clock) as ledger:
        assert spend_all(ledger) == 100_000
        clock.now = NOON + 60  # NTP corrects it a minute later, in real time
        assert spend_all(ledger) == 0, f"the {window}'s limit was spent a second time"
        today = date.fromtimestamp(clock.now)
        start = day_start(today if window == "day" else today.replace(day=1))
        counted = (ledger.spent_since_day(today.isoformat()) if window == "day"
                   else ledger.spent_since_month(today.isoformat()[:7]))
        assert counted == ledger.spent(since=start) == 100_000  # memory and SQL agree
    with Ledger(path, clock=clock) as ledger:  # a restart counts them alike
        assert spend_all(ledger) == 0
