"""Inputs: turn image inputs (URL, local path, data URI, base64, upload) into checked images.

The policy, briefly: bytes must sniff as PNG/JPEG/WEBP/GIF and fit `max_bytes` (checked while
reading); URLs may reach only public addresses, pinned at connect time, each redirect re-checked;
local paths only inside the allowed roots, never hidden files, never the gateway's data dir.
Every refusal is an `InvalidRequest` with a distinct `code` (see `refusals.py`).

Modules: `policy` (limits), `forms` (which form a string is), `urls` + `dns` + `addresses`
(fetching), `paths` (local files), `encoded` (data URIs and base64), `image` (the final check),
`resolver` (the entry point), `budget` (the bytes of URL and path inputs held at once).
"""

from .image import ImageInput
from .policy import InputPolicy
from .resolver import InputResolver, Pending

__all__ = ["ImageInput", "InputPolicy", "InputResolver", "Pending"]
