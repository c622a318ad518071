"""The byte budget that URL and path image inputs are read within (see `api/heavy.py`).

A semaphore counted in bytes: a pipeline run takes its share once, for all its inputs, and
waits in arrival order until it fits; one bigger than the whole budget is served alone.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

#: a share this big, given back, is worth trimming the heap for (as a big body is)
TRIM_AFTER = 1024 * 1024


class InputBudget:
    """Bytes of URL and path inputs held at once: a semaphore counted in bytes that waits, in
    arrival order, until a share fits (a later small share never overtakes a waiting big one)."""

    def __init__(self, total: int, *,
                 after_big: Callable[[], None] | None = None) -> None:
        self.total = total
        self.held = 0
        self.peak = 0  # the most ever held at once (tests)
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._after_big = after_big

    def hold(self) -> InputHold:
        return InputHold(self)

    async def acquire(self, size: int) -> int:
        """Wait until `size` bytes fit, take them and say how many were taken: at most the whole
        budget, so one share bigger than it is still served (alone)."""
        size = min(size, self.total)
        if size <= 0:
            return 0
        if not self._waiting and self.held + size <= self.total:
            self._take(size)
            return size
        entry = (size, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            await entry[1]
        except BaseException:
            if entry[1].done() and not entry[1].cancelled():
                self.release(size)  # granted just as it was cancelled
            else:
                if entry in self._waiting:
                    self._waiting.remove(entry)
                self._grant()  # it may have been the head that blocked the others
            raise
        return size

    def release(self, size: int) -> None:
        self.held -= size
        self._grant()
        if size > TRIM_AFTER and self._after_big is not None:
            self._after_big()

    def _take(self, size: int) -> None:
        self.held += size
        self.peak = max(self.peak, self.held)

    def _grant(self) -> None:
        while self._waiting and self.held + self._waiting[0][0] <= self.total:
            size, future = self._waiting.popleft()
            if not future.done():  # not cancelled while queued
                self._take(size)
                future.set_result(None)


class InputHold:
    """One pipeline run's share of the `InputBudget`, released when the run ends (or its slow
    job is accepted: `UpstreamCall.accepted`)."""

    def __init__(self, budget: InputBudget) -> None:
        self._budget = budget
        self.size = 0

    async def take(self, size: int) -> None:
        """Wait for `size` bytes. Once per run: waiting for more while holding some could
        deadlock two runs that each hold part of what the other waits for."""
        if self.size:
            raise RuntimeError("an input share is taken once per run")
        self.size = await self._budget.acquire(size)

    def release(self) -> None:
        if self.size:
            size, self.size = self.size, 0
            self._budget.release(size)
