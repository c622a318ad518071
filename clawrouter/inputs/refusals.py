"""Every way an image input can be refused: the codes, and one helper that builds the error.

All refusals are `InvalidRequest` (HTTP 400, nothing sent upstream, nothing paid). `param` names
the input as the caller passed it (`image[1]`, `mask`) so a client can tell which one failed.
Messages explain why but never carry file contents, and echo at most a short prefix of the value.
"""

from __future__ import annotations

from typing import NoReturn

from ..errors import InvalidRequest

INVALID_IMAGE = "invalid_image"  # bytes are not PNG, JPEG, WEBP or GIF
IMAGE_TOO_LARGE = "image_too_large"  # over the per-image byte cap
INVALID_DATA_URI = "invalid_data_uri"  # `data:` but not `data:<mime>;base64,<payload>`
INVALID_BASE64 = "invalid_base64"  # a payload that is not decodable base64
URL_REFUSED = "url_refused"  # scheme, credentials, address or redirect policy
URL_FETCH_FAILED = "url_fetch_failed"  # DNS, connect, timeout, non-2xx, broken transfer
PATH_REFUSED = "path_refused"  # outside roots, hidden, data dir, not a regular file
FILE_NOT_FOUND = "file_not_found"
LOCAL_FILES_DISABLED = "local_files_disabled"
UNRECOGNIZED_INPUT = "unrecognized_input"

_ECHO_LIMIT = 80


def shorten(value: str, limit: int = _ECHO_LIMIT) -> str:
    """A value fit to echo in a message: huge base64 strings must not come back in errors."""
    return value if len(value) <= limit else value[: limit - 1] + "…"


def refuse(message: str, *, param: str, code: str) -> NoReturn:
    """Raise the 400 for one input; the message is prefixed with the input's name."""
    raise InvalidRequest(f"{param}: {message}", param=param, code=code)
