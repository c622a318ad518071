"""Tell the input forms apart from the string alone, in an order that cannot confuse them.

Order matters: base64 may contain `/` (every JPEG's base64 starts with `/9j/`), so a string is
taken as base64 when its first bytes decode to an image signature, before any path guess; and
only short strings (< 4096 chars, longer than any real path) are ever taken as paths.
"""

from __future__ import annotations

import enum
import os
import re

from ..sniff import sniff_image
from .encoded import base64_prefix

MAX_PATH_CHARS = 4096
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_SEPARATORS = tuple({"/", os.sep, os.altsep or "/"})


class Form(enum.Enum):
    DATA_URI = enum.auto()
    URL = enum.auto()
    OTHER_SCHEME = enum.auto()  # ftp://, gopher://, …: refused
    FILE_URL = enum.auto()
    PATH = enum.auto()
    BARE_NAME = enum.auto()  # `photo.png`: a path only if that file exists in the cwd
    BASE64 = enum.auto()
    UNKNOWN = enum.auto()


def classify(value: str) -> Form:
    text = value.strip()
    lowered = text[:8].lower()
    if lowered.startswith("data:"):
        return Form.DATA_URI
    if lowered.startswith(("http://", "https://")):
        return Form.URL
    if lowered.startswith("file:"):
        return Form.FILE_URL
    if _SCHEME.match(text):
        return Form.OTHER_SCHEME
    if not text:
        return Form.UNKNOWN
    if len(text) >= MAX_PATH_CHARS:
        return Form.BASE64  # too long to be a path; decoding says whether it is base64
    head = base64_prefix(text)
    if head is not None and sniff_image(head) is not None:
        return Form.BASE64
    if text.startswith(("~", "./", "../")) or any(sep in text for sep in _SEPARATORS):
        return Form.PATH
    if "\n" not in text and "\0" not in text:
        return Form.BARE_NAME
    return Form.UNKNOWN
