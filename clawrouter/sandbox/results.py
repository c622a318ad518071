"""The `data` items of a finished request: fresh PNGs as data URIs or as media-store URLs.

Like BlockRun: models flagged `data_uri_results` (and every google/* edit) answer with
`data:image/png;base64,…`; the others with a URL the sandbox itself serves.
"""

from __future__ import annotations

import base64
import secrets
from typing import Any

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
