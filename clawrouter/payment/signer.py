"""Sign x402 `exact` payments: an EIP-3009 `TransferWithAuthorization` for USDC.

The domain comes from our network table; `to` and `value` come from a requirement that
`policy.check` already accepted. Validity follows BlockRun's SDKs: from ten minutes ago (clock
skew) until `maxTimeoutSeconds` from now.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from eth_account import Account
from eth_account.messages import encode_typed_data

from clawrouter.payment.networks import Network
from clawrouter.payment.wire import Challenge, Requirement, b64_json

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


def typed_message(network: Network, authorization: dict[str, Any]) -> dict[str, Any]:
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
    return encode_typed_data(network.domain, TWA_TYPES, typed_message(network, authorization))


@dataclass(frozen=True)
class SignedPayment:
    header: str  # value of PAYMENT-SIGNATURE; a bearer instrument: never log it
    amount: int
    pay_to: str
    nonce: str
    valid_before: int
    network: str


class Signer:
    """Holds the wallet key; signs one authorization per call with a fresh 32-byte nonce."""

    def __init__(self, private_key: str) -> None:
        self._account = Account.from_key(private_key)

    @property
    def address(self) -> str:
        return self._account.address

    def sign_authorization(self, network: Network, authorization: dict[str, Any]) -> str:
        """Sign an authorization dict (x402 field names, decimal strings, 0x-hex nonce)."""
        signed = self._account.sign_message(signable(network, authorization))
        return "0x" + bytes(signed.signature).hex()

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
                             network.caip2)


def _same_origin(url: Any, expected: str) -> bool:
    if not isinstance(url, str):
        return False
    from urllib.parse import urlsplit

    a, b = urlsplit(url), urlsplit(expected)
    return (a.scheme, a.netloc) == (b.scheme, b.netloc)
