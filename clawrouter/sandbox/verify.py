"""A strict offline x402 `exact` verifier (x402.md §7), as pure functions.

Checks everything that needs no chain: the echoed requirement, recipient, exact value, validity
window, nonce and signature shape (USDC's ECRecover rules: low-s, v in {27,28}; v in {0,1} too, as
the facilitator adds 27), and EIP-712 recovery with the domain from our network table. Replay
tracking is the caller's job: it needs state, and must happen at accept time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from clawrouter.payment.eth import Account
from clawrouter.payment.networks import Network
from clawrouter.payment.signer import signable
from clawrouter.payment.wallet import SECP256K1_N
from clawrouter.payment.wire import ChallengeError, decode_b64_json

#: the facilitator wants at least this many seconds left on an authorization
MIN_VALIDITY_SECONDS = 6

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_NONCE = re.compile(r"0x[0-9a-fA-F]{64}")
_SIGNATURE = re.compile(r"0x[0-9a-fA-F]{130}")
_UINT = re.compile(r"0|[1-9][0-9]{0,77}")  # canonical decimal: what the signer sends
#: seconds a validBefore may exceed now + maxTimeoutSeconds (the signer's clock runs ahead)
CLOCK_SKEW_SECONDS = 5


class PaymentInvalid(Exception):
    """A payment the verifier refuses; `reason` is the x402 `invalidReason`."""

    def __init__(self, reason: str, message: str, payer: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.payer = payer


@dataclass(frozen=True)
class Verified:
    payer: str  # `authorization.from`, as sent
    nonce: str  # lower-case 0x-hex
    amount: int
    valid_before: int

    @property
    def replay_key(self) -> tuple[str, str]:
        return self.payer.lower(), self.nonce


def requirement(network: Network, pay_to: str, amount: int,
                max_timeout_seconds: int) -> dict[str, Any]:
    """The `accepts[]` entry we advertise, and the only `accepted` we take back."""
    return {
        "scheme": "exact",
        "network": network.caip2,
        "amount": str(amount),
        "asset": network.usdc,
        "payTo": pay_to,
        "maxTimeoutSeconds": max_timeout_seconds,
        "extra": {"name": network.domain_name, "version": network.domain_version},
    }


def decode_payment(header: str) -> dict[str, Any]:
    """Decode a payment header (standard or url-safe base64 of a JSON object)."""
    try:
        payment = decode_b64_json(header)
    except ChallengeError as exc:
        raise PaymentInvalid("invalid_payload", f"payment header is {exc}") from None
    if not isinstance(payment, dict):
        raise PaymentInvalid("invalid_payload", "payment header is not a JSON object")
    return payment


def payer_of(payment: dict[str, Any]) -> str | None:
    """`authorization.from` if the payload has one (for error reports and wallet binding)."""
    payload = payment.get("payload")
    authorization = payload.get("authorization") if isinstance(payload, dict) else None
    payer = authorization.get("from") if isinstance(authorization, dict) else None
    return payer if isinstance(payer, str) else None


def verify_payment(payment: dict[str, Any], expected: dict[str, Any], network: Network,
                   now: int, *, max_accepted_timeout: int | None = None,
                   accept_v1: bool = False) -> Verified:
    """Verify a decoded payment against the requirement we would advertise for this request.

    `max_accepted_timeout` lets `accepted.maxTimeoutSeconds` be raised up to that value (BlockRun
    tolerates it); every other field of `accepted` must equal `expected` exactly.
    """
    payer = payer_of(payment)
    version = payment.get("x402Version")
    if version == 1 and accept_v1:
        _check_v1(payment, network, payer)
    elif version != 2:
        raise PaymentInvalid("invalid_x402_version",
                             f"x402Version {version!r} is not supported (expected 2)", payer)
    else:
        _check_accepted(payment.get("accepted"), expected, network, payer, max_accepted_timeout)
    payload = payment.get("payload")
    if not isinstance(payload, dict) or not isinstance(payload.get("authorization"), dict):
        raise PaymentInvalid("invalid_payload", "payload.authorization is missing", payer)
    lifetime = (payment["accepted"]["maxTimeoutSeconds"] if version == 2
                else expected["maxTimeoutSeconds"])  # v2: checked against `expected` above
    return check_authorization(payload["authorization"], payload.get("signature"), expected,
                               network, now, lifetime=lifetime)


def check_authorization(authorization: dict[str, Any], signature: Any,
                        expected: dict[str, Any], network: Network, now: int, *,
                        lifetime: int | None = None) -> Verified:
    """Checks 5-8 of x402.md §7 plus nonce and signature shape, then EIP-712 recovery.

    Stricter than a facilitator in one way, as a test oracle: an authorization may live no
    longer than the `lifetime` it was asked for (`maxTimeoutSeconds`, default `expected`'s),
    so a gateway that signs longer-lived ones than it must fails every paid test."""
    payer = authorization.get("from")
    if not isinstance(payer, str) or not _ADDRESS.fullmatch(payer):
        raise PaymentInvalid("invalid_payload", "authorization.from is not an address")
    to = authorization.get("to")
    if not isinstance(to, str) or to.lower() != str(expected["payTo"]).lower():
        raise PaymentInvalid("invalid_exact_evm_payload_recipient_mismatch",
                             f"authorization.to {to!r} is not {expected['payTo']}", payer)
    value = _uint(authorization, "value", payer)
    if value != int(expected["amount"]):
        raise PaymentInvalid("invalid_exact_evm_payload_authorization_value_mismatch",
                             f"authorization.value {value} != amount {expected['amount']}", payer)
    valid_after = _uint(authorization, "validAfter", payer)
    valid_before = _uint(authorization, "validBefore", payer)
    if valid_after > now:
        raise PaymentInvalid("invalid_exact_evm_payload_authorization_valid_after",
                             f"validAfter {valid_after} is in the future (now {now})", payer)
    if valid_before < now + MIN_VALIDITY_SECONDS:
        raise PaymentInvalid("invalid_exact_evm_payload_authorization_valid_before",
                             f"validBefore {valid_before} < now + {MIN_VALIDITY_SECONDS} "
                             f"({now + MIN_VALIDITY_SECONDS})", payer)
    longest = now + (expected["maxTimeoutSeconds"] if lifetime is None else lifetime)
    if valid_before > longest + CLOCK_SKEW_SECONDS:
        raise PaymentInvalid("invalid_exact_evm_payload_authorization_valid_before",
                             f"validBefore {valid_before} is more than maxTimeoutSeconds "
                             f"after now ({longest})", payer)
    nonce = authorization.get("nonce")
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        raise PaymentInvalid("invalid_exact_evm_payload_nonce",
                             "nonce must be 32 bytes of 0x-hex", payer)
    recovered = recover(authorization, signature, network)
    if recovered.lower() != payer.lower():
        raise PaymentInvalid("invalid_exact_evm_payload_signature",
                             f"signature recovers to {recovered}, not {payer}", payer)
    return Verified(payer, nonce.lower(), value, valid_before)


def recover(authorization: dict[str, Any], signature: Any, network: Network) -> str:
    """The EIP-712 signer of an authorization, after USDC's ECRecover shape rules."""
    payer = authorization.get("from") if isinstance(authorization.get("from"), str) else None
    if not isinstance(signature, str) or not _SIGNATURE.fullmatch(signature):
        raise PaymentInvalid("invalid_exact_evm_payload_signature",
                             "signature must be 65 bytes of 0x-hex", payer)
    raw = bytes.fromhex(signature[2:])
    r, s, v = int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:64], "big"), raw[64]
    if v in (0, 1):  # the x402 facilitator adds 27 before it settles, so USDC takes these too
        v += 27
        raw = raw[:64] + bytes([v])
    if v not in (27, 28):
        raise PaymentInvalid("invalid_exact_evm_payload_signature",
                             f"signature v is {v}, not 0, 1, 27 or 28", payer)
    if not 0 < r < SECP256K1_N or not 0 < s <= SECP256K1_N // 2:
        raise PaymentInvalid("invalid_exact_evm_payload_signature",
                             "signature s is in the upper half (malleable) or r/s is zero", payer)
    try:
        return Account.recover_message(signable(network, authorization), signature=raw)
    except Exception as exc:  # malformed typed data: eth-account raises many types
        raise PaymentInvalid("invalid_exact_evm_payload_signature",
                             f"cannot recover the signer: {exc}", payer) from None


def _check_accepted(accepted: Any, expected: dict[str, Any], network: Network,
                    payer: str | None, max_accepted_timeout: int | None) -> None:
    if not isinstance(accepted, dict):
        raise PaymentInvalid("invalid_payload", "accepted is missing", payer)
    if accepted.get("scheme") != "exact":
        raise PaymentInvalid("unsupported_scheme",
                             f"scheme {accepted.get('scheme')!r} is not 'exact'", payer)
    if accepted.get("network") != expected["network"]:
        raise PaymentInvalid("network_mismatch",
                             f"network {accepted.get('network')!r} is not {expected['network']}",
                             payer)
    extra = accepted.get("extra")
    if not isinstance(extra, dict) or not extra.get("name") or not extra.get("version"):
        raise PaymentInvalid("missing_eip712_domain", "accepted.extra lacks name/version", payer)
    if str(accepted.get("asset", "")).lower() != network.usdc.lower():
        raise PaymentInvalid("asset_mismatch",
                             f"asset {accepted.get('asset')!r} is not USDC {network.usdc}", payer)
    differing = sorted(k for k in set(accepted) | set(expected)
                       if not _same(accepted.get(k), expected.get(k))
                       and not (k == "maxTimeoutSeconds"
                                and _raised_timeout(accepted.get(k), expected[k],
                                                    max_accepted_timeout)))
    if differing:
        raise PaymentInvalid(
            "accepted_requirements_mismatch",
            "accepted does not match this request's requirement: " + ", ".join(
                f"{k}={accepted.get(k)!r} (want {expected.get(k)!r})" for k in differing), payer)


def _check_v1(payment: dict[str, Any], network: Network, payer: str | None) -> None:
    if payment.get("scheme") != "exact":
        raise PaymentInvalid("unsupported_scheme",
                             f"scheme {payment.get('scheme')!r} is not 'exact'", payer)
    if payment.get("network") != network.name:
        raise PaymentInvalid("network_mismatch",
                             f"network {payment.get('network')!r} is not {network.name}", payer)


def _raised_timeout(got: Any, want: int, limit: int | None) -> bool:
    return (limit is not None and isinstance(got, int) and not isinstance(got, bool)
            and want <= got <= limit)


def _same(got: Any, want: Any) -> bool:
    """Equal as JSON: 300.0 is not 300, nor True 1 (Python's == says they are)."""
    return json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)


def _uint(authorization: dict[str, Any], name: str, payer: str) -> int:
    """x402's uint256 fields are canonical decimal strings (no number, sign, space or 0-pad)."""
    value = authorization.get(name)
    if isinstance(value, str) and _UINT.fullmatch(value):
        return int(value)
    raise PaymentInvalid("invalid_payload", f"authorization.{name} is not a decimal string",
                         payer)
