"""Bound how much memory requests with big bodies can hold at once.

A 4 MB edit arrives as 5.3 MB of JSON; the largest body allowed (4 × `max_image_mb`) is
80 MB by default. Two limits keep a burst of them from multiplying that into gigabytes:

- Admission: requests with a body over `BIG_BODY` are read and carried upstream only while
  their bodies together fit in `BODY_BYTES` (a semaphore counted in bytes, `InputBudget`);
  the rest wait *before* their body is read, so it stays in the client's socket (TCP pushes
  back) instead of in our heap. The declared Content-Length decides; a chunked upload, which
  declares none, counts as the largest body allowed once 1 MB of it has arrived (JSON and
  forms alike, `api.images.admitted_stream`), so a small one never waits. One body bigger than
  the whole budget is served alone. Small requests never wait. The upstream works through big
  requests a few at a time anyway, so two dozen 4 MB edits at once lose no throughput; waiting
  only moves the queue from the upstream's side to ours. The price: a slow uploader holds its
  share while it uploads, so a few of them at once make other big requests wait (never small
  ones).
- Expansion: parsing, decoding and building the upstream body briefly hold three or four
  copies of it, so at most `SLOTS` requests do that at once. The work is CPU-bound on one event
  loop, so a few slots lose nothing either. Together: at most `BODY_BYTES` of bodies, and
  three or four copies of those being expanded, whatever their sizes (about 0.5 GB).

- Inputs: an image given as a URL or a local path costs the client a few bytes but the gateway
  up to `max_image_mb` each, so it is bounded by its size, not by the request's. A pipeline run
  takes its share of `INPUT_BYTES` once, for all its URL and path inputs together, before it
  reads any of them (a file counts its size, a URL its Content-Length or, without one, the
  cap), and holds it until the run ends (the upstream body built from them lives that long),
  or until its slow job is accepted (the body is dropped then: nothing is sent again).
  A run that does not fit waits, first come first served. Taking the share in one go means
  no run ever waits while holding some; a run needing more than the whole budget waits for
  all of it and is served alone. Inputs of at most 64 KiB (`inputs.resolver.READ_AT_ONCE`)
  are read as soon as they are judged and not counted: like small bodies, they never wait.

When a big request ends, `after_big` is called (the gateway trims its heap then).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from clawrouter.inputs.budget import InputBudget

SLOTS = 4
BIG_BODY = 1024 * 1024
#: big request bodies held at once: two dozen 4 MB edits, or one and a half of the largest
BODY_BYTES = 128 * 1024 * 1024
#: image bytes read from URLs and paths held at once: sixteen 4 MB images
INPUT_BYTES = 64 * 1024 * 1024


class Slot:
    """One request's places: admission (held until the request ends) and expansion."""

    def __init__(self, admission: InputBudget, expansion: asyncio.Semaphore,
                 after_big: Callable[[], None] | None = None, *,
                 undeclared: int = BODY_BYTES) -> None:
        self._admission = admission
        self._expansion = expansion
        self._after_big = after_big
        self._undeclared = undeclared  # what a body of unknown length counts as
        self._admitted = 0  # bytes of the admission budget held
        self._held = False
        self.used = False  # a big body went through this request
        self.handed_off = False  # a stream ends the request, not the handler (`hand_off`)

    async def admit(self, size: int | None) -> None:
        """Before reading a body of `size` bytes (None: not declared, so as big as allowed):
        wait for room if it is big. Once per request: the first call over `BIG_BODY` decides
        (a chunked body calls with 0 first, then with None once it is past `BIG_BODY`)."""
        size = self._undeclared if size is None else size
        if size > BIG_BODY and not self._admitted:
            self.used = True
            self._admitted = await self._admission.acquire(size)

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

    def let_go(self) -> None:
        """The body is gone for good (its slow job was accepted): give every place back
        (idempotent), so the client's resend of the request can be read, and join it."""
        self.release()
        if self._admitted:
            size, self._admitted = self._admitted, 0
            self._admission.release(size)

    def close(self) -> None:
        """The request is over: give every place back, then trim after a big one (idempotent)."""
        self.let_go()
        if self.used and self._after_big is not None:
            self.used = False
            self._after_big()

    def hand_off(self) -> Callable[[], None]:
        """For a response that outlives its handler (a stream, whose work runs while it is
        sent): the slot stays taken when the handler returns, until the returned `close`."""
        self.handed_off = True
        return self.close


class HeavyPhase:
    def __init__(self, slots: int = SLOTS, body_bytes: int = BODY_BYTES, *,
                 input_bytes: int = INPUT_BYTES, largest_body: int = BODY_BYTES,
                 after_big: Callable[[], None] | None = None) -> None:
        """`largest_body`: the body limit, which an upload of undeclared length counts as."""
        self._admission = InputBudget(body_bytes)  # (trimming is `Slot.close`'s job)
        self._expansion = asyncio.Semaphore(slots)
        self._after_big = after_big
        self._largest_body = largest_body
        #: URL and path inputs, held by pipeline runs (see the module docstring)
        self.inputs = InputBudget(input_bytes, after_big=after_big)

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        slot = Slot(self._admission, self._expansion, self._after_big,
                    undeclared=self._largest_body)
        try:
            yield slot
        finally:
            if not slot.handed_off:
                slot.close()
