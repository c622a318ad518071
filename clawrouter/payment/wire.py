"""x402 wire format: parse 402 challenges, encode payment headers, read settlement receipts.

Encode strictly (standard base64 of compact UTF-8 JSON); decode leniently (base64url, missing
padding). v2 challenges arrive in the `PAYMENT-REQUIRED` header; a v1 JSON body is accepted too.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
import re
from typing import Any

REQUIRED_HEADER = "payment-required"
SIGNATURE_HEADER = "PAYMENT-SIGNATURE"
V1_HEADER = "X-PAYMENT"  # where x402 v1 sends a payment
RECEIPT_HEADERS = ("payment-response", "x-payment-response", "x-payment-receipt")


class ChallengeError(ValueError):
    """A 402 whose challenge cannot be read."""


@dataclass(frozen=True)
class Requirement:
    """One `accepts[]` entry, normalised across v1 and v2."""

    scheme: str
    network: str
    amount: str  # atomic units, as sent (validated by policy, not here)
    asset: str
    pay_to: str
    max_timeout_seconds: Any
    extra: dict[str, Any]
    raw: dict[str, Any]  # echoed back unchanged as `accepted` (v2)


@dataclass(frozen=True)
class Challenge:
    version: int
    requirements: list[Requirement]
    resource: dict[str, Any] | None = None
    extensions: dict[str, Any] = field(default_factory=dict)


def b64_json(value: Any) -> str:
    return base64.b64encode(json.dumps(value, separators=(",", ":")).encode()).decode("ascii")


def decode_b64_json(text: str) -> Any:
    text = text.strip()
    text += "=" * (-len(text) % 4)
    try:
        raw = base64.b64decode(text.replace("-", "+").replace("_", "/"), validate=True)
        return json.loads(raw)
    except (binascii.Error, ValueError, RecursionError) as exc:  # too deep: RecursionError
        raise ChallengeError(f"not base64 JSON: {exc}") from None


def _requirement(entry: Any, version: int) -> Requirement:
    if not isinstance(entry, dict):
        raise ChallengeError("accepts[] entry is not an object")
    amount = entry.get("amount" if version >= 2 else "maxAmountRequired", entry.get("amount"))
    extra = entry.get("extra") or {}
    return Requirement(
        scheme=str(entry.get("scheme", "")),
        network=str(entry.get("network", "")),
        amount=str(amount) if amount is not None else "",
        asset=str(entry.get("asset", "")),
        pay_to=str(entry.get("payTo", "")),
        max_timeout_seconds=entry.get("maxTimeoutSeconds"),
        extra=extra if isinstance(extra, dict) else {},
        raw=entry,
    )


def parse_challenge(headers: Mapping[str, str], body: bytes) -> Challenge:
    """Read a 402 challenge: the v2 header first, else a v1 (or BlockRun legacy) JSON body."""
    header = headers.get(REQUIRED_HEADER) or headers.get(REQUIRED_HEADER.upper())
    if header:
        data = decode_b64_json(header)
    else:
        try:
            data = json.loads(body or b"null")
        except (ValueError, RecursionError):
            raise ChallengeError("402 without a PAYMENT-REQUIRED header or JSON body") from None
        if isinstance(data, dict) and isinstance(data.get("x402"), dict):
            data = data["x402"]
        if not (isinstance(data, dict) and (data.get("x402Version") == 1 or "accepts" in data)):
            raise ChallengeError("402 without a PAYMENT-REQUIRED header or v1 body")
    if not isinstance(data, dict):
        raise ChallengeError("challenge is not a JSON object")
    version = data.get("x402Version", 1 if not header else 2)
    if type(version) is not int or version not in (1, 2):  # JSON true == 1 and 2.0 == 2 in Python
        raise ChallengeError(f"unsupported x402Version {version!r}")
    accepts = data.get("accepts")
    if not isinstance(accepts, list) or not accepts:
        raise ChallengeError("challenge lists no payment requirements")
    resource = data.get("resource")
    return Challenge(
        version=version,
        requirements=[_requirement(entry, version) for entry in accepts],
        resource=resource if isinstance(resource, dict) else None,
        extensions=data.get("extensions") if isinstance(data.get("extensions"), dict) else {},
    )


_TX_HASH = re.compile(r"0x[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class Receipt:
    transaction: str | None
    network: str | None = None
    amount: str | None = None
    success: bool | None = None  # as the receipt says it; None for a bare hash, or unsaid

    @property
    def settled(self) -> bool:
        """Proof that the payment moved, even on a failed answer: a transaction hash, from a
        receipt that does not say the settlement failed (a reverted one has a hash too)."""
        return self.transaction is not None and self.success is not False


def read_receipt(headers: Mapping[str, str]) -> Receipt | None:
    """Settlement evidence from `PAYMENT-RESPONSE`, `X-PAYMENT-RESPONSE` or `X-Payment-Receipt`."""
    lowered = {k.lower(): v for k, v in headers.items()}
    found: Receipt | None = None
    for name in RECEIPT_HEADERS[:2]:
        if lowered.get(name):
            try:
                data = decode_b64_json(lowered[name])
            except ChallengeError:
                continue
            if isinstance(data, dict):
                tx = data.get("transaction") or data.get("txHash") or None
                success = data.get("success")
                success = success if isinstance(success, bool) else None
                found = found or Receipt(None, data.get("network"), data.get("amount"), success)
                if _transaction(tx):  # else the next header may still name the transaction
                    return replace(found, transaction=tx, success=success)
    bare = lowered.get("x-payment-receipt")
    if bare and _transaction(bare.strip()):
        return replace(found or Receipt(None), transaction=bare.strip())
    return found or (Receipt(None) if bare else None)


def _transaction(value: object) -> str | None:
    """A transaction hash, or None for anything else: the value goes into the ledger and a
    response header, where a malformed one would fail a request whose payment settled."""
    return value if isinstance(value, str) and _TX_HASH.fullmatch(value) else None
