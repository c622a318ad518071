"""Result downloads that failed in the request path, kept in SQLite and retried with backoff.

The user has already paid when a result URL fails to download, so the request must still
succeed (the caller hands out the upstream URL). We still want the local copy: the failure is
recorded with its error and retried in the background after each delay in `delays`; after the
last one the row stays as `failed` (visible in `stats`) until pruned with the images' TTL.
Rows survive a restart: `load` picks up whatever was still pending.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any

from clawrouter.plaintext import scrub
from clawrouter.store.db import MetadataDB, PendingRow
from clawrouter.store.download import DownloadRefused, Getter
from clawrouter.store.records import Deferred, ImageMeta, StoredImage
from clawrouter.wake import nap

log = logging.getLogger(__name__)

#: Seconds to wait before each retry; upstream result URLs may expire, so the first come soon.
DEFAULT_RETRY_DELAYS: tuple[float, ...] = (10.0, 60.0, 300.0, 1800.0)

Fetch = Callable[[str, ImageMeta, Getter], Awaitable[StoredImage]]
RunDB = Callable[..., Awaitable[Any]]


class PendingDownloads:
    def __init__(self, db: MetadataDB, run_db: RunDB, fetch: Fetch, *,
                 delays: Sequence[float] = DEFAULT_RETRY_DELAYS) -> None:
        self._db = db
        self._run_db = run_db
        self._fetch = fetch
        self._delays = tuple(delays)
        self._rows: dict[int, PendingRow] = {}
        self._wake = asyncio.Event()

    def __len__(self) -> int:
        return len(self._rows)

    async def load(self) -> None:
        self._rows = {r.id: r for r in await self._run_db(self._db.pending_rows)}

    async def defer(self, url: str, meta: ImageMeta, error: str) -> Deferred:
        """Record a failed first attempt and schedule the first retry.

        Never raises: if even the record cannot be written, the paid request still succeeds
        with the upstream URL, and `pending_id` is None.
        """
        next_attempt = self._next_attempt(attempts=1)
        try:
            pending_id: int = await self._run_db(
                self._db.add_pending, url, meta, created=time.time(), error=error,
                next_attempt=next_attempt)
        except Exception:
            log.exception("could not record a deferred result download: %s", scrub(url))
            return Deferred(url=url, error=error, pending_id=None)
        if next_attempt is not None:
            self._rows[pending_id] = PendingRow(
                id=pending_id, url=url, meta=meta, attempts=1, next_attempt=next_attempt,
                last_error=error, state="pending")
            self._wake.set()
        log.warning("result download deferred (%s): %s", scrub(error), scrub(url))
        return Deferred(url=url, error=error, pending_id=pending_id)

    async def run(self, session: Getter) -> None:
        """Retry due downloads forever; a background task cancelled on close."""
        while True:
            now = time.time()
            due = [r for r in self._rows.values()
                   if r.next_attempt is not None and r.next_attempt <= now]
            if due:
                try:
                    await asyncio.gather(*(self._attempt(r, session) for r in due))
                except Exception:  # e.g. the database is locked: keep the loop, try later
                    log.exception("retrying deferred downloads failed")
                    await asyncio.sleep(min(self._delays or (1.0,)))
                continue
            upcoming = [r.next_attempt for r in self._rows.values() if r.next_attempt is not None]
            await nap(self._wake, max(0.0, min(upcoming) - now) if upcoming else None)

    async def _attempt(self, row: PendingRow, session: Getter) -> None:
        try:
            image = await self._fetch(row.url, row.meta, session)
        except Exception as exc:  # DownloadFailed, or storing failed (disk full): retry too
            attempts = row.attempts + 1
            # A refusal (a redirect into the local network) is final: asking again cannot help.
            next_attempt = (None if isinstance(exc, DownloadRefused)
                            else self._next_attempt(attempts))
            await self._run_db(self._db.update_pending, row.id, attempts=attempts,
                               error=str(exc), next_attempt=next_attempt)
            if next_attempt is None:
                self._rows.pop(row.id, None)
                log.warning("result download gave up after %d attempts (%s): %s",
                            attempts, scrub(exc), scrub(row.url))
            else:
                self._rows[row.id] = replace(row, attempts=attempts, next_attempt=next_attempt,
                                             last_error=str(exc))
            return
        await self._run_db(self._db.delete_pending, row.id)
        self._rows.pop(row.id, None)
        log.info("deferred result download stored as %s: %s", image.name, scrub(row.url))

    def _next_attempt(self, attempts: int) -> float | None:
        """When to try again after `attempts` failures, or None to give up."""
        if attempts - 1 < len(self._delays):
            return time.time() + self._delays[attempts - 1]
        return None
