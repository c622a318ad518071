"""One gateway per wallet on Base mainnet, whatever its data directory.

The spending caps count what one data directory's ledger recorded (`budget`), and that
ledger's lock keeps a second gateway off it. A second data directory paying from the same
wallet (BLOCKRUN_WALLET_KEY exported, another CLAWROUTER_HOME) would keep caps of its own: two
gateways, each spending the whole daily cap from one wallet. So a gateway that pays on mainnet
also holds, for as long as it holds its ledger, an advisory lock named for its wallet and
network (flock: released by the OS even on kill -9), in a directory no CLAWROUTER_HOME moves:

1. `$CLAWROUTER_WALLET_LOCKS` when set, and then only it (tests; gateways of one user run with
   different HOMEs, which it can make meet);
2. else `~/.clawrouter/wallets` in the user's home (`Path.home()`);
3. where that cannot be written (a container's missing or read-only HOME), the temporary
   directory's `clawrouter-<uid>-wallets`, used only if it is this user's and nobody else may
   write to it (another user could otherwise hold, or fake, our locks there).

Where no directory serves, the gateway does not start: caps that hold per data directory only
are not the caps the user set.

The lock file names its holder (pid, data directory) for the refusal to say whom to stop. Its
holder removes it when letting go (a taker checks that the file it locked is still the one at
that name, so two never hold it at once): a key used once, as tests do, leaves nothing behind.

Only mainnet: on Base Sepolia and in the sandbox the money is play money, and tests run many
gateways at once. The caps still hold per data directory *over time*: a second one started
after the first stopped begins with its own, empty ledger.
"""

from __future__ import annotations

import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from clawrouter.payment.networks import Network
from clawrouter.payment.wallet import WalletError

try:  # POSIX, as the ledger's own lock
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

#: the environment variable naming the lock directory (not a config.toml setting: each data
#: directory's own file could then name a directory of its own, the split this lock closes)
ENVIRON = "CLAWROUTER_WALLET_LOCKS"
_TRIES = 10  # a taker that keeps finding the file just removed by its holder (see `_take`)


@dataclass(frozen=True)
class Holder:
    """Who holds a wallet's lock, as its lock file says."""

    pid: int
    home: str


class WalletBusy(WalletError):
    """Another data directory's gateway pays from this wallet on this network."""

    def __init__(self, address: str, network: Network, home: Path,
                 holder: Holder | None) -> None:
        who = (f"another data directory, {holder.home} (its gateway is pid {holder.pid})"
               if holder else "another data directory")
        there = f"CLAWROUTER_HOME={holder.home}" if holder else "the same CLAWROUTER_HOME"
        super().__init__(f"wallet {address} already pays on {network.name} for {who}: this "
                         f"one ({home}) would keep spending caps of its own. Use that data "
                         f"directory ({there}), or stop that gateway first.")
        self.holder = holder


class WalletLock:
    """A wallet lock held (or none, where none is taken); `release` lets go of it."""

    def __init__(self, handle: IO[bytes] | None = None, path: Path | None = None) -> None:
        self._handle = handle
        self.path = path

    @property
    def held(self) -> bool:
        return self._handle is not None

    def release(self) -> None:
        """Remove the lock file, then unlock it (closing it): a taker that opened it just
        before finds it gone and takes the next one (`_take`). Idempotent."""
        handle, self._handle = self._handle, None
        if handle is None or self.path is None:
            return
        try:
            if _still_named(handle, self.path):
                self.path.unlink()
        except OSError:
            pass  # left in place: the next holder reuses it
        finally:
            handle.close()


def hold(address: str, network: Network, home: Path, *, sandbox: bool) -> WalletLock:
    """The lock on (`address`, `network`) for the data directory `home`, or `WalletBusy`.

    Take it only while holding `home`'s ledger, and release it with the ledger: a command
    waiting for this data directory's ledger (`cli.client`) then never meets this lock."""
    if fcntl is None or network.testnet or sandbox:
        return WalletLock()
    name = f"{address.lower()}-{network.name}.lock"
    problems: list[str] = []
    for directory, shared in directories():
        path = directory / name
        try:
            handle = _take(path, shared=shared)
        except OSError as exc:
            problems.append(f"{directory}: {exc.strerror or exc}")
            continue
        if handle is None:
            raise WalletBusy(address, network, home, read_holder(path))
        lock = WalletLock(handle, path)
        try:
            _describe(handle, Holder(os.getpid(), str(home.resolve())))
        except BaseException:
            lock.release()
            raise
        return lock
    raise WalletError(f"cannot lock wallet {address} for this data directory alone: "
                      f"{'; '.join(problems)}. Set {ENVIRON} to a directory you can write "
                      "(the same one for every gateway of yours).")


def directories() -> list[tuple[Path, bool]]:
    """Where the wallet locks are kept, in order of preference (see the module's docstring),
    each with whether it sits in a directory others may write to (the temporary one)."""
    named = os.environ.get(ENVIRON, "").strip()
    if named:
        return [(Path(named).expanduser(), False)]
    found = []
    try:
        found.append((Path.home() / ".clawrouter" / "wallets", False))
    except RuntimeError:  # no home to be found
        pass
    uid = os.getuid() if hasattr(os, "getuid") else 0
    found.append((Path(tempfile.gettempdir()) / f"clawrouter-{uid}-wallets", True))
    return found


def _take(path: Path, *, shared: bool) -> IO[bytes] | None:
    """The lock file at `path`, locked by us; None when another process holds it. OSError:
    its directory cannot be used (or, in a `shared` one, is not this user's alone)."""
    _make_private(path.parent)
    if shared:
        _check_private(path.parent)
    for _ in range(_TRIES):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        handle = os.fdopen(fd, "r+b")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            return None
        except BaseException:
            handle.close()
            raise
        if _still_named(handle, path):
            return handle
        handle.close()  # its holder removed it as we opened it: take the one there now
    return None


def _make_private(directory: Path) -> None:
    """Create `directory` and its missing parents as this user's alone (0700): a parent made
    here may be ~/.clawrouter, the default data directory, which keeps the mode it finds."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    for made in reversed(missing):
        made.mkdir(mode=0o700, exist_ok=True)


def _check_private(directory: Path) -> None:
    """OSError unless `directory` is a real directory of this user's that no one else may
    write to (a shared temporary directory: anyone may have made it first)."""
    found = os.lstat(directory)
    if not stat.S_ISDIR(found.st_mode):  # (a symlink to one is not: lstat)
        raise NotADirectoryError(0, "not a directory", str(directory))
    if found.st_uid != os.getuid() or found.st_mode & 0o022:
        raise PermissionError(0, "not this user's alone", str(directory))


def _still_named(handle: IO[bytes], path: Path) -> bool:
    """Whether the file `handle` has open is (still) the one at `path`."""
    try:
        there = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(handle.fileno())
    return (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino)


def _describe(handle: IO[bytes], holder: Holder) -> None:
    handle.truncate(0)
    handle.seek(0)
    handle.write(f"{holder.pid}\n{holder.home}\n".encode())
    handle.flush()


def read_holder(path: Path) -> Holder | None:
    """Who holds the lock at `path`, as its file says (None if unreadable or just removed)."""
    try:
        pid, home = (path.read_text().split("\n") + [""])[:2]
        return Holder(int(pid), home) if home else None
    except (OSError, ValueError):
        return None
