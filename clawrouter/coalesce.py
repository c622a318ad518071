"""Exactly-once: repeats of a request share the first one's outcome instead of paying again.

- With an `Idempotency-Key` header, a repeat within 24 h gets the first result (or waits for it
  while it is in flight); the same key with a different request is a 409.
- Without one, an identical request from the same client that arrives while the first is in
  flight, or within `window` seconds after it ended with a payment, gets the first outcome.
  This is what stops the OpenAI SDK's automatic retries (after a timeout or dropped connection)
  from paying twice: it sends no idempotency key of its own.

The shared work stops early (client gone) only when every client waiting on it has left.
Outcomes that involved no payment are not kept: retrying those costs nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from clawrouter.context import RequestContext
from clawrouter.errors import ClawError, Conflict
from clawrouter.pipeline import Result

IDEMPOTENCY_TTL = 24 * 3600.0


@dataclass
class _Entry:
    fingerprint: str
    future: asyncio.Future[Result]
    shared: RequestContext
    clients: list[RequestContext] = field(default_factory=list)
    expires: float = float("inf")

    def attach(self, ctx: RequestContext) -> None:
        self.clients.append(ctx)
        ctx.on_leave(self._maybe_abandon)

    def _maybe_abandon(self) -> None:
        if all(c.gone.is_set() for c in self.clients):
            self.shared.leave()


def _paid(error: BaseException) -> bool:
    return isinstance(error, ClawError) and error.extra.get("payment") not in (None, "none")


def _slim(result: Result) -> Result:
    """Keep stored references, not image bytes, in the cache (shaping re-reads files)."""
    images = [replace(i, data=None) if i.stored is not None else i for i in result.images]
    return replace(result, images=images)


class Coalescer:
    def __init__(self, window: float, *, idempotency_ttl: float = IDEMPOTENCY_TTL,
                 clock: Callable[[], float] = time.monotonic, max_entries: int = 10_000) -> None:
        self.window = window
        self.idempotency_ttl = idempotency_ttl
        self._clock = clock
        self._max = max_entries
        self._entries: OrderedDict[tuple[str, ...], _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def run(self, ctx: RequestContext, fingerprint: str, idempotency_key: str | None,
                  work: Callable[[RequestContext], Awaitable[Result]]) -> Result:
        key = (("key", ctx.client, idempotency_key) if idempotency_key
               else ("same", ctx.client, fingerprint))
        entry = self._live(key)
        if entry is not None:
            if entry.fingerprint != fingerprint:
                raise Conflict("This Idempotency-Key was already used for a different request; "
                               "use a new key for a new request.", param="Idempotency-Key")
            entry.attach(ctx)
            return await asyncio.shield(entry.future)
        shared = RequestContext(ctx.request_id, ctx.base_url, ctx.client)
        entry = _Entry(fingerprint, asyncio.get_running_loop().create_future(), shared)
        entry.attach(ctx)
        self._put(key, entry)
        ttl = self.idempotency_ttl if idempotency_key else self.window
        try:
            result = await work(shared)
        except BaseException as exc:
            entry.future.set_exception(exc)
            entry.future.exception()  # retrieved: joiners re-raise it, nobody else must
            if _paid(exc):
                entry.expires = self._clock() + ttl
            else:
                self._entries.pop(key, None)
            raise
        entry.future.set_result(_slim(result))
        entry.expires = self._clock() + (ttl if result.amount or idempotency_key else 0)
        return result

    def _live(self, key: tuple[str, ...]) -> _Entry | None:
        entry = self._entries.get(key)
        if entry is not None and entry.future.done() and self._clock() >= entry.expires:
            del self._entries[key]
            return None
        return entry

    def _put(self, key: tuple[str, ...], entry: _Entry) -> None:
        self._entries[key] = entry
        while len(self._entries) > self._max:  # drop the oldest finished entries first
            oldest = next((k for k, e in self._entries.items() if e.future.done()), None)
            if oldest is None:
                break
            del self._entries[oldest]


def fingerprint_parts(*parts: Any) -> str:
    import hashlib

    h = hashlib.sha256()
    for part in parts:
        data = part if isinstance(part, bytes) else str(part).encode("utf-8", "surrogatepass")
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()
