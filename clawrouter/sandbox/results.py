"""The `data` items of a finished request (fresh PNGs as data URIs or media-store URLs), and
the response that carries them.

Like BlockRun: models flagged `data_uri_results` (and every google/* edit) answer with
`data:image/png;base64,…`; the others with a URL the sandbox itself serves.
"""

from __future__ import annotations

import base64
import json
import secrets
from typing import Any

from starlette.responses import Response

from clawrouter.sandbox.config import SandboxConfig
from clawrouter.sandbox.images import make_png, parse_size
from clawrouter.sandbox.media import MediaStore
from clawrouter.sandbox.validate import ImageRequest


def render(req: ImageRequest, config: SandboxConfig, media: MediaStore,
           base_url: str) -> list[dict[str, Any]]:
    width, height = parse_size(req.size)
    as_data_uri = (req.model.data_uri_results or not config.url_results
                   or (req.route == "image2image" and req.model.provider == "google"))
    items = []
    for _ in range(req.n):
        png = make_png(width, height, secrets.randbits(64), config.image_bytes)
        if as_data_uri:
            item: dict[str, Any] = {"url": "data:image/png;base64,"
                                    + base64.b64encode(png).decode("ascii")}
        else:
            item = {"url": f"{base_url.rstrip('/')}/api/media/{media.put(png)}",
                    "backed_up": True}
        if req.model.provider == "openai":
            item["revised_prompt"] = req.prompt
        items.append(item)
    return items


class ImagesResponse(Response):
    """`{…head, "data": [items]}` as JSON, splicing each `url` in as raw bytes.

    Our URLs (base64 data URIs, media links) never need JSON escaping, and skipping the encoder
    for multi-MB strings cuts the sandbox's CPU per data-URI image by about 40%.
    """

    media_type = "application/json"

    def __init__(self, head: dict[str, Any], items: list[dict[str, Any]],
                 status_code: int = 200, headers: dict[str, str] | None = None) -> None:
        super().__init__((head, items), status_code=status_code, headers=headers)

    def render(self, content: Any) -> bytes:
        head, items = content
        start = json.dumps(head, separators=(",", ":"))[:-1].encode()
        return b"".join((start, b',"data":[', b",".join(map(_item, items)), b"]}"))


def _item(item: dict[str, Any]) -> bytes:
    rest = {k: v for k, v in item.items() if k != "url"}
    extra = json.dumps(rest, separators=(",", ":"), ensure_ascii=False)[1:-1].encode()
    return b'{"url":"' + item["url"].encode("ascii") + (b'",' + extra if extra else b'"') + b"}"
