"""Answers that carry megabytes of base64, encoded without holding up the event loop.

Base64 of a 15 MB image, and JSON around it, take tens of milliseconds: on the event loop, every
other client (a `/health` probe, a small request) would wait that long. pybase64 releases the
interpreter lock, so it runs on a worker thread (`offloop`); `json.dumps` does not, so the
base64 never goes through it: the JSON is written around a placeholder, and the base64 bytes
(whose alphabet needs no escaping) are joined in.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

import pybase64


class Base64:
    """An image's base64, as bytes, for `json_bytes` to put in a JSON string (after `prefix`:
    a `data:` URI's head)."""

    __slots__ = ("data",)

    def __init__(self, image: bytes, prefix: bytes = b"") -> None:
        self.data = prefix + pybase64.b64encode(image)


def json_bytes(body: Any) -> bytes:
    """`body` as Starlette's `JSONResponse` renders it (compact UTF-8, no NaN), with each
    `Base64` in it as a JSON string."""
    spliced: list[bytes] = []
    marker = secrets.token_hex(8)  # (no text in the body can guess it)

    def placeholder(value: Any) -> str:
        if not isinstance(value, Base64):
            raise TypeError(f"{type(value).__name__} is not JSON")
        spliced.append(value.data)
        return f"{marker}:{len(spliced) - 1}"

    text = json.dumps(body, ensure_ascii=False, allow_nan=False, separators=(",", ":"),
                      default=placeholder).encode("utf-8")
    if not spliced:
        return text
    parts = re.split(rb'"' + marker.encode() + rb':(\d+)"', text)
    for i in range(1, len(parts), 2):
        parts[i] = b'"' + spliced[int(parts[i])] + b'"'
    return b"".join(parts)
