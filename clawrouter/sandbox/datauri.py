"""Data URIs in request bodies: decode once, check, and describe without keeping the bytes.

Validation and the stats recorder both need each image of a body; `DataUris` memoises the
decoded form per string for one request so a multi-MB image is decoded and hashed once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from clawrouter.sniff import sniff_image

_DATA_URI = re.compile(r"^data:([^;,]*)((?:;[^;,]*)*),", re.IGNORECASE)


@dataclass(frozen=True)
class DataUri:
    mime: str  # as declared, lower-case
    data: bytes | None  # None when the payload is not valid base64

    @property
    def sniffed(self) -> str | None:
        return sniff_image(self.data) if self.data is not None else None

    @cached_property
    def summary(self) -> dict[str, Any]:
        """What the stats keep instead of the image: type, hash and size."""
        if self.data is None:
            return {"mime": self.mime, "sha256": None, "bytes": None, "invalid_base64": True}
        return {"mime": self.mime, "sha256": hashlib.sha256(self.data).hexdigest(),
                "bytes": len(self.data)}


def parse(text: str) -> DataUri | None:
    """Parse a base64 `data:` URI; None for any other string."""
    match = _DATA_URI.match(text[:200])
    if not match or ";base64" not in match.group(2).lower():
        return None
    try:
        data: bytes | None = base64.b64decode(text[match.end():], validate=True)
    except (binascii.Error, ValueError):
        data = None
    return DataUri(match.group(1).strip().lower(), data)


class DataUris:
    """Per-request memo of parsed data URIs, keyed by the string object itself."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[str, DataUri | None]] = {}

    def get(self, text: str) -> DataUri | None:
        hit = self._seen.get(id(text))
        if hit is not None and hit[0] is text:
            return hit[1]
        parsed = parse(text) if text[:5].lower() == "data:" else None
        self._seen[id(text)] = (text, parsed)
        return parsed

    def redact(self, value: Any) -> Any:
        """A copy of a JSON value with every data URI replaced by its summary."""
        if isinstance(value, str):
            parsed = self.get(value)
            return parsed.summary if parsed is not None else value
        if isinstance(value, dict):
            return {k: self.redact(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.redact(v) for v in value]
        return value
