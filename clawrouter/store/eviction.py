"""Which images to remove: the eviction policy as one pure function.

An image's age is the time since it was last *used* — served, or stored (a dedupe put counts):
an image someone keeps looking at is not deleted just because it was generated long ago.
Images idle for longer than the TTL go; then, once the total is over the size cap, least
recently used first, as many as it takes to bring it to `LOW_WATER` of the cap — so a store that
sits at its cap evicts once in a while, not (scanning the whole index) on every put.

Images stored less than `FRESH_SECONDS` ago are never evicted (`spare`): a put's URL is handed
out as the put returns, and the client fetches it right after. One image bigger than most of
the cap would otherwise be evicted at once, and the client, having paid, would get a 404.
"""

from __future__ import annotations

from collections.abc import Container, Iterable

LOW_WATER = 0.9
#: How long a new image is safe from eviction: long enough for a client to fetch the URL it was
#: just given (after a slow stream, or a retry or two), short enough that a store pushed over
#: its cap by new images comes back under it within minutes.
FRESH_SECONDS = 300.0


def choose_victims(entries: Iterable[tuple[str, int, float]], *, now: float,
                   ttl_seconds: float, max_bytes: int,
                   spare: Container[str] = ()) -> list[tuple[str, float]]:
    """Return (id, last_used) of the images to evict, least recently used first.

    `entries` are (id, size in bytes, last used as a UNIX time); ids in `spare` (the fresh
    ones) are never chosen, though their sizes count.
    """
    ordered = sorted(entries, key=lambda e: e[2])
    total = sum(size for _, size, _ in ordered)
    goal = int(max_bytes * LOW_WATER) if total > max_bytes else total
    victims: list[tuple[str, float]] = []
    for image_id, size, last_used in ordered:
        if now - last_used <= ttl_seconds and total <= goal:
            break  # everything after this one is younger and already fits
        if image_id in spare:
            continue
        victims.append((image_id, last_used))
        total -= size
    return victims
