"""The control API for tests and benchmarks (not under /api, never part of BlockRun's surface).

GET  /_sandbox/stats   what was received, paid, settled and rejected
POST /_sandbox/reset   forget stats, jobs, faults, used authorizations and the chain
GET|POST /_sandbox/faults  show / replace the fault rules (faults.py)
GET|POST /_sandbox/config  show / change runtime settings (latency_ms, slow_seconds, …)
POST /_sandbox/rpc     JSON-RPC for the stand-in chain: balances, used authorizations (chain.py)
GET  /_sandbox/redirect?to=URL  a 302 to URL (a result URL that leaves the upstream's host)
"""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response

from clawrouter.sandbox.state import Sandbox


async def stats(request: Request) -> Response:
    sandbox = _sandbox(request)
    now = sandbox.now()
    return JSONResponse({**sandbox.stats.snapshot(),
                         "jobs": [job.summary(now) for job in sandbox.jobs],
                         "faults": sandbox.faults.public()})


async def reset(request: Request) -> Response:
    _sandbox(request).reset()
    return JSONResponse({"ok": True})


async def faults(request: Request) -> Response:
    sandbox = _sandbox(request)
    if request.method == "POST":
        try:
            sandbox.faults.install(await _json(request))
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
    return JSONResponse({"rules": sandbox.faults.public()})


async def config(request: Request) -> Response:
    sandbox = _sandbox(request)
    if request.method == "POST":
        changes = await _json(request)
        try:
            if not isinstance(changes, dict):
                raise ValueError("send a JSON object of settings")
            sandbox.config.update(changes)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
    return JSONResponse(sandbox.config.public())


async def redirect(request: Request) -> Response:
    target = request.query_params.get("to", "")
    if not target.startswith(("http://", "https://")):
        return JSONResponse({"error": "to= must be an http(s) URL"}, status_code=400)
    return RedirectResponse(target, status_code=302)


async def health(request: Request) -> Response:
    config = _sandbox(request).config
    return JSONResponse({"status": "ok", "sandbox": True, "network": config.network,
                         "caip2": config.chain.caip2, "pay_to": config.pay_to})


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError:
        raise ValueError("body is not JSON") from None


def _sandbox(request: Request) -> Sandbox:
    return request.app.state.sandbox
