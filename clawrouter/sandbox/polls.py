"""Polling an async job: wallet-bound, in progress until ready, settled on the first completion."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from clawrouter.sandbox import wire
from clawrouter.sandbox.answers import interrupt, reject, reject_by_rule
from clawrouter.sandbox.jobs import Job
from clawrouter.sandbox.results import ImagesResponse, render
from clawrouter.sandbox.routes import payment_header, sandbox_of
from clawrouter.sandbox.state import Sandbox
from clawrouter.sandbox.verify import PaymentInvalid, decode_payment, payer_of, recover


async def poll(request: Request) -> Response:
    sandbox = sandbox_of(request)
    job = sandbox.jobs.get(request.path_params["job_id"])
    sandbox.stats.request(job.request.route if job else "generations", "poll")
    if job is None:
        return JSONResponse({"error": "Job not found"}, status_code=404)
    req = job.request
    header = payment_header(request)
    if header is None:
        sandbox.stats.reject("PAYMENT_REQUIRED", "missing_payment", "poll without payment",
                             req.route)
        return JSONResponse({"error": "Payment Required",
                             "message": "Polling a job requires the PAYMENT-SIGNATURE of the "
                                        "payment that created it.", "job_id": job.id},
                            status_code=402)
    rule = sandbox.fire("reject", "poll", req)
    if rule is not None:
        return reject_by_rule(sandbox, req, rule, header, job.amount)
    try:
        _check_wallet(header, job, sandbox)
    except PaymentInvalid as exc:
        return reject(sandbox, req.route, "PAYMENT_INVALID", exc.reason, exc.message, exc.payer)

    early = await interrupt(sandbox, "poll", req, job=job)
    if early is not None:
        return early
    status = job.status(sandbox.now())
    if status == "in_progress":
        return JSONResponse(job.body(status), status_code=202)
    if status == "failed":
        return JSONResponse(job.body(status))
    return _complete(sandbox, job)


def _complete(sandbox: Sandbox, job: Job) -> Response:
    """The first completed poll settles; later ones repeat the same answer."""
    if job.transaction is None:
        if sandbox.now() >= job.valid_before:  # USDC: valid only while now < validBefore
            sandbox.stats.reject("SETTLEMENT_FAILED", "transaction_simulation_failed",
                                 "authorization expired before settlement", job.request.route)
            return JSONResponse({"error": "Payment settlement failed",
                                 "details": "transaction_simulation_failed"}, status_code=402)
        job.result = render(job.request, sandbox.config, sandbox.media, job.base_url)
        job.transaction = sandbox.settle(job.request, job.payer, job.nonce, job.amount, job.id)
    return ImagesResponse(job.body("completed"), job.result or [],
                          headers={wire.POLL_RECEIPT_HEADER: job.transaction})


def _check_wallet(header: str, job: Job, sandbox: Sandbox) -> None:
    """BlockRun binds polls to the paying wallet (not to the exact signature)."""
    payment = decode_payment(header)
    payer = payer_of(payment)
    if payer is None or payer.lower() != job.payer.lower():
        raise PaymentInvalid("payer_mismatch", f"job {job.id} was paid by another wallet", payer)
    payload = payment["payload"]
    if recover(payload["authorization"], payload.get("signature"),
               sandbox.config.chain).lower() != payer.lower():
        raise PaymentInvalid("invalid_exact_evm_payload_signature",
                             "signature does not recover to the job's payer", payer)
    if str(payload["authorization"].get("nonce", "")).lower() != job.nonce:
        # Accepted, as BlockRun does; counted, so tests can tell a client that signs afresh
        # for each poll (a fresh authorization is spendable money) from one that re-sends.
        sandbox.stats.polls_with_another_authorization += 1


