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

    With `base` (what this gateway hands out), only a URL at its origin counts, any loopback
    name standing for any other (`localhost` and `127.0.0.1` are the same gateway), under its
    path; without it, any host (a client that knows it talks to us)."""
    if not url.startswith(("http://", "https://")):
        return None
    try:
        parts = urlsplit(url)
        prefix = "/images/"
        if base is not None:
            home = urlsplit(base)
            if not _same_origin(parts, home):
                return None
            prefix = home.path.rstrip("/") + prefix
    except ValueError:  # a malformed port or address
        return None
    name = parts.path[len(prefix):] if parts.path.startswith(prefix) else ""
    return name if NAME.fullmatch(name) else None


def _same_origin(url: SplitResult, home: SplitResult) -> bool:
    if url.scheme != home.scheme or (
            (url.port or _DEFAULT_PORTS[url.scheme]) != (home.port or _DEFAULT_PORTS[home.scheme])):
        return False
    host, ours = url.hostname or "", home.hostname or ""
    return host == ours or (is_loopback_host(host) and is_loopback_host(ours))
