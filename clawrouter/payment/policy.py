"""Check a 402 challenge against our own tables before anything is signed.

The challenge is unauthenticated: anything on the path can rewrite it. We sign the cheapest
`exact` (EIP-3009) requirement on our network whose asset, EIP-712 domain, payee, amount and
timeout all pass (x402.md §10; of equally cheap ones, the first): a dearer option listed first
is not paid for coming first. If none passes, the challenge is refused, quoting the first one's
failure. The checks run on the requirement we will sign, not on a neighbour. (A challenge may
list several `exact` entries on one network, e.g. a Circle Gateway batching one first, with its
own domain and payee: that one is passed over, not a reason to refuse the standard one.)
"""

from __future__ import annotations

import re
from dataclasses import replace

from clawrouter.catalog import format_usd as usd
from clawrouter.errors import PaymentRefused
from clawrouter.payment.networks import Network, lookup
from clawrouter.payment.wire import Challenge, Requirement
from clawrouter.plaintext import one_line

MAX_TIMEOUT_SECONDS = 600
#: facilitators refuse an authorization whose validBefore is under 6 s away (three Base
#: blocks, x402.md §7): a shorter window is refused after it left, yet spendable until then
MIN_TIMEOUT_SECONDS = 6
_AMOUNT = re.compile(r"[0-9]{1,30}")
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


def refuse(check: str, message: str) -> PaymentRefused:
    """The refusal of a challenge that failed `check`; its message quotes the challenge's
    own words, so it is made plain, bounded text (`plaintext`)."""
    return PaymentRefused(f"Payment refused, nothing was signed: {one_line(message, 600)}",
                          extra={"check": check})


def select(challenge: Challenge, *, network: Network, pay_to: str, ceiling: int, cap: int,
           max_timeout: int = MAX_TIMEOUT_SECONDS) -> Requirement:
    """Return the requirement we may sign, or raise `PaymentRefused` naming the failed check."""
    exact = [r for r in challenge.requirements if r.scheme == "exact"
             and r.extra.get("assetTransferMethod", "eip3009") == "eip3009"]
    if not exact:
        schemes = ", ".join(sorted({_method(r) for r in challenge.requirements}))
        raise refuse("scheme", f"the upstream asked for scheme {schemes}; only 'exact' "
                               "(EIP-3009) is signed.")
    ours = [r for r in exact if lookup(r.network) == network]
    if not ours:
        asked = ", ".join(sorted({r.network or "?" for r in exact}))
        raise refuse("network", f"the upstream asked to pay on {asked}; this gateway pays on "
                                f"{network.name} ({network.caip2}) only.")
    passed: list[Requirement] = []
    refusals: list[PaymentRefused] = []
    for req in ours:
        try:
            passed.append(_checked(req, network=network, pay_to=pay_to, ceiling=ceiling,
                                   cap=cap, max_timeout=max_timeout))
        except PaymentRefused as refusal:
            refusals.append(refusal)
    if not passed:
        raise refusals[0]
    return min(passed, key=lambda req: int(req.amount))  # (min keeps the first of a tie)


def _checked(req: Requirement, *, network: Network, pay_to: str, ceiling: int, cap: int,
             max_timeout: int) -> Requirement:
    """`req` if every check passes, else `PaymentRefused` naming the first that fails."""
    if req.asset.lower() != network.usdc.lower():
        raise refuse("asset", f"asset {req.asset!r} is not USDC on {network.name} "
                              f"({network.usdc}).")
    domain = (req.extra.get("name"), req.extra.get("version"))
    if domain != (network.domain_name, network.domain_version):
        # We sign with our table's domain whatever it says; a facilitator verifies with its
        # `extra`, so a payment signed here would be refused, yet spendable until it expires.
        raise refuse("domain", f"the EIP-712 domain {domain!r} (extra.name, extra.version) is "
                               f"not USDC's on {network.name} ({network.domain_name!r}, "
                               f"{network.domain_version!r}).")
    if not _ADDRESS.fullmatch(req.pay_to) or req.pay_to.lower() != pay_to.lower():
        raise refuse("payee", f"payee {req.pay_to!r} is not the configured BlockRun payee "
                              f"{pay_to}.")
    if not _AMOUNT.fullmatch(req.amount) or int(req.amount) <= 0:
        raise refuse("amount", f"amount {req.amount!r} is not a positive whole number of "
                               "atomic USDC.")
    amount = int(req.amount)
    if amount > cap:
        raise refuse("amount", f"{usd(amount)} is above the per-request cap of {usd(cap)} "
                               "(CLAWROUTER_MAX_USD_PER_REQUEST).")
    if amount > ceiling:
        raise refuse("amount", f"{usd(amount)} is above the most this image should cost "
                               f"({usd(ceiling)}: the catalog price × the tolerance, plus "
                               "the fee).")
    timeout = req.max_timeout_seconds
    if not isinstance(timeout, int) or isinstance(timeout, bool) \
            or not MIN_TIMEOUT_SECONDS <= timeout <= max_timeout:
        raise refuse("timeout", f"maxTimeoutSeconds {timeout!r} is outside "
                                f"{MIN_TIMEOUT_SECONDS}..{max_timeout}; a longer-lived "
                                "authorization is not signed, nor one a facilitator would "
                                "refuse as already expiring.")
    return req


def _method(req: Requirement) -> str:
    method = req.extra.get("assetTransferMethod")
    return f"{req.scheme or '?'} ({method})" if method else req.scheme or "?"


def outliving(req: Requirement, seconds: int, max_timeout: int) -> Requirement:
    """`req` with an authorization valid for at least `seconds` (never above `max_timeout`).

    A slow job settles on the poll that completes it, which USDC accepts only before
    validBefore: an authorization that expires while the job runs pays nothing and delivers
    nothing. BlockRun's own clients raise `maxTimeoutSeconds` in `accepted` for video jobs (its
    Go SDK to 600 s, `video.go`), not for images; `max_timeout_seconds = 300` turns it off.
    """
    want = min(max(req.max_timeout_seconds, seconds), max_timeout)
    if want == req.max_timeout_seconds:
        return req
    return replace(req, max_timeout_seconds=want, raw={**req.raw, "maxTimeoutSeconds": want})
