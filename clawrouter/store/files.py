"""The on-disk layout of the image directory: content addressing and crash-safe writes.

Every function here blocks (disk I/O, fsync, hashing) and is meant to run in a worker thread.
A file only ever appears under its final name complete and fsynced: we write a hidden temporary
file in the same directory, fsync it, rename it over the final name and fsync the directory.
A crash therefore leaves at worst a `.<name>.<random>.tmp` file, which `scan` reports so that
opening the store can remove it (and `stale_temps`, for the periodic prune).
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from clawrouter.sniff import EXTENSIONS, sniff_image
from clawrouter.store.records import ID_LENGTH, parse_name

_TEMP_SUFFIX = ".tmp"


def content_id(data: bytes) -> str:
    """The image id: the first 32 hex chars (128 bits) of the SHA-256 of its bytes."""
    return hashlib.sha256(data).hexdigest()[:ID_LENGTH]


def write_atomic(directory: Path, name: str, data: bytes, *, sync_dir: bool = True,
                 private: bool = True) -> Path:
    """Write `data` to `directory/name` so that readers see either nothing or all of it.

    With `sync_dir=False` the rename is durable only after the caller's `fsync_dir` (one for
    a batch of files). `private`: mode 0600, as the store's files are; otherwise the mode a
    new file gets under the umask (a user's saved image, for their viewer and their sharing)."""
    if private:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=_TEMP_SUFFIX)
    else:
        fd, tmp = _temp_file(directory, name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        target = directory / name
        os.replace(tmp, target)
    except BaseException:
        _unlink(Path(tmp))
        raise
    if sync_dir:
        fsync_dir(directory)
    return target


def _temp_file(directory: Path, name: str) -> tuple[int, str]:
    """`mkstemp`'s hidden temporary file, but created 0666 less the umask, as `open` does (a
    file's mode is set by the kernel at creation: the process-wide umask is never changed)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = os.path.join(directory, f".{name}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # another write's name, by chance: draw again
            continue


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in `directory` durable. A no-op only where directories cannot
    be opened or synced at all (Windows; file systems that refuse it): any other failure (an
    I/O error, no file descriptors left) raises, so nothing is answered as durable that is not."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except (PermissionError, IsADirectoryError):  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF):
            raise
    finally:
        os.close(fd)


@dataclass
class Scan:
    """What is in the image directory, by kind. Names that are not ours are left alone."""

    images: dict[str, int] = field(default_factory=dict)  # "<id>.<ext>" -> size in bytes
    stale_temps: list[Path] = field(default_factory=list)


def scan(directory: Path, *, temp_grace: float) -> Scan:
    """List image files and temporary files older than `temp_grace` seconds.

    Younger temporary files may belong to a write in progress in another process (a CLI `prune`
    while the gateway runs), so they are left for the next open.
    """
    result = Scan()
    now = time.time()
    with os.scandir(directory) as entries:
        for entry in entries:
            if not entry.is_file(follow_symlinks=False):
                continue
            try:  # another process (a gateway sharing the store) may remove it meanwhile
                if _is_temp(entry.name):
                    if now - entry.stat(follow_symlinks=False).st_mtime >= temp_grace:
                        result.stale_temps.append(Path(entry.path))
                    continue
                parsed = parse_name(entry.name)
                if parsed is not None and parsed[1] is not None:
                    result.images[entry.name] = entry.stat(follow_symlinks=False).st_size
            except FileNotFoundError:
                continue
    return result


def stale_temps(directory: Path, *, temp_grace: float) -> list[Path]:
    """`scan`'s stale temporary files alone (image files are not even stat'ed): a restart
    within `temp_grace` of a crash leaves them to the periodic prune."""
    now = time.time()
    stale = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if not _is_temp(entry.name):
                continue
            try:
                if (entry.is_file(follow_symlinks=False) and
                        now - entry.stat(follow_symlinks=False).st_mtime >= temp_grace):
                    stale.append(Path(entry.path))
            except FileNotFoundError:  # removed meanwhile
                continue
    return stale


def _is_temp(name: str) -> bool:
    return name.startswith(".") and name.endswith(_TEMP_SUFFIX)


def verify(path: Path) -> tuple[str, int] | None:
    """Return (content type, size) if the file's bytes match its name's id and extension,
    None if they do not. A file that cannot be read raises OSError: unreadable is not corrupt
    (too many open files, a permission changed), and it may be an image someone paid for."""
    parsed = parse_name(path.name)
    if parsed is None:
        return None
    data = path.read_bytes()
    content_type = sniff_image(data)
    if content_type is None or EXTENSIONS[content_type] != parsed[1]:
        return None
    if content_id(data) != parsed[0]:
        return None
    return content_type, len(data)


def remove(paths: list[Path]) -> None:
    """Unlink files (already gone is fine), then make the unlinks durable."""
    for path in paths:
        _unlink(path)
    if paths:
        fsync_dir(paths[0].parent)


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
