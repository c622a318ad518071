"""Money safety end to end: refused challenges, budgets, exactly-once, pre-auth, crash recovery.

The gateway and the sandbox are real servers; the sandbox's fault rules stand in for a
misbehaving upstream. "Nothing signed" is checked at the sandbox (no payment received) and in
the gateway's ledger.
"""

from __future__ import annotations

import base64
import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from clawrouter.coalesce import REPLAYED
from clawrouter.sandbox.images import make_png
from clawrouter.upstream import jobs
from tests.servers import free_port

COGVIEW = {"model": "cogview", "size": "512x512"}
COGVIEW_PRICE = 16_750  # 0.015 × 1.05 + 0.001


def gen(gw, prompt="a quiet harbour", **extra):
    return gw.http.post("/v1/images/generations", json={**COGVIEW, "prompt": prompt, **extra})


def ledger_rows(gw):
    return gw.http.get("/v1/spend").json()["latest"]


EVIL = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"


@pytest.mark.parametrize("rule, check", [
    ({"override": {"payTo": EVIL}}, "payee"),
    ({"override": {"amount": "999999"}}, "amount"),
    ({"override": {"asset": "0x0000000000000000000000000000000000000bad"}}, "asset"),
    ({"override": {"network": "eip155:8453"}}, "network"),
    ({"override": {"scheme": "upto"}}, "scheme"),
    ({"override": {"maxTimeoutSeconds": 3600}}, "timeout"),
    ({"override": {"extra": {"name": "USD Coin", "version": "2"}}}, "domain"),  # mainnet's
    ({"override": {"extra": {"name": "USDC", "version": "2",
                             "assetTransferMethod": "permit2"}}}, "scheme"),
    ({"header": "%%%not-base64"}, "challenge"),
    ({"v1": True, "override": {"maxAmountRequired": "5000000"}}, "amount"),
])
def test_tampered_challenges_are_refused_and_nothing_is_signed(gateway, sandbox, rule, check):
    sandbox.faults({"kind": "challenge", **rule})
    r = gen(gateway)
    assert r.status_code == 402, r.text
    error = r.json()["error"]
    assert error["code"] == "payment_refused" and error["check"] == check
    assert r.headers["x-should-retry"] == "false"
    assert sandbox.stats()["payments_count"] == 0
    assert ledger_rows(gateway) == []


def test_an_upto_entry_before_the_exact_one_is_skipped(gateway, sandbox):
    sandbox.faults({"kind": "challenge", "prepend": [{"scheme": "upto", "amount": "900000"}]})
    assert gen(gateway).status_code == 200
    assert [p["amount"] for p in sandbox.stats()["payments_received"]] == [COGVIEW_PRICE]


def test_a_failure_after_payment_is_never_retried_by_the_openai_sdk(gateway, sandbox):
    sandbox.faults({"kind": "respond", "phase": "paid", "status": 500,
                    "body": {"error": "provider exploded"}})
    client = OpenAI(base_url=gateway.v1, api_key="unused")  # max_retries=2 by default
    with pytest.raises(openai.InternalServerError) as err:
        client.images.generate(prompt="x", **COGVIEW)
    assert err.value.response.headers["x-should-retry"] == "false"
    assert "payment of $0.01675 was signed" in err.value.message
    assert sandbox.stats()["payments_count"] == 1
    assert [row["status"] for row in ledger_rows(gateway)] == ["failed_after_payment"]


def test_a_lost_response_is_not_paid_again_on_retry(gateway, sandbox):
    sandbox.faults({"kind": "drop", "phase": "paid", "settle": True, "times": 1})
    first = gen(gateway)
    assert first.status_code == 502 and first.headers["x-should-retry"] == "false"
    again = gen(gateway)  # the same request again, within the coalescing window
    assert again.status_code == 502 and again.json() == replayed(first)
    assert again.headers["x-clawrouter-shared"] == "true" and again.headers["x-should-retry"] \
        == "false"
    assert "x-clawrouter-shared" not in first.headers
    assert sandbox.stats()["payments_count"] == 1


def replayed(response: httpx.Response) -> dict:
    """The envelope a repeat gets of `response`'s failure: the same, saying it is shared."""
    body = response.json()
    return {"error": {**body["error"], "message": REPLAYED + body["error"]["message"]}}


def test_a_repeat_answered_from_the_first_request_says_so(gateway, sandbox):
    """The same images and cost header, marked as shared: a client (or an agent asking for
    "another one") can tell that nothing was paid again."""
    first, again = gen(gateway, "twice"), gen(gateway, "twice")
    assert first.status_code == again.status_code == 200
    assert "x-clawrouter-shared" not in first.headers
    assert again.headers["x-clawrouter-shared"] == "true"
    assert again.json()["data"] == first.json()["data"]
    assert again.headers["x-clawrouter-cost-usd"] == first.headers["x-clawrouter-cost-usd"]
    assert sandbox.stats()["payments_count"] == 1


def test_sdk_timeouts_and_retries_join_the_paid_request_in_flight(gateway, sandbox):
    sandbox.faults({"kind": "delay", "phase": "paid", "seconds": 1.2})
    client = OpenAI(base_url=gateway.v1, api_key="unused", timeout=0.5, max_retries=4)
    result = client.images.generate(prompt="slow but paid once", **COGVIEW)
    assert result.data[0].url
    assert sandbox.stats()["payments_count"] == 1


def test_sdk_retries_join_a_slow_job_that_outlives_their_timeout(gateway, sandbox):
    """The SDK gives up on a request after its own timeout and resends it about a second
    later. A slow (202) job whose clients have all left waits a moment before giving up, so
    the resend joins it: one payment, and the image, instead of an abandoned job."""
    # Done 2 s after it is accepted: after the first try's 1.5 s timeout, whatever the load;
    # its polling pauses until the resend joins, which then has the image well within its own.
    sandbox.configure(slow_seconds=2)
    client = OpenAI(base_url=gateway.v1, api_key="unused", timeout=1.5, max_retries=2)
    made = client.images.with_raw_response.generate(model="gpt-image-2", prompt="outlives",
                                                    size="1024x1024")
    assert made.headers["x-clawrouter-shared"] == "true"  # the resend that joined it
    assert made.parse().data[0].b64_json  # OpenAI's name: its format (response_format auto)
    assert sandbox.stats()["payments_count"] == 1
    (row,) = gateway.http.get("/v1/spend").json()["latest"]
    assert row["status"] == "settled"


def test_sdk_retries_after_leaving_a_slow_job_learn_of_it_and_never_pay_again(gateway, sandbox,
                                                                            monkeypatch):
    """A slow job that outlives every retry: once its clients have been gone for a moment,
    polling stops, and a later repeat gets the abandoned job's answer (a 409 the SDK does not
    retry), not a second signature for a second job."""
    monkeypatch.setattr(jobs, "REJOIN_SECONDS", 1.5)  # (the SDK's retry comes 0.4–0.5 s on)
    sandbox.configure(slow_seconds=30)
    client = OpenAI(base_url=gateway.v1, api_key="unused", timeout=0.8, max_retries=1)
    with pytest.raises(openai.APITimeoutError):  # the retry joined, and timed out too
        client.images.generate(model="gpt-image-2", prompt="outlives its client",
                               size="1024x1024")
    deadline = time.monotonic() + 10
    while gateway.http.get("/v1/spend").json()["latest"][0]["status"] != "rejected":
        assert time.monotonic() < deadline  # held until the chain says it expired unused
        time.sleep(0.05)
    with pytest.raises(openai.ConflictError) as raised:
        client.images.generate(model="gpt-image-2", prompt="outlives its client",
                               size="1024x1024")
    assert raised.value.code == "job_abandoned"
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert "Not paid again" in raised.value.message
    assert sandbox.stats()["payments_count"] == 1


@pytest.mark.parametrize("stream, upstream_copy",
                         [(False, False), (True, False), (False, True), (True, True)])
def test_a_kept_result_whose_image_was_evicted_is_a_clear_410(gateway, sandbox, stream,
                                                               upstream_copy):
    """A repeat within the window gets the first request's outcome; if its image has been
    evicted since (small limits), it gets the upstream's copy when there is one, else says so
    (410 image_evicted, or that error event in a stream) instead of failing with a 500, and
    nothing is paid again."""
    sandbox.configure(url_results=upstream_copy)
    body = {**COGVIEW, "prompt": "evicted later", "response_format": "b64_json"}
    key = {"Idempotency-Key": f"evict-{stream}-{upstream_copy}"}
    first = gateway.http.post("/v1/images/generations", json=body, headers=key)
    assert first.status_code == 200, first.text
    for stored in gateway.gw.store.root.glob("*.png"):
        stored.unlink()  # as eviction would
    again = gateway.http.post("/v1/images/generations", json={**body, "stream": stream},
                              headers=key)
    if upstream_copy and stream:  # a stream carries bytes: it names the copy it cannot send
        assert again.status_code == 200 and '"code":"image_evicted"' in again.text
        assert f"upstream's copy: {sandbox.url}" in again.text
    elif upstream_copy:
        assert again.status_code == 200, again.text
        assert again.json()["data"][0]["url"].startswith(sandbox.url)
    elif stream:
        assert again.status_code == 200 and '"code":"image_evicted"' in again.text
    else:
        assert again.status_code == 410, again.text
        assert again.json()["error"]["code"] == "image_evicted"
        assert again.headers["x-should-retry"] == "false"
        assert "not paid again" in again.json()["error"]["message"]
    assert sandbox.stats()["payments_count"] == 1


def test_a_v1_challenge_is_paid_in_the_x_payment_header(make_gateway, sandbox):
    """x402 v1 servers read a payment only from X-PAYMENT (the sandbox's v1 mode too). A v1
    payment has no `accepted` to say its authorization lives longer than asked, so a slow
    model's is not raised to the poll window (the default 300 s deadline would ask 360)."""
    gw = make_gateway(poll_deadline=300)
    sandbox.configure(accept_v1=True)
    sandbox.faults({"kind": "challenge", "v1": True})
    assert gen(gw).status_code == 200
    slow = gw.http.post("/v1/images/generations", json={"model": "gpt-image-2", "prompt": "x"})
    assert slow.status_code == 200, slow.text
    assert sandbox.stats()["settled_count"] == 2
    assert [row["status"] for row in ledger_rows(gw)] == ["settled", "settled"]


def test_idempotency_key_returns_the_first_result_and_rejects_a_different_body(gateway, sandbox):
    headers = {"Idempotency-Key": "order-42"}
    first = gateway.http.post("/v1/images/generations", headers=headers,
                              json={**COGVIEW, "prompt": "one"})
    second = gateway.http.post("/v1/images/generations", headers=headers,
                               json={**COGVIEW, "prompt": "one"})
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    conflict = gateway.http.post("/v1/images/generations", headers=headers,
                                 json={**COGVIEW, "prompt": "two"})
    assert conflict.status_code == 409 and conflict.json()["error"]["param"] == "Idempotency-Key"
    assert sandbox.stats()["payments_count"] == 1


def test_idempotency_key_keeps_a_result_that_cost_nothing_too(gateway, sandbox):
    """An upstream that asked for no payment still made an image: a repeat of the key gets
    that image, not a new one, and a different body is refused."""
    png = base64.b64encode(make_png(8, 8, 5)).decode()
    sandbox.faults({"kind": "respond", "phase": "unpaid", "status": 200,
                    "body": {"created": 1, "data": [{"b64_json": png}]}})
    headers = {"Idempotency-Key": "free-1"}
    first = gateway.http.post("/v1/images/generations", headers=headers,
                              json={**COGVIEW, "prompt": "free"})
    second = gateway.http.post("/v1/images/generations", headers=headers,
                               json={**COGVIEW, "prompt": "free"})
    assert first.status_code == second.status_code == 200, first.text
    assert first.json() == second.json() and second.headers["x-clawrouter-shared"] == "true"
    conflict = gateway.http.post("/v1/images/generations", headers=headers,
                                 json={**COGVIEW, "prompt": "other"})
    assert conflict.status_code == 409
    assert sandbox.round_trips() == 1 and sandbox.stats()["payments_count"] == 0


def repeated_after_a_restart(first, make_gateway, home, headers):
    """Stop `first`, start a gateway on its data directory, repeat the request there: it must
    be a 409 that invites no retry. Returns the new gateway and the error."""
    first.server.stop()
    again = make_gateway(home=home)
    repeat = again.http.post("/v1/images/generations", headers=headers,
                             json={**COGVIEW, "prompt": "once"})
    assert repeat.status_code == 409 and repeat.headers["x-should-retry"] == "false"
    return again, repeat.json()["error"]


def test_an_idempotency_key_that_paid_is_never_paid_again_after_a_restart(make_gateway, sandbox,
                                                                          tmp_path):
    """Results are kept in memory, but the key goes into the ledger with its payment: after a
    restart its repeat is a 409 naming the payment, not a second payment."""
    home = tmp_path / "restarted"
    first = make_gateway(home=home)
    order = {"Idempotency-Key": "order-7"}
    assert first.http.post("/v1/images/generations", headers=order,
                           json={**COGVIEW, "prompt": "once"}).status_code == 200
    again, error = repeated_after_a_restart(first, make_gateway, home, order)
    assert (error["code"], error["param"], error["payment"]) == \
        ("idempotency_key_paid", "Idempotency-Key", "settled")
    assert "Not paid again" in error["message"]
    assert sandbox.stats()["payments_count"] == 1
    # another key, or the same key from another client, is a new request
    assert again.http.post("/v1/images/generations", headers={"Idempotency-Key": "order-8"},
                           json={**COGVIEW, "prompt": "once"}).status_code == 200
    assert httpx.post(again.v1 + "/images/generations", headers={**order, "User-Agent": "other"},
                      json={**COGVIEW, "prompt": "once"}, timeout=30).status_code == 200
    assert sandbox.stats()["payments_count"] == 3
    assert "idempotency" not in again.http.get("/v1/spend").json()["latest"][0]


def test_an_idempotency_key_whose_payment_was_refused_is_not_signed_for_after_a_restart(
        make_gateway, sandbox, tmp_path):
    """The key's first outcome (here the upstream refused the payment; a slow job its client
    left is recorded the same way) is kept a day in memory; a restart must not turn the
    repeat into a second signature."""
    home = tmp_path / "restarted"
    first = make_gateway(home=home)
    sandbox.faults({"kind": "reject", "code": "PAYMENT_UNFUNDED", "times": 1})
    order = {"Idempotency-Key": "order-9"}
    refused = first.http.post("/v1/images/generations", headers=order,
                              json={**COGVIEW, "prompt": "once"})
    assert refused.json()["error"]["code"] == "payment_rejected"
    kept = first.http.post("/v1/images/generations", headers=order,
                           json={**COGVIEW, "prompt": "once"})
    assert kept.json() == replayed(refused)  # the same outcome while the gateway runs
    again, error = repeated_after_a_restart(first, make_gateway, home, order)
    assert (error["code"], error["payment"]) == ("idempotency_key_paid", "rejected")
    assert "refused" in error["message"] and "Not paid again" in error["message"]
    assert [row["status"] for row in ledger_rows(again)] == ["rejected"]  # signed once
    assert sandbox.stats()["payments_count"] == 0


def test_idempotent_repeats_wait_for_the_request_in_flight(gateway, sandbox):
    sandbox.faults({"kind": "delay", "phase": "paid", "seconds": 0.8})
    headers = {"Idempotency-Key": "in-flight"}
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: httpx.post(
            gateway.v1 + "/images/generations", headers=headers, timeout=10,
            json={**COGVIEW, "prompt": "same"}), range(4)))
    assert {r.status_code for r in answers} == {200}
    assert len({r.text for r in answers}) == 1
    assert sandbox.stats()["payments_count"] == 1


def test_a_request_above_the_per_request_limit_is_refused_before_the_upstream(make_gateway,
                                                                              sandbox):
    """Its catalog price decides: no quote can fit, so not even the free probe is sent. (A
    challenge above the limit is still refused by the challenge check, `payment_refused`.)"""
    gw = make_gateway(max_usd_per_request=0.01)
    r = gen(gw)
    assert r.status_code == 402, r.text
    error = r.json()["error"]
    assert (error["code"], error["window"], error["requested_usd"]) == \
        ("budget_exceeded", "request", COGVIEW_PRICE / 1e6)
    assert "CLAWROUTER_MAX_USD_PER_REQUEST" in error["message"]
    assert sandbox.stats()["round_trips"] == 0 and ledger_rows(gw) == []


def test_concurrent_requests_never_exceed_the_budget(make_gateway, sandbox):
    gw = make_gateway(max_usd_per_day=5 * COGVIEW_PRICE / 1e6 + 0.00001)

    def one(i):
        return httpx.post(gw.v1 + "/images/generations", timeout=60,
                          json={**COGVIEW, "prompt": f"budget race {i}"})

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        answers = list(pool.map(one, range(50)))
    statuses = sorted(r.status_code for r in answers)
    assert statuses.count(200) == 5 and statuses.count(402) == 45
    refusal = next(r for r in answers if r.status_code == 402).json()["error"]
    assert refusal["code"] == "budget_exceeded" and refusal["window"] == "day"
    assert sandbox.stats()["payments_count"] == 5


def test_a_wallet_known_to_hold_too_little_is_refused_before_signing(make_gateway, sandbox):
    """An unfunded wallet's request is not signed only for the upstream to refuse it (which
    would hold its amount against the budgets): the balance the gateway keeps decides first,
    and a low one is re-read before it refuses (the rest: test_balance::test_short_of_…);
    in front of a sandbox it has no say."""
    from tests.test_balance import FakeRpc

    def short_of_funds(gw) -> dict:
        deadline = time.monotonic() + 10
        while gw.http.get("/health").json().get("balance_usd") is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        short = gen(gw)
        assert short.status_code == 402, short.text
        assert short.headers["x-should-retry"] == "false"
        assert sandbox.stats()["payments_count"] == 0 and ledger_rows(gw) == []
        return short.json()["error"]

    with FakeRpc(balance=COGVIEW_PRICE - 1) as rpc:
        sandbox.configure(marked=False)  # an upstream that is not a sandbox
        gw = make_gateway(rpc_urls=[rpc.url])
        error = short_of_funds(gw)
        assert error["code"] == "insufficient_funds" and error["type"] == "payment_error"
        assert gw.gw.address in error["message"] and "nothing was signed" in error["message"]
        assert "$0.016749 USDC on Base Sepolia" in error["message"]
        assert "$0.01675 this request costs" in error["message"]
        assert "Send USDC on Base Sepolia to that address" in error["message"]

        rpc.balance = 10_000_000  # funded: the low balance is re-read before refusing again
        gw.gw.balance.recheck = 0
        assert gen(gw, "funded").status_code == 200
        assert sandbox.stats()["payments_count"] == 1

        # In front of a sandbox (it marks its answers), the balance on the RPCs' chain says
        # nothing: the sandbox settles on its own stand-in chain and never refuses for funds.
        sandbox.configure(marked=True)
        rpc.balance = 0
        in_sandbox = make_gateway(rpc_urls=[rpc.url])
        deadline = time.monotonic() + 10
        while in_sandbox.http.get("/health").json().get("balance_usd") is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert gen(in_sandbox, "play money").status_code == 200
        assert sandbox.stats()["payments_count"] == 2


def test_on_mainnet_an_upstream_calling_itself_a_sandbox_still_gets_the_funds_check(
        make_gateway):
    """The sandbox's mark lifts the funds check only on a testnet: on Base, any upstream could
    send it, and each payment it then refused would hold its amount against the budgets."""
    from clawrouter.sandbox import SandboxConfig, create_sandbox_app
    from tests.servers import serving
    from tests.test_balance import FakeRpc

    from clawrouter.payment.networks import NETWORKS

    with FakeRpc(balance=0, chain_id=NETWORKS["base"].chain_id) as rpc, serving(create_sandbox_app(
            SandboxConfig(network="base", marked=True))) as upstream:
        gw = make_gateway(upstream=upstream.url + "/api", network="base", rpc_urls=[rpc.url])
        deadline = time.monotonic() + 10
        while gw.http.get("/health").json().get("balance_usd") is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = gen(gw, "marked on mainnet")
        assert r.status_code == 402 and r.json()["error"]["code"] == "insufficient_funds", r.text
        assert httpx.get(upstream.url + "/_sandbox/stats").json()["payments_count"] == 0


def test_a_monthly_budget_refuses_before_anything_is_signed(make_gateway, sandbox):
    gw = make_gateway(max_usd_per_month=1.5 * COGVIEW_PRICE / 1e6)
    assert gen(gw, "first").status_code == 200
    over = gen(gw, "second")
    assert over.status_code == 402, over.text
    error = over.json()["error"]
    assert (error["code"], error["window"]) == ("budget_exceeded", "month")
    assert "CLAWROUTER_MAX_USD_PER_MONTH" in error["message"]
    spend = httpx.get(gw.v1 + "/spend", timeout=10).json()["budget"]["month"]
    assert spend["used_usd"] == COGVIEW_PRICE / 1e6
    assert spend["limit_usd"] == 1.5 * COGVIEW_PRICE / 1e6
    assert sandbox.stats()["payments_count"] == 1


def test_a_refused_payment_holds_its_budget_until_its_authorization_expires(make_gateway,
                                                                            sandbox):
    """A refusal does not unsign: the payee could still settle the authorization until its
    validBefore, so its amount keeps counting until then (the release: test_budget)."""
    gw = make_gateway(max_usd_per_day=2 * COGVIEW_PRICE / 1e6)
    assert gw.gw.ledger.chain_network is None  # no RPC: held until validBefore + 60 s
    sandbox.faults({"kind": "reject", "code": "PAYMENT_UNFUNDED", "times": 1})
    rejected = gen(gw, "first")
    assert rejected.status_code == 402 and rejected.json()["error"]["code"] == "payment_rejected"
    day = httpx.get(gw.v1 + "/spend", timeout=10).json()["budget"]["day"]
    assert day["held_usd"] == day["used_usd"] == COGVIEW_PRICE / 1e6
    assert gen(gw, "second").status_code == 200
    over = gen(gw, "third")
    assert over.status_code == 402 and over.json()["error"]["code"] == "budget_exceeded"
    assert "held by unsettled payments" in over.json()["error"]["message"]
    assert [row["status"] for row in ledger_rows(gw)] == ["settled", "rejected"]
    assert sandbox.stats()["payments_count"] == 1


def test_a_client_that_leaves_before_payment_costs_nothing(gateway, sandbox):
    from tests.servers import leaving, until
    from tests.test_keep_paid_jobs import probed

    sandbox.faults({"kind": "delay", "phase": "unpaid", "seconds": 1.5})
    with leaving(gateway.v1 + "/images/generations", {**COGVIEW, "prompt": "bye"}):
        until(probed(sandbox))  # it leaves while the unpaid probe is held
    time.sleep(2.0)  # the probe has answered: nothing may be signed for the client now
    assert sandbox.stats()["payments_count"] == 0
    assert ledger_rows(gateway) == []


def test_preauth_makes_one_round_trip_per_image_after_warm_up(gateway, sandbox):
    trips = []
    for i in range(4):
        assert gen(gateway, f"p{i}").status_code == 200
        trips.append(sandbox.round_trips())
    assert trips == [2, 3, 4, 5]
    assert [row["status"] for row in ledger_rows(gateway)] == ["settled"] * 4


def test_preauth_off_pays_with_two_round_trips(make_gateway, sandbox):
    gw = make_gateway(preauth=False)
    for i in range(3):
        assert gen(gw, f"q{i}").status_code == 200
    assert sandbox.round_trips() == 6


def test_a_challenge_above_the_per_request_cap_is_refused_unsigned(make_gateway, sandbox):
    """The catalog price fits the cap, so the request goes out; the upstream then asks for
    more than the cap (within the price tolerance): the challenge check refuses it, and
    nothing is signed."""
    gw = make_gateway(max_usd_per_request=0.02)  # cogview 512x512: $0.01675
    sandbox.faults({"kind": "challenge", "override": {"amount": "25000"}})  # $0.025
    r = gen(gw, "over the cap")
    assert r.status_code == 402, r.text
    error = r.json()["error"]
    assert (error["code"], error["check"]) == ("payment_refused", "amount")
    assert "per-request cap of $0.02" in error["message"]
    assert sandbox.stats()["payments_count"] == 0 and ledger_rows(gw) == []


def test_a_price_change_costs_exactly_one_fresh_payment(gateway, sandbox):
    assert gen(gateway, "warm").status_code == 200
    sandbox.faults({"kind": "price", "multiply": 1.2})
    r = gen(gateway, "after the change")
    assert r.status_code == 200, r.text
    stats = sandbox.stats()
    assert stats["payments_count"] == 2 and stats["settled_count"] == 2
    rows = ledger_rows(gateway)  # newest first
    assert [(row["status"], row["attempt"]) for row in rows] == [
        ("settled", 2), ("rejected", 1), ("settled", 1)]
    assert rows[0]["amount"] > rows[1]["amount"]


def test_after_a_price_change_the_new_price_is_pre_authorized(gateway, sandbox):
    assert gen(gateway, "warm").status_code == 200
    sandbox.faults({"kind": "price", "multiply": 1.2})
    assert gen(gateway, "after the change").status_code == 200  # refused, probe, fresh one
    trips = sandbox.round_trips()
    assert gen(gateway, "at the new price").status_code == 200
    assert sandbox.round_trips() == trips + 1


NESTED_UNFUNDED = {"kind": "respond", "phase": "paid", "status": 402, "body": {"error": {
    "code": "PAYMENT_UNFUNDED", "message": "insufficient balance", "type": "payment_error"}}}


@pytest.mark.parametrize("refusal", [
    {"kind": "reject", "code": "PAYMENT_UNFUNDED"},
    {"kind": "reject", "code": "PAYMENT_INVALID", "reason": "insufficient_funds"},
    NESTED_UNFUNDED,  # BlockRun's OpenAI-nested error shape
])
def test_a_preauth_refused_for_want_of_funds_is_not_signed_again(gateway, sandbox, refusal):
    """A fresh payment from the same wallet would be refused the same way: one signature."""
    assert gen(gateway, "warm").status_code == 200
    sandbox.faults({"phase": "paid", **refusal, "times": 1})
    trips = sandbox.round_trips()
    r = gen(gateway, "short")
    assert r.status_code == 402, r.text
    error = r.json()["error"]
    assert error["payment"] == "rejected"
    assert error["upstream_code"] == refusal.get("code", "PAYMENT_UNFUNDED")
    assert "not re-signed" in error["message"]
    assert sandbox.round_trips() == trips + 1  # no probe, no second payment
    assert [(row["status"], row["attempt"]) for row in ledger_rows(gateway)] == [
        ("rejected", 1), ("settled", 1)]


def test_a_preauth_refused_at_an_unchanged_price_stops_pre_auth_for_a_while(gateway, sandbox):
    """The upstream refused the pre-authorised payment, then asked the same amount again: the
    refusal was not about the price, so the next requests probe first instead of risking a
    second signature each."""
    assert gen(gateway, "warm").status_code == 200
    sandbox.faults({"kind": "reject", "phase": "paid", "code": "PAYMENT_INVALID", "times": 1})
    assert gen(gateway, "refused once").status_code == 200  # refused, probe, fresh payment
    trips = sandbox.round_trips()
    for i in range(2):
        assert gen(gateway, f"later {i}").status_code == 200
    assert sandbox.round_trips() == trips + 4  # probe + payment each: nothing pre-authorised
    assert [(row["status"], row["attempt"]) for row in ledger_rows(gateway)] == [
        ("settled", 1), ("settled", 1), ("settled", 2), ("rejected", 1), ("settled", 1)]


def test_tampered_challenges_are_still_refused_on_the_preauth_path(gateway, sandbox):
    assert gen(gateway, "warm").status_code == 200
    sandbox.faults({"kind": "price", "multiply": 1.2},
                   {"kind": "challenge", "override": {"payTo": EVIL}})
    r = gen(gateway, "then tampered")
    assert r.status_code == 402 and r.json()["error"]["check"] == "payee"
    assert [row["status"] for row in ledger_rows(gateway)] == ["rejected", "settled"]
    assert sandbox.stats()["payments_count"] == 1


def test_a_refused_preauth_then_a_failed_probe_says_so_and_is_kept_for_its_key(gateway,
                                                                             sandbox):
    """The pre-authorized payment is refused (the price changed) and the fresh probe then
    fails: the client must not read "nothing was paid, retry" (the SDK retries a 503), since
    the refused payment holds budget and its Idempotency-Key has spent it; a repeat of the key
    gets that same answer, not a 409 claiming the gateway forgot the outcome."""
    assert gen(gateway, "warm").status_code == 200
    sandbox.faults({"kind": "price", "multiply": 2},
                   {"kind": "respond", "phase": "unpaid", "status": 503, "times": 1,
                    "body": {"error": "busy"}, "headers": {"Retry-After": "7"}})
    key = {"Idempotency-Key": "refused-then-busy"}
    answers = [gateway.http.post("/v1/images/generations", headers=key,
                                 json={**COGVIEW, "prompt": "changed"}) for _ in range(2)]
    for r in answers:
        assert r.status_code == 503, r.text
        error = r.json()["error"]
        assert error["payment"] == "rejected" and r.headers["x-should-retry"] == "false"
        assert "retry-after" not in r.headers  # the upstream's: a retry gets this answer
        assert "refused this request's pre-authorized payment of $0.01675" in error["message"]
    assert [row["status"] for row in ledger_rows(gateway)] == ["rejected", "settled"]
    assert sandbox.stats()["payments_count"] == 1


def test_polling_that_never_completes_ends_in_504_with_nothing_settled(make_gateway, sandbox):
    gw = make_gateway(poll_deadline=0.5)
    sandbox.faults({"kind": "job", "outcome": "never"})
    r = gen(gw, "never done")
    assert r.status_code == 504 and "No payment was settled" in r.json()["error"]["message"]
    assert r.headers["x-should-retry"] == "false"
    assert sandbox.stats()["settled_count"] == 0


def test_failed_job_is_reported_and_not_settled(gateway, sandbox):
    sandbox.faults({"kind": "job", "outcome": "failed"})
    r = gen(gateway, "forbidden")
    assert r.status_code == 502 and "content policy" in r.json()["error"]["message"]
    assert [row["status"] for row in ledger_rows(gateway)] == ["rejected"]


def test_unpaid_429_passes_status_and_retry_after_through(gateway, sandbox):
    sandbox.faults({"kind": "respond", "phase": "unpaid", "status": 429,
                    "headers": {"Retry-After": "7"}, "body": {"error": "slow down"}})
    r = gen(gateway)
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert "slow down" in r.json()["error"]["message"]


def test_the_answer_waits_for_the_settled_record(make_gateway, sandbox, monkeypatch):
    """The settled row is written while the images are stored, but the client hears of the
    image only once it is committed: read the ledger file itself the moment the answer comes."""
    import sqlite3

    from clawrouter.payment.ledger import Ledger

    outcome_sql = Ledger._outcome_sql

    def slow_outcome(*args, **kwargs):  # inside the batch's transaction, before its commit
        time.sleep(0.3)  # far longer than storing a 512x512 image
        return outcome_sql(*args, **kwargs)

    monkeypatch.setattr(Ledger, "_outcome_sql", staticmethod(slow_outcome))
    gw = make_gateway()
    started = time.monotonic()
    r = gen(gw, "wait for the ledger")
    assert r.status_code == 200, r.text
    assert time.monotonic() - started >= 0.3
    with sqlite3.connect(gw.gw.settings.ledger_path) as db:
        assert db.execute("SELECT status FROM payments").fetchall() == [("settled",)]


@pytest.mark.parametrize("fault, status", [(None, 200), ("paid_500", 500)])
def test_a_ledger_that_cannot_record_an_outcome_never_costs_a_second_payment(
        make_gateway, sandbox, monkeypatch, fault, status):
    """The signed row is durable before anything is sent; if writing the outcome then fails
    (disk full), the client must still be told what happened to its payment — the images, or
    the paid error — not a bare 500 that the SDK retries into a second payment."""
    import sqlite3

    from clawrouter.payment.ledger import Ledger

    def broken_outcome(*args, **kwargs):  # fails inside the batch's transaction
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(Ledger, "_outcome_sql", staticmethod(broken_outcome))
    if fault == "paid_500":
        sandbox.faults({"kind": "respond", "phase": "paid", "status": 500,
                        "body": {"error": "provider down"}})
    gw = make_gateway()
    client = OpenAI(base_url=gw.v1, api_key="unused", max_retries=2)
    if status == 200:
        client.images.generate(model="cogview", prompt="record this", size="512x512")
    else:
        with pytest.raises(openai.APIStatusError) as failed:
            client.images.generate(model="cogview", prompt="record this", size="512x512")
        assert failed.value.status_code == status
        assert failed.value.response.headers["x-should-retry"] == "false"
    assert sandbox.stats()["payments_count"] == 1
    assert [row["status"] for row in ledger_rows(gw)] == ["signed"]  # "unknown" after restart
    # not counted yet: reconcile counts it once it records the chain's answer
    assert "clawrouter_payments_total{" not in gw.http.get("/metrics").text


def test_a_ledger_that_cannot_record_a_payment_sends_none_and_says_a_retry_is_safe(gateway,
                                                                                 sandbox):
    """Disk full (or the ledger locked) when a signed payment is recorded: it must not leave,
    and the client hears a 503 that says nothing was paid and a retry is safe, not a bare 500
    that says neither; the next request, with the ledger back, pays as usual."""
    import sqlite3

    class FullDisk:  # the commit fails, as SQLite's does when the disk is full
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def execute(self, sql: str, *args):
            if sql == "COMMIT":
                raise sqlite3.OperationalError("database or disk is full")
            return self.conn.execute(sql, *args)

        def __getattr__(self, name: str):
            return getattr(self.conn, name)

    ledger = gateway.gw.ledger
    real, ledger._conn = ledger._conn, FullDisk(ledger._conn)
    try:
        r = gateway.http.post("/v1/images/generations", json={**COGVIEW, "prompt": "full"})
    finally:
        ledger._conn = real
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "ledger_unavailable" and error["payment"] == "none"
    assert "database or disk is full" in error["message"]
    assert r.headers["x-should-retry"] == "true" and r.headers["retry-after"] == "5"
    assert sandbox.stats()["payments_count"] == 0 and ledger_rows(gateway) == []
    ready = gateway.http.get("/readyz")  # a load balancer stops sending paid work here
    assert ready.status_code == 503 and ready.json()["checks"]["ledger"] is False
    ledger.failed_at -= 31  # a while later, with no request to try again: ready, to be tried
    assert gateway.http.get("/readyz").status_code == 200
    ledger.failed_at += 31
    r = gateway.http.post("/v1/images/generations", json={**COGVIEW, "prompt": "full"})
    assert r.status_code == 200, r.text
    assert sandbox.stats()["payments_count"] == 1
    assert gateway.http.get("/readyz").status_code == 200


def serve_process(home: Path, sandbox, port: int, **settings: str) -> subprocess.Popen:
    """`clawrouter serve` in its own process (so it can be killed), paying `sandbox`."""
    env = {**os.environ, "CLAWROUTER_HOME": str(home), "BLOCKRUN_API_URL": sandbox.api,
           "CLAWROUTER_NETWORK": "base-sepolia", "CLAWROUTER_MAX_USD_PER_DAY": "0",
           "CLAWROUTER_LOG_LEVEL": "warning",
           "CLAWROUTER_RPC_URLS": f'["{sandbox.url}/_sandbox/rpc"]',
           "CLAWROUTER_RECONCILE_INTERVAL": "0.2", **settings}
    cmd = [sys.executable, "-m", "clawrouter", "serve", "--port", str(port), "--no-sandbox"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        lines = [proc.stdout.readline()]
        while "ready" not in lines[-1] and lines[-1] and len(lines) < 20:
            lines.append(proc.stdout.readline())  # log lines too (a new key, a recovery)
        assert "ready" in lines[-1], lines
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def killed_while_paying(proc: subprocess.Popen, sandbox, port: int, prompt: str, *,
                        route: str = "/v1/images/generations", body: dict | None = None,
                        after: float = 0.0, held: float = 6.0) -> None:
    """Send a paid request and SIGKILL the gateway `after` seconds once the sandbox holds its
    payment, which it settles `held` s after the kill: by default once the restarted gateway
    has looked. (A test that does not wait for that uses a sandbox of its own: it settles
    after the test.)"""
    sandbox.faults({"kind": "delay", "phase": "paid", "seconds": held + after, "times": 1})

    def doomed_request():
        with pytest.raises(httpx.HTTPError):  # the gateway dies under it
            httpx.post(f"http://127.0.0.1:{port}{route}", timeout=30,
                       json={**(body or COGVIEW), "prompt": prompt})

    threading.Thread(target=doomed_request, daemon=True).start()
    deadline = time.monotonic() + 10
    while sandbox.stats()["payments_count"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_9_during_a_paid_request_leaves_an_unknown_row_that_the_chain_settles(tmp_path,
                                                                                 sandbox):
    """The restarted gateway shows the killed request's payment as unknown, and pending,
    until the chain settles it. The sandbox's settlement is final only once the test has
    looked (its finalized head trails the latest by an hour until then), not some seconds
    after the kill, which a restart on a busy machine may outlast; as the look comes after
    the sandbox settled, a settlement in the latest blocks alone must decide nothing."""
    port = free_port()

    def spend():
        return httpx.get(f"http://127.0.0.1:{port}/v1/spend").json()

    sandbox.configure(finality_seconds=3600)
    killed_while_paying(serve_process(tmp_path, sandbox, port), sandbox, port, "interrupted",
                        held=2.0)
    proc = serve_process(tmp_path, sandbox, port)
    try:
        deadline = time.monotonic() + 15
        while sandbox.stats()["settled_count"] == 0:  # in the latest blocks, not final yet
            assert time.monotonic() < deadline
            time.sleep(0.05)
        first = spend()
        assert [row["status"] for row in first["latest"]] == ["unknown"]
        assert first["today"]["pending"]["micro"] == COGVIEW_PRICE
        sandbox.configure(finality_seconds=0)
        deadline = time.monotonic() + 15
        while (now := spend())["latest"][0]["status"] == "unknown":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        (row,), (event,) = now["latest"], sandbox.stats()["settled"]
        assert row["status"] == "settled" and row["transaction"] == event["transaction"]
        assert now["today"]["micro"] == COGVIEW_PRICE == sandbox.stats()["settled_total_micro"]
        assert now["today"]["pending"]["micro"] == 0
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text  # the chain's word too
        assert 'clawrouter_payments_total{outcome="settled"} 1.0' in metrics
        assert f'clawrouter_spent_usd_total{{model="zai/cogview-4"}} {COGVIEW_PRICE / 1e6}' \
            in metrics
    finally:
        proc.terminate()
        proc.wait()


def test_a_retry_after_a_crash_is_not_paid_again(tmp_path, own_sandbox):
    """The OpenAI SDK retries a request whose connection died (`x-stainless-retry-count` 1, 2,
    ...), with no Idempotency-Key of its own. If the gateway died under it and was restarted
    (as a supervisor does) while the SDK still retries, the retry must not pay a second time:
    the first payment's row carries the request's hashed client and content, and a retry
    within the coalescing window is a 409 that names it, and so is a new call's first try
    (an app's retry loop); the request sent as asked for anew by its user is paid."""
    sandbox = own_sandbox  # the killed request's payment settles there after the test
    port = free_port()
    proc = serve_process(tmp_path, sandbox, port)
    sandbox.faults({"kind": "delay", "phase": "paid", "seconds": 6, "times": 1})
    # retries 0.5, 1, 2, 4, 8, 8 s apart: the gateway is back long before they run out
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=6)
    ask = dict(model=COGVIEW["model"], prompt="crashed", size=COGVIEW["size"])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(client.images.generate, **ask)
        deadline = time.monotonic() + 10
        while sandbox.stats()["payments_count"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc = serve_process(tmp_path, sandbox, port)
        try:
            with pytest.raises(openai.ConflictError) as refused:  # the same call, retried
                call.result(timeout=60)
            assert refused.value.response.headers["x-should-retry"] == "false"
            assert int(refused.value.response.request.headers["x-stainless-retry-count"]) >= 1
            error = refused.value.body
            assert error["code"] == "repeat_paid_before_restart"
            # (`unknown` until the chain has settled it: the sandbox does, 6 s in)
            assert error["payment"] in ("unknown", "settled")
            assert "Not paid again" in error["message"] and "cut off" in error["message"]
            assert sandbox.stats()["payments_count"] == 1
            # A new call's first try is refused too: an app's own retry loop (the SDK's
            # retries off) sends nothing else. Its user asking anew is paid.
            with pytest.raises(openai.ConflictError):
                OpenAI(base_url=client.base_url, api_key="unused",
                       max_retries=0).images.generate(**ask)
            again = client.images.generate(**ask,
                                           extra_headers={"x-clawrouter-new-call": "true"})
            assert again.data[0].url and sandbox.stats()["payments_count"] == 2
            # another request is not held up
            other = httpx.post(f"http://127.0.0.1:{port}/v1/images/generations", timeout=10,
                               json={**COGVIEW, "prompt": "something else"})
            assert other.status_code == 200, other.text
            assert sandbox.stats()["payments_count"] == 3
        finally:
            proc.terminate()
            proc.wait()


@pytest.mark.parametrize("case", ["an edit", "in flight longer than the window"])
def test_a_retry_after_a_crash_is_not_paid_again_whatever_it_carried_or_how_long_it_ran(
        tmp_path, own_sandbox, case):
    """The retry is known by its request's content, hashed the same way in every process
    (images included: a per-process hash would make an edit's retry look new), and by its
    payment being one the last run left in flight, however long before the crash it was
    signed (a slow job polls for minutes, a window of 60 s would have missed it)."""
    sandbox = own_sandbox  # the killed request's payment settles there after the test
    port = free_port()
    settings = {"CLAWROUTER_COALESCE_WINDOW_SECONDS": "1"}  # its retry: 0.05-0.15 s in
    image = "data:image/png;base64," + base64.b64encode(make_png(64, 64, seed=5)).decode()
    edit = {"model": "nano-banana", "image": image}
    if case == "an edit":
        request = dict(route="/v1/images/image2image", body=edit)
    else:
        request = dict(after=1.5)  # signed 1.5 s before the crash: older than the window
    killed_while_paying(serve_process(tmp_path, sandbox, port, **settings), sandbox, port,
                        case, **request)
    proc = serve_process(tmp_path, sandbox, port, **settings)
    try:
        route = request.get("route", "/v1/images/generations")
        retry = httpx.post(f"http://127.0.0.1:{port}{route}",
                           json={**request.get("body", COGVIEW), "prompt": case}, timeout=30)
        assert retry.status_code == 409, retry.text
        assert retry.json()["error"]["code"] == "repeat_paid_before_restart"
        assert sandbox.stats()["payments_count"] == 1
    finally:
        proc.terminate()
        proc.wait()
