"""What the sandbox puts on the x402 wire: challenges, rejections and settlement receipts.

Shapes copy BlockRun (blockrun-api.md §6, x402.md §3 and §7): a v2 `PAYMENT-REQUIRED` header
with a small JSON body, `402 {"error":"Payment verification failed","details":…,"code":…}` for
refused payments, and a base64 `SettleResponse` in `PAYMENT-RESPONSE`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from clawrouter.catalog import FEE_USD, MICRO, to_micro
from clawrouter.payment.networks import Network
from clawrouter.payment.wire import b64_json

REQUIRED_HEADER = "PAYMENT-REQUIRED"
RECEIPT_HEADER = "PAYMENT-RESPONSE"
POLL_RECEIPT_HEADER = "x-payment-receipt"

#: invalidReason for a `reject` fault that names only a code
DEFAULT_REASONS = {
    "PAYMENT_INVALID": "invalid_payload",
    "PAYMENT_UNFUNDED": "insufficient_funds",
    "PAYMENT_REPLAY": "invalid_exact_evm_nonce_already_used",
}


def challenge(requirement: dict[str, Any], network: Network, url: str, description: str,
              tamper: dict[str, Any] | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    """(headers, body) of a 402 for `requirement`, optionally tampered (a `challenge` fault)."""
    tamper = tamper or {}
    if tamper.get("v1"):
        entry = {"scheme": requirement["scheme"], "network": network.name,
                 "maxAmountRequired": requirement["amount"], "resource": url,
                 "description": description, "mimeType": "application/json",
                 "payTo": requirement["payTo"],
                 "maxTimeoutSeconds": requirement["maxTimeoutSeconds"],
                 "asset": requirement["asset"], "extra": requirement["extra"]}
        return {}, {"x402Version": 1, "error": "Payment Required",
                    "accepts": _accepts(entry, tamper)}
    required = {
        "x402Version": 2,
        "error": "Payment Required",
        "resource": {"url": url, "description": description, "mimeType": "application/json"},
        "accepts": _accepts(requirement, tamper),
    }
    header = tamper["header"] if "header" in tamper else b64_json(required)
    return {REQUIRED_HEADER: header}, price_body(int(requirement["amount"]))


def price_body(amount: int) -> dict[str, Any]:
    """BlockRun's 402 body: the price without the flat fee (never what gets charged)."""
    base = max(0, amount - to_micro(FEE_USD))
    return {"error": "Payment Required",
            "price": {"amount": _usd(base), "currency": "USD"}}


def rejection(code: str, reason: str, message: str, payer: str | None,
              **extra: Any) -> dict[str, Any]:
    """BlockRun's body for a refused payment, with a VerifyResponse inside `details`."""
    verify: dict[str, Any] = {"isValid": False, "invalidReason": reason,
                              "invalidMessage": message}
    if payer:
        verify["payer"] = payer
    return {"error": "Payment verification failed",
            "details": f"Verification failed: {json.dumps(verify)}\n", "code": code, **extra}


def transaction_hash(payer: str, nonce: str) -> str:
    """A stand-in tx hash, stable per authorization (a real one would be, too)."""
    return "0x" + hashlib.sha256(f"{payer.lower()}:{nonce.lower()}".encode()).hexdigest()


def receipt(transaction: str, network: Network, payer: str, amount: int) -> str:
    """The `PAYMENT-RESPONSE` value (BlockRun hard-codes success: true)."""
    return b64_json({"success": True, "transaction": transaction, "network": network.caip2,
                     "payer": payer, "amount": str(amount)})


def _accepts(entry: dict[str, Any], tamper: dict[str, Any]) -> list[dict[str, Any]]:
    first = {**entry, **tamper.get("override", {})}
    return ([{**entry, **extra} for extra in tamper.get("prepend", [])] + [first]
            + [{**entry, **extra} for extra in tamper.get("append", [])])


def _usd(micro: int) -> str:
    whole, frac = divmod(micro, MICRO)
    return f"{whole}.{frac:06d}".rstrip("0").rstrip(".") if frac else str(whole)
