"""A bounded LRU of hot image bytes, so serving a popular image costs no disk read.

Uvicorn has no sendfile (ASGI's zero-copy extension is not implemented), so the cheapest body is
one already in memory, sent in a single ASGI message. Content addressing makes this safe: the
bytes for an id can never change, so an entry is never stale, only evicted for room.
"""

from __future__ import annotations

from collections import OrderedDict


class ByteCache:
    def __init__(self, budget: int, *, max_item: int | None = None) -> None:
        self.budget = budget
        #: Larger images are streamed from disk rather than pushing out many small ones.
        self.max_item = max_item if max_item is not None else budget // 8
        self.used = 0
        self._items: OrderedDict[str, bytes] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        data = self._items.get(key)
        if data is not None:
            self._items.move_to_end(key)
        return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.max_item or key in self._items:
            return
        self._items[key] = data
        self.used += len(data)
        while self.used > self.budget:
            _, old = self._items.popitem(last=False)
            self.used -= len(old)

    def discard(self, key: str) -> None:
        data = self._items.pop(key, None)
        if data is not None:
            self.used -= len(data)

    def __len__(self) -> int:
        return len(self._items)
