"""Give freed memory back to the OS after big requests.

A 4 MB edit allocates several multi-megabyte buffers. glibc serves them from its heap once it
has seen big frees (fast, no page faults), but then keeps that memory: the process's RSS
stays at its peak, and interleaved small allocations fragment the heap so that later bursts
add to it. `malloc_trim` returns the free pages inside the heap. The `Trimmer` runs it soon
after a big request ends (at most every `min_gap` seconds during a burst) and every
`interval` seconds otherwise.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
from typing import Any

from clawrouter.wake import nap

TRIM_INTERVAL_SECONDS = 5.0
MIN_GAP_SECONDS = 0.2


def _libc() -> Any:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


class Trimmer:
    def __init__(self, interval: float = TRIM_INTERVAL_SECONDS,
                 min_gap: float = MIN_GAP_SECONDS) -> None:
        self.interval = interval
        self.min_gap = min_gap
        self.trims = 0
        self._wake = asyncio.Event()

    def poke(self) -> None:
        """A big request just let go of its buffers: trim soon."""
        self._wake.set()

    async def run(self) -> None:
        """Trim until cancelled (glibc only; elsewhere this returns at once)."""
        libc = _libc()
        if libc is None:
            return
        while True:
            await nap(self._wake, self.interval)
            await asyncio.to_thread(libc.malloc_trim, 0)
            self.trims += 1
            await asyncio.sleep(self.min_gap)
