"""BlockRun's image routes: validate, then a 402 challenge (unpaid) or verify and answer (paid).

A paid request answers 200 with a receipt, or 202 with a job for slow models (polls.py).
Faults (faults.py) are consulted at fixed points, in this order: reject (paid: before
verifying), delay, drop, respond, then challenge (unpaid) or job (paid).
"""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from clawrouter.catalog import BASE_MARKUP, FEE_USD, MODELS, ImageModel
from clawrouter.sandbox import wire
from clawrouter.sandbox.answers import interrupt, reject, reject_by_rule
from clawrouter.sandbox.datauri import DataUris
from clawrouter.sandbox.faults import Rule
from clawrouter.sandbox.jobs import DEFAULT_ERROR, Job, poll_path
from clawrouter.sandbox.media import serve
from clawrouter.sandbox.middleware import DropConnection
from clawrouter.sandbox.results import ImagesResponse, render
from clawrouter.sandbox.state import Sandbox
from clawrouter.sandbox.validate import BadRequest, ImageRequest, Route, validate
from clawrouter.sandbox.verify import (
    PaymentInvalid, Verified, decode_payment, payer_of, verify_payment,
)

PAYMENT_HEADERS = ("payment-signature", "x-payment")


async def generations(request: Request) -> Response:
    return await _image(request, "generations")


async def image2image(request: Request) -> Response:
    return await _image(request, "image2image")


async def models(request: Request) -> Response:
    sandbox_of(request).stats.request("models", "free")
    return JSONResponse({"object": "list", "data": [_model_row(m) for m in MODELS]})


async def media(request: Request) -> Response:
    sandbox = sandbox_of(request)
    sandbox.stats.request("media", "get")
    return serve(sandbox.media, request)


async def _image(request: Request, route: Route) -> Response:
    sandbox = sandbox_of(request)
    raw = await request.body()
    uris = DataUris()
    try:
        body: Any = json.loads(raw)
        sandbox.stats.bodies.append(uris.redact(body))
    except ValueError:
        body = None
        sandbox.stats.bodies.append({"invalid_json": True, "bytes": len(raw)})
    header = payment_header(request)
    try:
        req = validate(body, route, uris)
    except BadRequest as exc:
        sandbox.stats.request(route, "invalid")
        return JSONResponse(exc.envelope(), status_code=400)
    sandbox.stats.request(route, "unpaid" if header is None else "paid")
    if header is None:
        return await _unpaid(request, sandbox, req)
    return await _paid(request, sandbox, req, header)


async def _unpaid(request: Request, sandbox: Sandbox, req: ImageRequest) -> Response:
    early = await interrupt(sandbox, "unpaid", req)
    if early is not None:
        return early
    tamper = sandbox.fire("challenge", "unpaid", req)
    headers, body = wire.challenge(
        sandbox.requirement(req), sandbox.config.chain, str(request.url),
        f"{req.model.id}: {req.n} image(s) at {req.size}", tamper.params if tamper else None)
    return JSONResponse(body, status_code=402, headers=headers)


async def _paid(request: Request, sandbox: Sandbox, req: ImageRequest,
                header: str) -> Response:
    config = sandbox.config
    expected = sandbox.requirement(req)
    rule = sandbox.fire("reject", "paid", req)
    if rule is not None:
        return reject_by_rule(sandbox, req, rule, header, int(expected["amount"]))
    now = int(sandbox.now())
    try:
        payment = decode_payment(header)
        if config.accept_v1:  # (else a v1 payment is refused for its version)
            _check_transport(request, payment)
        verified = verify_payment(payment, expected, config.chain, now,
                                  max_accepted_timeout=config.max_accepted_timeout_seconds,
                                  accept_v1=config.accept_v1)
    except PaymentInvalid as exc:
        return reject(sandbox, req.route, "PAYMENT_INVALID", exc.reason, exc.message, exc.payer)
    if verified.replay_key in sandbox.used:
        job_id = sandbox.used.job_of(verified.replay_key)
        extra = {"job_id": job_id, "poll_url": poll_path(job_id)} if job_id else {}
        return reject(sandbox, req.route, "PAYMENT_REPLAY", "invalid_exact_evm_nonce_already_used",
                      "this authorization was already used", verified.payer, **extra)
    sandbox.used.add(verified, now)
    spend_cpu(config.verify_cpu_ms)
    sandbox.stats.payment({"amount": verified.amount, "payer": verified.payer,
                           "nonce": verified.nonce, "route": req.route, "model": req.model.id,
                           "size": req.size, "n": req.n,
                           "valid_before": verified.valid_before})

    early = await interrupt(sandbox, "paid", req, verified)
    if early is not None:
        return early
    job_rule = sandbox.fire("job", "paid", req)
    if job_rule is not None or req.model.slow:
        return _start_job(request, sandbox, req, verified, job_rule)
    data = render(req, config, sandbox.media, str(request.base_url))
    transaction = sandbox.settle(req, verified.payer, verified.nonce, verified.amount)
    return ImagesResponse(
        {"created": int(sandbox.now())}, data,
        headers={wire.RECEIPT_HEADER: wire.receipt(transaction, config.chain, verified.payer,
                                                   verified.amount)})


def _check_transport(request: Request, payment: dict[str, Any]) -> None:
    """x402's HTTP transports: v1 pays in `X-PAYMENT`, and a v1 server reads nothing else;
    v2 in `PAYMENT-SIGNATURE`, though x402's v2 servers read `X-PAYMENT` too (so do polls
    here: BlockRun's TS SDK sends both)."""
    if payment.get("x402Version") == 1 and not request.headers.get("x-payment"):
        raise PaymentInvalid("invalid_payload", "an x402 v1 payment goes in the X-PAYMENT "
                             "header", payer_of(payment))


def _start_job(request: Request, sandbox: Sandbox, req: ImageRequest, verified: Verified,
               rule: Rule | None) -> Response:
    now = sandbox.now()
    params = rule.params if rule else {}
    job = Job(req, verified.payer, verified.nonce, verified.amount, verified.valid_before,
              created=now, ready_at=now + sandbox.config.slow_seconds,
              outcome=params.get("outcome", "completed"), error=params.get("error", DEFAULT_ERROR),
              base_url=str(request.base_url))
    sandbox.jobs.add(job)
    sandbox.used.add(verified, int(now), job.id)
    if params.get("lost"):
        return DropConnection()
    return JSONResponse(job.body("queued"), status_code=202)


def spend_cpu(ms: float) -> None:
    """Burn `ms` of this thread's CPU (`verify_cpu_ms`), as heavier verification would."""
    until = time.thread_time() + ms / 1000
    while time.thread_time() < until:
        pass


def payment_header(request: Request) -> str | None:
    for name in PAYMENT_HEADERS:
        value = request.headers.get(name)
        if value:
            return value
    return None


def _model_row(model: ImageModel) -> dict[str, Any]:
    return {"id": model.id, "object": "model", "owned_by": model.provider,
            "categories": ["image"], "billing_mode": "per_image",
            "pricing": {"per_image": round(min(model.prices.values()) * BASE_MARKUP, 6),
                        "transaction_fee": FEE_USD},
            "supported_sizes": list(model.sizes), "available": True}


def sandbox_of(request: Request) -> Sandbox:
    return request.app.state.sandbox
