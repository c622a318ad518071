"""The values the store hands out: what was stored, what it cost, and what is still pending.

Plain frozen dataclasses so the API layer, the CLI and the tests can pass them around without
touching the store's internals.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

#: A public image name: the id (32 lowercase hex chars of the SHA-256) and an optional extension.
#: Used with `fullmatch` only (`$` would also accept a trailing newline).
NAME = re.compile(r"([0-9a-f]{32})(?:\.([a-z]{3,4}))?")
ID_LENGTH = 32


@dataclass(frozen=True)
class ImageMeta:
    """What we know about where an image came from; every field may be unknown."""

    model: str | None = None
    prompt: str | None = None
    size: str | None = None
    #: What the image cost, in micro-USDC (USDC's atomic unit: 1 USDC = 1_000_000).
    cost_micro: int | None = None
    request_id: str | None = None
    #: The upstream URL it was downloaded from, or "data-uri" / "b64" for inline results.
    source: str | None = None


@dataclass(frozen=True, slots=True)  # one per stored image, kept in memory: keep it small
class StoredImage:
    """One file in the store; its path comes from the index, never from a request.

    Every indexed image stays in memory, so the entry is kept small: `root` is the store's one
    shared directory object and the path is built when asked for (a `Path` per image would
    more than double the entry; bench/soak.py watches RSS).
    """

    id: str
    ext: str
    content_type: str
    bytes: int
    root: Path  # the store's directory (shared by all entries)
    created: float

    @property
    def path(self) -> Path:
        return self.root / self.name

    @property
    def name(self) -> str:
        """The public file name, `<id>.<ext>`, as served under `/images/`."""
        return f"{self.id}.{self.ext}"

    @property
    def etag(self) -> str:
        """A strong validator: the content hash never changes for a given id."""
        return f'"{self.id}"'


@dataclass(frozen=True)
class Deferred:
    """A remote result we could not download yet; the caller returns the upstream URL instead.

    The download is recorded in SQLite (`pending_id`, the `pending` table's row id) and
    retried in the background; `pending_id` is None if even that record could not be written.
    """

    url: str
    error: str
    pending_id: int | None


def parse_name(name: str) -> tuple[str, str | None] | None:
    """Split `<id>[.<ext>]` into (id, ext), or None if it is not a well-formed image name."""
    match = NAME.fullmatch(name)
    if match is None:
        return None
    return match.group(1), match.group(2)
