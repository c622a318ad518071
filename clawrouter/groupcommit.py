"""Group commit: writes queued from the event loop, made durable by one thread, in batches.

A paid image costs several durable writes (the signed payment before the request leaves, its
outcome, the image file and its row). Sent one by one to worker threads, each write cost a
thread wake-up, a GIL hand-off back and forth and its own fsync; at 64 concurrent requests that
traffic, not the disk, was a quarter of the gateway's CPU (`bench/ablate.py`). Here every write
joins a queue; the writer thread takes everything queued, hands it to the owner's batch
function in one call (one transaction, one fsync) and wakes the event loop once for the batch.
Alone, a write costs what a worker-thread call did; under load the fixed costs are shared.

The thread also runs the owner's other blocking calls (`call`), in queue order, so one thread
owns the owner's SQLite connection. A write still completes when the task awaiting it is
cancelled: it is already queued, and durability does not depend on who is listening.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

log = logging.getLogger(__name__)

W = TypeVar("W")
T = TypeVar("T")

#: What a batch function returns for each write, in order: (value, None) or (None, error).
Outcome = tuple[Any, BaseException | None]

_MAX_BATCH = 256


@dataclass(slots=True)
class _Job:
    future: asyncio.Future[Any]
    write: Any = None
    call: Callable[[], Any] | None = None


class GroupCommit(Generic[W]):
    """One writer thread named `name` that applies writes with `commit(writes) -> outcomes`.

    `commit` must return one `Outcome` per write, in order, and should not raise; if it does,
    every write of that batch fails with the exception.
    """

    def __init__(self, name: str, commit: Callable[[list[W]], list[Outcome]]) -> None:
        self._commit = commit
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    async def write(self, write: W) -> Any:
        """Queue `write`; return its value once its batch is durable (or raise its error)."""
        return await self._put(_Job(self._future(), write=write))

    async def call(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """Run `fn(*args, **kwargs)` on the writer thread, in queue order with the writes."""
        return await self._put(_Job(self._future(), call=functools.partial(fn, *args, **kwargs)))

    def close(self) -> None:
        """Finish everything queued, then stop the thread. Idempotent."""
        if not self._closed:
            self._closed = True
            self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # --- internals ----------------------------------------------------------------------------
    @staticmethod
    def _future() -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    def _put(self, job: _Job) -> asyncio.Future[Any]:
        if self._closed:
            raise RuntimeError("the writer is closed")
        self._queue.put(job)
        return job.future

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            jobs: list[_Job] = []
            stop = job is None
            while job is not None:
                jobs.append(job)
                if len(jobs) >= _MAX_BATCH:
                    break
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                stop = job is None
            if jobs:
                _resolve(self._apply(jobs))
            if stop:
                return

    def _apply(self, jobs: list[_Job]) -> list[tuple[_Job, Outcome]]:
        """Runs of consecutive writes become one batch each; calls run alone, in order."""
        done: list[tuple[_Job, Outcome]] = []
        for is_write, grouped in itertools.groupby(jobs, key=lambda job: job.call is None):
            same = list(grouped)
            if is_write:
                done += zip(same, self._batch([job.write for job in same]))
            else:
                done += [(job, _outcome(job.call)) for job in same]  # type: ignore[arg-type]
        return done

    def _batch(self, writes: list[W]) -> list[Outcome]:
        try:
            outcomes = self._commit(writes)
            if len(outcomes) != len(writes):
                raise RuntimeError(f"commit returned {len(outcomes)} outcomes for "
                                   f"{len(writes)} writes")
            return outcomes
        except BaseException as exc:  # never kill the thread: fail this batch, keep going
            log.exception("group commit failed for a batch of %d", len(writes))
            return [(None, exc)] * len(writes)


def _outcome(fn: Callable[[], Any]) -> Outcome:
    try:
        return fn(), None
    except BaseException as exc:
        return None, exc


def _resolve(done: list[tuple[_Job, Outcome]]) -> None:
    """Wake each event loop once for the whole batch (normally there is only one loop)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, Outcome]]] = {}
    for job, outcome in done:
        by_loop.setdefault(job.future.get_loop(), []).append((job, outcome))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, items)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _settle(items: list[tuple[_Job, Outcome]]) -> None:
    for job, (value, error) in items:
        if job.future.cancelled():  # the waiter left; the write itself is done
            continue
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(value)
