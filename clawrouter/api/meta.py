"""Free endpoints: health and the model list. None of them ever calls the paid upstream."""

from __future__ import annotations

import os
import time
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response

from clawrouter import __version__, catalog
from clawrouter.errors import InvalidRequest, ModelNotFound

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    """The gateway's state; without the API key (when one is set) only that it is up: the
    wallet, its balance and the upstream are for the key's holders."""
    gw = request.app.state.gw
    if getattr(request.state, "authorized", True) is False:
        return {"status": "ok", "version": __version__, "api_key": "required"}
    health = {"status": "ok", "wallet": gw.address, "upstream": gw.settings.upstream_url,
              "sandbox": gw.in_sandbox, "version": __version__, "network": gw.network.name,
              # random per process, and in its ledger's lock file: the terminal commands use
              # it to tell this data directory's gateway from another's at the same address
              "instance": gw.ledger.instance}
    if gw.balance is not None:  # cached, refreshed in the background: never on this path
        health.update(gw.balance.snapshot())
    return health


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


#: seconds `/readyz` says not ready after a ledger commit failed: long enough for a load
#: balancer to send work elsewhere, short enough that a gateway nobody sends work to recovers
LEDGER_RECOVERY = 30.0


@router.get("/readyz")
async def readyz(request: Request) -> Response:
    """Readiness: settings loaded, wallet loaded, store and ledger open, and no ledger commit
    failed in the last LEDGER_RECOVERY seconds (disk full or locked: no payment can be
    recorded, so none is made; after that, the next request tries again). Never calls
    upstream."""
    gw = request.app.state.gw
    images = gw.settings.images_dir
    failed_at = gw.ledger.failed_at
    checks = {"config": True, "wallet": bool(gw.address), "pipeline": gw.pipeline is not None,
              "store": images.is_dir() and os.access(images, os.W_OK),
              "ledger": gw.settings.ledger_path.is_file() and (
                  failed_at is None or time.time() - failed_at > LEDGER_RECOVERY)}
    ready = all(checks.values())
    return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks},
                        status_code=200 if ready else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(request.app.state.gw.metrics.render(),
                    media_type="text/plain; version=0.0.4; charset=utf-8")


def model_card(model: catalog.ImageModel) -> dict[str, Any]:
    return {
        "id": model.id,
        "object": "model",
        "created": 0,
        "owned_by": model.provider,
        "aliases": list(model.aliases),
        "sizes": list(model.sizes),
        # What BlockRun charges per image on Base (list price × 1.05), plus a fee per request.
        "prices": {size: round(price * catalog.BASE_MARKUP, 6)
                   for size, price in model.prices.items()},
        "fee_per_request": catalog.FEE_USD,
        "edits": model.edits,
        "max_input_images": model.max_images,
        "mask": model.mask,
        "status": model.status,
        "slow": model.slow,
        "note": model.note,
    }


@router.get("/v1/models")
@router.get("/models", include_in_schema=False)
async def models() -> dict[str, Any]:
    return {"object": "list", "data": [model_card(m) for m in catalog.MODELS]}


_NAME_MAX = 200  # characters of a model name looked up (and quoted back); ids are shorter


@router.get("/v1/models/{name:path}")
@router.get("/models/{name:path}", include_in_schema=False)
async def model(name: str) -> dict[str, Any]:
    """One model (`client.models.retrieve`), by id, alias or retired name; 404 otherwise
    (a dropped one too, saying what to use instead, and a name far longer than any model's,
    quoted only in part)."""
    try:
        return model_card(catalog.resolve(name[:_NAME_MAX]).model)
    except InvalidRequest as exc:
        if exc.code == "model_dropped":
            raise ModelNotFound(exc.message, param="model") from None
        raise


@router.get("/v1/spend")
async def spend(request: Request, latest: int = Query(20, ge=0, le=1000)) -> dict[str, Any]:
    """Every cent: today, this month, in total, by model and day, and the latest payments.
    Read apart from the ledger's writer (`Ledger.report`): the gallery asks after every image,
    and a report scanning months of rows must not hold up the next payment's record."""
    gw = request.app.state.gw
    summary = await gw.ledger.report(latest=latest)
    summary["budget"] = gw.budget.remaining()
    summary["wallet"] = gw.address
    summary["network"] = gw.network.name
    return summary
