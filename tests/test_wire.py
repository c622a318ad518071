import base64
import json

import pytest

from clawrouter.payment.wire import ChallengeError, decode_b64_json, parse_challenge, read_receipt


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
])
def test_unreadable_challenges_raise(headers, body):
    with pytest.raises(ChallengeError):
        parse_challenge(headers, body)


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
