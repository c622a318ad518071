import base64
import json

import httpx
import pytest

from clawrouter.payment.wire import (
    ChallengeError, b64_json, decode_b64_json, parse_challenge, read_receipt,
)


def test_decoding_is_lenient_about_urlsafe_alphabet_and_padding():
    raw = json.dumps({"a": "??>>"}).encode()
    urlsafe = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert decode_b64_json(urlsafe) == {"a": "??>>"}


@pytest.mark.parametrize("headers, body", [
    ({"payment-required": "%%%"}, b""),
    ({"payment-required": base64.b64encode(b"[1,2]").decode()}, b""),
    ({"payment-required": base64.b64encode(b'{"x402Version":3,"accepts":[{}]}').decode()}, b""),
    ({}, b'{"error":"Payment Required"}'),
    ({}, b"<html>"),
    ({"payment-required": base64.b64encode(b'{"x402Version":2,"accepts":[]}').decode()}, b""),
    # Python's == takes JSON true for 1 and 2.0 for 2
    ({"payment-required": b64_json({"x402Version": True, "accepts": [{}]})}, b""),
    ({"payment-required": b64_json({"x402Version": 2.0, "accepts": [{}]})}, b""),
    ({}, b'{"x402Version":true,"accepts":[{}]}'),
    ({}, b'{"x402Version":1.0,"accepts":[{}]}'),
])
def test_unreadable_challenges_raise(headers, body):
    with pytest.raises(ChallengeError):
        parse_challenge(headers, body)


@pytest.mark.parametrize("version, status, paid", [(True, 402, 0), (2.0, 402, 0), (2, 200, 1)])
def test_a_challenge_whose_version_is_not_an_integer_is_refused_unsigned(gateway, sandbox,
                                                                          version, status, paid):
    """The sandbox's real challenge with only `x402Version` changed: paid as the integer 2,
    refused before signing as `true` or `2.0` (a version we cannot vouch for)."""
    probe = httpx.post(sandbox.api + "/v1/images/generations",
                       json={"model": "zai/cogview-4", "prompt": "p", "size": "512x512"})
    challenge = decode_b64_json(probe.headers["payment-required"])
    sandbox.faults({"kind": "challenge",
                    "header": b64_json({**challenge, "x402Version": version})})
    r = gateway.http.post("/v1/images/generations",
                          json={"model": "cogview", "prompt": "p", "size": "512x512"})
    assert r.status_code == status, r.text
    if not paid:
        assert (r.json()["error"]["code"], r.json()["error"]["check"]) \
            == ("payment_refused", "challenge")
    assert sandbox.stats()["payments_count"] == paid
    assert len(gateway.http.get("/v1/spend").json()["latest"]) == paid


def test_receipts_from_each_header():
    tx = "0x" + "ab" * 32
    v2 = base64.b64encode(json.dumps({"success": True, "transaction": tx}).encode()).decode()
    assert read_receipt({"PAYMENT-RESPONSE": v2}).transaction == tx
    assert read_receipt({"x-payment-response": v2}).transaction == tx
    assert read_receipt({"X-Payment-Receipt": tx}).transaction == tx
    assert read_receipt({}) is None


def test_a_receipt_without_a_transaction_falls_back_to_the_next_header():
    tx = "0x" + "ab" * 32
    bare = base64.b64encode(json.dumps({"success": True, "network": "eip155:8453"}).encode())
    receipt = read_receipt({"PAYMENT-RESPONSE": bare.decode(), "X-Payment-Receipt": tx})
    assert (receipt.transaction, receipt.network) == (tx, "eip155:8453")


@pytest.mark.parametrize("tx", ["0x" + "ab" * 31, "0x" + "zz" * 32, "\u2603" * 66, 12,
                                "0x" + "ab" * 32 + "\r\nx-evil: 1",
                                "0x" + "ab" * 32 + "\n"])  # `$` matches before a final \n
def test_a_receipt_with_no_transaction_hash_keeps_no_transaction(tx):
    """It goes into the ledger and a response header: a malformed one would fail a request
    whose payment settled (and get it retried into another payment)."""
    v2 = base64.b64encode(json.dumps({"success": True, "transaction": tx}).encode()).decode()
    assert read_receipt({"PAYMENT-RESPONSE": v2}).transaction is None
    if isinstance(tx, str) and not tx.endswith("\n"):  # a bare header's spaces are trimmed
        assert read_receipt({"x-payment-receipt": tx}).transaction is None
