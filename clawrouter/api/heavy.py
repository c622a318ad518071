"""Bound how much memory requests with big bodies can hold at once.

A 4 MB edit arrives as 5.3 MB of JSON. Two limits keep a burst of them from multiplying that
into gigabytes:

- Admission: at most `IN_FLIGHT` requests with a body over `BIG_BODY` are read and carried
  upstream at a time; the rest wait *before* their body is read, so it stays in the client's
  socket (TCP pushes back) instead of in our heap. The declared Content-Length decides; a
  chunked upload is admitted when what has arrived passes `BIG_BODY`. Small requests never
  wait. The upstream works through big requests a few at a time anyway, so 16 lose no
  throughput; they only move the queue from the upstream's side to ours. The price: a slow
  uploader holds its place while it uploads, so 16 of them at once make other big requests
  wait (never small ones).
- Expansion: parsing, decoding and building the upstream body briefly hold three or four
  copies of it, so at most `SLOTS` requests do that at once. The work is CPU-bound on one event
  loop, so a few slots lose nothing either.

When a big request ends, `after_big` is called (the gateway trims its heap then).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

IN_FLIGHT = 16
SLOTS = 4
BIG_BODY = 1024 * 1024


class Slot:
    """One request's places: admission (held until the request ends) and expansion."""

    def __init__(self, admission: asyncio.Semaphore, expansion: asyncio.Semaphore) -> None:
        self._admission = admission
        self._expansion = expansion
        self._admitted = False
        self._held = False
        self.used = False  # a big body went through this request

    async def admit(self, size: int) -> None:
        """Before (or while) reading a body of `size` bytes: wait for a place if it is big."""
        if size > BIG_BODY and not self._admitted:
            self.used = True
            await self._admission.acquire()
            self._admitted = True

    async def enter(self, size: int) -> None:
        """Take an expansion slot if a body of `size` bytes is big enough to need one."""
        await self.admit(size)
        if size > BIG_BODY and not self._held:
            await self._expansion.acquire()
            self._held = True

    def release(self) -> None:
        """Give the expansion slot back (idempotent): the big copies are gone."""
        if self._held:
            self._held = False
            self._expansion.release()

    def close(self) -> None:
        self.release()
        if self._admitted:
            self._admitted = False
            self._admission.release()


class HeavyPhase:
    def __init__(self, slots: int = SLOTS, in_flight: int = IN_FLIGHT, *,
                 after_big: Callable[[], None] | None = None) -> None:
        self._admission = asyncio.Semaphore(in_flight)
        self._expansion = asyncio.Semaphore(slots)
        self._after_big = after_big

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        slot = Slot(self._admission, self._expansion)
        try:
            yield slot
        finally:
            slot.close()
            if slot.used and self._after_big is not None:
                self._after_big()
