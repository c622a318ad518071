"""Cheap, real, different-per-request PNGs.

A palette PNG (colour type 3): the pixel data is a fixed 16x16 grid of palette indices,
compressed once per size and cached; each request only writes a new 768-byte `PLTE` (four
corner colours from its seed, blended across the grid). No recompression per image, so a
1024x1024 image costs well under a millisecond. An optional private ancillary chunk (`paDd`)
pads the file to a chosen size for benchmarks.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from functools import lru_cache

SIGNATURE = b"\x89PNG\r\n\x1a\n"
GRID = 16  # the image is GRID x GRID blocks, one palette entry each
PAD_CHUNK = b"paDd"  # ancillary, private, safe to copy: every decoder skips it
_CHUNK_OVERHEAD = 12  # length + type + CRC


def make_png(width: int, height: int, seed: int, pad_to: int | None = None) -> bytes:
    """A `width`x`height` PNG whose colours derive from `seed`, optionally padded to ~`pad_to`."""
    head = _head(width, height)
    body = _chunk(b"PLTE", _palette(seed))
    tail = _tail(width, height)
    size = len(head) + len(body) + len(tail)
    if pad_to and pad_to > size + _CHUNK_OVERHEAD:
        return b"".join((head, body, _padding(pad_to - size - _CHUNK_OVERHEAD), tail))
    return b"".join((head, body, tail))


def parse_size(size: str) -> tuple[int, int]:
    width, height = size.lower().split("x")
    return int(width), int(height)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _palette(seed: int) -> bytes:
    """256 RGB entries: a bilinear blend of four corner colours chosen by the seed."""
    corners = hashlib.blake2b(seed.to_bytes(16, "big", signed=True), digest_size=12).digest()
    c00, c01, c10, c11 = (corners[i:i + 3] for i in range(0, 12, 3))
    out = bytearray()
    last = GRID - 1
    for gx in range(GRID):  # palette index = gx * GRID + gy, matching _pixels
        for gy in range(GRID):
            u, v = gx / last, gy / last
            for ch in range(3):
                top = c00[ch] * (1 - u) + c10[ch] * u
                bottom = c01[ch] * (1 - u) + c11[ch] * u
                out.append(int(top * (1 - v) + bottom * v))
    return bytes(out)


@lru_cache(maxsize=32)
def _head(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)  # 8-bit palette, no interlace
    return SIGNATURE + _chunk(b"IHDR", ihdr)


@lru_cache(maxsize=32)
def _tail(width: int, height: int) -> bytes:
    """IDAT (the fixed index grid, compressed once) + IEND."""
    columns = bytes(x * GRID // width * GRID for x in range(width))
    rows = [b"\x00" + bytes(c + gy for c in columns) for gy in range(GRID)]  # filter 0
    raw = b"".join(rows[y * GRID // height] for y in range(height))
    return _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")


@lru_cache(maxsize=8)
def _padding(length: int) -> bytes:
    return _chunk(PAD_CHUNK, bytes(length))
