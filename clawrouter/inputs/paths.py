"""Read a local image file without ever reading a secret.

A path is judged before anything is opened, in this order: no hidden component in the path as
written; not in a forbidden folder (the gateway's data directory holds the wallet key); after
resolving symlinks and `..`, inside an allowed root; no hidden component below that root. Only
then is the file stat'ed — so the answer never reveals whether a file outside the roots exists —
and read, at most its stat'ed size (itself within the cap). Judging and reading are separate
steps (`judge_local_image`, `read_judged`) so the gateway can wait for memory between them.
Whatever passes must still sniff as an image, so a text secret renamed `photo.png` is refused
by the caller.

Everything here blocks; call it through `asyncio.to_thread`.
"""

from __future__ import annotations

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


def path_from_file_url(value: str, *, param: str) -> str:
    """The local path a `file://` URL names; a remote host in it is refused."""
    parts = urlsplit(value)
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
        before = os.stat(real)
    except (FileNotFoundError, NotADirectoryError):
        refuse(f"no such file: {shown!r}", param=param, code=FILE_NOT_FOUND)
    except OSError as exc:
        refuse(f"cannot read {shown!r} ({exc.strerror})", param=param, code=PATH_REFUSED)
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
        refuse(f"cannot read {shown!r} ({exc.strerror}; did it change while being read?)",
               param=param, code=PATH_REFUSED)
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


def _open_judged(real: Path) -> int:
    """Open the resolved path `real` one component at a time, each relative to the folder
    opened before it and with O_NOFOLLOW: a parent folder swapped for a symlink since `real`
    was judged (say, to the data directory) fails to open instead of being followed."""
    if os.open not in os.supports_dir_fd:
        return os.open(real, _OPEN_FLAGS)
    fd = os.open("/", _DIR_FLAGS)
    try:
        for part in real.parts[1:-1]:
            parent, fd = fd, -1
            try:
                fd = os.open(part, _DIR_FLAGS, dir_fd=parent)
            finally:
                os.close(parent)
        return os.open(real.name, _OPEN_FLAGS, dir_fd=fd)
    finally:
        if fd >= 0:
            os.close(fd)


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
