"""SQLite databases for the owner only: the ledger (every payment) and the image index (every
prompt, if logged) are nobody else's business, whatever the umask or data directory."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

FILE_MODE = 0o600


def owner_only(path: Path) -> Path:
    """`path`, made for the owner only if new (SQLite gives its -wal and -shm files the
    database's mode), and tightened, with those, if an older version made them readable by
    all. Returns `path`, for `sqlite3.connect`."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, FILE_MODE))
        for part in ("", "-wal", "-shm"):
            each = path.with_name(path.name + part)
            if each.exists() and each.stat().st_mode & 0o777 != FILE_MODE:
                each.chmod(FILE_MODE)
    except OSError as exc:  # another user's file, read-only: sqlite3 says what matters
        log.debug("could not make %s private (%s)", path, exc)
    return path
