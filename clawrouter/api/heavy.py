"""Bound how many requests expand a big body at the same time.

A 4 MB edit arrives as 5.3 MB of JSON; parsing, decoding and building the upstream body
briefly hold three or four copies of it. With 64 such requests at once that multiplies into
gigabytes. Reading a body is not gated (a slow uploader must not hold others up); once a body
bigger than `BIG_BODY` is in, its request takes one of `SLOTS` slots until its upstream body is
built, after which it holds one copy and lets the next one in. The work is CPU-bound on one
event loop anyway, so a few slots lose no throughput.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

SLOTS = 4
BIG_BODY = 1024 * 1024


class Slot:
    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self._semaphore = semaphore
        self._held = False
        self.used = False  # a big body went through this request

    async def enter(self, size: int) -> None:
        """Take a slot if a body of `size` bytes is big enough to need one."""
        if size > BIG_BODY and not self._held:
            self.used = True
            await self._semaphore.acquire()
            self._held = True

    def release(self) -> None:
        """Give the slot back (idempotent): the big copies are gone."""
        if self._held:
            self._held = False
            self._semaphore.release()


class HeavyPhase:
    def __init__(self, slots: int = SLOTS, *, after_big: Callable[[], None] | None = None) -> None:
        self._semaphore = asyncio.Semaphore(slots)
        self._after_big = after_big  # called when a request with a big body has ended

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        slot = Slot(self._semaphore)
        try:
            yield slot
        finally:
            slot.release()
            if slot.used and self._after_big is not None:
                self._after_big()
