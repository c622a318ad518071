"""What one entry of an upstream answer's `data` holds: the image's base64, or where it is.

Read by the poll loop (does a 200 bring images?) and by the pipeline (what to store), so the
two never disagree on what counts as an image.
"""

from __future__ import annotations

from typing import Any, NamedTuple


class EntryImage(NamedTuple):
    encoded: str | None  # base64 of the image: `b64_json`, or a `data:` URL's payload
    source: str  # "b64_json" or "data-uri" for encoded ones, else the URL
    remote: str | None  # BlockRun's http(s) URL, else the provider's own (`source_url`)


def entry_image(entry: Any) -> EntryImage | None:
    """The image an entry names, by its shape (nothing decoded); None when it names none."""
    if not isinstance(entry, dict):
        return None
    b64, url = entry.get("b64_json"), entry.get("url")
    remote = next((u for u in (url, entry.get("source_url")) if isinstance(u, str)
                   and u.startswith(("https://", "http://"))), None)
    if isinstance(b64, str) and b64:
        return EntryImage(b64, "b64_json", remote)
    if isinstance(url, str) and url.startswith("data:"):
        return EntryImage(url.partition(",")[2], "data-uri", remote)
    return EntryImage(None, remote, remote) if remote else None


def holds_an_image(body: Any) -> bool:
    """Whether an answer's `data` names at least one image (an upstream that delivered)."""
    data = body.get("data") if isinstance(body, dict) else None
    return isinstance(data, list) and any(map(entry_image, data))
