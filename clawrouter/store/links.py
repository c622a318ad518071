"""The URLs the gateway gives its stored images (`<base>/images/<id>.<ext>`), and knowing one
again when a client sends it back: as an edit's input, or to download a result."""

from __future__ import annotations

from urllib.parse import SplitResult, urlsplit

from clawrouter.config import is_loopback_host
from clawrouter.store.records import NAME

_DEFAULT_PORTS = {"http": 80, "https": 443}


def image_url(base: str, name: str) -> str:
    return f"{base}/images/{name}"


def image_name(url: str, base: str | None = None) -> str | None:
    """`<id>[.<ext>]` when `url` is one of our image URLs, else None.

    With `base` (what this gateway hands out), a URL at its origin under its path counts, and
    so does any loopback one: ids are content hashes, so an id in our store names our bytes
    whichever local gateway (a CLI run's own, on another port) handed the URL out. Without
    `base`, any host (a client that knows it talks to us)."""
    if not url.startswith(("http://", "https://")):
        return None
    try:
        parts = urlsplit(url)
        prefix = "/images/"
        if base is not None:
            home = urlsplit(base)
            if _same_origin(parts, home):
                prefix = home.path.rstrip("/") + prefix
            elif not is_loopback_host(parts.hostname or ""):
                return None
            _ = parts.port  # raises ValueError for a malformed one
    except ValueError:  # a malformed port or address
        return None
    name = parts.path[len(prefix):] if parts.path.startswith(prefix) else ""
    return name if NAME.fullmatch(name) else None


def _same_origin(url: SplitResult, home: SplitResult) -> bool:
    return (url.scheme, url.hostname, url.port or _DEFAULT_PORTS[url.scheme]) == \
        (home.scheme, home.hostname, home.port or _DEFAULT_PORTS.get(home.scheme))
