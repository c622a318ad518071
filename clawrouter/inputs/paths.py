"""Read a local image file without ever reading a secret.

A path is judged before anything is opened, in this order: no hidden component in the path as
written; not in a forbidden folder (the gateway's data directory holds the wallet key); after
resolving symlinks and `..`, inside an allowed root; no hidden component below that root. Only
then is the file stat'ed — so the answer never reveals whether a file outside the roots exists —
and read, at most its stat'ed size (itself within the cap). Both walk the resolved path from `/`
one folder at a time without following a symlink (`_open_parent`), so a folder or file swapped
for one since it was resolved is neither described nor read, and no folder on the way may be
the data directory by identity, whatever its name. Judging and reading are separate steps
(`judge_local_image`, `read_judged`) so the gateway can wait for memory between them.
Whatever passes must still sniff as an image, so a text secret renamed `photo.png` is refused
by the caller.

Everything here blocks; call it through `asyncio.to_thread`.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePath
from urllib.parse import unquote, urlsplit

from .image import check_size
from .policy import InputPolicy
from .refusals import FILE_NOT_FOUND, PATH_REFUSED, refuse, shorten

_OPEN_FLAGS = (os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
               | getattr(os, "O_CLOEXEC", 0))
#: folders on the way: O_PATH (Linux) needs only search permission, as a path lookup does
_DIR_FLAGS = (getattr(os, "O_PATH", os.O_RDONLY) | getattr(os, "O_DIRECTORY", 0)
              | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
_READ_CHUNK = 1024 * 1024
#: what an open of a judged file fails with when its path changed since (gone, a folder on its
#: way replaced by a file, the file by a symlink: O_NOFOLLOW's ELOOP); other errors are said as is
_CHANGED = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})


class _Changed(OSError):
    """A component of a resolved path is a symlink now: it changed since it was resolved."""


class _DataDirectory(OSError):
    """A folder on the way is the data directory (or another forbidden one), by identity."""


def path_from_file_url(value: str, *, param: str) -> str:
    """The local path a `file://` URL names; a remote host in it is refused, and so is a
    host `urlsplit` cannot parse (an unbalanced `[` or `]`: its ValueError is no refusal)."""
    try:
        parts = urlsplit(value)
    except ValueError:
        refuse(f"malformed file URL {shorten(value)!r}", param=param, code=PATH_REFUSED)
    if parts.netloc not in ("", "localhost"):
        refuse(f"file URLs must not name a host ({shorten(value)!r})", param=param,
               code=PATH_REFUSED)
    return unquote(parts.path)


@dataclass(frozen=True)
class JudgedFile:
    """A file the policy allows, not read yet: its resolved path and the stat it was judged by."""

    real: Path
    stat: os.stat_result
    shown: str  # the path as the client wrote it, shortened for messages

    @property
    def size(self) -> int:
        return self.stat.st_size


def read_local_image(raw: str, policy: InputPolicy, *, cwd: Path | None,
                     param: str) -> bytes:
    """Bytes of the file `raw` names (absolute, `~/…` or relative to `cwd`), if policy allows.

    `cwd` None means the process's working folder, looked up only for a relative path."""
    return read_judged(judge_local_image(raw, policy, cwd=cwd, param=param), param=param)


def open_local_image(raw: str, policy: InputPolicy, *, cwd: Path | None, param: str,
                     read_up_to: int) -> bytes | JudgedFile:
    """Judge `raw`; a file of at most `read_up_to` bytes is read at once (one thread hop), a
    bigger one is returned judged, for `read_judged` once there is room for it."""
    judged = judge_local_image(raw, policy, cwd=cwd, param=param)
    return read_judged(judged, param=param) if judged.size <= read_up_to else judged


def judge_local_image(raw: str, policy: InputPolicy, *, cwd: Path | None,
                      param: str) -> JudgedFile:
    """The regular file within the cap that `raw` names, judged by the policy before its stat."""
    real = _judged_path(raw, policy, cwd=cwd, param=param)
    shown = shorten(raw)
    try:
        before = _stat_judged(real, _identities(policy.forbidden))
    except _DataDirectory:
        refuse(f"{shown!r} is inside the gateway's data directory", param=param,
               code=PATH_REFUSED)
    except _Changed:
        refuse(f"{shown!r} changed while it was being judged", param=param, code=PATH_REFUSED)
    except (FileNotFoundError, NotADirectoryError):
        refuse(f"no such file: {shown!r}", param=param, code=FILE_NOT_FOUND)
    except OSError as exc:
        refuse(f"cannot read {shown!r} ({exc.strerror})", param=param, code=PATH_REFUSED)
    if stat.S_ISLNK(before.st_mode):
        refuse(f"{shown!r} changed while it was being judged", param=param, code=PATH_REFUSED)
    if not stat.S_ISREG(before.st_mode):
        refuse(f"{shown!r} is not a regular file", param=param, code=PATH_REFUSED)
    check_size(before.st_size, max_bytes=policy.max_bytes, param=param)
    return JudgedFile(real, before, shown)


def read_judged(judged: JudgedFile, *, param: str) -> bytes:
    """The bytes of a judged file, at most its judged size: what reading holds is what was
    counted for it (`api/heavy.py`), and a file that grew since is refused."""
    shown = judged.shown
    try:
        fd = _open_judged(judged.real)
    except OSError as exc:
        if isinstance(exc, _Changed) or exc.errno in _CHANGED:
            refuse(f"{shown!r} changed while it was being read", param=param,
                   code=PATH_REFUSED)
        refuse(f"cannot read {shown!r} ({exc.strerror})", param=param, code=PATH_REFUSED)
    try:
        # The file we opened must be the one we judged, not one swapped in after the checks:
        # no component of its path was followed as a symlink (O_NOFOLLOW at every level), and
        # it is the file stat'ed when judged.
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (judged.stat.st_dev, judged.stat.st_ino):
            refuse(f"{shown!r} changed while it was being read", param=param, code=PATH_REFUSED)
        data = _read_at_most(fd, judged.size + 1)
    finally:
        os.close(fd)
    if len(data) > judged.size:
        refuse(f"{shown!r} changed while it was being read", param=param, code=PATH_REFUSED)
    return data


def bare_name_exists(name: str, policy: InputPolicy, *, cwd: Path | None, param: str) -> bool:
    """Whether a bare name (no folder in it) names something in `cwd`, asked only once the
    policy allows the path: a refusal here does not depend on whether the file exists, so
    names cannot probe for files outside the roots."""
    _judged_path(name, policy, cwd=cwd, param=param)
    return os.path.lexists(working_folder(cwd, param=param) / name)


def _stat_judged(real: Path, forbidden: frozenset[tuple[int, int]]) -> os.stat_result:
    """The stat of the resolved path `real` itself (a symlink now is not followed), reached by
    the walk that opens it, and refused if a folder on its way is one of `forbidden`."""
    parent, name = _open_parent(real, forbidden)
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    finally:
        if parent is not None:
            os.close(parent)


def _open_judged(real: Path) -> int:
    """Open the resolved path `real` for reading by the same walk, with O_NOFOLLOW on the file
    too. (Which file it is, is `read_judged`'s check: the one judged.)"""
    parent, name = _open_parent(real, frozenset())
    try:
        return os.open(name, _OPEN_FLAGS, dir_fd=parent)
    finally:
        if parent is not None:
            os.close(parent)


def _open_parent(real: Path, forbidden: frozenset[tuple[int, int]]) -> tuple[int | None, str]:
    """The folder `real` is in, opened from `/` one component at a time, each relative to the
    folder opened before it and with O_NOFOLLOW (O_PATH where there is one: search permission
    is enough, as for a path lookup), and the name to look up in it. A folder swapped for a
    symlink since `real` was resolved is not followed (`_Changed`), and none of the folders may
    be one of `forbidden` by (device, inode): a bind mount or a differently-cased name is the
    same folder (`_DataDirectory`). Without `dir_fd` support: (None, `real`) as one name."""
    if os.open not in os.supports_dir_fd:
        return None, str(real)
    fd = os.open("/", _DIR_FLAGS)
    try:
        _refuse_forbidden(fd, forbidden)
        for part in real.parts[1:-1]:
            parent, fd = fd, -1
            try:
                fd = _open_folder(part, parent)
            finally:
                os.close(parent)
            _refuse_forbidden(fd, forbidden)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        raise
    return fd, real.name


def _open_folder(name: str, parent: int) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent)
    except OSError as exc:
        # O_NOFOLLOW with O_DIRECTORY refuses a symlink as ENOTDIR (O_PATH) or ELOOP
        if exc.errno in (errno.ENOTDIR, errno.ELOOP) and _is_symlink(name, parent):
            raise _Changed(exc.errno, "a folder on the way is a symlink now") from None
        raise


def _is_symlink(name: str, parent: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _refuse_forbidden(fd: int, forbidden: frozenset[tuple[int, int]]) -> None:
    if forbidden:
        folder = os.fstat(fd)
        if (folder.st_dev, folder.st_ino) in forbidden:
            raise _DataDirectory(errno.EACCES, "the data directory")


def _identities(folders: Iterable[Path]) -> frozenset[tuple[int, int]]:
    """(device, inode) of each folder that exists: what every name for it shares."""
    found = set()
    for folder in folders:
        try:
            info = os.stat(Path(folder).expanduser())
        except (OSError, ValueError):
            continue
        found.add((info.st_dev, info.st_ino))
    return frozenset(found)


def _judged_path(raw: str, policy: InputPolicy, *, cwd: Path | None, param: str) -> Path:
    """The real path `raw` points to, or a refusal saying which rule it breaks."""
    shown = shorten(raw)
    if not raw or "\0" in raw or not _fs_encodable(raw):
        refuse("empty or malformed path", param=param, code=PATH_REFUSED)
    written = os.path.expanduser(raw)
    given = (Path(written) if os.path.isabs(written)
             else working_folder(cwd, param=param) / written)
    roots = _with_resolved(policy.roots)
    forbidden = _with_resolved(policy.forbidden)

    hidden = _hidden_part(_below(PurePath(written), roots))
    if hidden:
        refuse(f"{shown!r} has a hidden component ({shorten(hidden, 40)!r}); hidden files and "
               f"folders are never read", param=param, code=PATH_REFUSED)
    try:
        real = given.resolve()
    except (OSError, RuntimeError):  # symlink loop, unreadable component
        refuse(f"{shown!r} cannot be resolved", param=param, code=PATH_REFUSED)
    lexical = Path(os.path.normpath(given))
    if any(p.is_relative_to(f) for p in (real, lexical) for f in forbidden):
        refuse(f"{shown!r} is inside the gateway's data directory", param=param,
               code=PATH_REFUSED)
    root = _deepest_root(real, roots)
    if root is None:
        allowed = ", ".join(shorten(str(r), 40) for r in policy.roots) or "none configured"
        refuse(f"{shown!r} is outside the allowed folders ({allowed}) once symlinks and '..' "
               f"are resolved", param=param, code=PATH_REFUSED)
    hidden = _hidden_part(real.relative_to(root))
    if hidden:
        refuse(f"{shown!r} resolves into a hidden file or folder ({shorten(hidden, 40)!r})",
               param=param, code=PATH_REFUSED)
    return real


def working_folder(cwd: Path | None, *, param: str) -> Path:
    """The folder relative paths and bare names are read from: `cwd`, else the process's.

    Asked only when a relative path needs it, so absolute paths keep working after that folder
    was deleted under the gateway (`os.getcwd()` then fails); a relative one is then a 400.
    """
    if cwd is not None:
        return cwd
    try:
        return Path(os.getcwd())
    except OSError:
        refuse("the gateway's working folder no longer exists, so relative paths and bare "
               "file names cannot be read; give the file's absolute path", param=param,
               code=PATH_REFUSED)


def _fs_encodable(raw: str) -> bool:
    """False for text no file name can hold (a lone surrogate, from a JSON `\\ud800` escape)."""
    try:
        os.fsencode(raw)
    except UnicodeEncodeError:
        return False
    return True


def _with_resolved(paths: Iterable[Path]) -> tuple[Path, ...]:
    """Each folder as configured and as resolved (e.g. macOS /tmp -> /private/tmp)."""
    out: list[Path] = []
    for path in paths:
        path = Path(path).expanduser()
        out.append(Path(os.path.normpath(path)))
        try:
            out.append(path.resolve())
        except (OSError, RuntimeError):
            pass
    return tuple(dict.fromkeys(out))


def _deepest_root(path: PurePath, roots: Iterable[Path]) -> Path | None:
    """The innermost root containing `path`: a root configured inside a hidden folder is fine."""
    containing = [root for root in roots if path.is_relative_to(root)]
    return max(containing, key=lambda r: len(r.parts), default=None)


def _below(path: PurePath, roots: Iterable[Path]) -> PurePath:
    """The part of a written path below the root it names, or all of it."""
    root = _deepest_root(path, roots) if path.is_absolute() else None
    return path.relative_to(root) if root is not None else path


def _hidden_part(path: PurePath) -> str | None:
    return next((p for p in path.parts if p.startswith(".") and p not in (".", "..")), None)


def _read_at_most(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    remaining = limit
    while remaining > 0:
        chunk = os.read(fd, min(remaining, _READ_CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
