"""Answers other than the happy path, shared by paid requests and polls.

Fault-driven interruptions (delay, drop, respond) and 402 payment rejections in BlockRun's shape.
"""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.responses import JSONResponse, Response

from clawrouter.sandbox import wire
from clawrouter.sandbox.faults import Rule
from clawrouter.sandbox.jobs import Job
from clawrouter.sandbox.middleware import DropConnection
from clawrouter.sandbox.state import Sandbox
from clawrouter.sandbox.validate import ImageRequest
from clawrouter.sandbox.verify import PaymentInvalid, Verified, decode_payment, payer_of


async def interrupt(sandbox: Sandbox, phase: str, req: ImageRequest,
                    verified: Verified | None = None, job: Job | None = None) -> Response | None:
    """Delay, drop and respond faults; a response here replaces the normal answer."""
    rule = sandbox.fire("delay", phase, req)
    if rule is not None:
        await asyncio.sleep(rule.params["seconds"])
    for kind in ("drop", "respond"):
        rule = sandbox.fire(kind, phase, req)
        if rule is None:
            continue
        receipt = _settle_for_fault(sandbox, req, rule, verified, job)
        if kind == "drop":
            return DropConnection()
        return _fault_response(rule, receipt)
    return None


def _settle_for_fault(sandbox: Sandbox, req: ImageRequest, rule: Rule,
                      verified: Verified | None, job: Job | None) -> dict[str, str]:
    """`settle: true` on a paid/poll fault: count the payment as settled; return receipt headers."""
    if not rule.params.get("settle"):
        return {}
    chain = sandbox.config.chain
    if verified is not None:
        tx = sandbox.settle(req, verified.payer, verified.nonce, verified.amount)
        return {wire.RECEIPT_HEADER: wire.receipt(tx, chain, verified.payer, verified.amount)}
    if job is not None:
        if job.transaction is None:
            job.transaction = sandbox.settle(req, job.payer, job.nonce, job.amount, job.id)
        return {wire.POLL_RECEIPT_HEADER: job.transaction}
    return {}


def _fault_response(rule: Rule, receipt: dict[str, str]) -> Response:
    params = rule.params
    headers = {**params.get("headers", {}), **receipt}
    body = params.get("body")
    if isinstance(body, str):
        return Response(body, status_code=params["status"], headers=headers,
                        media_type=params.get("content_type", "text/plain"))
    if body is None:
        return Response(b"", status_code=params["status"], headers=headers,
                        media_type=params.get("content_type"))
    response = JSONResponse(body, status_code=params["status"], headers=headers)
    if "content_type" in params:
        response.headers["content-type"] = params["content_type"]
    return response


def reject_by_rule(sandbox: Sandbox, req: ImageRequest, rule: Rule, header: str,
                   amount: int) -> Response:
    code = rule.params.get("code", "PAYMENT_INVALID")
    reason = rule.params.get("reason", wire.DEFAULT_REASONS.get(code, "invalid_payload"))
    default = (f"insufficient balance: 0 < {amount}" if code == "PAYMENT_UNFUNDED"
               else "payment rejected (sandbox fault)")
    try:
        payer = payer_of(decode_payment(header))
    except PaymentInvalid:
        payer = None
    return reject(sandbox, req.route, code, reason, rule.params.get("message", default), payer)


def reject(sandbox: Sandbox, route: str, code: str, reason: str, message: str,
           payer: str | None, **extra: Any) -> Response:
    sandbox.stats.reject(code, reason, message, route)
    return JSONResponse(wire.rejection(code, reason, message, payer, **extra), status_code=402)


