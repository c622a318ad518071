"""Which images to remove: the eviction policy as one pure function.

An image's age is the time since it was last *used* — served, or stored (a dedupe put counts):
an image someone keeps looking at is not deleted just because it was generated long ago.
Images idle for longer than the TTL go; then, once the total is over the size cap, least
recently used first, as many as it takes to bring it to `LOW_WATER` of the cap — so a store that
sits at its cap evicts once in a while, not (scanning the whole index) on every put.
"""

from __future__ import annotations

from collections.abc import Iterable

LOW_WATER = 0.9


def choose_victims(entries: Iterable[tuple[str, int, float]], *, now: float,
                   ttl_seconds: float, max_bytes: int) -> list[tuple[str, float]]:
    """Return (id, last_used) of the images to evict, least recently used first.

    `entries` are (id, size in bytes, last used as a UNIX time).
    """
    ordered = sorted(entries, key=lambda e: e[2])
    total = sum(size for _, size, _ in ordered)
    goal = int(max_bytes * LOW_WATER) if total > max_bytes else total
    victims: list[tuple[str, float]] = []
    for image_id, size, last_used in ordered:
        if now - last_used <= ttl_seconds and total <= goal:
            break  # everything after this one is younger and already fits
        victims.append((image_id, last_used))
        total -= size
    return victims
