"""Read an HTTP body within a byte cap: the API's answers, result images and image inputs all
come from servers we do not control, and a huge (or inflating) body must cost a bounded amount
of memory."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp

_CHUNK = 64 * 1024


class TooLarge(ValueError):
    """A body over its byte cap (decompressed bytes are counted)."""


async def read_capped(resp: aiohttp.ClientResponse, max_bytes: int,
                      head: Callable[[bytes], None] | None = None, head_bytes: int = 0) -> bytes:
    """The whole body, or `TooLarge` as soon as it passes `max_bytes`.

    A declared, uncompressed length bounds what aiohttp will read: one read, no copies (the hot
    path). Anything else (chunked, or compressed, which may inflate) is counted as it arrives.
    `head` sees the first `head_bytes` as soon as they are in (and short bodies at the end), so
    a caller can stop reading what is not what it expects.
    """
    if resp.content_length is not None and resp.content_length > max_bytes:
        raise TooLarge(f"{resp.content_length} bytes is over the {max_bytes}-byte cap")
    if (resp.content_length is not None
            and resp.headers.get("content-encoding", "identity") == "identity"):
        data = await resp.read()
        if head is not None:
            head(data[:head_bytes])
        return data
    body = bytearray()
    checked = head is None
    async for chunk in resp.content.iter_chunked(_CHUNK):
        body += chunk
        if len(body) > max_bytes:
            raise TooLarge(f"body is over the {max_bytes}-byte cap")
        if not checked and len(body) >= head_bytes:
            head(bytes(body[:head_bytes]))  # type: ignore[misc]
            checked = True
    if not checked:
        head(bytes(body))  # type: ignore[misc]
    return bytes(body)
