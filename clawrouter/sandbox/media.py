"""The sandbox's image host: the last few thousand result PNGs, in memory, served like a CDN.

BlockRun answers most models with an https URL to its own mirror; the sandbox answers with a
URL to itself so clients exercise the same download path. Old images fall out (LRU by age).
"""

from __future__ import annotations

import secrets
from collections import OrderedDict

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

MAX_IMAGES = 2_000


class MediaStore:
    def __init__(self, limit: int = MAX_IMAGES) -> None:
        self.limit = limit
        self._images: OrderedDict[str, bytes] = OrderedDict()

    def put(self, png: bytes) -> str:
        """Keep a PNG; return its file name."""
        name = f"img_{secrets.token_hex(12)}.png"
        self._images[name] = png
        while len(self._images) > self.limit:
            self._images.popitem(last=False)
        return name

    def get(self, name: str) -> bytes | None:
        return self._images.get(name)

    def __len__(self) -> int:
        return len(self._images)


def serve(store: MediaStore, request: Request) -> Response:
    """GET/HEAD one stored image, with an ETag (names are unique, so content never changes)."""
    name = request.path_params["name"]
    png = store.get(name)
    if png is None:
        return JSONResponse({"error": "Not found"}, status_code=404)
    etag = f'"{name}"'
    headers = {"ETag": etag, "Cache-Control": "public, max-age=31536000, immutable"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(png, media_type="image/png", headers=headers)
