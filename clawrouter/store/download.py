"""Download a remote result image with a deadline, a byte cap and a check that it is an image.

The URL comes from the upstream's response, which we paid for but do not control: a slow,
huge or non-image answer must cost us a bounded amount of time and memory. The caller's
`aiohttp.ClientSession` decides the connector (and any SSRF guard on it).
"""

from __future__ import annotations

import asyncio

import aiohttp

from clawrouter.sniff import sniff_image

DEFAULT_TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=5)
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
_MAX_REDIRECTS = 5
_CHUNK = 64 * 1024
_SNIFF_BYTES = 12  # the longest signature sniff_image needs (WEBP)


class DownloadFailed(Exception):
    """A result image could not be downloaded; the message says why (never shown as-is)."""


async def download(url: str, session: aiohttp.ClientSession, *,
                   max_bytes: int = DEFAULT_MAX_BYTES,
                   timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT) -> bytes:
    """Return the image bytes at `url`, or raise `DownloadFailed`.

    Stops reading as soon as the body passes `max_bytes` (decompressed bytes are counted) and
    as soon as the first bytes are not a PNG, JPEG, WEBP or GIF.
    """
    if not url.startswith(("http://", "https://")):
        raise DownloadFailed("not an http(s) URL")
    try:
        async with session.get(url, timeout=timeout, max_redirects=_MAX_REDIRECTS) as resp:
            if resp.status != 200:
                raise DownloadFailed(f"HTTP {resp.status}")
            if resp.content_length is not None and resp.content_length > max_bytes:
                raise DownloadFailed(f"{resp.content_length} bytes is over the "
                                     f"{max_bytes}-byte cap")
            if (resp.content_length is not None
                    and resp.headers.get("content-encoding", "identity") == "identity"):
                # Not compressed, so the declared length bounds what the parser will read:
                # one read, no copies. (A compressed body may inflate: it is counted below.)
                data = await resp.read()
                _check_image(data)
                return data
            body = bytearray()
            sniffed = False
            async for chunk in resp.content.iter_chunked(_CHUNK):
                body += chunk
                if len(body) > max_bytes:
                    raise DownloadFailed(f"body is over the {max_bytes}-byte cap")
                if not sniffed and len(body) >= _SNIFF_BYTES:
                    _check_image(body)
                    sniffed = True
            _check_image(body)
            return bytes(body)
    except DownloadFailed:
        raise
    except asyncio.TimeoutError as exc:
        raise DownloadFailed("timed out") from exc
    except aiohttp.ClientError as exc:
        raise DownloadFailed(f"{type(exc).__name__}: {exc}") from exc


def _check_image(body: bytes | bytearray) -> None:
    if sniff_image(bytes(body[:_SNIFF_BYTES])) is None:
        raise DownloadFailed("not a PNG, JPEG, WEBP or GIF image")
