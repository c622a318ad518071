"""The gallery: `GET /` serves a small offline page (no CDN, no build step) and
`GET /v1/images` lists recent images with their metadata for it (and for scripts)."""

from __future__ import annotations

from importlib import resources
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, Response

from clawrouter.api.images import base_url
from clawrouter.catalog import to_usd
from clawrouter.store.links import image_url

router = APIRouter()
MAX_OFFSET = 2**62  # SQLite integers are 64-bit; a larger OFFSET raised instead of listing nothing
PUBLIC_FIELDS = ("name", "model", "prompt", "size", "created", "cost_micro", "bytes",
                 "content_type", "request_id")


@router.get("/", include_in_schema=False)
async def page() -> Response:
    html = resources.files("clawrouter.static").joinpath("index.html").read_text()
    # Never framed: a page that can spend money must not be clickjacked from another site.
    return HTMLResponse(html, headers={"cache-control": "no-cache",
                                       "x-content-type-options": "nosniff",
                                       "x-frame-options": "DENY",
                                       "content-security-policy": "frame-ancestors 'none'"})


@router.get("/static/{name}", include_in_schema=False)
async def static(name: str) -> Response:
    """The page's own CSS and JS (a fixed allowlist: no path is built from the request)."""
    kinds = {"gallery.css": "text/css", "gallery.js": "text/javascript"}
    if name not in kinds:
        from clawrouter.errors import RouteNotFound

        raise RouteNotFound(f"No static file {name!r}.")
    body = resources.files("clawrouter.static").joinpath(name).read_bytes()
    return Response(body, media_type=kinds[name], headers={"cache-control": "no-cache"})


@router.get("/v1/images")
async def list_images(request: Request, limit: int = Query(50, ge=1, le=500),
                      offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> dict[str, Any]:
    gw = request.app.state.gw
    rows = await gw.store.ls(limit, offset)
    base = base_url(request)
    data = []
    for row in rows:
        item = {k: row.get(k) for k in PUBLIC_FIELDS}
        item["url"] = image_url(base, row["name"])
        item["cost_usd"] = to_usd(row.get("cost_micro") or 0)
        data.append(item)
    return {"object": "list", "data": data, "limit": limit, "offset": offset}
