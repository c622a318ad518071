"""Download a remote result image with a deadline, a byte cap and a check that it is an image.

The URL comes from the upstream's response, which we paid for but do not control: a slow,
huge or non-image answer must cost us a bounded amount of time and memory. The caller's
`Getter` decides the connection for each hop (`sources.ResultSources` keeps hosts other than
the upstream's off the local network), so redirects are followed here, one hop at a time.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import aiohttp
from yarl import URL

from clawrouter.inputs.dns import AddressRefused, idna_host
from clawrouter.sniff import sniff_image
from clawrouter.capped import TooLarge, read_capped

DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=5)
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
_MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_SNIFF_BYTES = 12  # the longest signature sniff_image needs (WEBP)


class DownloadFailed(Exception):
    """A result image could not be downloaded; the message says why (never shown as-is)."""


class DownloadRefused(DownloadFailed):
    """The URL (or a redirect) leads where the gateway does not connect, or round in circles;
    retrying cannot help."""


class Getter(Protocol):
    """What a download needs: `aiohttp.ClientSession.get`, or `ResultSources`."""

    def get(self, url: URL, **kwargs: Any) -> Any: ...


async def download(url: str, session: Getter, *, max_bytes: int = DEFAULT_MAX_BYTES,
                   timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT) -> bytes:
    """Return the image bytes at `url`, or raise `DownloadFailed`.

    Follows up to 5 redirects, each asked of `session` anew. Stops reading as soon as the body
    passes `max_bytes` (decompressed bytes are counted) and as soon as the first bytes are not
    a PNG, JPEG, WEBP or GIF. `timeout.total` bounds all the hops together.
    """
    target = _http_url(url)
    try:
        async with asyncio.timeout(timeout.total):
            for _ in range(_MAX_REDIRECTS + 1):
                async with session.get(target, timeout=timeout,
                                       allow_redirects=False) as resp:
                    location = resp.headers.get("Location")
                    if resp.status in _REDIRECTS and location:
                        target = _redirect_target(resp.url, location)
                        continue
                    return await _read(resp, max_bytes)
            # A loop (or a chain this long) is how the host is set up: asked again, it loops again.
            raise DownloadRefused(f"more than {_MAX_REDIRECTS} redirects")
    except DownloadFailed:
        raise
    except AddressRefused as exc:
        raise DownloadRefused(f"{exc.host} resolves to {exc.address}, not a public address") \
            from exc
    except TimeoutError as exc:  # asyncio.timeout, or aiohttp's own
        raise DownloadFailed("timed out") from exc
    except (aiohttp.ClientError, ValueError) as exc:
        raise DownloadFailed(f"{type(exc).__name__}: {exc}") from exc


def _http_url(url: str) -> URL:
    """`url` if it is one the gateway fetches, else refused: a `file:` or `gopher:` URL, or a
    host IDNA cannot encode (as `getaddrinfo` must), is the same on every retry."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        raise DownloadRefused("not an http(s) URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        raise DownloadRefused("not an http(s) URL")
    if not idna_host(parsed):
        raise DownloadRefused("malformed host name")
    return parsed


def _redirect_target(base: URL, location: str) -> URL:
    try:
        target = str(base.join(URL(location)))
    except (ValueError, TypeError):
        raise DownloadRefused("redirected to a malformed URL") from None
    return _http_url(target)


async def _read(resp: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    if resp.status != 200:
        raise DownloadFailed(f"HTTP {resp.status}")
    try:
        return await read_capped(resp, max_bytes, _check_image, _SNIFF_BYTES)
    except TooLarge as exc:
        raise DownloadFailed(str(exc)) from None


def _check_image(head: bytes) -> None:
    if sniff_image(head[:_SNIFF_BYTES]) is None:
        raise DownloadFailed("not a PNG, JPEG, WEBP or GIF image")
