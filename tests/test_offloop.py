"""The one rule for moving byte-heavy work off the event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from clawrouter.offloop import OFF_LOOP_BYTES, off_loop


@pytest.mark.parametrize("size, inline", [(0, True), (OFF_LOOP_BYTES, True),
                                          (OFF_LOOP_BYTES + 1, False), (None, False)])
def test_work_moves_to_a_thread_only_past_the_threshold_or_when_its_size_is_unknown(size,
                                                                                     inline):
    async def main() -> bool:
        loop_thread = threading.get_ident()
        ran_in = await off_loop(lambda a, b: (a + b, threading.get_ident())[1], 1, 2, size=size)
        return ran_in == loop_thread

    assert asyncio.run(main()) is inline
