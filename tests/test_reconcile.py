"""Payments with a lost outcome, settled by asking the chain — the sandbox's stand-in chain,
served over JSON-RPC by the sandbox itself, with the gateway and sandbox as real servers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import given, strategies as st

from clawrouter.payment.ledger import (
    FAILED_AFTER_PAYMENT, REJECTED, SETTLED, UNKNOWN, Ledger, Payment,
)
from clawrouter.payment.networks import NETWORKS
from clawrouter.payment.onchain import AUTHORIZATION_STATE, AUTHORIZATION_USED, Block
from clawrouter.payment.reconcile import Resolution, agree, decide
from clawrouter.payment.wire import RECEIPT_HEADERS
from clawrouter.sandbox import SandboxConfig, create_sandbox_app
from tests.servers import serving

COGVIEW = {"model": "cogview", "size": "512x512"}
COGVIEW_PRICE = 16_750
SEPOLIA = NETWORKS["base-sepolia"]


def gen(gw, prompt):
    return gw.http.post("/v1/images/generations", json={**COGVIEW, "prompt": prompt})


def rpc(url: str, method: str, *params):
    answer = httpx.post(url, json={"jsonrpc": "2.0", "id": 7, "method": method,
                                   "params": list(params)}).json()
    assert answer["id"] == 7
    return answer


def word(hex_value: str) -> str:
    return hex_value[2:].lower().rjust(64, "0")


@pytest.fixture
def chain_url(sandbox) -> str:
    return sandbox.url + "/_sandbox/rpc"


@pytest.fixture
def time_travel(sandbox):
    """Move the sandbox's clock (and so its chain's blocks) forward; restored afterwards."""
    config = sandbox.server.config.app.state.sandbox.config
    original = config.clock

    def travel(seconds: float) -> None:
        config.clock = lambda: original() + seconds

    yield travel
    config.clock = original


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def only_row(gw) -> dict:
    (row,) = gw.http.get("/v1/spend").json()["latest"]
    return row


def reconciling(make_gateway, *rpc_urls, **overrides):
    return make_gateway(rpc_urls=list(rpc_urls), reconcile_interval=0.1, **overrides)


# --- the sandbox's chain --------------------------------------------------------------------

def test_the_sandbox_chain_shows_what_was_settled(gateway, sandbox, chain_url):
    assert rpc(chain_url, "eth_chainId")["result"] == hex(SEPOLIA.chain_id)
    address = gateway.gw.address
    balance_call = {"to": SEPOLIA.usdc, "data": "0x70a08231" + word(address)}
    assert int(rpc(chain_url, "eth_call", balance_call, "latest")["result"], 16) == 100_000_000
    assert gen(gateway, "on chain").status_code == 200
    (event,) = sandbox.stats()["settled"]
    assert int(rpc(chain_url, "eth_call", balance_call, "latest")["result"], 16) \
        == 100_000_000 - COGVIEW_PRICE

    block = rpc(chain_url, "eth_getBlockByNumber", "latest", False)["result"]
    assert abs(int(block["timestamp"], 16) - time.time()) <= 3
    state = {"to": SEPOLIA.usdc,
             "data": AUTHORIZATION_STATE + word(address) + word(event["nonce"])}
    assert int(rpc(chain_url, "eth_call", state, block["number"])["result"], 16) == 1
    other = {**state, "data": AUTHORIZATION_STATE + word(address) + "ab" * 32}
    assert int(rpc(chain_url, "eth_call", other, "latest")["result"], 16) == 0
    logs = rpc(chain_url, "eth_getLogs", {
        "address": SEPOLIA.usdc, "fromBlock": "0x0", "toBlock": "latest",
        "topics": [AUTHORIZATION_USED, "0x" + word(address), event["nonce"]]})["result"]
    assert [log["transactionHash"] for log in logs] == [event["transaction"]]


def test_the_sandbox_chains_finalized_head_trails_the_latest(gateway, sandbox, chain_url):
    sandbox.configure(finality_seconds=60)
    latest = int(rpc(chain_url, "eth_getBlockByNumber", "latest", False)["result"]["number"], 16)
    finalized = rpc(chain_url, "eth_getBlockByNumber", "finalized", False)["result"]
    assert int(finalized["number"], 16) in (latest - 30, latest - 29)
    assert gen(gateway, "not final yet").status_code == 200
    (event,) = sandbox.stats()["settled"]
    state = {"to": SEPOLIA.usdc,
             "data": AUTHORIZATION_STATE + word(gateway.gw.address) + word(event["nonce"])}
    assert int(rpc(chain_url, "eth_call", state, "latest")["result"], 16) == 1
    assert int(rpc(chain_url, "eth_call", state, "finalized")["result"], 16) == 0


def test_usdc_selectors_and_topic_are_the_well_known_ones():
    assert AUTHORIZATION_STATE == "0xe94a0102"
    assert AUTHORIZATION_USED == ("0x98de503528ee59b575ef0c0a2576a82497bfc029a5685b209e9ec33347"
                                  "9b10a5")


def test_the_sandbox_chain_refuses_what_it_cannot_answer(sandbox, chain_url):
    assert "error" in rpc(chain_url, "eth_sendRawTransaction", "0x00")
    assert "error" in rpc(chain_url, "eth_call", {"to": SEPOLIA.usdc, "data": "0xdeadbeef"})
    assert "error" in rpc(chain_url, "eth_getBlockByNumber", hex(10**12), False)
    assert rpc(chain_url, "eth_call", {"to": "0x" + "11" * 20, "data": "0x70a08231"})[
        "result"] == "0x"  # no contract there
    bad = httpx.post(chain_url, content=b"[not json").json()
    assert bad["error"]["code"] == -32600


def test_a_sandboxed_gateway_reads_its_balance_from_the_sandbox_chain(tmp_path):
    """`clawrouter serve --sandbox`: /health shows the sandbox wallet's balance, offline. The
    sandbox never receives a mainnet authorization: it runs on Base Sepolia whatever
    `network` says."""
    from clawrouter.config import Settings
    from clawrouter.launch import run_async, start_gateway

    async def main() -> dict:
        settings = Settings(home=tmp_path, port=0, sandbox=True, network="base")
        running = await start_gateway(settings)
        try:
            assert running.settings.rpc_urls[0].endswith("/_sandbox/rpc")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.port}") as c:
                for _ in range(100):
                    health = (await c.get("/health")).json()
                    if health.get("balance_usd") is not None:
                        return health
                    await asyncio.sleep(0.05)
            return health
        finally:
            running.stop()
            await asyncio.gather(*running.tasks, return_exceptions=True)

    health = run_async(main())
    assert health["balance_usd"] == 100.0 and health["sandbox"] is True
    assert health["network"] == "base-sepolia"


# --- reconciling ----------------------------------------------------------------------------

def test_a_failed_payment_the_chain_shows_settled_becomes_settled(make_gateway, sandbox,
                                                                  chain_url):
    sandbox.faults({"kind": "drop", "phase": "paid", "settle": True, "times": 1})
    gw = reconciling(make_gateway, chain_url)
    assert gen(gw, "lost answer").status_code == 502
    row = wait_for(lambda: (r := only_row(gw))["status"] == SETTLED and r)
    (event,) = sandbox.stats()["settled"]
    assert row["transaction"] == event["transaction"]
    assert row["payer"] == gw.gw.address and row["nonce"] == event["nonce"]
    assert "although the request failed" in row["note"] and "was: response lost" in row["note"]
    today = gw.http.get("/v1/spend").json()["today"]
    assert today["micro"] == COGVIEW_PRICE and today["pending"]["micro"] == 0


def test_a_payment_never_used_stays_pending_until_it_expires_then_costs_nothing(
        make_gateway, sandbox, chain_url, time_travel):
    sandbox.faults({"kind": "drop", "phase": "paid", "times": 1})  # received, never settled
    gw = reconciling(make_gateway, chain_url, max_usd_per_day=0.02)
    assert gen(gw, "never settled").status_code == 502
    row = only_row(gw)
    assert row["status"] == FAILED_AFTER_PAYMENT and row["valid_before"] > time.time()
    time.sleep(0.5)  # several rounds: unused but still spendable proves nothing
    assert only_row(gw)["status"] == FAILED_AFTER_PAYMENT
    # the day's budget ($0.02) is taken by the pending payment: a second image is refused
    refused = gen(gw, "over budget")
    assert refused.status_code == 402, refused.text
    assert sandbox.stats()["payments_count"] == 1

    time_travel(row["valid_before"] - time.time() + 2)  # the chain passes validBefore
    row = wait_for(lambda: (r := only_row(gw))["status"] == REJECTED and r)
    assert "never used" in row["note"] and row["transaction"] is None
    assert gw.http.get("/v1/spend").json()["today"]["pending"]["micro"] == 0
    time_travel(0)
    assert gen(gw, "budget back").status_code == 200  # the budget got the amount back


def test_a_refused_payment_the_payee_settled_anyway_is_recorded_and_counted(
        make_gateway, sandbox, chain_url, monkeypatch):
    """A dishonest payee answers 402 but settles, and sends no receipt (with one, the
    refusal is recorded `settled` at once: `tests/test_hostile_upstream.py`): the chain corrects
    the record (`settled`, with its transaction), and the amount never stopped counting
    against the budgets."""
    sandbox.faults({"kind": "respond", "phase": "paid", "status": 402, "settle": True,
                    "body": {"error": "Payment rejected"}, "times": 1})
    gw = reconciling(make_gateway, chain_url)
    post = gw.gw.client.post

    async def without_receipts(*args, **kwargs):  # the sandbox sends one with `settle`
        resp = await post(*args, **kwargs)
        return dataclasses.replace(resp, headers={
            k: v for k, v in resp.headers.items() if k not in RECEIPT_HEADERS})

    monkeypatch.setattr(gw.gw.client, "post", without_receipts)
    refused = gen(gw, "refused")
    assert refused.status_code == 402 and refused.json()["error"]["code"] == "payment_rejected"
    row = wait_for(lambda: (r := only_row(gw))["status"] == SETTLED and r)
    (event,) = sandbox.stats()["settled"]
    assert row["transaction"] == event["transaction"]
    assert "although the upstream refused it" in row["note"]
    spend = gw.http.get("/v1/spend").json()
    assert spend["today"]["micro"] == COGVIEW_PRICE  # = the sandbox's settled total
    assert spend["budget"]["day"]["used_usd"] == COGVIEW_PRICE / 1e6
    assert spend["budget"]["day"]["held_usd"] == 0


def test_a_refused_payment_holds_its_budget_until_the_chain_sees_it_expire_unused(
        make_gateway, sandbox, chain_url, time_travel):
    sandbox.faults({"kind": "reject", "code": "PAYMENT_UNFUNDED", "times": 1})
    gw = reconciling(make_gateway, chain_url, max_usd_per_day=0.02)
    assert gw.gw.ledger.chain_network == SEPOLIA.caip2  # expiry alone frees nothing
    assert gen(gw, "refused").status_code == 402
    row = only_row(gw)
    time.sleep(0.5)  # several rounds: unused but still spendable proves nothing
    assert gw.http.get("/v1/spend").json()["budget"]["day"]["held_usd"] == COGVIEW_PRICE / 1e6
    assert gen(gw, "over budget").json()["error"]["code"] == "budget_exceeded"
    time_travel(row["valid_before"] - time.time() + 2)  # the chain passes validBefore
    wait_for(lambda: gw.http.get("/v1/spend").json()["budget"]["day"]["held_usd"] == 0)
    assert "never used" in only_row(gw)["note"]
    time_travel(0)
    assert gen(gw, "budget back").status_code == 200
    assert sandbox.stats()["payments_count"] == 1  # the refused one was never received


def test_an_rpc_on_another_chain_changes_nothing(make_gateway, sandbox):
    """Mainnet's chain, an hour on: no Sepolia USDC contract there, so no answer means "unused"."""
    later = SandboxConfig(network="base", clock=lambda: time.time() + 3600)
    with serving(create_sandbox_app(later)) as mainnet:
        sandbox.faults({"kind": "drop", "phase": "paid", "times": 1})
        gw = reconciling(make_gateway, mainnet.url + "/_sandbox/rpc")
        assert gen(gw, "wrong chain").status_code == 502
        time.sleep(0.6)
        assert only_row(gw)["status"] == FAILED_AFTER_PAYMENT


@contextlib.contextmanager
def lying_chain(chain_id: int = SEPOLIA.chain_id) -> Iterator[str]:
    """An RPC for Sepolia's USDC that has seen no transfer and whose every block is an hour
    on: every authorization unused and long expired. Yields its URL."""
    from types import SimpleNamespace

    from starlette.applications import Starlette
    from starlette.routing import Route

    from clawrouter.sandbox.chain import Chain, rpc as chain_rpc

    liar = Starlette(routes=[Route("/", chain_rpc, methods=["POST"])])
    liar.state.sandbox = SimpleNamespace(chain=Chain(
        dataclasses.replace(SEPOLIA, chain_id=chain_id), lambda: time.time() + 3600, 0))
    with serving(liar) as server:
        yield server.url + "/"


def test_an_rpc_that_claims_another_chain_id_is_not_believed(make_gateway, sandbox):
    """Same USDC address, every authorization unused and long expired — but chain id 1."""
    with lying_chain(chain_id=1) as liar:
        sandbox.faults({"kind": "drop", "phase": "paid", "times": 1})
        gw = reconciling(make_gateway, liar)
        assert gen(gw, "spoofed chain").status_code == 502
        time.sleep(0.6)
        assert only_row(gw)["status"] == FAILED_AFTER_PAYMENT


def rows(gw) -> dict[str, dict]:
    """The ledger's rows keyed by the order they were paid in ("1", "2", ...)."""
    latest = sorted(gw.http.get("/v1/spend").json()["latest"], key=lambda r: r["id"])
    return {str(i): row for i, row in enumerate(latest, 1)}


def test_a_refund_needs_two_rpcs_to_agree_and_rpcs_that_disagree_change_nothing(
        make_gateway, sandbox, chain_url, time_travel):
    """The honest sandbox chain and a liar that calls everything expired and unused. Payment 1
    was never used: the liar alone cannot hand its amount back to the budget, the honest chain
    and the liar together can once it expired. Payment 2 was used: the liar contradicts the
    honest chain, so it stays pending instead of being settled or refunded."""
    sandbox.faults({"kind": "drop", "phase": "paid", "times": 1},
                   {"kind": "drop", "phase": "paid", "settle": True, "times": 1})
    with lying_chain() as liar:
        gw = reconciling(make_gateway, chain_url, liar)
        assert gen(gw, "never used").status_code == 502
        assert gen(gw, "used").status_code == 502
        assert len(sandbox.stats()["settled"]) == 1
        time.sleep(0.6)  # several rounds
        assert [r["status"] for r in rows(gw).values()] == [FAILED_AFTER_PAYMENT] * 2

        time_travel(rows(gw)["1"]["valid_before"] - time.time() + 2)
        wait_for(lambda: rows(gw)["1"]["status"] == REJECTED)
        time.sleep(0.4)
        assert rows(gw)["2"]["status"] == FAILED_AFTER_PAYMENT


def test_one_rpc_answering_can_settle_but_not_refund(make_gateway, sandbox, chain_url,
                                                     time_travel):
    sandbox.faults({"kind": "drop", "phase": "paid", "settle": True, "times": 1},
                   {"kind": "drop", "phase": "paid", "times": 1})
    gw = reconciling(make_gateway, "http://127.0.0.1:9/", chain_url)
    assert gen(gw, "used").status_code == 502
    assert gen(gw, "never used").status_code == 502
    wait_for(lambda: rows(gw)["1"]["status"] == SETTLED)
    time_travel(rows(gw)["2"]["valid_before"] - time.time() + 2)
    time.sleep(0.6)
    assert rows(gw)["2"]["status"] == FAILED_AFTER_PAYMENT


def test_outcomes_are_read_at_the_finalized_block(make_gateway, sandbox, chain_url,
                                                  time_travel):
    """A transfer in the latest blocks, or an expiry only the latest blocks have passed, could
    still be undone by a reorg: nothing is decided until the finalized head shows it."""
    sandbox.configure(finality_seconds=1000)  # longer than an authorization's window
    sandbox.faults({"kind": "drop", "phase": "paid", "settle": True, "times": 1},
                   {"kind": "drop", "phase": "paid", "times": 1})
    gw = reconciling(make_gateway, chain_url)
    assert gen(gw, "used").status_code == 502
    assert gen(gw, "never used").status_code == 502
    expired = rows(gw)["2"]["valid_before"] - time.time() + 2
    time_travel(expired)  # the latest block is past validBefore, the finalized one is not
    time.sleep(0.6)
    assert [r["status"] for r in rows(gw).values()] == [FAILED_AFTER_PAYMENT] * 2

    time_travel(expired + 1000)
    wait_for(lambda: [r["status"] for r in rows(gw).values()] == [SETTLED, REJECTED])


def test_no_rpc_answering_changes_nothing(make_gateway, sandbox, time_travel):
    sandbox.faults({"kind": "drop", "phase": "paid", "times": 1})
    gw = reconciling(make_gateway, "http://127.0.0.1:9/")
    assert gen(gw, "offline").status_code == 502
    time_travel(3600)
    time.sleep(0.4)
    assert only_row(gw)["status"] == FAILED_AFTER_PAYMENT


# --- the ledger -----------------------------------------------------------------------------

def test_a_version_1_ledger_is_migrated_and_its_rows_are_never_guessed_at(tmp_path: Path):
    path = tmp_path / "ledger.sqlite3"
    old = sqlite3.connect(path)
    old.executescript("""
        CREATE TABLE payments (
            id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, request_id TEXT NOT NULL,
            route TEXT NOT NULL, model TEXT NOT NULL, size TEXT NOT NULL,
            n INTEGER NOT NULL CHECK (n >= 1), amount INTEGER NOT NULL CHECK (amount > 0),
            payee TEXT NOT NULL, network TEXT NOT NULL, nonce TEXT NOT NULL UNIQUE,
            status TEXT NOT NULL, "transaction" TEXT, latency_ms REAL, note TEXT,
            attempt INTEGER NOT NULL);
        PRAGMA user_version = 1;
    """)
    old.execute("INSERT INTO payments (time, request_id, route, model, size, n, amount, payee, "
                "network, nonce, status, attempt) VALUES (1, 'r', '/v1/images/generations', "
                "'zai/cogview-4', '512x512', 1, 16750, "
                "'0xe9030014F5DAe217d0A152f02A043567b16c1aBf', 'eip155:84532', "
                "'0x' || printf('%064d', 1), 'signed', 1)")
    old.commit()
    old.close()
    with Ledger(path) as ledger:
        (row,) = ledger.payments()
        assert (row.status, row.payer, row.valid_before, row.idempotency) == \
            (UNKNOWN, None, None, None)
        assert ledger.unresolved(SEPOLIA.caip2) == []  # no payer: the chain cannot be asked
        assert ledger.spent() == 16_750
        assert ledger.paid_for("any", since=0) is None
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == 3
    raw.close()


def test_an_outcome_expecting_a_status_fails_if_the_row_moved_on(ledger: Ledger):
    payment_id = ledger.commit(ledger.signed(
        request_id="r", route="/v1/images/generations", model="zai/cogview-4", size="512x512",
        n=1, amount=16_750, payee="0xe9030014F5DAe217d0A152f02A043567b16c1aBf",
        network=SEPOLIA.caip2, nonce="0x" + "01" * 32))
    ledger.commit(ledger.outcome(payment_id, SETTLED))
    with pytest.raises(ValueError, match="settled now, not unknown"):
        ledger.commit(ledger.outcome(payment_id, REJECTED, expected=UNKNOWN))
    assert ledger.get(payment_id).status == SETTLED


# --- the decision ---------------------------------------------------------------------------

def _payment(status: str, valid_before: int, note: str | None = None) -> Payment:
    return Payment(1, 0.0, "r", "/v1/images/generations", "zai/cogview-4", "512x512", 1,
                   16_750, "0xe9030014F5DAe217d0A152f02A043567b16c1aBf", SEPOLIA.caip2,
                   "0x" + "01" * 32, status, None, None, note, 1,
                   "0x1563915e194D8CfBA1943570603F7606A3115508", valid_before)


@given(status=st.sampled_from([UNKNOWN, FAILED_AFTER_PAYMENT]), used=st.booleans(),
       valid_before=st.integers(0, 2**40), timestamp=st.integers(0, 2**40),
       note=st.none() | st.text(max_size=50))
def test_only_an_expired_unused_authorization_is_ever_called_unpaid(status, used,
                                                                    valid_before, timestamp,
                                                                    note):
    decision = decide(_payment(status, valid_before, note), used, Block(5, timestamp))
    if used:
        assert decision is not None and decision[0] == SETTLED
    elif timestamp >= valid_before:
        assert decision is not None and decision[0] == REJECTED
    else:
        assert decision is None  # still spendable: nothing is proven yet


@given(answers=st.lists(st.sampled_from(["absent", "not yet", SETTLED, REJECTED]),
                        min_size=1, max_size=4), quorum=st.integers(1, 3),
       refused=st.booleans())
def test_rpcs_are_believed_only_together(answers, quorum, refused):
    """One payment, one verdict per RPC that answered ("absent": it skipped the row). A row
    the upstream refused needs one RPC to confirm it expired unused (an RPC that is down must
    not hold it for a day); any other row needs `quorum`."""
    payment = _payment(REJECTED if refused else FAILED_AFTER_PAYMENT, 100)
    quorum_here = 1 if refused else quorum
    given_answers = [{} if a == "absent" else
                     {payment.id: None if a == "not yet" else Resolution(payment, a, "")}
                     for a in answers]
    agreed = agree([payment], given_answers, quorum)
    if SETTLED in answers and REJECTED in answers:
        assert agreed == []  # one of them is wrong: believe neither
    elif SETTLED in answers:
        assert [r.status for r in agreed] == [SETTLED]
    elif answers.count(REJECTED) >= quorum_here:
        assert [r.status for r in agreed] == [REJECTED]
    else:
        assert agreed == []


def test_a_row_left_signed_long_after_its_authorization_expired_is_reconciled(
        tmp_path: Path, sandbox, chain_url):
    """A request task that died without an outcome (cancelled while its row was written)
    leaves `signed`; once its authorization is long expired and unused, it cost nothing."""
    import aiohttp

    from clawrouter.payment.reconcile import ORPHANED_AFTER, Reconciler

    payer = "0x1563915e194D8CfBA1943570603F7606A3115508"
    with Ledger(tmp_path / "ledger.sqlite3") as ledger:
        def signed(nonce: str, valid_before: float) -> int:
            return ledger.commit(ledger.signed(
                request_id="r", route="/v1/images/generations", model="zai/cogview-4",
                size="512x512", n=1, amount=16_750,
                payee="0xe9030014F5DAe217d0A152f02A043567b16c1aBf", network=SEPOLIA.caip2,
                nonce=nonce, payer=payer, valid_before=int(valid_before)))

        orphan = signed("0x" + "0a" * 32, time.time() - ORPHANED_AFTER - 60)
        live = signed("0x" + "0b" * 32, time.time() + 300)  # its request may still be running

        async def once():
            async with aiohttp.ClientSession() as session:
                return await Reconciler(ledger, SEPOLIA, [chain_url], session).reconcile_once()

        (done,) = asyncio.run(once())
        assert done.payment.id == orphan and done.status == REJECTED
        assert ledger.get(orphan).status == REJECTED and ledger.get(live).status == "signed"
        assert ledger.spent() == 16_750  # only the live row still counts


def test_rows_the_chain_never_answers_for_do_not_keep_the_others_from_being_asked(
        tmp_path: Path):
    """One RPC of two down: an expired, never-used failed row needs both to be refunded, so it
    stays. Three such rows fill every batch of 2, yet a refused payment the payee settled
    anyway is asked about (refusals have a slice of each round of their own), found and
    counted, not let go after a day unasked."""
    import aiohttp
    from types import SimpleNamespace

    from starlette.applications import Starlette
    from starlette.routing import Route

    from clawrouter.payment.reconcile import Reconciler
    from clawrouter.sandbox.chain import Chain, rpc as chain_rpc
    from tests.servers import dead_port

    payer = "0x1563915e194D8CfBA1943570603F7606A3115508"
    chain = Chain(SEPOLIA, time.time, 0)
    app = Starlette(routes=[Route("/", chain_rpc, methods=["POST"])])
    app.state.sandbox = SimpleNamespace(chain=chain)
    with serving(app) as server, Ledger(tmp_path / "l.sqlite3",
                                        chain_network=SEPOLIA.caip2) as ledger:
        def signed(i: int) -> int:
            return ledger.commit(ledger.signed(
                request_id="r", route="/v1/images/generations", model="m", size="s", n=1,
                amount=1000, payee=payer, network=SEPOLIA.caip2, nonce="0x%064x" % i,
                payer=payer, valid_before=int(time.time()) - 600))

        for i in range(1, 4):
            ledger.commit(ledger.outcome(signed(i), FAILED_AFTER_PAYMENT, note="timeout"))
        refused = signed(99)
        ledger.commit(ledger.outcome(refused, REJECTED, note="PAYMENT_INVALID"))
        chain.transfer(payer, "0x%064x" % 99, 1000, "0x" + "ee" * 32)

        async def rounds() -> None:
            async with aiohttp.ClientSession() as session:
                reconciler = Reconciler(ledger, SEPOLIA, [
                    f"http://127.0.0.1:{dead_port()}/", server.url + "/"], session, batch=2)
                for _ in range(3):
                    await reconciler.reconcile_once()

        asyncio.run(rounds())
        assert ledger.get(refused).status == SETTLED
        assert [p.status for p in ledger.payments()].count(FAILED_AFTER_PAYMENT) == 3


def test_rounds_page_through_rows_the_chain_cannot_decide_yet(tmp_path: Path):
    """Two failed rows whose authorizations are still live (nothing to decide) fill a batch
    of 2; the next round goes on to the third, expired unused: refunded (one RPC, the only
    one configured)."""
    import aiohttp
    from types import SimpleNamespace

    from starlette.applications import Starlette
    from starlette.routing import Route

    from clawrouter.payment.reconcile import Reconciler
    from clawrouter.sandbox.chain import Chain, rpc as chain_rpc

    payer = "0x1563915e194D8CfBA1943570603F7606A3115508"
    app = Starlette(routes=[Route("/", chain_rpc, methods=["POST"])])
    app.state.sandbox = SimpleNamespace(chain=Chain(SEPOLIA, time.time, 0))
    with serving(app) as server, Ledger(tmp_path / "l.sqlite3",
                                        chain_network=SEPOLIA.caip2) as ledger:
        ids = []
        for i, valid_before in enumerate((time.time() + 3600, time.time() + 3600,
                                          time.time() - 600), start=1):
            pid = ledger.commit(ledger.signed(
                request_id="r", route="/v1/images/generations", model="m", size="s", n=1,
                amount=1000, payee=payer, network=SEPOLIA.caip2, nonce="0x%064x" % i,
                payer=payer, valid_before=int(valid_before)))
            ledger.commit(ledger.outcome(pid, FAILED_AFTER_PAYMENT, note="timeout"))
            ids.append(pid)

        async def rounds() -> None:
            async with aiohttp.ClientSession() as session:
                reconciler = Reconciler(ledger, SEPOLIA, [server.url + "/"], session, batch=2)
                for _ in range(2):
                    await reconciler.reconcile_once()

        asyncio.run(rounds())
        assert [ledger.get(pid).status for pid in ids] == [
            FAILED_AFTER_PAYMENT, FAILED_AFTER_PAYMENT, REJECTED]


@pytest.mark.parametrize("answer, chunks", [
    (b'{"jsonrpc": "2.0", "id": 1, "result": "0x14a34"}', 2),  # split: read to its end
    (b"[" * 100_000 + b"]" * 100_000, 1),  # nested past the parser: one RPC's failure
])
def test_an_rpc_answer_is_read_whole_and_any_bad_one_is_that_rpcs_failure(answer, chunks):
    import aiohttp

    from clawrouter.payment.onchain import Rpc

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(answer))
        step = -(-len(answer) // chunks)
        for i in range(0, len(answer), step):
            writer.write(answer[i:i + step])
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.close()

    async def ask() -> object:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            async with aiohttp.ClientSession() as session:
                return await Rpc(f"http://127.0.0.1:{port}/", session).chain_id()
        except ValueError as exc:  # what every caller counts as this RPC failing
            return exc
        finally:
            server.close()

    got = asyncio.run(ask())
    if chunks == 2:
        assert got == SEPOLIA.chain_id
    else:
        assert isinstance(got, ValueError) and "not JSON" in str(got)


def test_a_pruned_rpc_decides_expired_payments_from_its_recent_state(tmp_path: Path):
    """A full node keeps 128 blocks of state; Base's finalized head is ~600 behind. Once an
    authorization expired before the finalized head, every block that could have used it is
    final, so the latest state (which every node keeps) decides: used → settled, unused →
    refunded. Before, each such RPC failed every round and the rows stayed pending."""
    import aiohttp
    from types import SimpleNamespace

    from starlette.applications import Starlette
    from starlette.routing import Route

    from clawrouter.payment.reconcile import Reconciler
    from clawrouter.sandbox.chain import Chain, rpc as chain_rpc

    payer = "0x1563915e194D8CfBA1943570603F7606A3115508"
    chain = Chain(SEPOLIA, time.time, 0, lambda: 1200.0, state_blocks=128)
    app = Starlette(routes=[Route("/", chain_rpc, methods=["POST"])])
    app.state.sandbox = SimpleNamespace(chain=chain)
    with serving(app) as server, Ledger(tmp_path / "l.sqlite3",
                                        chain_network=SEPOLIA.caip2) as ledger:
        ids = []
        for i in (1, 2):
            pid = ledger.commit(ledger.signed(
                request_id="r", route="/v1/images/generations", model="m", size="s", n=1,
                amount=1000, payee=payer, network=SEPOLIA.caip2, nonce="0x%064x" % i,
                payer=payer, valid_before=int(time.time()) - 1300))
            ledger.commit(ledger.outcome(pid, FAILED_AFTER_PAYMENT, note="timeout"))
            ids.append(pid)
        chain.transfer(payer, "0x%064x" % 1, 1000, "0x" + "ee" * 32)

        async def round_() -> None:
            async with aiohttp.ClientSession() as session:
                await Reconciler(ledger, SEPOLIA, [server.url + "/"], session).reconcile_once()

        asyncio.run(round_())
        assert [ledger.get(pid).status for pid in ids] == [SETTLED, REJECTED]
