"""The payment path against a hostile upstream: the x402 wire format checked against the spec,
and a scripted upstream that lies, against a real gateway on loopback.

`Scripted` answers each phase of a call (the unpaid probe, the paid request, a poll) as a
test tells it to, and keeps every payment it was sent, decoded. What the gateway signs is
checked where it arrives: at the upstream, against the x402 reference values (x402.md §3-§5,
the x402 spec's `PaymentPayload` and facilitator checks), never against our own tables.
The tests at the end pin defects an audit found (pre-auth re-signing, receipts on failures).
"""

from __future__ import annotations

import base64
import concurrent.futures
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clawrouter.sandbox.images import make_png
from tests.servers import ServerThread
from tests.servers import leaving, until

# --- the reference values (x402.md §4, §9), written out: not read from our tables -----------
SEPOLIA_CAIP2 = "eip155:84532"
SEPOLIA_USDC = "0x036CbD53842c5426634e7929541eC2318f3dCF7e"
BASE_USDC = "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913"
SEPOLIA_DOMAIN = {"name": "USDC", "version": "2", "chainId": 84532,
                  "verifyingContract": SEPOLIA_USDC}
PAYEE = "0xe9030014F5DAe217d0A152f02A043567b16c1aBf"
EVIL = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
TWA_TYPES = {"TransferWithAuthorization": [
    {"name": "from", "type": "address"}, {"name": "to", "type": "address"},
    {"name": "value", "type": "uint256"}, {"name": "validAfter", "type": "uint256"},
    {"name": "validBefore", "type": "uint256"}, {"name": "nonce", "type": "bytes32"}]}

COGVIEW = {"model": "cogview", "size": "512x512"}
PRICE = 16_750  # cogview-4 at 512x512: 0.015 × 1.05 + the 0.001 fee
TX = "0x" + "ab" * 32
PNG = base64.b64encode(make_png(8, 8, 3)).decode()


def entry(**changes: Any) -> dict[str, Any]:
    """BlockRun's `accepts[]` entry on Base Sepolia, with `changes`."""
    return {"scheme": "exact", "network": SEPOLIA_CAIP2, "amount": str(PRICE),
            "asset": SEPOLIA_USDC, "payTo": PAYEE, "maxTimeoutSeconds": 300,
            "extra": {"name": "USDC", "version": "2"}, **changes}


def b64(value: Any) -> str:
    return base64.b64encode(json.dumps(value).encode()).decode()


def challenge(*entries: dict[str, Any], body: Any = None, **top: Any) -> Response:
    """A v2 402: the challenge in `PAYMENT-REQUIRED`, BlockRun's body (or `body`)."""
    required = {"x402Version": 2, "accepts": list(entries) or [entry()],
                "resource": {"url": "http://placeholder/api/v1/images/generations",
                             "mimeType": "application/json"}, **top}
    return JSONResponse(body if body is not None else
                        {"error": "Payment Required", "price": {"amount": "0.015"}},
                        402, headers={"PAYMENT-REQUIRED": b64(required)})


def image(**headers: str) -> Response:
    return JSONResponse({"created": 1, "data": [{"b64_json": PNG}]}, headers=headers)


def receipt(**fields: Any) -> str:
    return b64({"success": True, "transaction": TX, "network": SEPOLIA_CAIP2, **fields})


Answer = Callable[[Request, "dict[str, Any] | None"], Response]


class Scripted:
    """A BlockRun stand-in whose answers per phase are set by the test.

    `payments` keeps every payment header it was sent, decoded, once per distinct header (a
    poll repeats its request's); `sent` counts paid requests, polls included."""

    def __init__(self) -> None:
        self.unpaid: Answer = lambda request, _: challenge()
        self.paid: Answer = lambda request, _: image()
        self.poll: Answer = lambda request, _: JSONResponse({"status": "in_progress"}, 202)
        self.payments: list[dict[str, Any]] = []
        self.header_names: list[str] = []
        self.probes = 0
        self.polls = 0
        self._seen: set[str] = set()
        self.server = ServerThread(Starlette(routes=[
            Route("/{path:path}", self._handle, methods=["GET", "POST"])])).start()
        self.api = self.server.url + "/api"

    async def _handle(self, request: Request) -> Response:
        await request.body()
        header = request.headers.get("payment-signature") or request.headers.get("x-payment")
        payment = None
        if header:
            payment = json.loads(base64.b64decode(header, validate=True))
            if header not in self._seen:
                self._seen.add(header)
                self.payments.append(payment)
                self.header_names.append(
                    "PAYMENT-SIGNATURE" if request.headers.get("payment-signature")
                    else "X-PAYMENT")
        if request.method == "GET":
            if not request.url.path.startswith("/api/v1/images/"):
                return JSONResponse({"error": "not found"}, 404)
            self.polls += 1
            return self.poll(request, payment)
        if payment is None:
            self.probes += 1
            return self.unpaid(request, None)
        return self.paid(request, payment)

    def close(self) -> None:
        self.server.stop()


@pytest.fixture
def upstream():
    scripted = Scripted()
    yield scripted
    scripted.close()


def gen(gw, prompt: str = "a hostile harbour", *, timeout: float = 30,
        **extra: Any) -> httpx.Response:
    return httpx.post(gw.v1 + "/images/generations", timeout=timeout,
                      json={**COGVIEW, "prompt": prompt, **extra})


def rows(gw) -> list[dict[str, Any]]:
    return gw.http.get("/v1/spend", params={"latest": 200}).json()["latest"]


def error(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    return body["error"]


def authorization(payment: dict[str, Any]) -> dict[str, Any]:
    return payment["payload"]["authorization"]


def recovered(payment: dict[str, Any], domain: dict[str, Any] = SEPOLIA_DOMAIN) -> str:
    """The address the payment's signature recovers to under `domain` (eth-account)."""
    auth = authorization(payment)
    message = {"from": auth["from"], "to": auth["to"], "value": int(auth["value"]),
               "validAfter": int(auth["validAfter"]), "validBefore": int(auth["validBefore"]),
               "nonce": bytes.fromhex(auth["nonce"][2:])}
    return Account.recover_message(encode_typed_data(domain, TWA_TYPES, message),
                                   signature=payment["payload"]["signature"])


# --- the wire format, checked at the upstream ----------------------------------------------

def test_the_payment_header_is_x402_v2_as_the_spec_and_blockrun_read_it(make_gateway,
                                                                         upstream):
    """PaymentPayload v2 (x402 `schemas/payments.py`; BlockRun's `x402.py`): `x402Version` 2,
    `accepted` the chosen entry echoed unchanged, `resource`, the challenge's `extensions`,
    and an EIP-3009 payload: decimal strings, value == amount, to == payTo, a 32-byte nonce,
    validAfter now − 600 and validBefore now + maxTimeoutSeconds (BlockRun's SDKs), signed
    with USDC's Base Sepolia domain ("USDC", "2") so that it recovers to `from`; sent in
    `PAYMENT-SIGNATURE` only."""
    gw = make_gateway(upstream.api)
    offered = entry(maxTimeoutSeconds=120)
    extensions = {"bazaar": {"info": {"x": 1}}}
    upstream.unpaid = lambda request, _: challenge(offered, extensions=extensions)
    before = int(time.time())
    r = gen(gw)
    after = int(time.time())
    assert r.status_code == 200, r.text
    (payment,) = upstream.payments
    assert upstream.header_names == ["PAYMENT-SIGNATURE"]
    assert set(payment) == {"x402Version", "resource", "accepted", "payload", "extensions"}
    assert payment["x402Version"] == 2 and payment["accepted"] == offered
    assert payment["extensions"] == extensions
    # the challenge's resource names another origin: the request's own URL replaces it
    assert payment["resource"] == {"url": upstream.api + "/v1/images/generations"}
    auth = authorization(payment)
    assert set(auth) == {"from", "to", "value", "validAfter", "validBefore", "nonce"}
    assert all(isinstance(v, str) for v in auth.values())
    assert auth["to"] == PAYEE and auth["value"] == str(PRICE)
    assert auth["from"] == gw.gw.signer.address
    assert before - 600 <= int(auth["validAfter"]) <= after - 600
    assert before + 120 <= int(auth["validBefore"]) <= after + 120
    assert len(auth["nonce"]) == 66 and int(auth["nonce"], 16) >= 0
    signature = payment["payload"]["signature"]
    assert len(signature) == 132 and int(signature[-2:], 16) in (27, 28)
    assert int(signature[66:130], 16) <= 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0
    assert recovered(payment) == auth["from"]
    # the mainnet name on the Sepolia contract recovers elsewhere (x402.md §4, the trap)
    assert recovered(payment, {**SEPOLIA_DOMAIN, "name": "USD Coin"}) != auth["from"]


def test_a_same_origin_resource_is_echoed_and_a_v1_body_under_a_v2_header_is_ignored(
        make_gateway, upstream):
    """The header is the challenge (x402.md §1): a body that disagrees with it (a v1 body
    asking for less, to another payee) is not read."""
    gw = make_gateway(upstream.api)
    resource = {"url": upstream.api + "/v1/images/generations", "description": "an image"}
    v1_body = {"x402Version": 1, "accepts": [{**entry(), "network": "base-sepolia",
                                              "maxAmountRequired": "1000", "payTo": EVIL}]}
    upstream.unpaid = lambda request, _: challenge(entry(), resource=resource, body=v1_body)
    assert gen(gw).status_code == 200
    (payment,) = upstream.payments
    assert upstream.header_names == ["PAYMENT-SIGNATURE"] and payment["x402Version"] == 2
    assert payment["resource"] == resource
    assert authorization(payment)["to"] == PAYEE
    assert authorization(payment)["value"] == str(PRICE)


# --- hostile challenges: nothing is signed ------------------------------------------------

HOSTILE_ENTRIES = {
    "amount as a float string": entry(amount="16750.0"),
    "amount negative": entry(amount="-16750"),
    "amount in hex": entry(amount="0x416e"),
    "amount with an exponent": entry(amount="1.675e4"),
    "amount past 2^256": entry(amount=str(2**256 + PRICE)),
    "amount in fullwidth digits": entry(amount="１６７５０"),
    "amount in Arabic-Indic digits": entry(amount="١٦٧٥٠"),
    "amount as a JSON float": entry(amount=16750.0),
    "amount missing": {k: v for k, v in entry().items() if k != "amount"},
    "timeout zero": entry(maxTimeoutSeconds=0),
    # a facilitator refuses validBefore < now + 6 (x402.md §7): expiring as it is signed
    "timeout of 5 s": entry(maxTimeoutSeconds=5),
    "timeout negative": entry(maxTimeoutSeconds=-1),
    "timeout a float": entry(maxTimeoutSeconds=300.5),
    "timeout huge": entry(maxTimeoutSeconds=10**12),
    "timeout as text": entry(maxTimeoutSeconds="300"),
    "mainnet's domain name": entry(extra={"name": "USD Coin", "version": "2"}),
    "another domain version": entry(extra={"name": "USDC", "version": "1"}),
    "no domain": entry(extra=None),
    "Base mainnet's USDC on Sepolia": entry(asset=BASE_USDC),
    "another payee": entry(payTo=EVIL),
    "a payee with a trailing space": entry(payTo=PAYEE + " "),
    "upto": entry(scheme="upto"),
    "permit2": entry(extra={"name": "USDC", "version": "2", "assetTransferMethod": "permit2"}),
    "another chain": entry(network="eip155:1"),
}


def test_hostile_challenges_are_refused_and_nothing_is_signed(make_gateway, upstream):
    """Each challenge has one field a hostile (or buggy) upstream rewrote; every one is a 402
    `payment_refused` envelope, nothing reaches the upstream signed, the ledger stays empty."""
    gw = make_gateway(upstream.api)
    for name, hostile in HOSTILE_ENTRIES.items():
        upstream.unpaid = lambda request, _, hostile=hostile: challenge(hostile)
        r = gen(gw, prompt=name)
        assert r.status_code == 402 and error(r)["code"] == "payment_refused", (name, r.text)
        assert "nothing was signed" in error(r)["message"], name
    assert upstream.payments == [] and rows(gw) == []


UNREADABLE_HEADERS = {
    "not base64": "%%%not base64", "a list": b64([entry()]),
    "x402Version 3": b64({"x402Version": 3, "accepts": [entry()]}),
    "no accepts": b64({"x402Version": 2, "accepts": []}),
    "not UTF-8": base64.b64encode(b"\xff\xfe").decode(),
}


def test_an_unreadable_challenge_header_is_refused_even_with_a_good_v1_body(make_gateway,
                                                                            upstream):
    """A `PAYMENT-REQUIRED` that cannot be read is not replaced by the body's challenge
    (official clients read the body only without the header)."""
    gw = make_gateway(upstream.api)
    v1 = {"x402Version": 1, "accepts": [{**entry(), "network": "base-sepolia",
                                         "maxAmountRequired": str(PRICE)}]}
    for name, header in UNREADABLE_HEADERS.items():
        upstream.unpaid = lambda request, _, header=header: JSONResponse(
            v1, 402, headers={"PAYMENT-REQUIRED": header})
        r = gen(gw, prompt=name)
        assert r.status_code == 402 and error(r)["code"] == "payment_refused", (name, r.text)
    assert upstream.payments == [] and rows(gw) == []


def test_of_several_entries_only_ours_is_signed_however_cheap_the_others(make_gateway,
                                                                          upstream):
    """Cheaper entries first, on another network, asset, payee or scheme, or with another
    domain: the one on our network, USDC, payee and domain is signed, at its own amount."""
    gw = make_gateway(upstream.api)
    decoys = [entry(network="eip155:8453", asset=BASE_USDC, amount="1000",
                    extra={"name": "USD Coin", "version": "2"}),
              entry(asset="0x0000000000000000000000000000000000000bad", amount="1000"),
              entry(payTo=EVIL, amount="1000"),
              entry(scheme="upto", amount="1000"),
              entry(extra={"name": "GatewayWalletBatched", "version": "1"}, amount="1000")]
    upstream.unpaid = lambda request, _: challenge(*decoys, entry())
    assert gen(gw).status_code == 200
    (payment,) = upstream.payments
    assert payment["accepted"] == entry()
    assert (authorization(payment)["to"], authorization(payment)["value"]) == (PAYEE,
                                                                             str(PRICE))


HARMLESS_SPELLINGS = {
    "payee in lower case": {"payTo": PAYEE.lower()},
    "payee in upper case": {"payTo": PAYEE.upper().replace("0X", "0x")},
    "asset in lower case": {"asset": SEPOLIA_USDC.lower()},
    "v1 network name": {"network": "base-sepolia"},
    "leading zeros": {"amount": "000" + str(PRICE)},
    "amount as a JSON number": {"amount": PRICE},
    "eip3009 named": {"extra": {"name": "USDC", "version": "2",
                                "assetTransferMethod": "eip3009"}},
}


def test_harmless_spellings_are_paid_at_the_same_value_to_the_same_payee(make_gateway,
                                                                         upstream):
    """Address case, a v1 network name, leading zeros or a JSON number: the same payment.
    The authorization carries the amount as plain decimal and recovers to the payer; the
    entry is echoed as sent (a facilitator compares `int(value) == int(amount)`)."""
    gw = make_gateway(upstream.api, preauth=False)  # each request reads its own challenge
    for name, changes in HARMLESS_SPELLINGS.items():
        offered = entry(**changes)
        upstream.unpaid = lambda request, _, offered=offered: challenge(offered)
        assert gen(gw, prompt=name).status_code == 200, name
        payment = upstream.payments[-1]
        auth = authorization(payment)
        assert auth["value"] == str(PRICE) and auth["to"].lower() == PAYEE.lower(), name
        assert payment["accepted"] == offered, name
        assert recovered(payment) == auth["from"], name
    assert len(upstream.payments) == len(HARMLESS_SPELLINGS)


# --- after the payment left: never signed again ---------------------------------------------

def test_a_fresh_challenge_to_the_paid_request_is_not_paid_again(make_gateway, upstream):
    """A 402 to the paid request that carries a new challenge (even a cheaper one) is a
    refusal, not an invitation: one signature, a 402 envelope that says so and forbids a
    retry, and the row `rejected` (held: the upstream has the authorization)."""
    gw = make_gateway(upstream.api)
    upstream.paid = lambda request, _: challenge(entry(amount="1000"))
    r = gen(gw)
    assert r.status_code == 402 and error(r)["code"] == "payment_rejected", r.text
    assert error(r)["payment"] == "rejected"
    assert len(upstream.payments) == 1 and upstream.probes == 1
    assert [row["status"] for row in rows(gw)] == ["rejected"]
    assert gw.gw.ledger.held() and gw.gw.ledger.spent() == PRICE


def test_a_fresh_challenge_on_a_poll_is_never_signed(make_gateway, upstream):
    """A 202 job whose poll answers a 402 with a new challenge: the poll's payment is the
    request's; no new signature, and the job's refusal says nothing settled."""
    gw = make_gateway(upstream.api, poll_deadline=5)
    upstream.paid = lambda request, _: JSONResponse(
        {"id": "img_1", "status": "queued", "poll_url": "/api/v1/images/generations/img_1"},
        202)
    upstream.poll = lambda request, _: challenge(
        entry(amount="1000"), body={"error": "Payment settlement failed",
                                    "details": "transaction_simulation_failed"})
    r = gen(gw)
    assert r.status_code == 402 and error(r)["payment"] == "not_settled", r.text
    assert len(upstream.payments) == 1 and upstream.polls == 1
    assert [row["status"] for row in rows(gw)] == ["rejected"]


UNUSABLE_RECEIPTS = {
    "not base64": "%%%not base64", "a list": b64(["not", "an", "object"]),
    "not JSON": base64.b64encode(b"not json").decode(),
    "a failure": receipt(success=False, errorReason="invalid_transaction_state",
                         transaction=""),
    # a reverted settlement names its hash too: not a transaction the user paid with
    "a failure naming a hash": receipt(success=False, errorReason="transaction_reverted"),
    "a short hash": receipt(transaction="0x1234"),
    "an object for a hash": b64({"success": True, "transaction": {"hash": TX}}),
}


def test_an_unusable_or_failed_receipt_still_delivers_the_paid_image(make_gateway, upstream):
    """`PAYMENT-RESPONSE` that is not base64 JSON, names no transaction hash, or says the
    settlement failed: the image (paid for) is delivered and recorded `settled`, with no
    transaction (x402.md §8: BlockRun hard-codes `success`; only a tx hash proves one)."""
    gw = make_gateway(upstream.api)
    for name, value in UNUSABLE_RECEIPTS.items():
        upstream.paid = lambda request, _, value=value: image(**{"PAYMENT-RESPONSE": value})
        r = gen(gw, prompt=name)
        assert r.status_code == 200, (name, r.text)
        assert "x-clawrouter-transaction" not in r.headers, name
        newest = rows(gw)[0]
        assert newest["status"] == "settled" and not newest["transaction"], name
    assert len(upstream.payments) == len(rows(gw)) == len(UNUSABLE_RECEIPTS)


def test_a_receipt_names_the_transaction_in_the_ledger_and_the_response(make_gateway,
                                                                         upstream):
    gw = make_gateway(upstream.api)
    upstream.paid = lambda request, _: image(**{"PAYMENT-RESPONSE": receipt()})
    r = gen(gw)
    assert r.status_code == 200 and r.headers["x-clawrouter-transaction"] == TX
    (row,) = rows(gw)
    assert (row["status"], row["transaction"]) == ("settled", TX)


# --- many at once -----------------------------------------------------------------------

def _all_at_once(gw, prompts: list[str]) -> list[httpx.Response]:
    """One POST per prompt, all at once, over one client's pool."""
    limits = httpx.Limits(max_connections=len(prompts))
    with httpx.Client(base_url=gw.v1, timeout=30, limits=limits) as client, \
            concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(lambda prompt: client.post(
            "/images/generations", json={**COGVIEW, "prompt": prompt}), prompts))


def _refusing(upstream: Scripted) -> None:
    """The upstream answers 402 twice: a challenge, then a refusal of the payment."""
    upstream.paid = lambda request, _: JSONResponse(
        {"error": "Payment verification failed", "code": "PAYMENT_INVALID",
         "details": 'Verification failed: {"isValid":false,"invalidReason":"invalid_payload"}'},
        402)


def test_64_identical_requests_to_an_upstream_that_refuses_sign_once(make_gateway, upstream):
    gw = make_gateway(upstream.api)
    _refusing(upstream)
    answers = _all_at_once(gw, ["the same"] * 64)
    assert {r.status_code for r in answers} == {402}
    assert {error(r)["code"] for r in answers} == {"payment_rejected"}
    assert len(upstream.payments) == 1
    assert [row["status"] for row in rows(gw)] == ["rejected"]


def test_64_different_requests_to_an_upstream_that_refuses_stay_in_the_budget(make_gateway,
                                                                               upstream):
    """Refused payments hold their budget (the upstream has the authorizations): with room
    for 11, exactly 11 are signed, each once, each in the ledger; the rest are refused before
    signing."""
    gw = make_gateway(upstream.api, max_usd_per_day=0.2)  # 11 × 0.01675 = 0.18425
    _refusing(upstream)
    answers = _all_at_once(gw, [f"picture {i}" for i in range(64)])
    codes = sorted(error(r)["code"] for r in answers)
    assert codes.count("payment_rejected") == 11 and codes.count("budget_exceeded") == 53
    nonces = {authorization(p)["nonce"] for p in upstream.payments}
    assert len(upstream.payments) == len(nonces) == 11
    ledger = rows(gw)
    assert {row["nonce"] for row in ledger} == nonces
    assert {row["status"] for row in ledger} == {"rejected"}
    assert gw.gw.ledger.spent() == 11 * PRICE <= 200_000


# --- defects found by this audit, fixed ------------------------------------------------

def test_an_upstream_refusing_pre_auth_costs_a_second_signature_once_not_every_time(
        make_gateway, upstream):
    """exchange.py's own promise: "an upstream that refuses pre-authorised payments costs a
    second signature once, not every time". This one accepts a payment only for the last
    challenge it issued, unpaid so far, and its quote moves by one micro-USDC each time."""
    gw = make_gateway(upstream.api)
    issued: list[int] = []
    paid_for: set[int] = set()

    def unpaid(request: Request, _: Any) -> Response:
        issued.append(PRICE + len(issued) % 2)
        return challenge(entry(amount=str(issued[-1])))

    def paid(request: Request, payment: dict[str, Any]) -> Response:
        amount = int(authorization(payment)["value"])
        if amount != issued[-1] or len(issued) in paid_for:
            return JSONResponse({"error": "Payment verification failed",
                                 "code": "PAYMENT_INVALID"}, 402)
        paid_for.add(len(issued))
        return image()

    upstream.unpaid, upstream.paid = unpaid, paid
    requests = 6
    for i in range(requests):
        assert gen(gw, prompt=f"picture {i}").status_code == 200
    # a second signature a bounded number of times (here at most twice), not every time
    assert len(upstream.payments) <= requests + 2, (
        f"{len(upstream.payments)} signatures for {requests} images")


def test_price_changes_with_pre_auth_accepted_between_each_keep_pre_auth(make_gateway,
                                                                         upstream):
    """Two real price changes, a pre-authorised payment accepted between them: each costs
    one refused payment and one probe, and the new price is pre-authorised after each."""
    gw = make_gateway(upstream.api)
    price = [PRICE]
    upstream.unpaid = lambda request, _: challenge(entry(amount=str(price[0])))
    upstream.paid = lambda request, payment: image() if (
        authorization(payment)["value"] == str(price[0])) else JSONResponse(
        {"error": "Payment verification failed", "code": "PAYMENT_INVALID"}, 402)
    for change in (0, 1, 2):
        price[0] = PRICE + change
        for i in range(2):  # after a change: refused, probed, paid; then pre-authorised
            assert gen(gw, prompt=f"price {change}, picture {i}").status_code == 200
    assert upstream.probes == 3 and len(upstream.payments) == 6 + 2


def _price_book() -> tuple[Any, Callable[[], Any], Callable[[float], None]]:
    """A PriceBook on a clock that a test moves, and a challenge as a probe reads it (a new
    object each time)."""
    from clawrouter.payment.prices import PriceBook
    from clawrouter.payment.wire import parse_challenge

    now = [0.0]

    def learned() -> Any:
        return parse_challenge({"payment-required": b64({"x402Version": 2,
                                                         "accepts": [entry()]})}, b"")

    def later(seconds: float = 1.0) -> None:
        now[0] += seconds

    return PriceBook(3600, clock=lambda: now[0]), learned, later


PRICE_KEY = ("/v1/images/generations", "cogview-4", "512x512", 1, None, 0, False)


def test_pre_auth_is_held_off_after_a_second_learned_price_is_refused_not_after_one():
    """`PriceBook.refused`: one refusal (a price change) still learns the new price; requests
    in flight that all signed from that one stale price count once; a price learned after a
    refusal and refused too, with none accepted in between, holds pre-auth off; an accepted
    one forgives."""
    book, learned, later = _price_book()
    key = PRICE_KEY
    book.learn(key, learned())
    stale = book.get(key)
    later()
    for _ in range(3):  # three requests in flight, all refused at the stale price
        book.refused(key, stale, hold_off=600)
        later()
    book.learn(key, fresh := learned())
    assert book.get(key).challenge is fresh  # a price change keeps working
    book.accepted(key)  # ... and its pre-authorised payments go through
    later()
    book.refused(key, book.get(key), hold_off=600)  # a later refusal is a first one again
    later()
    book.learn(key, newer := learned())
    assert book.get(key).challenge is newer
    later()
    book.refused(key, book.get(key), hold_off=600)  # refused again, nothing accepted between
    book.learn(key, learned())
    assert book.get(key) is None  # held off
    later(601)
    book.learn(key, latest := learned())
    assert book.get(key).challenge is latest


def test_prices_learned_before_a_price_change_are_refused_for_it_once():
    """Review D2: requests probing at once each learn their own challenge, and requests
    started in between pre-authorise from one or the other. One price change refuses both
    learnings: that is one refusal (both were learned before it), so the new price is still
    learned, and pre-auth is not held off for ten minutes. A price learned after that first
    refusal is judged against it, not against the stale refusals that followed."""
    book, learned, later = _price_book()
    book.learn(PRICE_KEY, learned())
    first = book.get(PRICE_KEY)  # a request pre-authorises from it
    later()
    book.learn(PRICE_KEY, learned())  # a probe that answered later learns its own
    second = book.get(PRICE_KEY)  # another request pre-authorises from that one
    later()
    book.refused(PRICE_KEY, second, hold_off=600)  # the price changed
    later()
    book.learn(PRICE_KEY, learned())  # its fresh probe learns the new price
    fresh = book.get(PRICE_KEY)  # a third request pre-authorises from it
    later()
    book.refused(PRICE_KEY, first, hold_off=600)  # the same change, for the other request
    later()
    book.learn(PRICE_KEY, new := learned())
    assert book.get(PRICE_KEY).challenge is new  # pre-auth goes on at the new price
    # ... but a price learned after the first refusal, refused too, is a second refusal,
    # however many stale ones came in between
    later()
    book.refused(PRICE_KEY, fresh, hold_off=600)
    book.learn(PRICE_KEY, learned())
    assert book.get(PRICE_KEY) is None


def test_a_refusal_older_than_a_price_lives_holds_nothing_off():
    """Review D3: `accepted` forgets a refusal only after a pre-authorised payment; with
    sporadic use (every learned price expired before its reuse) a refusal stayed, and one
    price change days later held pre-auth off for ten minutes. A refusal older than a learned
    price lives (`ttl`) says nothing of the next one."""
    book, learned, later = _price_book()
    book.learn(PRICE_KEY, learned())
    book.refused(PRICE_KEY, book.get(PRICE_KEY), hold_off=600)  # day 0
    later(3 * 86_400)
    book.learn(PRICE_KEY, learned())  # a probe learns the price, days later
    later()
    book.refused(PRICE_KEY, book.get(PRICE_KEY), hold_off=600)  # one price change
    book.learn(PRICE_KEY, new := learned())
    assert book.get(PRICE_KEY).challenge is new  # learned: nothing held off


SETTLED_FAILURES = ["failed poll", "402 poll", "402 poll, a bare receipt", "402 paid request",
                    "402 to a pre-authorised payment"]


def _failing(gw, upstream: Scripted, where: str, headers: dict[str, str]) -> httpx.Response:
    """One request whose paid answer, or whose job's poll, fails `where` says, carrying
    `headers`; a pre-authorised payment is made from a price learned just before."""
    if where.endswith("pre-authorised payment"):
        assert gen(gw, prompt="warm").status_code == 200
    if "poll" not in where:
        upstream.paid = lambda request, _: JSONResponse(
            {"error": "Payment verification failed", "code": "PAYMENT_INVALID"}, 402,
            headers=headers)
    else:
        upstream.paid = lambda request, _: JSONResponse(
            {"id": "img_1", "status": "queued",
             "poll_url": "/api/v1/images/generations/img_1"}, 202)
        upstream.poll = lambda request, _: JSONResponse(
            {"status": "failed", "error": "content policy violation"}
            if where == "failed poll" else {"error": "Payment settlement failed"},
            200 if where == "failed poll" else 402, headers=headers)
    return gen(gw)


@pytest.mark.parametrize("where", SETTLED_FAILURES)
def test_a_settlement_receipt_is_never_recorded_as_a_rejected_payment(make_gateway, upstream,
                                                                      where):
    """A failure that carries a receipt proving settlement (x402.md §8: a transaction hash,
    not `success: false`) moved the user's money: the row is `settled` with its transaction
    (so it counts against the budgets for good, never let go at its expiry), the client is
    told so and not to retry, and nothing is signed again."""
    gw = make_gateway(upstream.api, poll_deadline=5)
    settled = {"X-Payment-Receipt": TX} if "bare" in where else {"PAYMENT-RESPONSE": receipt()}
    r = _failing(gw, upstream, where, settled)
    assert r.status_code == 502 and r.headers["x-should-retry"] == "false", r.text
    assert (error(r)["payment"], error(r)["transaction"]) == ("settled", TX)
    assert TX in error(r)["message"] and "it was charged" in error(r)["message"]
    row = rows(gw)[0]
    assert (row["status"], row["transaction"]) == ("settled", TX), row
    assert "failed after settling" in row["note"]
    warm = 1 if where.endswith("pre-authorised payment") else 0
    assert len(upstream.payments) == len(rows(gw)) == 1 + warm and upstream.probes == 1
    assert gw.gw.ledger.held() == [] and gw.gw.ledger.spent() == (1 + warm) * PRICE


NO_PROOF = {"a failure receipt": receipt(success=False, errorReason="transaction_reverted"),
            "an unreadable one": "%%%not base64"}


@pytest.mark.parametrize("where", ["failed poll", "402 poll", "402 paid request"])
@pytest.mark.parametrize("kind", sorted(NO_PROOF))
def test_a_receipt_that_proves_no_settlement_changes_nothing(make_gateway, upstream, where,
                                                             kind):
    """`success: false` (a reverted settlement names a hash too), or a receipt that cannot
    be read: the failure is what it says, as without a receipt."""
    gw = make_gateway(upstream.api, poll_deadline=5)
    r = _failing(gw, upstream, where, {"PAYMENT-RESPONSE": NO_PROOF[kind]})
    payment = "rejected" if where == "402 paid request" else "not_settled"
    assert error(r)["payment"] == payment and TX not in r.text, r.text
    (row,) = rows(gw)
    assert (row["status"], row["transaction"]) == ("rejected", None)


# --- review D1: a settlement receipt on the 202, or on a poll of a job still running --------

EARLY_RECEIPTS = ["202 paid answer", "running poll"]


def _early_receipt(upstream: Scripted, where: str, then: Answer) -> None:
    """A 202 job whose accepted answer, or first poll (still running), carries a receipt
    proving settlement; every later poll answers `then`."""
    settled = {"PAYMENT-RESPONSE": receipt()}
    upstream.paid = lambda request, _: JSONResponse(
        {"id": "img_1", "status": "queued", "poll_url": "/api/v1/images/generations/img_1"},
        202, headers=settled if where == "202 paid answer" else {})
    upstream.poll = lambda request, payment: JSONResponse(
        {"status": "in_progress"}, 202, headers=settled if where == "running poll" else {}
    ) if upstream.polls == 1 else then(request, payment)


def _settled_once(gw, upstream: Scripted, r: httpx.Response) -> None:
    """`r` tells its client the payment settled with TX, and the ledger says so: counted for
    good (never held, then let go), one signature."""
    assert r.status_code == 502 and r.headers["x-should-retry"] == "false", r.text
    assert (error(r)["payment"], error(r)["transaction"]) == ("settled", TX), r.text
    assert TX in error(r)["message"] and "it was charged" in error(r)["message"]
    (row,) = rows(gw)
    assert (row["status"], row["transaction"]) == ("settled", TX), row
    assert len(upstream.payments) == 1 and upstream.probes == 1
    assert gw.gw.ledger.held() == [] and gw.gw.ledger.spent() == PRICE


@pytest.mark.parametrize("end", ["failed", "timeout"])
@pytest.mark.parametrize("where", EARLY_RECEIPTS)
def test_a_receipt_before_the_job_fails_or_times_out_is_a_settled_payment(
        make_gateway, upstream, where, end):
    gw = make_gateway(upstream.api, poll_deadline=1.5)
    _early_receipt(upstream, where, lambda request, _: JSONResponse(
        {"status": "failed", "error": "content policy violation"}) if end == "failed"
        else JSONResponse({"status": "in_progress"}, 202))
    r = gen(gw)
    _settled_once(gw, upstream, r)
    assert error(r)["code"] == ("job_failed" if end == "failed" else "upstream_timeout")


def test_a_receipt_on_a_202_whose_poll_url_is_refused_is_a_settled_payment(make_gateway,
                                                                           upstream):
    """The 202 says the payment settled, and names a poll URL on another origin, which the
    gateway never sends its payment header to: the request fails, and says it was charged
    (the row `settled` with the transaction), not that nothing was received."""
    gw = make_gateway(upstream.api)
    upstream.paid = lambda request, _: JSONResponse(
        {"id": "img_1", "status": "queued", "poll_url": "https://elsewhere.example/poll/1"},
        202, headers={"PAYMENT-RESPONSE": receipt()})
    r = gen(gw)
    _settled_once(gw, upstream, r)
    assert error(r)["code"] == "poll_origin_refused"


@pytest.mark.parametrize("where", EARLY_RECEIPTS)
def test_a_job_whose_receipt_came_is_polled_to_its_image_after_every_client_left(
        make_gateway, upstream, monkeypatch, where):
    """The client leaves during polling after a receipt said the payment settled: polling goes
    on (it costs nothing more, and stopping would throw away an image that was paid for), the
    row is `settled` with the transaction, and a repeat gets the image, not paid again."""
    from clawrouter.upstream import jobs

    monkeypatch.setattr(jobs, "REJOIN_SECONDS", 0.2)
    gw = make_gateway(upstream.api)
    done = threading.Event()
    _early_receipt(upstream, where, lambda request, _: image() if done.is_set() else
                   JSONResponse({"status": "in_progress"}, 202))
    with leaving(gw.v1 + "/images/generations", {**COGVIEW, "prompt": "a hostile harbour"}):
        until(lambda: upstream.polls > 1)  # the receipt came (the 202's, or the first poll's)
    polls = upstream.polls
    # polled on, for many times REJOIN_SECONDS: a job nobody waits for is let go after it
    until(lambda: upstream.polls > polls + 10)
    done.set()
    until(lambda: [row["status"] for row in rows(gw)] == ["settled"])
    repeat = gen(gw)  # the kept job's image, for the window: not paid again
    assert repeat.status_code == 200 and repeat.headers["x-clawrouter-shared"] == "true"
    assert repeat.headers["x-clawrouter-transaction"] == TX
    (row,) = rows(gw)
    assert (row["status"], row["transaction"]) == ("settled", TX), row
    assert len(upstream.payments) == 1 and upstream.probes == 1


@pytest.mark.parametrize("where", EARLY_RECEIPTS)
def test_a_receipt_before_the_image_names_its_transaction(make_gateway, upstream, where):
    """The completed poll carries no receipt (or a failed one): the earlier receipt's
    transaction is the image's, in the ledger and the response."""
    gw = make_gateway(upstream.api)
    _early_receipt(upstream, where, lambda request, _: image(**{
        "PAYMENT-RESPONSE": receipt(success=False, transaction="0x" + "cd" * 32)}))
    r = gen(gw)
    assert r.status_code == 200 and r.headers["x-clawrouter-transaction"] == TX, r.text
    (row,) = rows(gw)
    assert (row["status"], row["transaction"]) == ("settled", TX)


def test_a_receipt_on_a_job_nobody_paid_for_claims_no_charge(make_gateway, upstream):
    """The upstream started a job without asking for payment, and a failed poll carries a
    receipt: nothing was signed, so the client is not told it was charged."""
    gw = make_gateway(upstream.api)
    upstream.unpaid = lambda request, _: JSONResponse(
        {"id": "img_1", "status": "queued", "poll_url": "/api/v1/images/generations/img_1"}, 202)
    upstream.poll = lambda request, _: JSONResponse({"error": "gone"}, 404,
                                                    headers={"PAYMENT-RESPONSE": receipt()})
    r = gen(gw)
    assert r.status_code == 404 and error(r)["payment"] != "settled", r.text
    assert "charged" not in error(r)["message"] and TX not in r.text
    assert rows(gw) == [] and upstream.payments == []


# --- review 3: jobs nobody paid for, and a receipt recorded while its job runs on -----------

JOB = {"id": "img_1", "status": "queued", "poll_url": "/api/v1/images/generations/img_1"}
UNPAID_ENDINGS = {  # ending: (the 202's body, the poll's answer, status, code)
    "failed job": (JOB, lambda up: JSONResponse({"status": "failed", "error": "policy"}),
                   502, "job_failed"),
    "lost poll, then failed": (JOB, lambda up: JSONResponse({"error": "boom"}, 503)
                               if up.polls == 1 else JSONResponse({"status": "failed"}),
                               502, "job_failed"),
    "deadline": (JOB, lambda up: JSONResponse({"status": "in_progress"}, 202),
                 504, "upstream_timeout"),
    "no poll_url": ({"id": "img_1", "status": "queued"}, None, 502, "upstream_error"),
}


@pytest.mark.parametrize("ending", list(UNPAID_ENDINGS))
def test_a_job_nobody_paid_for_ends_unpaid_and_a_retry_runs_again(make_gateway, upstream,
                                                                  ending):
    """The upstream started a job without asking for payment: however it ends, nothing was
    paid (no "$0.00" payment, no lost poll), and a retry runs again instead of being answered
    from the failure, as paid failures are (`coalesce`)."""
    gw = make_gateway(upstream.api, poll_deadline=1.0)
    accepted, poll, status, code = UNPAID_ENDINGS[ending]
    upstream.unpaid = lambda request, _: JSONResponse(accepted, 202)
    if poll is not None:
        upstream.poll = lambda request, _: poll(upstream)
    first, retry = gen(gw), gen(gw)
    assert (first.status_code, error(first)["code"]) == (status, code), first.text
    assert error(first)["payment"] == "none" and "lost_poll" not in error(first), first.text
    assert "$0.00" not in first.text and "Nothing was paid" in error(first)["message"]
    assert "x-clawrouter-shared" not in retry.headers and upstream.probes == 2, retry.text
    assert rows(gw) == [] and upstream.payments == []


def _settled_metric(gw) -> tuple[float, float]:
    """/metrics' count of settled payments, and the USD spent on cogview-4."""
    text = gw.http.get("/metrics").text
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines()
                   if line and not line.startswith("#"))
    return (float(samples.get('clawrouter_payments_total{outcome="settled"}', 0)),
            float(samples.get('clawrouter_spent_usd_total{model="zai/cogview-4"}', 0)))


@pytest.mark.parametrize("where", EARLY_RECEIPTS)
def test_a_receipt_on_a_running_job_leaves_its_row_in_flight_until_the_job_ends(make_gateway,
                                                                               upstream, where):
    """A receipt on the 202, or on a poll of a job still running: the row stays `signed` (in
    flight) until the job ends, then is `settled` with that transaction, counted once. A row
    written `settled` mid-job was no longer in flight for a restart after a crash
    (`Ledger.interrupted`), and the SDK's retry then paid a second time (review4)."""
    gw = make_gateway(upstream.api)
    done = threading.Event()
    _early_receipt(upstream, where, lambda request, _: image() if done.is_set() else
                   JSONResponse({"status": "in_progress"}, 202))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(gen, gw)
        deadline = time.monotonic() + 15
        while upstream.polls < 4:  # the receipt came (the 202's, or the first poll's)
            assert time.monotonic() < deadline and not pending.done()
            time.sleep(0.05)
        assert [row["status"] for row in rows(gw)] == ["signed"], rows(gw)
        done.set()
        r = pending.result()
    assert r.status_code == 200 and r.headers["x-clawrouter-transaction"] == TX, r.text
    (row,) = rows(gw)
    assert (row["status"], row["transaction"]) == ("settled", TX), row
    assert _settled_metric(gw) == (1, PRICE / 1e6)
    assert len(upstream.payments) == 1 and gw.gw.ledger.spent() == PRICE
