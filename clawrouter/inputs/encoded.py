"""Images carried inside the request itself: `data:` URIs and raw base64.

The encoded length is checked against the cap before decoding, so an oversized payload costs
no decoded copy. Standard and url-safe alphabets are accepted, padding optional, whitespace
ignored (base64 wrapped at 76 columns is common).
"""

from __future__ import annotations

import base64
import binascii
import re

import pybase64

from .image import check_size
from .refusals import INVALID_BASE64, INVALID_DATA_URI, refuse

_WHITESPACE = re.compile(r"\s+")
_ALPHABET = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")
#: what wrapped or indented base64 holds between its characters
_WRAPPING = ("\n", "\r", " ", "\t")
#: Enough base64 to decode the 12 bytes `sniff_image` needs (WEBP is the longest signature).
SNIFF_CHARS = 16


def decode_data_uri(value: str, *, max_bytes: int, param: str) -> bytes:
    """Bytes of a `data:<mime>;base64,<payload>` URI; the declared MIME type is ignored."""
    return decode_base64(data_uri_payload(value, param=param), max_bytes=max_bytes, param=param)


def data_uri_payload(value: str, *, param: str) -> str:
    """The base64 part of a `data:<mime>;base64,<payload>` URI."""
    header, comma, payload = value[len("data:"):].partition(",")
    if not comma or header.rsplit(";", 1)[-1].strip().lower() != "base64":
        refuse("a data URI must look like data:<mime>;base64,<payload>", param=param,
               code=INVALID_DATA_URI)
    return payload


def decode_base64(text: str, *, max_bytes: int, param: str) -> bytes:
    """Decode base64 after checking that the result could fit the cap."""
    # Before any copy is made: the payload decodes to at least this many bytes. Line breaks
    # (wrapped base64) are not characters, but counting them costs a pass: only near the cap.
    if len(text) * 3 // 4 - 2 > max_bytes:
        check_size(_encoded_chars(text) * 3 // 4 - 2, max_bytes=max_bytes, param=param)
    try:  # the common case, canonical padded base64, in one SIMD pass (no regex over megabytes)
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    compact = _WHITESPACE.sub("", text)
    body = compact.rstrip("=")
    check_size(len(body) * 3 // 4, max_bytes=max_bytes, param=param)
    if not body or len(compact) - len(body) > 2 or len(body) % 4 == 1:
        refuse("the payload is not valid base64", param=param, code=INVALID_BASE64)
    urlsafe = "-" in body or "_" in body
    try:
        return base64.b64decode(body + "=" * (-len(body) % 4),
                                altchars=b"-_" if urlsafe else None, validate=True)
    except (binascii.Error, ValueError):
        refuse("the payload is not valid base64", param=param, code=INVALID_BASE64)


def _encoded_chars(text: str) -> int:
    """Characters of `text` that are not its usual whitespace, counted without copying it."""
    return len(text) - sum(text.count(c) for c in _WRAPPING)


def base64_prefix(text: str) -> bytes | None:
    """The first bytes a base64 string decodes to, or None if its start is not base64.

    Cheap (looks at a few dozen characters) so a form can be guessed without decoding it all.
    """
    head = _WHITESPACE.sub("", text[: SNIFF_CHARS * 4])[:SNIFF_CHARS].rstrip("=")
    if not head or len(head) % 4 == 1 or not _ALPHABET.fullmatch(head):
        return None
    urlsafe = "-" in head or "_" in head
    try:
        return base64.b64decode(head + "=" * (-len(head) % 4),
                                altchars=b"-_" if urlsafe else None, validate=True)
    except (binascii.Error, ValueError):
        return None


def canonical_base64(data: bytes, uri: str) -> bool:
    """Whether `uri`'s payload is exactly the standard, padded base64 of `data`.

    Cheap: the payload already decoded to `data`, so its length, its alphabet and its last
    quantum settle it.
    """
    start = uri.index(",") + 1
    if len(uri) - start != 4 * ((len(data) + 2) // 3):  # rules out whitespace, lost padding
        return False
    if uri.find("-", start) != -1 or uri.find("_", start) != -1:  # url-safe alphabet
        return False
    tail = data[-(len(data) % 3 or 3):]
    return uri.endswith(base64.b64encode(tail).decode())
