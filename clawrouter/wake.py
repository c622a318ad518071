"""The sleep of a background loop that can be woken early."""

from __future__ import annotations

import asyncio


async def nap(wake: asyncio.Event, timeout: float | None) -> None:
    """Return when `wake` is set or after `timeout` seconds (None: only when set), with `wake`
    cleared, so a poke that arrives while the loop works wakes its next nap at once."""
    try:
        await asyncio.wait_for(wake.wait(), timeout)
    except asyncio.TimeoutError:
        pass
    wake.clear()
