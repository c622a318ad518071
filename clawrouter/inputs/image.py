"""A checked image: bytes that sniff as PNG, JPEG, WEBP or GIF and fit the size cap."""

from __future__ import annotations

from dataclasses import dataclass

import pybase64

from ..sniff import sniff_image
from .refusals import IMAGE_TOO_LARGE, INVALID_IMAGE, refuse


@dataclass(frozen=True)
class ImageInput:
    """Image bytes plus the MIME type sniffed from them (never from a name or a header)."""

    data: bytes
    mime: str
    #: the client's own `data:` URI when it is exactly `data:<mime>;base64,<canonical base64>`:
    #: forwarded as it came, so a big image is not encoded again
    uri: str | None = None

    def data_uri(self) -> str:
        """The form BlockRun accepts upstream: `data:<mime>;base64,<payload>`."""
        return self.uri or f"data:{self.mime};base64,{pybase64.b64encode(self.data).decode()}"


def check_size(size: int, *, max_bytes: int, param: str) -> None:
    """Refuse a (possibly predicted) decoded size above the cap, before anything is buffered."""
    if size > max_bytes:
        refuse(f"image is larger than the {_human(max_bytes)} limit", param=param,
               code=IMAGE_TOO_LARGE)


def checked_image(data: bytes, *, max_bytes: int, param: str) -> ImageInput:
    """The last gate for every input form: size cap, then the bytes must sniff as an image.

    The message never echoes the bytes: a secret file renamed `photo.png` must not leak here.
    """
    check_size(len(data), max_bytes=max_bytes, param=param)
    mime = sniff_image(data)
    if mime is None:
        refuse("the data is not a PNG, JPEG, WEBP or GIF image", param=param, code=INVALID_IMAGE)
    return ImageInput(data, mime)


def _human(size: int) -> str:
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):g} MB"
    if size >= 1024:
        return f"{size / 1024:g} KB"
    return f"{size} bytes"
