"""Give freed memory back to the OS after a burst of big requests.

A 4 MB edit allocates several multi-megabyte buffers. glibc serves them from its heap once it
has seen big frees (fast, no page faults), but then keeps that memory after the load ends, so
the process's RSS stays at its peak. Trimming the heap every few seconds returns it.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from typing import Any

TRIM_INTERVAL_SECONDS = 5.0


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


async def trim_forever(interval: float = TRIM_INTERVAL_SECONDS) -> None:
    """Run `malloc_trim(0)` periodically (glibc only; elsewhere this returns at once)."""
    libc = _libc()
    if libc is None:
        return
    while True:
        await asyncio.sleep(interval)
        await asyncio.to_thread(libc.malloc_trim, 0)
