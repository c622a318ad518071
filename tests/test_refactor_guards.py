"""An error leaves the gateway four ways: FastAPI's handlers (`api/errors.py`), the ASGI
middleware below them (`send_error`), the image server (`store/server.py`) and the raw
connection (`api/connection.py`), through `ClawError.rendered`. They share one rendering; these pin
what each sends, so that sharing it changed nothing a client can see."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from clawrouter.api.errors import error_response
from clawrouter.api.middleware import send_error
from clawrouter.errors import ClawError, PaymentRejected, UpstreamUnavailable
from clawrouter.store import server as image_server
from tests.conftest import Gateway

# Quotes a lone surrogate (client text that is not UTF-8): the body must still render, as ASCII.
BUSY = UpstreamUnavailable("Busy: \udcff.", param="prompt", status=503, code="upstream_busy",
                           headers={"Retry-After": "5"}, extra={"payment": "none"})
REJECTED = PaymentRejected("Rejected.", extra={"upstream_code": "X", "payment": "rejected"})
BUSY_BODY = (b'{"error":{"message":"Busy: \\udcff.","type":"upstream_error","param":"prompt",'
             b'"code":"upstream_busy","payment":"none"}}')
REJECTED_BODY = (b'{"error":{"message":"Rejected.","type":"payment_error","param":null,'
                 b'"code":"payment_rejected","upstream_code":"X","payment":"rejected"}}')


def _common(body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-length", str(len(body)).encode()), (b"content-type", b"application/json")]


@pytest.mark.parametrize("error, body, own", [
    (BUSY, BUSY_BODY, [(b"retry-after", b"5")]),
    (REJECTED, REJECTED_BODY, [(b"x-should-retry", b"false")]),
])
def test_fastapi_handlers_send_the_envelope_with_lowercase_headers(error, body, own):
    state: dict[str, Any] = {}
    response = error_response(error, _Request({"state": state}))
    assert response.status_code == error.status and bytes(response.body) == body
    assert sorted(response.raw_headers) == sorted(_common(body) + own)
    assert state == {"error_code": error.code, "payment": error.extra["payment"]}
    assert json.loads(body)["error"]["message"] == error.message


@pytest.mark.parametrize("error, body, own", [
    (BUSY, BUSY_BODY, [(b"Retry-After", b"5")]),  # names as the error gives them
    (REJECTED, REJECTED_BODY, [(b"x-should-retry", b"false")]),
])
def test_middleware_and_raw_connection_send_the_envelope(error, body, own):
    parts = error.rendered()
    assert parts[0] == body and sorted(parts[1]) == sorted(_common(body) + own)
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope: dict[str, Any] = {"type": "http"}
    asyncio.run(send_error(scope, send, error))
    assert sent == [{"type": "http.response.start", "status": error.status, "headers": parts[1]},
                    {"type": "http.response.body", "body": body}]
    assert scope["state"] == {"error_code": error.code, "payment": error.extra["payment"]}


def test_the_image_server_adds_nosniff_and_its_own_headers():
    status, headers, body = image_server._error(BUSY, [(b"content-range", b"bytes */9")])
    assert (status, body) == (503, BUSY_BODY)
    assert sorted(headers) == sorted(_common(BUSY_BODY) + [
        (b"retry-after", b"5"), (b"x-content-type-options", b"nosniff"),
        (b"content-range", b"bytes */9")])
    status, headers, body = image_server._NOT_ALLOWED
    assert status == 405 and json.loads(body)["error"]["code"] == "method_not_allowed"
    assert sorted(headers) == sorted(_common(body) + [
        (b"allow", b"GET, HEAD"), (b"x-should-retry", b"false"),
        (b"x-content-type-options", b"nosniff")])


def test_a_plain_error_sends_no_retry_advice():
    body, headers = ClawError("Oops.").rendered()
    assert body == (b'{"error":{"message":"Oops.","type":"server_error","param":null,'
                    b'"code":null}}')
    assert sorted(headers) == sorted(_common(body))


def test_head_errors_carry_headers_and_no_body(make_gateway):
    """HEAD answered by each path: FastAPI's (an unknown route), the middleware's (no API
    key) and the image server's (an unknown image). Status and envelope headers as for GET,
    and no body on the wire."""
    gw: Gateway = make_gateway(api_key="sk-guard")
    auth = {"authorization": "Bearer sk-guard"}
    for path, headers, status in [("/v1/nope", auth, 404), ("/v1/models", {}, 401),
                                  ("/images/" + "0" * 32 + ".png", {}, 404)]:
        get = gw.http.get(path, headers=headers)
        head = gw.http.head(path, headers=headers)
        assert head.status_code == get.status_code == status, path
        assert head.content == b"" and get.json()["error"]["code"]
        for name in ("content-type", "content-length", "x-should-retry", "www-authenticate",
                     "x-content-type-options"):
            assert head.headers.get(name) == get.headers.get(name), (path, name)
        assert head.headers["x-request-id"].startswith("req_")
        assert httpx.get(gw.url + "/health").status_code == 200


class _Request:
    """Just enough of a Starlette request for `error_response`."""

    def __init__(self, scope: dict[str, Any]) -> None:
        self.scope = scope


# --- the ledger, split into ledgerdb / ledgerlock / ledgertotals / ledgerreport -------------
# These pin what the split must not change: the names other modules import from `ledger`, the
# refused-authorization rule that lives in two forms (SQL and in memory), and the report's shape.

LEDGER_NAMES = (
    "CHAIN_PATIENCE", "EXPIRY_MARGIN", "FAILED_AFTER_PAYMENT", "FILENAME", "FINAL", "NEVER_SENT",
    "NOTE_MAX", "PENDING", "REJECTED", "SETTLED", "SIGNED", "STATUSES", "UNKNOWN", "Holder",
    "Ledger", "LedgerBusy", "Payment", "Write", "clean_note", "day_start", "holder", "in_use",
    "local_day", "lock_path",
)


def test_the_ledger_still_exports_what_the_rest_imports():
    from clawrouter.payment import ledger, ledgerdb, ledgerlock

    missing = [name for name in LEDGER_NAMES if not hasattr(ledger, name)]
    assert missing == []
    assert ledger.Payment is ledgerdb.Payment and ledger.LedgerBusy is ledgerlock.LedgerBusy
    assert ledger.holder is ledgerlock.holder and ledger.FINAL == ("settled", "rejected")


@pytest.mark.parametrize("chain", ["eip155:8453", None])
@pytest.mark.parametrize("network", ["eip155:8453", "eip155:84532"])
@pytest.mark.parametrize("offset", [-86_400 - 1, -86_400, -86_399, -61, -60, -59, 0, 300])
def test_the_held_rule_says_the_same_in_sql_and_in_memory(chain, network, offset):
    """A restart (`HELD`, in SQL) must hold exactly the refusals the running totals hold
    (`held_until`): at and around each boundary, on the chain's network and another."""
    import sqlite3

    from clawrouter.payment.ledgerdb import HELD, held_params, held_until

    now = 1_773_500_000.0
    valid_before = int(now) + offset
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE payments (status TEXT, unspendable INTEGER, valid_before INTEGER, "
               "network TEXT)")
    db.execute("INSERT INTO payments VALUES ('rejected', NULL, ?, ?)", (valid_before, network))
    in_sql = db.execute(f"SELECT count(*) FROM payments WHERE {HELD}",
                        held_params(now, chain)).fetchone()[0] == 1
    assert in_sql == (held_until(valid_before, network, chain) > now)


def test_totals_in_memory_match_a_sql_sum_and_a_restart(tmp_path):
    """The running totals (`ledgertotals`) and the ledger's SQL agree as a refusal is held and
    then let go, and a restart rebuilds the same totals (day and month included)."""
    from clawrouter.payment.ledger import EXPIRY_MARGIN, Ledger, local_day
    from tests.test_ledger import Clock, record

    clock = Clock()
    path = tmp_path / "ledger.sqlite3"
    today = local_day(clock.now)
    expires = int(clock.now) + 300
    with Ledger(path, clock=clock) as ledger:
        held = record(ledger, 4_000, valid_before=expires)
        let_go = record(ledger, 2_000, valid_before=expires)
        record(ledger, 1_000)
        ledger.commit(ledger.outcome(held, "rejected"))
        ledger.commit(ledger.outcome(let_go, "rejected", can_settle=False))
        assert ledger.spent() == ledger.spent(since=0) == 5_000  # as the outcomes moved them
    for now, spent in [(clock.now, 5_000), (expires + EXPIRY_MARGIN, 1_000)]:
        clock.now = now
        with Ledger(path, clock=clock) as ledger:  # (from a restart) ...
            restarted = (ledger.spent(), ledger.spent_since_day(today),
                         ledger.spent_since_month(today[:7]))
            assert restarted == (spent, spent, spent) and ledger.spent(since=0) == spent
    clock.now = expires - 1
    with Ledger(path, clock=clock) as ledger:  # ... and as it lets go in memory
        assert ledger.spent() == ledger.spent(since=0) == 5_000 and len(ledger.held()) == 1
        clock.now = expires + EXPIRY_MARGIN
        assert ledger.spent() == ledger.spent(since=0) == ledger.spent_since_day(today) == 1_000
        assert ledger.held() == []


def test_the_spending_report_keeps_its_keys_in_order(ledger):
    assert list(ledger.summary()) == ["timezone", "today", "month", "total", "by_model",
                                      "by_day", "latest"]
