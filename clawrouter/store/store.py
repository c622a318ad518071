"""`ImageStore`: every image the user paid for, kept on disk and reachable by id.

Files are content-addressed (`<sha256[:32]>.<ext>`, so identical images are stored once) and
written atomically by `files`; metadata lives in SQLite (`db`). New files and all SQLite work
go through the store's one thread, which writes the files and rows of concurrent puts in
batches (one directory fsync and one transaction per batch; see `groupcommit`). What serving
needs is held in memory: the index (id → `StoredImage`) loaded at open, last-use times
(flushed to SQLite in batches) and a byte cache of hot images. `get` therefore
does no I/O at all, and nothing is served unless it is in the index.

On a dedupe put the first row's metadata is kept; the put only counts as a use of the image
(it updates `last_served`, since its URL is about to be handed out again).

Concurrency: puts and evictions of the same id are serialised by a per-id lock, so a put never
returns an image that an eviction is removing. Different ids never wait on each other.

Usable from a CLI: `asyncio.run(...)` the async methods inside `async with ImageStore(...)`.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import weakref
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp

from clawrouter.groupcommit import GroupCommit, Outcome
from clawrouter.inputs.addresses import is_public_address
from clawrouter.offloop import off_loop
from clawrouter.plaintext import scrub
from clawrouter.sniff import EXTENSIONS, sniff_image
from clawrouter.store import files
from clawrouter.store.cache import ByteCache
from clawrouter.store.db import RECOVERED, MetadataDB, refuse_newer
from clawrouter.store.download import (
    DEFAULT_MAX_BYTES,
    DEFAULT_TIMEOUT,
    DownloadFailed,
    DownloadRefused,
    Getter,
    download,
)
from clawrouter.store.eviction import FRESH_SECONDS, choose_victims
from clawrouter.store.pending import DEFAULT_RETRY_DELAYS, PendingDownloads
from clawrouter.store.records import Deferred, ImageMeta, StoredImage, parse_name
from clawrouter.store.sources import ResultSources
from clawrouter.wake import nap

if TYPE_CHECKING:
    from collections.abc import Sequence

    from clawrouter.config import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

_DAY = 86400.0
DB_NAME = "index.sqlite3"
#: The image directory holds every prompt's image and the index every prompt: the owner's only.
DIR_MODE = 0o700


@dataclass(frozen=True)
class Unsaved(Deferred):
    """A result downloaded but not stored (disk full, the directory gone or read-only).

    Its bytes are what the client paid for, so the answer is made from them; storing is retried
    in the background as a failed download is (`pending_id`).
    """

    data: bytes = field(default=b"", repr=False)


class ImageStore:
    def __init__(
        self,
        root: Path,
        *,
        ttl_days: float = 30,
        max_bytes: int = 2 * 1024**3,
        db_path: Path | None = None,
        cache_bytes: int = 16 * 1024**2,  # hot images in memory: ~80 of 200 KB
        download_max_bytes: int = DEFAULT_MAX_BYTES,
        download_timeout: aiohttp.ClientTimeout = DEFAULT_TIMEOUT,
        retry_delays: Sequence[float] = DEFAULT_RETRY_DELAYS,
        flush_interval: float = 30.0,
        prune_interval: float = 600.0,
        temp_grace: float = 60.0,
        fresh_seconds: float = FRESH_SECONDS,
    ) -> None:
        self.root = Path(root)
        self.ttl_days = ttl_days
        self.max_bytes = max_bytes
        self.cache = ByteCache(cache_bytes)
        self.download_max_bytes = download_max_bytes
        self.download_timeout = download_timeout
        self._flush_interval = flush_interval
        self._prune_interval = prune_interval
        self._temp_grace = temp_grace
        self._fresh_seconds = fresh_seconds
        #: id -> when (monotonic) a put of this process last handed its URL out: spared by
        #: eviction for `fresh_seconds` (not images found at open: a CLI prune takes them)
        self._fresh: dict[str, float] = {}
        self._db = MetadataDB(db_path or self.root / DB_NAME)
        self._group: GroupCommit[_Put] | None = None  # the store's one thread
        self._index: dict[str, StoredImage] = {}
        self._last_used: dict[str, float] = {}
        self._served: dict[str, float] = {}  # last-served times not yet written to SQLite
        self._total = 0
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = (
            weakref.WeakValueDictionary())
        self._prune_lock = asyncio.Lock()
        #: disk reads under way, by id: concurrent misses for one image share one read
        self._reads: dict[str, asyncio.Future[bytes | None]] = {}
        self._pending = PendingDownloads(self._db, self._run_db, self.fetch_and_put,
                                         delays=retry_delays)
        self._tasks: list[asyncio.Task[None]] = []
        self._wake = asyncio.Event()
        self._own_sources: ResultSources | None = None

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> ImageStore:
        return cls(settings.images_dir, ttl_days=settings.image_ttl_days,
                   max_bytes=int(settings.image_max_gb * 1024**3), **options)

    # --- lifecycle ----------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse now, before the gateway listens, an index a newer clawrouter wrote
        (`NewerIndex`), which `open` would refuse from inside the running server."""
        refuse_newer(self._db.path)

    async def open(self) -> None:
        """Create the directory and database, clean temporary files, reconcile, load the index.

        Reconciling: a row whose file is missing or has the wrong size is dropped (with the
        file). A well-named file without a row is re-hashed: if its bytes match its name it is
        an image we stored whose row was lost (a crash between rename and commit, or the last
        commits lost with `synchronous=NORMAL`), so it is indexed with unknown metadata and
        source "recovered" — the user paid for it. Otherwise it is corrupt and deleted. Files
        not named like ours are left alone and never served.
        """
        self._group = GroupCommit("image-store", self._commit)
        await asyncio.to_thread(_make_private_dir, self.root)
        await self._run_db(self._db.open)
        # Rows before files: a file is in place before its row commits, so an image another
        # process stores meanwhile shows as a file without a row (recovered, then its real row
        # wins), never as a row without a file (which would be dropped).
        rows = await self._run_db(self._db.index_rows)
        scan = await asyncio.to_thread(files.scan, self.root, temp_grace=self._temp_grace)
        await asyncio.to_thread(files.remove, scan.stale_temps)

        keep, drop_rows, drop_files = [], [], []
        for row in rows:
            name = f"{row.id}.{row.ext}"
            size = scan.images.pop(name, None)
            if size == row.bytes:
                keep.append(row)
                continue
            drop_rows.append(row.id)
            if size is not None:
                drop_files.append(self.root / name)
        recovered = await asyncio.to_thread(self._recover, list(scan.images), drop_files)
        await asyncio.to_thread(files.remove, drop_files)
        if drop_rows:
            await self._run_db(self._db.delete_images, drop_rows)
        for image in recovered:
            await self._run_db(self._db.insert_image, image, ImageMeta(source=RECOVERED))
        if scan.stale_temps or drop_rows or drop_files or recovered:
            log.warning("image store reconciled: %d temporary files removed, %d rows without "
                        "a valid file dropped, %d files recovered, %d corrupt files removed",
                        len(scan.stale_temps), len(drop_rows), len(recovered), len(drop_files))

        for row in keep:
            self._add(StoredImage(id=row.id, ext=sys.intern(row.ext),
                                  content_type=sys.intern(row.content_type),
                                  bytes=row.bytes, root=self.root,
                                  created=row.created), row.last_used)
        for image in recovered:
            self._add(image, image.created)
        await self._pending.load()

    def _recover(self, names: list[str], corrupt: list[Path]) -> list[StoredImage]:
        """Re-hash files found without a row; return the valid ones, append the rest to corrupt."""
        recovered = []
        for name in names:
            path = self.root / name
            try:
                checked = files.verify(path)
                created = path.stat().st_mtime
            except FileNotFoundError:  # evicted by another process sharing the store
                continue
            except OSError as exc:  # left as it is, for the next start to look at again
                log.warning("image store: %s could not be read (%s); left in place", name, exc)
                continue
            if checked is None:
                corrupt.append(path)
                continue
            image_id, ext = name.split(".")
            recovered.append(StoredImage(id=image_id, ext=ext, content_type=checked[0],
                                         bytes=checked[1], root=self.root, created=created))
        return recovered

    async def start(self, session: Getter | None = None) -> None:
        """Start background eviction, last-served flushing and download retries.

        Retries use `session`, or sources of the store's own that reach public addresses only
        (closed by `aclose`).
        """
        if session is None:
            session = self._own_sources = ResultSources(is_public_address)
        self._tasks = [asyncio.create_task(self._maintain(), name="image-store-maintenance"),
                       asyncio.create_task(self._pending.run(session), name="image-store-retry")]

    async def aclose(self) -> None:
        """Stop background work, write last-served times, close the database."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("image store task %s failed", task.get_name())
        self._tasks = []
        if self._own_sources is not None:
            sources, self._own_sources = self._own_sources, None
            await sources.aclose()
        if self._group is None:
            return
        await self._flush_served()
        await self._run_db(self._db.close)
        group, self._group = self._group, None
        await asyncio.to_thread(group.close)

    async def __aenter__(self) -> ImageStore:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # --- storing ------------------------------------------------------------------------------
    async def put_bytes(self, data: bytes, meta: ImageMeta) -> StoredImage:
        """Store decoded bytes (data URI or `b64_json` results); ValueError if not an image."""
        content_type = sniff_image(data)
        if content_type is None:
            raise ValueError("not a PNG, JPEG, WEBP or GIF image")
        image_id = await off_loop(files.content_id, data, size=len(data))
        ext = EXTENSIONS[content_type]
        async with self._lock(image_id):
            existing = self._index.get(image_id)
            if existing is not None:
                if await asyncio.to_thread(existing.path.exists):
                    self.mark_served(image_id)  # its URL is about to be handed out again
                    self._fresh[image_id] = time.monotonic()
                    return existing
                self.discard(image_id)  # deleted behind our back: stored again below
            image = StoredImage(id=image_id, ext=ext, content_type=content_type,
                                bytes=len(data), root=self.root,
                                created=time.time())
            # The file, then its row; the image is served only once both are done. A crash in
            # between leaves a file without its row, which `open` recovers.
            try:
                await self._write(image, data, meta)
            except FileNotFoundError:  # the directory was deleted: made again, then once more
                if not await self._run_db(self._restore_root):
                    raise
                await self._write(image, data, meta)
            self._add(image, image.created)
            self._fresh[image_id] = time.monotonic()
            if image.bytes > self.max_bytes:
                log.warning("an image of %d bytes is bigger than the store's cap (%d bytes, "
                            "image_max_gb): it is evicted once it is %d s old", image.bytes,
                            self.max_bytes, self._fresh_seconds)
            if existing is not None:  # stored again under its old row: not idle since then
                self.mark_served(image_id)
            self.cache.put(image_id, data)
        if self._over_cap():
            self._wake.set()
        return image

    def _over_cap(self) -> bool:
        """Over `max_bytes` with an image a prune may take: fresh images alone over the cap
        (one bigger than it, a burst) would have every put and tick sort the index for nothing."""
        if self._total <= self.max_bytes:
            return False
        since = time.monotonic() - self._fresh_seconds
        return sum(t > since for t in self._fresh.values()) < len(self._index)

    async def fetch_and_put(self, url: str, meta: ImageMeta,
                            session: Getter) -> StoredImage:
        """Download a result URL and store it; raises `DownloadFailed` (also for non-images).

        The stored `source` is the URL (`meta.source` is ignored).
        """
        data = await download(url, session, max_bytes=self.download_max_bytes,
                              timeout=self.download_timeout)
        return await self.put_bytes(data, replace(meta, source=url))

    async def put_remote_or_defer(self, url: str, meta: ImageMeta,
                                  session: Getter) -> StoredImage | Deferred:
        """`fetch_and_put`, but a failure never fails the (already paid) request.

        On any failure (download, or storing: disk full) the download is recorded in SQLite with
        its error and retried in the background. A failed download gives a `Deferred` (the
        caller returns the upstream URL); a download that could not be stored gives `Unsaved`,
        with the bytes, for the caller to answer from. Never raises, except `CancelledError`.
        """
        try:
            data = await download(url, session, max_bytes=self.download_max_bytes,
                                  timeout=self.download_timeout)
        except DownloadRefused as exc:  # retrying cannot help: nothing to record
            # the upstream's URL, which may quote the payment we sent it: scrubbed in the log
            log.warning("result download refused (%s): %s", scrub(exc), scrub(url))
            return Deferred(url=url, error=str(exc), pending_id=None)
        except Exception as exc:
            error = str(exc) if isinstance(exc, DownloadFailed) else f"{type(exc).__name__}: {exc}"
            return await self._pending.defer(url, meta, error)
        try:
            return await self.put_bytes(data, replace(meta, source=url))
        except Exception as exc:  # (`download` checked it is an image: this is our disk)
            error = f"{type(exc).__name__}: {exc}"
            log.warning("a downloaded result could not be stored (%s): answered from memory, "
                        "storing retried: %s", scrub(error), scrub(url))
            deferred = await self._pending.defer(url, meta, error)
            return Unsaved(deferred.url, deferred.error, deferred.pending_id, data)

    # --- reading ------------------------------------------------------------------------------
    def get(self, name: str) -> StoredImage | None:
        """The image for `<id>` or `<id>.<ext>` if the id is in the index (no I/O).

        The extension is not compared: callers that care (the server) check `image.ext`.
        """
        parsed = parse_name(name)
        return self._index.get(parsed[0]) if parsed is not None else None

    def mark_served(self, image_id: str) -> None:
        """Record a use for eviction; written to SQLite in batches."""
        now = time.time()
        self._last_used[image_id] = now
        self._served[image_id] = now

    async def read(self, image: StoredImage) -> bytes | None:
        """The image's bytes from the cache or disk (cached if small); None if the file is gone
        or too big to cache (the caller streams it).

        Concurrent misses for one image share one read: a burst of requests for an image not
        cached (after a restart, or pushed out) would otherwise hold a copy each."""
        data = self.cache.get(image.id)
        if data is not None:
            return data
        if image.bytes > self.cache.max_item:
            return None
        flight = self._reads.get(image.id)
        if flight is None:
            flight = self._reads[image.id] = asyncio.ensure_future(self._read_file(image))
            flight.add_done_callback(lambda done: self._read_done(image.id, done))
        # shielded: a reader that leaves (its client gone) does not cancel the others' read
        return await asyncio.shield(flight)

    async def _read_file(self, image: StoredImage) -> bytes | None:
        try:
            data = await asyncio.to_thread(_read_bytes, image.path)
        except FileNotFoundError:
            self.discard(image.id)
            return None
        self.cache.put(image.id, data)
        return data

    def _read_done(self, image_id: str, flight: asyncio.Future[bytes | None]) -> None:
        if self._reads.get(image_id) is flight:
            del self._reads[image_id]
        if not flight.cancelled():
            flight.exception()  # retrieved: every reader may have left

    async def present(self, image: StoredImage) -> bool:
        """Whether `read` would find the image (cached, or its file there), as a HEAD must
        say without reading it; a file gone is forgotten, as `read` forgets it."""
        if self.cache.get(image.id) is not None or await asyncio.to_thread(image.path.exists):
            return True
        self.discard(image.id)
        return False

    def discard(self, image_id: str) -> None:
        """Forget an image whose file disappeared behind our back (the row goes at next open)."""
        image = self._index.pop(image_id, None)
        if image is not None:
            self._total -= image.bytes
            self._last_used.pop(image_id, None)
            self._served.pop(image_id, None)
            self._fresh.pop(image_id, None)
            self.cache.discard(image_id)

    async def ls(self, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        """Stored images with their metadata, newest first (for `clawrouter images ls`).

        Each dict has the database columns plus `name` and `path`.
        """
        await self._flush_served()
        return _named(self.root, await self._run_db(self._db.list_images, limit, offset))

    @staticmethod
    async def rows(root: Path, limit: int = 50, offset: int = 0) -> list[dict[str, Any]]:
        """What `ls` lists, without opening the store: nothing is reconciled or written, so it
        is safe beside a gateway using the store (`open` would drop what it is writing)."""
        def read() -> list[dict[str, Any]]:
            if not (root / DB_NAME).exists():
                return []
            db = MetadataDB(root / DB_NAME)
            db.open()
            try:
                return db.list_images(limit, offset)
            finally:
                db.close()

        return _named(root, await asyncio.to_thread(read))

    async def kept_since(self, since: float) -> dict[str, int]:
        """How many images each request (by id) stored or queued to download since `since`."""
        return await self._run_db(self._db.kept_since, since)

    async def stats(self) -> dict[str, Any]:
        counts = await self._run_db(self._db.pending_counts)
        return {"count": len(self._index), "bytes": self._total, "max_bytes": self.max_bytes,
                "ttl_days": self.ttl_days, "pending_downloads": counts.get("pending", 0),
                "failed_downloads": counts.get("failed", 0), "cached_bytes": self.cache.used}

    # --- eviction -----------------------------------------------------------------------------
    async def prune(self) -> list[str]:
        """Evict images idle for over `ttl_days`, then least recently used ones until the total
        fits `max_bytes`; return the removed names. Images whose URL a put of this process
        handed out less than `fresh_seconds` ago are spared (`eviction.FRESH_SECONDS`). Also
        drops failed downloads past the TTL, and temporary files a crashed write left (older
        than `temp_grace`)."""
        async with self._prune_lock:
            now = time.time()
            ttl = self.ttl_days * _DAY
            since = time.monotonic() - self._fresh_seconds
            self._fresh = {i: t for i, t in self._fresh.items() if t > since}
            chosen = await self._choose(now, ttl)
            removed: list[StoredImage] = []
            async with AsyncExitStack() as stack:
                for image_id, last_used in chosen:
                    await stack.enter_async_context(self._lock(image_id))
                    # A put or a serve since choosing made it young again: keep it.
                    image = self._index.get(image_id)
                    if (image is not None and self._last_used.get(image_id) == last_used
                            and self._fresh.get(image_id, since) <= since):
                        self.discard(image_id)
                        removed.append(image)
                if removed:
                    # Files first: a crash in between leaves rows without files, which open()
                    # drops, rather than files without rows, which it would resurrect.
                    await asyncio.to_thread(files.remove, [img.path for img in removed])
                    await self._run_db(self._db.delete_images, [img.id for img in removed])
            await self._run_db(self._db.delete_failed_before, now - ttl)
            try:
                swept = await asyncio.to_thread(self._sweep_temps)
            except OSError as exc:  # the next prune tries again
                log.warning("image store: temporary files could not be removed (%s)", exc)
            else:
                if swept:
                    log.warning("image store: %d temporary files left by a crashed write "
                                "removed", swept)
        if removed:
            log.info("evicted %d images (%d bytes)", len(removed),
                     sum(img.bytes for img in removed))
        return [img.name for img in removed]

    async def _choose(self, now: float, ttl: float) -> list[tuple[str, float]]:
        """`choose_victims` on a worker thread, over copies of the index: sorting it all held
        the event loop (every client) for ~20 ms at 30k images, ~250 ms at 300k; the copies
        cost it about a twentieth of that. Puts and serves go on meanwhile, so `prune` checks
        each victim again before removing it."""
        index, last_used, fresh = self._index.copy(), self._last_used.copy(), set(self._fresh)
        entries = ((i, img.bytes, last_used.get(i, img.created)) for i, img in index.items())
        return await asyncio.to_thread(choose_victims, entries, now=now, ttl_seconds=ttl,
                                       max_bytes=self.max_bytes, spare=fresh)

    async def _maintain(self) -> None:
        """Flush last-served times every `flush_interval`; prune every `prune_interval`, or as
        soon as a put takes the total over `max_bytes`."""
        last_prune = 0.0
        while True:
            await nap(self._wake, self._flush_interval)
            try:
                await self._flush_served()
                now = time.monotonic()
                if self._over_cap() or now - last_prune >= self._prune_interval:
                    last_prune = now
                    await self.prune()
            except Exception:  # keep the loop alive; the next tick retries
                log.exception("image store maintenance failed")
            try:  # after the prune, which a put over the cap is waiting for
                await self._run_db(self._restore_root)  # a stat or two: see `_restore_root`
            except Exception:
                log.exception("image store: checking its directory failed")

    def _sweep_temps(self) -> int:
        """Remove stale temporary files (in a worker thread): `open` spares those younger than
        the grace, so a restart soon after a crash would keep them until the next one."""
        stale = files.stale_temps(self.root, temp_grace=self._temp_grace)
        files.remove(stale)
        return len(stale)

    async def _flush_served(self) -> None:
        if self._served:
            served, self._served = self._served, {}
            await self._run_db(self._db.set_last_served, served)

    # --- internals ----------------------------------------------------------------------------
    async def _write(self, image: StoredImage, data: bytes, meta: ImageMeta) -> None:
        """Write the file and its row (group committed with concurrent puts; see `_commit`)."""
        if self._group is None:
            raise RuntimeError("the image store is not open")
        await self._group.write(_Put(image, data, meta))

    def _commit(self, puts: list[_Put]) -> list[Outcome]:
        """Files first (each fsynced and renamed, then the directory fsynced once for all),
        then their rows in one transaction: the index never names a file that is not on disk.
        A file that fails (disk full) fails its put alone; rows that fail leave their files for
        `open` to recover."""
        errors: list[BaseException | None] = []
        for put in puts:
            try:
                files.write_atomic(self.root, put.image.name, put.data, sync_dir=False)
                errors.append(None)
            except Exception as exc:
                errors.append(exc)
        written = [put for put, error in zip(puts, errors) if error is None]
        if written:
            try:
                files.fsync_dir(self.root)
                self._db.insert_images((put.image, put.meta) for put in written)
            except Exception as exc:
                errors = [exc if error is None else error for error in errors]
        return [(None, error) for error in errors]

    def _restore_root(self) -> bool:
        """On the store's thread: if the image directory was deleted (`rm -rf images/` on a
        running gateway), make it again and move the index into it, from the connection still
        open on the deleted file (whose rows would otherwise be lost at the next start).
        Return whether the directory is there to write into. Cheap (a stat or two): it runs
        when a write finds no directory, and on each maintenance tick."""
        if not self.root.is_dir():
            try:
                _make_private_dir(self.root)
            except OSError as exc:  # e.g. a file is in the way: the puts fail, and say why
                log.warning("image store: %s is gone and could not be made again (%s)",
                            self.root, exc)
                return False
            log.warning("image store: %s was deleted while in use; made again (the images "
                        "in it are gone)", self.root)
        self._db.reopen_if_moved()
        return True

    def _add(self, image: StoredImage, last_used: float) -> None:
        self._index[image.id] = image
        self._last_used[image.id] = last_used
        self._total += image.bytes

    def _lock(self, image_id: str) -> asyncio.Lock:
        lock = self._locks.get(image_id)
        if lock is None:
            lock = self._locks[image_id] = asyncio.Lock()
        return lock

    async def _run_db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._group is None:
            raise RuntimeError("the image store is not open")
        return await self._group.call(fn, *args, **kwargs)


@dataclass(frozen=True, slots=True)
class _Put:
    image: StoredImage
    data: bytes
    meta: ImageMeta


def _read_bytes(path: Path) -> bytes:
    """A file's bytes (in a worker thread; a name of its own, for tests to count reads)."""
    return path.read_bytes()


def _make_private_dir(path: Path) -> None:
    """Make the directory for the owner only, and tighten one an older version made 0755."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    try:
        if path.stat().st_mode & 0o777 != DIR_MODE:
            path.chmod(DIR_MODE)
    except OSError as exc:  # not ours to change (another user's store): read it as it is
        log.warning("image store: could not make %s private (%s)", path, exc)


def _named(root: Path, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for row in rows:
        row["name"] = f"{row['id']}.{row['ext']}"
        row["path"] = str(root / row["name"])
    return rows
