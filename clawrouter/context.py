"""Per-request context that the pipeline carries: the request id and whether the client is
still there (a client that leaves before the payment is sent must cost nothing)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from clawrouter.errors import ClientGone

T = TypeVar("T")

#: The request header by which a client says "I may leave, but I will retry: a slow job I paid
#: for, finish it" (value `true`): `clawrouter mcp` sends it, as its agent's timeout cancels a
#: call long before a slow model is done (`upstream/jobs.py`, `keep_paid_job`).
KEEP_PAID_JOB = "x-clawrouter-keep-paid-job"
#: The request header by which a client says "my user asked for this anew" (value `true`):
#: `clawrouter generate` and `edit` send it, as each run is a command the user typed, and an
#: interrupted one said a payment may have been made. It is then never refused as the retry
#: of a payment the last run left in flight (`coalesce`), which a command's own gateway,
#: started anew each run, could never get past.
NEW_CALL = "x-clawrouter-new-call"


@dataclass
class RequestContext:
    request_id: str
    #: base for the local URLs we hand back, e.g. "http://localhost:8402"
    base_url: str
    #: identifies the client for coalescing duplicate requests (API key or address)
    client: str = "local"
    gone: asyncio.Event = field(default_factory=asyncio.Event)
    #: the request's Idempotency-Key (or, without one, its content) hashed with `client`,
    #: kept with any payment it signs so that a repeat is known paid after a restart
    #: (`coalesce`)
    idempotency: str | None = None
    #: the client asked that a slow job it paid for be polled to its end even if it leaves
    #: (`KEEP_PAID_JOB`): nothing changes before the payment, where leaving still stops it
    keep_paid_job: bool = False
    #: called once the upstream body is built and the big copies of the input are gone
    body_built: Callable[[], None] = field(default=lambda: None, repr=False)
    #: called once a slow job is accepted: the upstream body is gone too, for good (and a
    #: stream held until then starts: `api/images.inputs_judged`)
    job_accepted: Callable[[], None] = field(default=lambda: None, repr=False)
    _on_leave: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def leave(self) -> None:
        """The client disconnected."""
        self.gone.set()
        for callback in self._on_leave:
            callback()

    def on_leave(self, callback: Callable[[], None]) -> None:
        self._on_leave.append(callback)
        if self.gone.is_set():
            callback()

    def check(self) -> None:
        """Raise `ClientGone` if the client disconnected."""
        if self.gone.is_set():
            raise ClientGone()

    async def unless_gone(self, waiting: Awaitable[T]) -> T:
        """`await waiting`, but give up at once (cancelling it, raising `ClientGone`) if the
        client disconnects first."""
        task = asyncio.ensure_future(waiting)
        try:
            while not task.done() and not self.gone.is_set():
                # (a leave that a joining client undid, `coalesce`, wakes us with the flag
                # clear again: then we go on waiting)
                gone = asyncio.ensure_future(self.gone.wait())
                try:
                    await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    gone.cancel()
        finally:
            if not task.done():
                task.cancel()
        if task.cancelled() or not task.done():
            await asyncio.gather(task, return_exceptions=True)  # let it clean up first
            raise ClientGone()
        return task.result()

    async def rejoined(self, within: float) -> bool:
        """After a leave: whether a joining client (`coalesce`) undid it within `within`
        seconds."""
        loop = asyncio.get_running_loop()
        until = loop.time() + within
        while self.gone.is_set() and loop.time() < until:
            await asyncio.sleep(min(0.1, max(0.0, until - loop.time())))
        return not self.gone.is_set()

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake at once (raising `ClientGone`) if the client disconnects (and no
        joining client has undone that by the time we wake: `coalesce`)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + max(0.0, seconds)
        while True:
            try:
                await asyncio.wait_for(self.gone.wait(), timeout=max(0.0, until - loop.time()))
            except asyncio.TimeoutError:
                return
            if self.gone.is_set():
                raise ClientGone()
