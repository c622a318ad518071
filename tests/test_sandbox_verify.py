"""The sandbox's pure parts: the x402 verifier (x402.md §11 vectors), PNGs, fault rule parsing."""

from __future__ import annotations

import struct
import time
import zlib

import pytest

from clawrouter.payment.networks import NETWORKS
from clawrouter.payment.signer import Signer
from clawrouter.sandbox.datauri import DataUris
from clawrouter.sandbox.faults import Faults, parse_rule
from clawrouter.sandbox.images import make_png
from clawrouter.sandbox.verify import (
    SECP256K1_N,
    PaymentInvalid,
    check_authorization,
    requirement,
    verify_payment,
)

SEPOLIA, BASE = NETWORKS["base-sepolia"], NETWORKS["base"]

# x402.md §11 vector 1 (the x402 spec example), Base Sepolia domain
V1_AUTH = {
    "from": "0x857b06519E91e3A54538791bDbb0E22373e36b66",
    "to": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
    "value": "10000", "validAfter": "1740672089", "validBefore": "1740672154",
    "nonce": "0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480",
}
V1_SIG = ("0x2d6a7588d6acca505cbf0d9a4a227e0c52c6c34008c8e8986a1283259764173608a2ce6496642e"
          "377d6da8dbbf5836e9bd15092f9ecab05ded3d6293af148b571c")
V1_NOW = 1740672100
V1_ACCEPTED = requirement(SEPOLIA, V1_AUTH["to"], 10000, 60)

# x402.md §11 vector 2 (Hardhat key #0, deterministic), Base mainnet domain
V2_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
V2_AUTH = {
    "from": "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266",
    "to": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
    "value": "1000", "validAfter": "1700000000", "validBefore": "1700000300",
    "nonce": "0x" + "00" * 32,
}
V2_SIG = ("0x05e2dc1173d263746cb0da3ca014b3cba7cf04173bebc72626962b720291c8d33b46bae716e97ea5b"
          "00cfd521108ac8ea62e6b305a1390053805944714749ddc1b")
V2_EXPECTED = requirement(BASE, V2_AUTH["to"], 1000, 300)


def _payment(accepted: dict = V1_ACCEPTED, auth: dict = V1_AUTH, sig: str = V1_SIG) -> dict:
    return {"x402Version": 2, "accepted": accepted,
            "resource": {"url": "https://api.example.com/premium-data"},
            "payload": {"signature": sig, "authorization": auth}}


def _reason(call) -> str:
    with pytest.raises(PaymentInvalid) as info:
        call()
    return info.value.reason


def test_vector1_recovers_with_frozen_clock() -> None:
    verified = verify_payment(_payment(), V1_ACCEPTED, SEPOLIA, V1_NOW)
    assert verified.payer == V1_AUTH["from"]
    assert verified.amount == 10000 and verified.nonce == V1_AUTH["nonce"]


def test_vector1_outside_its_window_or_on_the_wrong_domain() -> None:
    assert _reason(lambda: verify_payment(_payment(), V1_ACCEPTED, SEPOLIA, 1740672149)) \
        == "invalid_exact_evm_payload_authorization_valid_before"
    assert _reason(lambda: verify_payment(_payment(), V1_ACCEPTED, SEPOLIA, 1740672000)) \
        == "invalid_exact_evm_payload_authorization_valid_after"
    # the same authorization checked against the mainnet domain recovers someone else
    mainnet = requirement(BASE, V1_AUTH["to"], 10000, 60)
    with pytest.raises(PaymentInvalid) as info:
        verify_payment(_payment(mainnet), mainnet, BASE, V1_NOW)
    assert info.value.reason == "invalid_exact_evm_payload_signature"
    assert "0x34aE57701723c302054fe521aC33679a9a94fe42" in info.value.message


def test_vector1_accepted_must_match_the_requirement() -> None:
    other = {**V1_ACCEPTED, "amount": "20000"}
    assert _reason(lambda: verify_payment(_payment(), other, SEPOLIA, V1_NOW)) \
        == "accepted_requirements_mismatch"
    assert _reason(lambda: verify_payment(_payment({**V1_ACCEPTED, "scheme": "upto"}),
                                          V1_ACCEPTED, SEPOLIA, V1_NOW)) == "unsupported_scheme"
    assert _reason(lambda: verify_payment({**_payment(), "x402Version": 1}, V1_ACCEPTED,
                                          SEPOLIA, V1_NOW)) == "invalid_x402_version"
    raised = {**V1_ACCEPTED, "maxTimeoutSeconds": 600}  # BlockRun tolerates a raised timeout
    assert verify_payment(_payment(raised), V1_ACCEPTED, SEPOLIA, V1_NOW,
                          max_accepted_timeout=600).payer == V1_AUTH["from"]
    assert _reason(lambda: verify_payment(_payment(raised), V1_ACCEPTED, SEPOLIA, V1_NOW,
                                          max_accepted_timeout=60)) \
        == "accepted_requirements_mismatch"


def test_accepted_must_equal_the_requirement_as_json() -> None:
    """Python's == takes 60.0 for 60; the echo is compared as the JSON it is."""
    floated = {**V1_ACCEPTED, "maxTimeoutSeconds": 60.0}
    assert _reason(lambda: verify_payment(_payment(floated), V1_ACCEPTED, SEPOLIA, V1_NOW)) \
        == "accepted_requirements_mismatch"


def test_vector2_signer_and_verifier_agree() -> None:
    assert Signer(V2_KEY).sign_authorization(BASE, V2_AUTH) == V2_SIG
    assert check_authorization(V2_AUTH, V2_SIG, V2_EXPECTED, BASE, 1700000100).payer \
        == V2_AUTH["from"]


@pytest.mark.parametrize("mangle", ["high_s", "v_plus_2", "v_minus_25"])
def test_vector2_malleable_signatures_are_refused(mangle: str) -> None:
    raw = bytearray(bytes.fromhex(V2_SIG[2:]))
    if mangle == "high_s":  # eth-account still recovers `from` here; USDC would not
        s = SECP256K1_N - int.from_bytes(raw[32:64], "big")
        raw[32:64] = s.to_bytes(32, "big")
        raw[64] = 55 - raw[64]
    elif mangle == "v_plus_2":  # 27/28 -> 29/30: neither USDC nor the facilitator takes it
        raw[64] += 2
    else:  # 27/28 -> 2/3: not a 0/1 the facilitator would lift to 27/28
        raw[64] -= 25
    sig = "0x" + raw.hex()
    assert _reason(lambda: check_authorization(V2_AUTH, sig, V2_EXPECTED, BASE, 1700000100)) \
        == "invalid_exact_evm_payload_signature"


def test_vector2_v_minus_27_is_accepted_like_the_facilitator() -> None:
    """x402's facilitator adds 27 to a v of 0/1 before settling, so USDC takes those too."""
    raw = bytearray(bytes.fromhex(V2_SIG[2:]))
    raw[64] -= 27
    assert raw[64] in (0, 1)
    assert check_authorization(V2_AUTH, "0x" + raw.hex(), V2_EXPECTED, BASE, 1700000100).payer \
        == V2_AUTH["from"]


@pytest.mark.parametrize("field,value,reason", [
    ("to", "0x" + "11" * 20, "invalid_exact_evm_payload_recipient_mismatch"),
    ("value", "1001", "invalid_exact_evm_payload_authorization_value_mismatch"),
    ("value", "1e3", "invalid_payload"),
    ("value", 1000, "invalid_payload"),  # x402's uint256 fields are decimal strings
    ("value", "01000", "invalid_payload"),
    ("value", "1000\n", "invalid_payload"),
    ("nonce", "0x01", "invalid_exact_evm_payload_nonce"),
    # `$` matches before a final newline: a replay key that is not the signed nonce's
    ("nonce", V2_AUTH["nonce"] + "\n", "invalid_exact_evm_payload_nonce"),
    ("from", "0xabc", "invalid_payload"),
    ("from", V2_AUTH["from"] + "\n", "invalid_payload"),
    # alive longer than the 300 s asked for (+5 s of clock skew)
    ("validBefore", str(1700000100 + 306), "invalid_exact_evm_payload_authorization_valid_before"),
])
def test_authorization_field_checks(field: str, value: str, reason: str) -> None:
    auth = {**V2_AUTH, field: value}
    assert _reason(lambda: check_authorization(auth, V2_SIG, V2_EXPECTED, BASE, 1700000100)) \
        == reason


def _chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    out, pos = [], 8
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos:pos + 4])
        kind, data = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", png[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + data), kind
        out.append((kind, data))
        pos += 12 + length
    return out


def test_png_is_real_sized_and_differs_per_seed() -> None:
    a, b = make_png(1536, 1024, 1), make_png(1536, 1024, 2)
    chunks = dict(_chunks(a))
    assert struct.unpack(">II", chunks[b"IHDR"][:8]) == (1536, 1024)
    assert len(zlib.decompress(chunks[b"IDAT"])) == 1024 * (1536 + 1)
    assert len(chunks[b"PLTE"]) == 768
    assert a != b and _chunks(b)[-1][0] == b"IEND"


def test_png_padding_and_speed() -> None:
    padded = make_png(1024, 1024, 3, pad_to=200_000)
    assert abs(len(padded) - 200_000) <= 16 and b"paDd" in dict(_chunks(padded))
    make_png(1024, 1024, 0)  # warm the per-size cache
    start = time.process_time()
    for seed in range(100):
        make_png(1024, 1024, seed)
    assert (time.process_time() - start) / 100 < 0.005


def test_data_uris_are_redacted_to_hashes() -> None:
    import base64
    import hashlib

    png = make_png(8, 8, 1)
    body = {"image": ["data:image/png;base64," + base64.b64encode(png).decode(), "plain"],
            "mask": "data:image/png;base64,@@@"}
    redacted = DataUris().redact(body)
    assert redacted["image"][0] == {"mime": "image/png", "bytes": len(png),
                                    "sha256": hashlib.sha256(png).hexdigest()}
    assert redacted["image"][1] == "plain"
    assert redacted["mask"]["invalid_base64"] is True


@pytest.mark.parametrize("spec", [
    {"kind": "nope"},
    {"kind": "respond"},  # status required
    {"kind": "respond", "status": 500, "colour": "red"},
    {"kind": "challenge"},
    {"kind": "challenge", "phase": "paid", "v1": True},
    {"kind": "price", "multiply": 2, "times": 1},
    {"kind": "price", "multiply": 2, "amount": 5},
    {"kind": "job", "outcome": "maybe"},
    {"kind": "delay"},
    {"kind": "drop", "times": 0},
    {"kind": "drop", "route": "edits"},
])
def test_bad_fault_rules_are_refused(spec: dict) -> None:
    with pytest.raises(ValueError):
        parse_rule(spec)


def test_fault_rules_match_filters_and_spend_times() -> None:
    faults = Faults()
    faults.install([{"kind": "respond", "status": 503, "phase": "paid", "times": 2,
                     "model": "google/nano-banana"},
                    {"kind": "price", "multiply": 2, "route": "image2image"}])
    assert faults.take("respond", "unpaid", "generations", "google/nano-banana") is None
    assert faults.take("respond", "paid", "generations", "zai/cogview-4") is None
    assert faults.take("respond", "paid", "generations", "google/nano-banana") is not None
    assert faults.take("respond", "paid", "image2image", "google/nano-banana") is not None
    assert faults.take("respond", "paid", "generations", "google/nano-banana") is None
    assert faults.public()[0]["remaining"] == 0
    assert faults.price("image2image", "x", 1000) == 2000
    assert faults.price("generations", "x", 1000) == 1000
