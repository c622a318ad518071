"""SQLite metadata for stored images and pending downloads.

Blocking by nature: `ImageStore` calls every method on one dedicated worker thread, which also
owns the connection (sqlite3 connections stay on the thread that made them). WAL lets the CLI
read while the gateway writes; `synchronous=NORMAL` may lose the last commits on power loss but
never corrupts, and opening the store re-indexes any file whose row was lost.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clawrouter.ownerfiles import owner_only
from clawrouter.store.records import ImageMeta, StoredImage

log = logging.getLogger(__name__)

class _FailedCheck(sqlite3.DatabaseError):
    """`PRAGMA quick_check` found damage the open itself did not meet."""


def _damaged(exc: sqlite3.DatabaseError) -> bool:
    """What SQLite says of a file that is not (or no longer) a database it can read
    (SQLITE_CORRUPT_INDEX and the like included), or what `quick_check` found."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    return (isinstance(exc, _FailedCheck) or name == "SQLITE_NOTADB"
            or name.startswith("SQLITE_CORRUPT"))


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


#: The `source` of a row rebuilt from a file found on disk without one.
RECOVERED = "recovered"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id           TEXT PRIMARY KEY,
    ext          TEXT NOT NULL,
    content_type TEXT NOT NULL,
    bytes        INTEGER NOT NULL,
    created      REAL NOT NULL,
    last_served  REAL,
    model        TEXT,
    prompt       TEXT,
    size         TEXT,
    cost_micro   INTEGER,
    request_id   TEXT,
    source       TEXT
);
CREATE INDEX IF NOT EXISTS images_by_created ON images (created);
CREATE TABLE IF NOT EXISTS pending (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    url          TEXT NOT NULL,
    model        TEXT,
    prompt       TEXT,
    size         TEXT,
    cost_micro   INTEGER,
    request_id   TEXT,
    created      REAL NOT NULL,
    attempts     INTEGER NOT NULL,
    next_attempt REAL,
    last_error   TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('pending', 'failed'))
);
"""

_META = ("model", "prompt", "size", "cost_micro", "request_id")

#: `PRAGMA user_version` of the index: 1 is `_SCHEMA` as it has been from the first release
#: (whose files say 0). A later version that changes what the index means raises it, so that
#: this one refuses its index (`NewerIndex`) instead of misreading or rewriting it.
INDEX_VERSION = 1


class NewerIndex(RuntimeError):
    """The image index was written by a newer clawrouter. Not damage (a damaged index is moved
    aside and rebuilt, losing its prompts and costs to the version that wrote them): the
    user's to settle, said in one line by every command (`index_unusable` in `--json`)."""


def _known_version(conn: sqlite3.Connection, path: Path) -> int:
    """The index's version, if this clawrouter knows it; `NewerIndex` if not."""
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > INDEX_VERSION:
        raise NewerIndex(
            f"image index {path} was written by a newer clawrouter (version {version}, this "
            f"one knows {INDEX_VERSION}): upgrade clawrouter to use it (the images stay as "
            "they are)")
    return version


def refuse_newer(path: Path) -> None:
    """Raise `NewerIndex` now if a newer clawrouter wrote the index at `path`: called before
    the gateway listens (as the ledger is opened), since the store opens its index once the
    server runs, where a failure ends in a traceback instead of one line. Anything else (no
    file yet, damage) is left to `MetadataDB.open`."""
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error:
        return
    try:
        _known_version(conn, path)
    except sqlite3.Error:
        pass
    finally:
        conn.close()


@dataclass(frozen=True)
class IndexRow:
    """The part of a row the in-memory index needs."""

    id: str
    ext: str
    content_type: str
    bytes: int
    created: float
    last_used: float  # last_served, or created if never served


@dataclass(frozen=True)
class PendingRow:
    id: int
    url: str
    meta: ImageMeta
    attempts: int
    next_attempt: float | None
    last_error: str
    state: str


class MetadataDB:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._opened: tuple[int, int] | None = None  # the file the connection is on

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the image database is not open")
        return self._conn

    def open(self) -> None:
        """Open (or create) the index. A damaged one is moved aside and started afresh: the
        images are files named by their hash, so the store's `open` recovers every one of them
        (their prompts and costs stay in the file moved aside, and the ledger keeps every
        payment)."""
        before = _identity(self.path)
        try:
            self._conn = self._connect()
            return
        except sqlite3.DatabaseError as exc:
            if not _damaged(exc):
                raise
            damage = exc
        # Another gateway sharing the store may have moved it aside already, and made a new
        # one: that one is not ours to move.
        if _identity(self.path) == before:
            aside = self.path.with_name(
                f"{self.path.name}.damaged-{int(time.time())}-{os.getpid()}")
            for suffix in ("", "-wal", "-shm"):
                try:
                    self.path.with_name(self.path.name + suffix).rename(
                        aside.with_name(aside.name + suffix))
                except FileNotFoundError:  # no such part (or another gateway moved it)
                    continue
            log.warning("the image index %s was damaged (%s): moved to %s, and a new one is "
                        "built from the image files", self.path, damage, aside)
        self._conn = self._connect()

    def reopen_if_moved(self) -> None:
        """If the index file was deleted (or replaced) while open, write what the connection
        still holds to a new file at `path` and go on there: otherwise every later write would
        go to the deleted file, and be lost at the next start."""
        if self._conn is None or _identity(self.path) == self._opened:
            return
        if _identity(self.path) is None:
            fresh = sqlite3.connect(owner_only(self.path))
            try:
                self._conn.backup(fresh)
            finally:
                fresh.close()
            log.warning("the image index %s was deleted while open: written again", self.path)
        else:  # another process put a file there: that one is the index now
            log.warning("the image index %s was replaced while open: using the new one",
                        self.path)
        self.close()
        self._conn = self._connect()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(owner_only(self.path), timeout=10)
        try:
            conn.row_factory = sqlite3.Row
            version = _known_version(conn, self.path)  # before anything is written to it
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            if version < INDEX_VERSION:
                conn.execute(f"PRAGMA user_version = {INDEX_VERSION}")
            # damage past the header shows only when its pages are read: read them all now
            if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise _FailedCheck("quick_check found the index damaged")
        except BaseException:
            conn.close()
            raise
        self._opened = _identity(self.path)
        return conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- images -------------------------------------------------------------------------------
    def index_rows(self) -> list[IndexRow]:
        rows = self.conn.execute(
            "SELECT id, ext, content_type, bytes, created, "
            "COALESCE(last_served, created) AS last_used FROM images").fetchall()
        return [IndexRow(**dict(r)) for r in rows]

    def insert_image(self, image: StoredImage, meta: ImageMeta) -> None:
        self.insert_images([(image, meta)])

    def insert_images(self, images: Iterable[tuple[StoredImage, ImageMeta]]) -> None:
        """Insert rows in one transaction; the first real metadata wins, but it replaces a
        recovered placeholder.

        A placeholder appears when another process (a CLI) opened the store between our rename
        and this insert and indexed the file as found on disk.
        """
        with self.conn:
            self.conn.executemany(
                "INSERT INTO images (id, ext, content_type, bytes, created, model, prompt, size,"
                " cost_micro, request_id, source) VALUES (?,?,?,?,?,?,?,?,?,?,?)"
                " ON CONFLICT (id) DO UPDATE SET model=excluded.model, prompt=excluded.prompt,"
                " size=excluded.size, cost_micro=excluded.cost_micro,"
                " request_id=excluded.request_id, source=excluded.source"
                " WHERE images.source = ? AND excluded.source IS NOT ?",
                [(image.id, image.ext, image.content_type, image.bytes, image.created,
                  meta.model, meta.prompt, meta.size, meta.cost_micro, meta.request_id,
                  meta.source, RECOVERED, RECOVERED) for image, meta in images])

    def delete_images(self, ids: Iterable[str]) -> None:
        with self.conn:
            self.conn.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in ids])

    def set_last_served(self, served: dict[str, float]) -> None:
        with self.conn:
            self.conn.executemany(
                "UPDATE images SET last_served = MAX(COALESCE(last_served, 0), ?) WHERE id = ?",
                [(t, i) for i, t in served.items()])

    def list_images(self, limit: int, offset: int) -> list[dict[str, Any]]:
        rows = self.conn.execute(
            "SELECT id, ext, content_type, bytes, created, last_served, model, prompt, size,"
            " cost_micro, request_id, source FROM images"
            " ORDER BY created DESC, id LIMIT ? OFFSET ?", (limit, offset)).fetchall()
        return [dict(r) for r in rows]

    def kept_since(self, since: float) -> dict[str, int]:
        """How many images each request has here, stored or waiting to be downloaded again,
        of those stored or queued since `since` (unix)."""
        rows = self.conn.execute(
            "SELECT request_id, COUNT(*) FROM (SELECT request_id FROM images WHERE created >= ?"
            " UNION ALL SELECT request_id FROM pending WHERE created >= ?)"
            " WHERE request_id IS NOT NULL GROUP BY request_id", (since, since)).fetchall()
        return {request_id: n for request_id, n in rows}

    # --- pending downloads --------------------------------------------------------------------
    def add_pending(self, url: str, meta: ImageMeta, *, created: float, error: str,
                    next_attempt: float | None) -> int:
        with self.conn:
            cursor = self.conn.execute(
                "INSERT INTO pending (url, model, prompt, size, cost_micro, request_id, created,"
                " attempts, next_attempt, last_error, state) VALUES (?,?,?,?,?,?,?,1,?,?,?)",
                (url, meta.model, meta.prompt, meta.size, meta.cost_micro, meta.request_id,
                 created, next_attempt, error, "pending" if next_attempt is not None else "failed"))
        assert cursor.lastrowid is not None
        return cursor.lastrowid

    def pending_rows(self, state: str = "pending") -> list[PendingRow]:
        rows = self.conn.execute(
            "SELECT * FROM pending WHERE state = ? ORDER BY id", (state,)).fetchall()
        return [PendingRow(id=r["id"], url=r["url"], attempts=r["attempts"],
                           next_attempt=r["next_attempt"], last_error=r["last_error"],
                           state=r["state"], meta=ImageMeta(**{k: r[k] for k in _META}))
                for r in rows]

    def update_pending(self, pending_id: int, *, attempts: int, error: str,
                       next_attempt: float | None) -> None:
        with self.conn:
            self.conn.execute(
                "UPDATE pending SET attempts = ?, last_error = ?, next_attempt = ?, state = ?"
                " WHERE id = ?",
                (attempts, error, next_attempt,
                 "pending" if next_attempt is not None else "failed", pending_id))

    def delete_pending(self, pending_id: int) -> None:
        with self.conn:
            self.conn.execute("DELETE FROM pending WHERE id = ?", (pending_id,))

    def delete_failed_before(self, cutoff: float) -> int:
        with self.conn:
            return self.conn.execute(
                "DELETE FROM pending WHERE state = 'failed' AND created < ?", (cutoff,)).rowcount

    def pending_counts(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT state, COUNT(*) AS n FROM pending GROUP BY state")
        return {r["state"]: r["n"] for r in rows}
