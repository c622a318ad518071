"""`ImageServer`: the ASGI endpoint behind `GET|HEAD /images/<id>[.<ext>]`.

Mount it as `Route("/images/{name}", ImageServer(store))` (or `Mount("/images", ...)`).

Safety: the requested name is only ever a key into the store's in-memory index; the file path
comes from the index, so no path is built from the request and nothing outside the index (a
file dropped in the directory by hand, a temporary file) can be served. Content-Type comes from
the sniffed bytes, never from the URL; a known id asked for with the wrong extension, or none,
gets a 308 to its canonical name, so each image has one cacheable URL.

Speed: a raw ASGI callable with no Request/Response objects. Uvicorn cannot sendfile, so the
body is sent from the store's in-memory LRU in one ASGI message (one transport write); images
too big for the cache are streamed from disk in chunks. Last-served times are noted in memory.
"""

from __future__ import annotations

import asyncio
from email.utils import formatdate, parsedate_to_datetime

from starlette.types import Receive, Scope, Send

from clawrouter.errors import ClawError, InvalidRequest, MethodNotAllowed, RouteNotFound
from clawrouter.store.ranges import RangeNotSatisfiable, parse_range
from clawrouter.store.records import StoredImage
from clawrouter.store.store import ImageStore

Headers = list[tuple[bytes, bytes]]

_CHUNK = 256 * 1024
_HEADER_CACHE = 1024  # images whose response headers are kept ready
_CACHE_CONTROL = (b"cache-control", b"public, max-age=31536000, immutable")
_NOSNIFF = (b"x-content-type-options", b"nosniff")
_ACCEPT_RANGES = (b"accept-ranges", b"bytes")


def _error(exc: ClawError, extra: Headers | None = None) -> tuple[int, Headers, bytes]:
    """An error in the OpenAI envelope (`ClawError.rendered`, as every path sends it), with
    `nosniff` as every image answer has it and `extra`, rendered once."""
    body, headers = exc.rendered()
    return exc.status, [*((k.lower(), v) for k, v in headers), _NOSNIFF, *(extra or [])], body


_NOT_FOUND = _error(RouteNotFound("Image not found"))
_NOT_ALLOWED = _error(MethodNotAllowed("Method not allowed: images are read with GET or HEAD",
                                       headers={"Allow": "GET, HEAD"}))


class ImageServer:
    def __init__(self, store: ImageStore) -> None:
        self.store = store
        # Per-image headers never change (content-addressed). Most images are fetched once,
        # right after they are made, so a small first-in-first-out set is enough; an unbounded
        # one would grow by ~0.4 KB per image for as long as the gateway runs.
        self._headers: dict[str, tuple[Headers, bytes, bytes]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope["method"]
        if method != "GET" and method != "HEAD":
            return await _respond(send, *_NOT_ALLOWED)
        name = _requested_name(scope)
        image = self.store.get(name)
        if image is None:
            return await _respond(send, *_NOT_FOUND)
        if name != image.name:
            return await _respond(send, 308, [(b"location", image.name.encode()),
                                              (b"content-length", b"0")], b"")

        base, etag, last_modified = self._headers_for(image)
        if_none_match = if_modified_since = range_ = if_range = None
        ranges = 0
        for key, value in scope["headers"]:
            if key == b"if-none-match":  # a list, which may come over several lines
                if_none_match = value if if_none_match is None else if_none_match + b"," + value
            elif key == b"range":
                range_ = value
                ranges += 1
            elif key == b"if-modified-since":
                if_modified_since = value
            elif key == b"if-range":
                if_range = value
        self.store.mark_served(image.id)

        if if_none_match is not None:
            if _etag_matches(if_none_match, etag):
                return await _not_modified(send, etag, last_modified)
        elif if_modified_since is not None and _not_modified_since(if_modified_since, image):
            return await _not_modified(send, etag, last_modified)

        start, stop, headers, status = 0, image.bytes, base, 200
        # Range is defined for GET only, and one that comes twice is ignored (RFC 9110 §14.2)
        if (range_ is not None and method == "GET" and ranges == 1
                and (if_range is None or if_range in (etag, last_modified))):
            try:
                span = parse_range(range_.decode("latin-1"), image.bytes)
            except RangeNotSatisfiable:
                return await _respond(send, *_error(
                    InvalidRequest("Requested range not satisfiable", param="range",
                                   code="range_not_satisfiable", status=416),
                    [(b"content-range", f"bytes */{image.bytes}".encode())]))
            if span is not None:
                start, stop = span
                status = 206
                headers = [*base, (b"content-range",
                                   f"bytes {start}-{stop - 1}/{image.bytes}".encode())]
        headers = [*headers, (b"content-length", str(stop - start).encode())]

        if method == "HEAD":  # 404 where a GET would be, for a file deleted behind our back
            if not await self.store.present(image):
                return await _respond(send, *_NOT_FOUND)
            return await _respond(send, status, headers, b"")
        data = await self.store.read(image)
        if data is not None:
            body = data if status == 200 else data[start:stop]
            return await _respond(send, status, headers, body)
        if self.store.get(image.id) is None:  # the file vanished; the store forgot it
            return await _respond(send, *_NOT_FOUND)
        await _stream(send, self.store, image, status, headers, start, stop)

    def _headers_for(self, image: StoredImage) -> tuple[Headers, bytes, bytes]:
        cached = self._headers.get(image.id)
        if cached is None:
            if len(self._headers) >= _HEADER_CACHE:
                del self._headers[next(iter(self._headers))]
            etag = image.etag.encode()
            last_modified = formatdate(image.created, usegmt=True).encode()
            base = [(b"content-type", image.content_type.encode()), (b"etag", etag),
                    (b"last-modified", last_modified), _CACHE_CONTROL, _ACCEPT_RANGES, _NOSNIFF]
            cached = self._headers[image.id] = (base, etag, last_modified)
        return cached


def _requested_name(scope: Scope) -> str:
    """The name from a `{name}` route parameter, else the path below the mount point."""
    params = scope.get("path_params")
    if params and "name" in params:
        return str(params["name"])
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path[1:] if path.startswith("/") else path


def _etag_matches(if_none_match: bytes, etag: bytes) -> bool:
    """Weak comparison, as RFC 9110 §13.1.2 requires for If-None-Match."""
    if if_none_match.strip() == b"*":
        return True
    return any(tag.strip().removeprefix(b"W/") == etag for tag in if_none_match.split(b","))


def _not_modified_since(value: bytes, image: StoredImage) -> bool:
    try:
        since = parsedate_to_datetime(value.decode("latin-1")).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):  # a bad date is no condition
        return False
    return since >= int(image.created)


async def _not_modified(send: Send, etag: bytes, last_modified: bytes) -> None:
    await _respond(send, 304, [(b"etag", etag), (b"last-modified", last_modified),
                               _CACHE_CONTROL, _NOSNIFF], b"")


async def _respond(send: Send, status: int, headers: Headers, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _stream(send: Send, store: ImageStore, image: StoredImage, status: int,
                  headers: Headers, start: int, stop: int) -> None:
    """Send a file too big for the cache in chunks, reading it off the event loop."""
    try:
        f = await asyncio.to_thread(open, image.path, "rb")
    except FileNotFoundError:
        store.discard(image.id)
        return await _respond(send, *_NOT_FOUND)
    try:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await asyncio.to_thread(f.seek, start)
        remaining = stop - start
        while remaining > 0:
            chunk = await asyncio.to_thread(f.read, min(_CHUNK, remaining))
            if not chunk:  # truncated behind our back: abort rather than send a short body
                raise RuntimeError(f"{image.path} is shorter than its index entry")
            remaining -= len(chunk)
            await send({"type": "http.response.body", "body": chunk, "more_body": remaining > 0})
    finally:
        await asyncio.to_thread(f.close)
