"""Prices learned from challenges, so a known price can be paid with the first request.

Every peer pays with two round trips per image (unpaid probe → 402 → paid request). Once we
have seen the challenge for a (route, model, size, n), we sign from it straight away and save
the probe. Entries expire after `ttl` seconds and are dropped when the upstream rejects one;
`forget(hold_off=…)` also keeps a key from being learned again for a while.
Only challenges that passed the policy are ever learned, and they pass it again before reuse.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from clawrouter.payment.wire import Challenge

#: route, model id, size, n, quality, input images, mask: a learned price is reused only for
#: a request that matches it in all of them
PriceKey = tuple[str, str, str, int, str | None, int, bool]


@dataclass(frozen=True)
class KnownPrice:
    challenge: Challenge
    learned: float


class PriceBook:
    def __init__(self, ttl: float, *, clock: Callable[[], float] = time.monotonic,
                 max_entries: int = 1024) -> None:
        self.ttl = ttl
        self._clock = clock
        self._max = max_entries
        self._known: dict[PriceKey, KnownPrice] = {}
        self._held_off: dict[PriceKey, float] = {}  # key: when it may be learned again

    def get(self, key: PriceKey) -> Challenge | None:
        known = self._known.get(key)
        if known is None:
            return None
        if self._clock() - known.learned > self.ttl:
            del self._known[key]
            return None
        return known.challenge

    def learn(self, key: PriceKey, challenge: Challenge) -> None:
        until = self._held_off.get(key)
        if until is not None:
            if self._clock() < until:
                return
            del self._held_off[key]
        if len(self._known) >= self._max and key not in self._known:
            self._known.pop(next(iter(self._known)))
        self._known[key] = KnownPrice(challenge, self._clock())

    def forget(self, key: PriceKey, *, hold_off: float = 0.0) -> None:
        """Drop what was learned for `key`; with `hold_off`, learn nothing for it for that
        many seconds (the upstream refused a pre-authorised payment for a reason other than
        its price)."""
        self._known.pop(key, None)
        if hold_off > 0:
            if len(self._held_off) >= self._max and key not in self._held_off:
                self._held_off.pop(next(iter(self._held_off)))
            self._held_off[key] = self._clock() + hold_off
