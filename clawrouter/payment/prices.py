"""Prices learned from challenges, so a known price can be paid with the first request.

Every peer pays with two round trips per image (unpaid probe → 402 → paid request). Once we
have seen the challenge for a (route, model, size, n), we sign from it straight away and save
the probe. Entries expire after `ttl` seconds and are dropped when the upstream rejects one;
`forget(hold_off=…)` also keeps a key from being learned again for a while, and so does a
refusal of a price learned after a first refusal, with none accepted in between (`refused`):
an upstream that refuses pre-authorised payments costs a second signature once, not every
time.
Only challenges that passed the policy are ever learned, and they pass it again before reuse.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

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
        #: key: when a learned price was first refused, until a pre-authorised one is accepted
        self._refused: dict[PriceKey, float] = {}

    def get(self, key: PriceKey) -> KnownPrice | None:
        """The price learned for `key`, with when it was learned (`refused` compares it)."""
        known = self._known.get(key)
        if known is None:
            return None
        if self._clock() - known.learned > self.ttl:
            del self._known[key]
            return None
        return known

    def learn(self, key: PriceKey, challenge: Challenge) -> None:
        until = self._held_off.get(key)
        if until is not None:
            if self._clock() < until:
                return
            del self._held_off[key]
        self._bounded(self._known, key, KnownPrice(challenge, self._clock()))

    def forget(self, key: PriceKey, *, hold_off: float = 0.0) -> None:
        """Drop what was learned for `key`; with `hold_off`, learn nothing for it for that
        many seconds (the upstream refused a pre-authorised payment for a reason other than
        its price)."""
        self._known.pop(key, None)
        if hold_off > 0:
            self._bounded(self._held_off, key, self._clock() + hold_off)

    def refused(self, key: PriceKey, known: KnownPrice, *, hold_off: float) -> None:
        """The upstream refused a payment signed from `known` (from `get`): drop what is
        learned for `key`. If `known` was learned after an earlier refusal for `key`, with
        none accepted since, learn nothing for `key` for `hold_off` seconds, whatever the
        amounts: a quote that moves every time does not explain the refusals. A price learned
        before the first refusal counts with it: requests in flight when the price changed
        signed from whatever was learned as they started, and are refused for one reason."""
        first = self._refused.get(key)
        if first is not None and self._clock() - first > self.ttl:
            first = None  # older than a learned price lives: it says nothing of this one
        again = first is not None and known.learned > first
        self.forget(key, hold_off=hold_off if again else 0.0)
        if first is None:
            self._bounded(self._refused, key, self._clock())

    def accepted(self, key: PriceKey) -> None:
        """A pre-authorised payment for `key` went through: its earlier refusal is forgiven."""
        self._refused.pop(key, None)

    def _bounded(self, table: dict[PriceKey, Any], key: PriceKey, value: Any) -> None:
        """Set `table[key]`, dropping the oldest entry when the table is full."""
        if len(table) >= self._max and key not in table:
            table.pop(next(iter(table)))
        table[key] = value
