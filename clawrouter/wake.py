"""Background loops: a sleep that can be woken early, and stopping one."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any


async def nap(wake: asyncio.Event, timeout: float | None) -> None:
    """Return when `wake` is set or after `timeout` seconds (None: only when set), with `wake`
    cleared, so a poke that arrives while the loop works wakes its next nap at once."""
    try:
        await asyncio.wait_for(wake.wait(), timeout)
    except asyncio.TimeoutError:
        pass
    wake.clear()


async def stop(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background loop's task (if any) and wait until it has stopped."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
