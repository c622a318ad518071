"""Sign x402 `exact` payments: an EIP-3009 `TransferWithAuthorization` for USDC.

The domain comes from our network table; `to` and `value` come from a requirement that
`policy.select` already accepted. Validity follows BlockRun's SDKs: from ten minutes ago (clock
skew) until `maxTimeoutSeconds` from now.
"""

from __future__ import annotations

import functools
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import coincurve
from eth_hash.auto import keccak

from clawrouter.payment.eth import Account, encode_typed_data
from clawrouter.payment.networks import Network
from clawrouter.payment.wire import (
    SIGNATURE_HEADER, V1_HEADER, Challenge, Requirement, b64_json,
)

TWA_TYPES = {
    "TransferWithAuthorization": [
        {"name": "from", "type": "address"},
        {"name": "to", "type": "address"},
        {"name": "value", "type": "uint256"},
        {"name": "validAfter", "type": "uint256"},
        {"name": "validBefore", "type": "uint256"},
        {"name": "nonce", "type": "bytes32"},
    ]
}
VALID_AFTER_SKEW = 600


def typed_message(authorization: dict[str, Any]) -> dict[str, Any]:
    """The EIP-712 message for an authorization (ints for numbers, bytes for the nonce)."""
    return {
        "from": authorization["from"],
        "to": authorization["to"],
        "value": int(authorization["value"]),
        "validAfter": int(authorization["validAfter"]),
        "validBefore": int(authorization["validBefore"]),
        "nonce": bytes.fromhex(authorization["nonce"].removeprefix("0x")),
    }


def signable(network: Network, authorization: dict[str, Any]):
    return encode_typed_data(network.domain, TWA_TYPES, typed_message(authorization))


@dataclass(frozen=True)
class SignedPayment:
    #: the header's value, signature included: a bearer instrument, so never logged and kept
    #: out of the repr (a traceback's locals, a debug log)
    header: str = field(repr=False)
    amount: int
    pay_to: str
    nonce: str
    valid_before: int
    network: str
    #: where the payment goes: v2's `PAYMENT-SIGNATURE`, or v1's `X-PAYMENT` (x402 transports)
    header_name: str = SIGNATURE_HEADER

    @property
    def headers(self) -> dict[str, str]:
        return {self.header_name: self.header}


TWA_TYPEHASH = keccak(b"TransferWithAuthorization(address from,address to,uint256 value,"
                      b"uint256 validAfter,uint256 validBefore,bytes32 nonce)")


@functools.lru_cache(maxsize=8)
def domain_separator(network: Network) -> bytes:
    """The EIP-712 domain separator, computed by eth-account once per network."""
    return bytes(encode_typed_data(network.domain, TWA_TYPES, typed_message({
        "from": "0x" + "00" * 20, "to": "0x" + "00" * 20, "value": "0", "validAfter": "0",
        "validBefore": "0", "nonce": "0x" + "00" * 32})).header)


def digest(network: Network, authorization: dict[str, Any]) -> bytes:
    """The EIP-712 digest of one authorization.

    The type is fixed, so its struct hash is six 32-byte words; eth-account's generic encoder
    costs about four times as much per signature. Tests pin this against eth-account.
    """
    words = b"".join((
        TWA_TYPEHASH,
        bytes(12) + bytes.fromhex(authorization["from"][2:]),
        bytes(12) + bytes.fromhex(authorization["to"][2:]),
        int(authorization["value"]).to_bytes(32, "big"),
        int(authorization["validAfter"]).to_bytes(32, "big"),
        int(authorization["validBefore"]).to_bytes(32, "big"),
        bytes.fromhex(authorization["nonce"][2:]).rjust(32, b"\0"),
    ))
    return keccak(b"\x19\x01" + domain_separator(network) + keccak(words))


class Signer:
    """Holds the wallet key; signs one authorization per call with a fresh 32-byte nonce."""

    def __init__(self, private_key: str) -> None:
        self._account = Account.from_key(private_key)
        self._key = coincurve.PrivateKey(bytes.fromhex(private_key.removeprefix("0x")))

    @property
    def address(self) -> str:
        return self._account.address

    def sign_authorization(self, network: Network, authorization: dict[str, Any]) -> str:
        """Sign an authorization dict (x402 field names, decimal strings, 0x-hex nonce).

        libsecp256k1 (coincurve) gives low-s signatures; v is 27 or 28, as USDC requires.
        """
        signature = self._key.sign_recoverable(digest(network, authorization), hasher=None)
        return "0x" + signature[:64].hex() + format(signature[64] + 27, "02x")

    def authorize(self, network: Network, pay_to: str, amount: int, *, valid_for: int,
                  now: int | None = None) -> tuple[dict, str]:
        """Return (authorization, signature) for `amount` atomic USDC to `pay_to`."""
        now = int(time.time()) if now is None else now
        authorization = {
            "from": self.address,
            "to": pay_to,
            "value": str(amount),
            "validAfter": str(now - VALID_AFTER_SKEW),
            "validBefore": str(now + valid_for),
            "nonce": "0x" + secrets.token_bytes(32).hex(),
        }
        return authorization, self.sign_authorization(network, authorization)

    def pay(self, challenge: Challenge, requirement: Requirement, network: Network,
            resource_url: str) -> SignedPayment:
        """Build the `PAYMENT-SIGNATURE` header for an accepted requirement."""
        amount = int(requirement.amount)
        authorization, signature = self.authorize(
            network, requirement.pay_to, amount, valid_for=int(requirement.max_timeout_seconds))
        payload: dict[str, Any] = {"signature": signature, "authorization": authorization}
        if challenge.version >= 2:
            resource = challenge.resource or {}
            message: dict[str, Any] = {
                "x402Version": 2,
                "resource": resource if _same_origin(resource.get("url"), resource_url)
                else {"url": resource_url},
                "accepted": requirement.raw,
                "payload": payload,
            }
            if challenge.extensions:
                message["extensions"] = challenge.extensions
        else:
            message = {"x402Version": 1, "scheme": "exact", "network": requirement.network,
                       "payload": payload}
        return SignedPayment(b64_json(message), amount, requirement.pay_to,
                             authorization["nonce"], int(authorization["validBefore"]),
                             network.caip2,
                             SIGNATURE_HEADER if challenge.version >= 2 else V1_HEADER)


def _same_origin(url: Any, expected: str) -> bool:
    if not isinstance(url, str):
        return False
    from urllib.parse import urlsplit

    a, b = urlsplit(url), urlsplit(expected)
    return (a.scheme, a.netloc) == (b.scheme, b.netloc)
