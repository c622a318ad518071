"""One gateway per ledger: the ledger's process lock, and the lock file that names its holder.

Two processes on one ledger would each enforce the budgets alone, so a ledger is opened under an
exclusive advisory lock (flock: released by the OS even on kill -9). The lock file says who
holds it (pid, gateway URL, instance id), so a command that finds the ledger busy can say whom
to stop, or use that gateway instead.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

try:  # POSIX: one gateway per ledger, or two processes would each enforce budgets alone
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_LOCK_TRIES = 10  # 10 ms apart: see `exclusive_lock`


@dataclass(frozen=True)
class Holder:
    """Who holds a ledger, as its lock file says: the pid, the URL of its gateway when it
    serves one that others may use (`serve`'s; not one started in-process by a command), and
    the holder's random `instance` id, which its gateway's `/health` also shows: how a command
    tells this data directory's gateway from another one answering at the same address."""

    pid: int
    url: str | None = None
    instance: str | None = None

    def __str__(self) -> str:
        return f"pid {self.pid}" + (f", serving {self.url}" if self.url else "")


class LedgerBusy(RuntimeError):
    """Another gateway process has this ledger open; `holder` says who, when known."""

    def __init__(self, lock: Path, holder: Holder | None) -> None:
        who = f" ({holder})" if holder else ""
        super().__init__(f"{lock.parent}: another clawrouter process{who} is using this ledger "
                         "(a `clawrouter serve`, a `clawrouter mcp`, `generate` or `edit` "
                         "running a gateway of its own, or an `images prune`); use or stop "
                         "it, or set a different CLAWROUTER_HOME")
        self.lock = lock
        self.holder = holder


def lock_path(ledger_path: Path) -> Path:
    return ledger_path.with_name(ledger_path.name + ".lock")


def exclusive_lock(path: Path, instance: str) -> IO[bytes]:
    """Hold an advisory lock for the ledger's lifetime (released by the OS even on kill -9).

    The holder writes its pid and `instance` into the lock file, so a process that finds the
    ledger busy can say who has it. A process waiting for the ledger tests the lock for an
    instant (`in_use`); the short retry here keeps such a test from ever failing a gateway
    that starts meanwhile.
    """
    handle = open(path, "a+b")
    if fcntl is not None:
        for attempt in range(_LOCK_TRIES):
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt + 1 == _LOCK_TRIES:
                    handle.close()
                    raise LedgerBusy(path, holder(path)) from None
                time.sleep(0.01)
            except OSError as exc:  # not held elsewhere: locks do not work here (NFS: ENOLCK)
                handle.close()
                raise unlockable(exc, path) from None
        describe(handle, Holder(os.getpid(), instance=instance))
    return handle


def unlockable(exc: OSError, path: Path) -> OSError:
    """`exc` from flock, naming the file that could not be locked: without its name the
    command would show a traceback, not the one line that says which file and why."""
    return OSError(exc.errno, f"cannot lock it ({exc.strerror or exc})", str(path))


def describe(handle: IO[bytes], holder: Holder) -> None:
    """Write `holder` into the lock file we hold, replacing what it said."""
    handle.truncate(0)
    handle.write(f"{holder.pid}\n{holder.url or ''}\n{holder.instance or ''}\n".encode())
    handle.flush()


def in_use(lock: Path) -> bool:
    """Whether a process holds the ledger lock at `lock`; takes it for an instant to tell.
    Only a lock held elsewhere counts: any other failure is for opening the ledger to report."""
    if fcntl is None:
        return False
    try:
        with open(lock, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(handle, fcntl.LOCK_UN)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def holder(lock: Path) -> Holder | None:
    """Who last took the ledger's lock (it may have exited since)."""
    try:
        pid, url, instance = (lock.read_text().split("\n") + ["", ""])[:3]
        return Holder(int(pid), url.strip() or None, instance.strip() or None)
    except (OSError, ValueError):
        return None
