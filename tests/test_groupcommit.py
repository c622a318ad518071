"""GroupCommit: writes from the event loop, applied by one thread in batches."""

from __future__ import annotations

import asyncio
import threading

import pytest

from clawrouter.groupcommit import GroupCommit, Outcome


class Recorder:
    """A batch function that records its batches; a write of "bad" fails alone."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.threads: set[str] = set()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, writes: list[str]) -> list[Outcome]:
        self.gate.wait(5)
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(writes))
        return [(None, ValueError(w)) if w == "bad" else (w.upper(), None) for w in writes]


def test_writes_queued_together_are_one_batch_with_answers_in_order() -> None:
    recorder = Recorder()
    group: GroupCommit[str] = GroupCommit("test-writer", recorder)

    async def main() -> list[object]:
        recorder.gate.clear()  # hold the thread so that the rest queue up behind the first
        first = asyncio.ensure_future(group.write("first"))
        await asyncio.sleep(0.05)
        rest = [group.write(w) for w in ("a", "bad", "b", "c")]
        recorder.gate.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    try:
        results = asyncio.run(main())
    finally:
        group.close()
    assert results[0] == "FIRST" and results[1] == "A" and results[3:] == ["B", "C"]
    assert isinstance(results[2], ValueError)
    assert recorder.batches == [["first"], ["a", "bad", "b", "c"]]
    assert recorder.threads == {"test-writer"}


def test_a_batch_function_that_raises_fails_its_batch_and_the_thread_lives_on() -> None:
    calls: list[list[str]] = []

    def flaky(writes: list[str]) -> list[Outcome]:
        calls.append(writes)
        if len(calls) == 1:
            raise OSError("disk on fire")
        return [(w, None) for w in writes]

    group: GroupCommit[str] = GroupCommit("flaky", flaky)

    async def main() -> str:
        with pytest.raises(OSError, match="disk on fire"):
            await group.write("x")
        return await group.write("y")

    try:
        after = asyncio.run(main())
    finally:
        group.close()
    assert after == "y" and calls == [["x"], ["y"]]


def test_calls_run_on_the_thread_in_queue_order_with_writes() -> None:
    order: list[str] = []

    def commit(writes: list[str]) -> list[Outcome]:
        order.extend(writes)
        return [(None, None)] * len(writes)

    group: GroupCommit[str] = GroupCommit("ordered", commit)

    async def main() -> str:
        first = group.write("w1")
        call = group.call(lambda: (order.append("call"), threading.current_thread().name)[1])
        second = group.write("w2")
        _, name, _ = await asyncio.gather(first, call, second)
        with pytest.raises(ValueError):  # a call's error reaches its caller
            await group.call(int, "not a number")
        return name

    try:
        name = asyncio.run(main())
    finally:
        group.close()
    assert order == ["w1", "call", "w2"] and name == "ordered"


def test_close_finishes_what_is_queued_and_refuses_more() -> None:
    recorder = Recorder()
    group: GroupCommit[str] = GroupCommit("closing", recorder)

    async def main() -> None:
        recorder.gate.clear()
        pending = [asyncio.ensure_future(group.write(w)) for w in ("p", "q")]
        await asyncio.sleep(0.05)
        for task in pending:
            task.cancel()  # nobody waits any more; the writes are still made
        closer = threading.Thread(target=group.close)
        closer.start()
        recorder.gate.set()
        await asyncio.to_thread(closer.join, 5)
        with pytest.raises(RuntimeError, match="closed"):
            await group.write("late")

    asyncio.run(main())
    assert sum(recorder.batches, []) == ["p", "q"]
