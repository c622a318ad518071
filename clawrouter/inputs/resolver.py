"""The one entry point: any image input form in, a checked `ImageInput` out (or a 400).

In two steps when the gateway needs them: `open` checks everything it can without reading a big
file or body and says how big reading it will be (`Pending.size`); `Pending.read` then reads it,
once the caller has room for it (`api/heavy.py`). `resolve` does both at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from types import TracebackType

from aiohttp.abc import AbstractResolver

from ..errors import InvalidRequest
from ..offloop import off_loop
from ..sniff import EXTENSIONS
from .addresses import AddressRule, is_public_address
from .encoded import canonical_base64, decode_base64, decode_data_uri
from .forms import Form, classify
from .image import ImageInput, check_size, checked_image
from .paths import bare_name_exists, open_local_image, path_from_file_url, read_judged
from .policy import InputPolicy
from .refusals import (
    FILE_NOT_FOUND, LOCAL_FILES_DISABLED, UNRECOGNIZED_INPUT, URL_REFUSED, refuse, shorten,
)
from .urls import UrlFetcher

#: A bare name with one of these endings was meant as a file: say it is missing.
_IMAGE_SUFFIXES = frozenset({"." + ext for ext in EXTENSIONS.values()} | {".jpeg"})
#: A file or declared body this small is read in the step that judges it (for a file, in the
#: same thread hop, as ever): it never waits for room, and a request's few of them hold less
#: than the small body every request may bring uncounted (`api/heavy.py`).
READ_AT_ONCE = 64 * 1024


@dataclass
class Pending:
    """A path or URL input checked as far as it can be without reading it."""

    param: str
    size: int  # the most reading it will hold: a file's size, a declared length or the cap
    max_bytes: int
    _read: Callable[[], Awaitable[bytes]]
    _close: Callable[[], None] = lambda: None

    async def read(self) -> ImageInput:
        try:
            data = await self._read()
        finally:
            self.close()
        return checked_image(data, max_bytes=self.max_bytes, param=self.param)

    def close(self) -> None:
        """Let go of what was opened for reading (a response). Idempotent."""
        self._close()


class InputResolver:
    """Turns `image`/`mask` values into image bytes under one `InputPolicy`.

    `resolver` replaces DNS (tests map names to loopback addresses); `address_allowed` replaces
    the rule for which addresses count as public. `policy.allow_private_urls` switches the
    address check off whatever the rule. Holds one HTTP session: call `aclose()` when done.
    """

    def __init__(self, policy: InputPolicy, *, resolver: AbstractResolver | None = None,
                 address_allowed: AddressRule | None = None) -> None:
        self.policy = policy
        allowed = None if policy.allow_private_urls else (address_allowed or is_public_address)
        self._urls = UrlFetcher(policy, dns=resolver, allowed=allowed)

    async def resolve(self, value: str, *, param: str) -> ImageInput:
        """Fetch, read or decode `value`, then size-check and sniff it."""
        found = await self.open(value, param=param)
        return await found.read() if isinstance(found, Pending) else found

    async def open(self, value: str, *, param: str) -> ImageInput | Pending:
        """The checked image if it is already in memory (data URI, base64) or small; else a
        path or URL judged and sized but not read. The caller must `read()` or `close()` it."""
        if not isinstance(value, str):
            refuse("expected a string (URL, path, data URI or base64)", param=param,
                   code=UNRECOGNIZED_INPUT)
        value = value.strip()
        data = await self._source(value, param=param)
        if isinstance(data, Pending):
            return data
        image = checked_image(data, max_bytes=self.policy.max_bytes, param=param)
        if value.startswith(f"data:{image.mime};base64,") and canonical_base64(data, value):
            return replace(image, uri=value)
        return image

    async def open_stored(self, path: Path, size: int, *, param: str) -> ImageInput | Pending:
        """One of the gateway's own images, named by its `/images/` URL: read from the store
        (the data directory is no input root, and fetching our own loopback URL is refused
        like any private address), so "generate, then edit what came back" just works."""
        check_size(size, max_bytes=self.policy.max_bytes, param=param)

        async def read() -> bytes:
            try:
                return await asyncio.to_thread(path.read_bytes)
            except FileNotFoundError:
                refuse(f"{path.name} was deleted from this gateway's image store since "
                       "(image_ttl_days, image_max_gb)", param=param, code=FILE_NOT_FOUND)

        if size <= READ_AT_ONCE:
            return checked_image(await read(), max_bytes=self.policy.max_bytes, param=param)
        return Pending(param, size, self.policy.max_bytes, read)

    def from_upload(self, data: bytes, *, param: str) -> ImageInput:
        """An uploaded file part: already in memory, so only the cap and the sniff apply."""
        return checked_image(data, max_bytes=self.policy.max_bytes, param=param)

    async def aclose(self) -> None:
        await self._urls.aclose()

    async def __aenter__(self) -> "InputResolver":
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.aclose()

    async def _source(self, value: str, *, param: str) -> bytes | Pending:
        form = classify(value)
        cap = self.policy.max_bytes
        if form is Form.URL:
            return await self._open_url(value, param=param)
        if form is Form.DATA_URI:
            return await _decode(decode_data_uri, value, max_bytes=cap, param=param)
        if form is Form.BASE64:
            return await _decode(decode_base64, value, max_bytes=cap, param=param)
        if form is Form.OTHER_SCHEME:
            refuse(f"only http, https, file and data URLs are accepted ({shorten(value)!r})",
                   param=param, code=URL_REFUSED)
        if form is Form.FILE_URL:
            self._require_local_files(param)
            return await self._open_file(path_from_file_url(value, param=param), param=param)
        if form is Form.PATH:
            return await self._open_file(value, param=param)
        if form is Form.BARE_NAME and self.policy.allow_local_files:
            meant_a_file = Path(value).suffix.lower() in _IMAGE_SUFFIXES
            if await self._names_a_file(value, meant_a_file, param=param):
                return await self._open_file(value, param=param)
            if meant_a_file:
                refuse(f"no such file: {shorten(value)!r} in the gateway's working folder; give "
                       "the file's full path (or ./name relative to where the gateway runs), a "
                       "URL or a data URI", param=param, code=FILE_NOT_FOUND)
        refuse(self._unrecognized(value), param=param, code=UNRECOGNIZED_INPUT)

    async def _names_a_file(self, name: str, meant_a_file: bool, *, param: str) -> bool:
        """Whether a bare name is a file in the working folder (else it may be any word).

        The file policy is applied to the name before anything is looked up, so a name outside
        the roots gets one answer whether or not the file exists: the policy's refusal when an
        image file was clearly meant, else "not recognised".
        """
        try:
            return await asyncio.to_thread(bare_name_exists, name, self.policy,
                                           cwd=self.policy.cwd, param=param)
        except InvalidRequest:
            if meant_a_file:
                raise
            return False

    async def _open_file(self, path: str, *, param: str) -> bytes | Pending:
        self._require_local_files(param)
        found = await asyncio.to_thread(open_local_image, path, self.policy,
                                        cwd=self.policy.cwd, param=param,
                                        read_up_to=READ_AT_ONCE)
        if isinstance(found, bytes):
            return found
        return Pending(param, found.size, self.policy.max_bytes,
                       lambda: asyncio.to_thread(read_judged, found, param=param))

    async def _open_url(self, url: str, *, param: str) -> bytes | Pending:
        opened = await self._urls.open(url, param=param)
        if opened.size <= READ_AT_ONCE:
            return await opened.read()
        return Pending(param, opened.size, self.policy.max_bytes, opened.read, opened.close)

    def _require_local_files(self, param: str) -> None:
        if not self.policy.allow_local_files:
            refuse("local files are disabled on this gateway (allow_local_files); send a URL, "
                   "a data URI, base64 or an uploaded file", param=param,
                   code=LOCAL_FILES_DISABLED)

    def _unrecognized(self, value: str) -> str:
        forms = ["an http(s) URL", "a data URI (data:<mime>;base64,<payload>)",
                 "base64 of a PNG, JPEG, WEBP or GIF image"]
        if self.policy.allow_local_files:
            forms.insert(1, "a path to an existing local file (or a file:// URL)")
        return (f"input not recognised ({shorten(value)!r}); expected "
                f"{', '.join(forms[:-1])} or {forms[-1]}")


async def _decode(decoder: Callable[..., bytes], value: str, *, max_bytes: int,
                  param: str) -> bytes:
    """Run a base64 decoder, off the event loop when the payload is big enough to stall it."""
    return await off_loop(partial(decoder, max_bytes=max_bytes, param=param), value,
                          size=len(value))
