"""Saving and serving images: every image the user paid for stays reachable at `/images/<id>.<ext>`.

- `records`: the values handed out (`ImageMeta`, `StoredImage`, `Deferred`).
- `files`: content addressing and crash-safe writes on disk.
- `db`: SQLite metadata (images and pending downloads).
- `store`: `ImageStore`, the in-memory index over both, with eviction.
- `eviction`: which images to remove, as a pure function.
- `download`: fetching a remote result with a deadline, a byte cap and a type check.
- `sources`: which connection a result URL may use (other hosts than the upstream's: public
  addresses only).
- `pending`: failed downloads, retried in the background.
- `cache`: the LRU of hot image bytes.
- `ranges`: the `Range` header.
- `server`: `ImageServer`, the ASGI endpoint.
- `links`: the URLs handed out for stored images, and knowing one again when a client sends it
  back.
"""

from clawrouter.store.download import DownloadFailed
from clawrouter.store.records import Deferred, ImageMeta, StoredImage
from clawrouter.store.server import ImageServer
from clawrouter.store.store import ImageStore

__all__ = ["Deferred", "DownloadFailed", "ImageMeta", "ImageServer", "ImageStore", "StoredImage"]
