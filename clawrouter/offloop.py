"""Work over many bytes (hashing, base64, joining, encoding), on a worker thread when it is big.

On the event loop, such work makes every other client (a `/health` probe, a small request)
wait for it; on a thread, the loop runs on while it does, as long as the work lets go of the
interpreter lock (pybase64, hashlib, `bytes.join` of big parts and file I/O do; pydantic's
JSON parser and `json` do not, so moving those gains nothing). A hop costs a little latency
too, so small work stays inline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

R = TypeVar("R")

#: Bytes of work past which it moves off the loop, everywhere. A judgement, not a measured
#: crossover: hashing 1.1 MB takes 0.58 ms of CPU (bench/results/disk.md), the costliest work
#: per byte behind this threshold, so what stays inline holds the loop for about half a
#: millisecond at most; a thread hop's own cost (roughly 0.05 ms) is not in bench/results.
OFF_LOOP_BYTES = 1024 * 1024


async def off_loop(fn: Callable[..., R], *args: Any, size: int | None = None) -> R:
    """`fn(*args)`, on a worker thread unless `size` (the bytes it works on) is known to be
    at most `OFF_LOOP_BYTES`."""
    if size is not None and size <= OFF_LOOP_BYTES:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)
