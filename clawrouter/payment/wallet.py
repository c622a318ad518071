"""Find or create the wallet key: `BLOCKRUN_WALLET_KEY`, else `$CLAWROUTER_HOME/wallet.key`,
else a new key generated there (mode 0600, never overwritten, never printed).

BlockRun's SDK reads the environment before the file; we do the same and report which source
was used (never the key).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from clawrouter.store.files import fsync_dir

log = logging.getLogger(__name__)
_KEY = re.compile(r"0x[0-9a-fA-F]{64}")
_BARE_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
#: secp256k1's group order: a private key is below it (a public constant, not a key)
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


class WalletError(ValueError):
    """A key that cannot be used; the message never contains the key."""


@dataclass(frozen=True)
class WalletKey:
    key: str
    source: Literal["env", "file", "created"]
    path: Path | None = None

    def __repr__(self) -> str:  # keep the key out of tracebacks and logs
        return f"WalletKey(source={self.source!r}, path={self.path!r})"


def with_0x(key: str) -> str:
    """`key` stripped, with `0x` before it if it is 64 hex digits without (as some wallets
    export it): the one spelling `check_key` accepts. Any other form stays as it is, for the
    check to refuse."""
    key = key.strip()
    return "0x" + key if _BARE_HEX_KEY.fullmatch(key) else key


def check_key(key: str, where: str) -> str:
    """`key` as the one spelling a private key has here (`with_0x`), or `WalletError` naming
    `where` (never the key)."""
    key = with_0x(key)
    if not _KEY.fullmatch(key):
        raise WalletError(f"the wallet key in {where} is malformed: expected 64 hex characters, "
                          "with or without 0x before them")
    if int(key, 16) == 0:
        raise WalletError(f"the wallet key in {where} is zero")
    if int(key, 16) >= SECP256K1_N:  # eth-keys would refuse it with the number in the message
        raise WalletError(f"the wallet key in {where} is not a private key: it must be below "
                          "secp256k1's group order")
    return key


def read_key_file(path: Path) -> str:
    """A key file's text, or `WalletError` when it is not ASCII text (PowerShell 5's `>` and
    `Out-File` write UTF-16): the message says how to rewrite it, never what it holds."""
    data = path.read_bytes()
    if b"\0" not in data and data.isascii():
        return data.decode("ascii")
    utf16 = " (it looks like UTF-16, which PowerShell 5's > and Out-File write)" if (
        data[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\0" in data) else ""
    raise WalletError(
        f"{path} is not ASCII text{utf16}: a wallet key file holds one line of ASCII, 0x "
        "followed by 64 hex characters. Rewrite it as ASCII, e.g. in PowerShell: "
        f"(Get-Content '{path}') | Set-Content -Encoding ascii '{path}'")


def load_wallet(home: Path, env_key: str | None,
                where: str = "BLOCKRUN_WALLET_KEY") -> WalletKey:
    """The configured key (`env_key`, set in `where`: named when it is malformed), else the
    data directory's key file, else a new one created there."""
    if env_key:
        return WalletKey(check_key(env_key, where), "env")
    path = home / "wallet.key"
    _remove_stale_drafts(path)
    if not path.exists():
        try:
            return WalletKey(create_key_file(path), "created", path)
        except FileExistsError:  # another process created it first: its key is complete
            if not path.exists():  # not there to read, yet there: a broken link, say
                raise WalletError(f"{path} exists but cannot be read (a broken link?); move "
                                  "it away, or set BLOCKRUN_WALLET_KEY") from None
    key = check_key(read_key_file(path), str(path))
    _keep_private(path)
    return WalletKey(key, "file", path)


def _keep_private(path: Path) -> None:
    """A key file others can read is made the owner's alone, as ssh would insist."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077 and os.name == "posix":  # (Windows reports every file as 0o666)
        try:
            os.chmod(path, 0o600)
        except OSError:
            log.warning("%s is readable by other users (mode %o) and could not be made "
                        "private: chmod 600 it", path, mode)
            return
        log.warning("%s was readable by other users (mode %o); it is now 600", path, mode)


def create_key_file(path: Path) -> str:
    """Write a fresh key with mode 0600, durably; `FileExistsError` if `path` exists.

    The key is written and synced under a temporary name, then linked into place: a process
    racing to create the first key (two gateways starting together) either wins or finds the
    winner's complete key, never an empty or half-written file; and a link never replaces
    an existing file, as a rename would."""
    key = "0x" + secrets.token_bytes(32).hex()
    tmp = draft_path(path)
    write_private(tmp, key + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: create the name itself, exclusively
        write_private(path, key + "\n")
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)  # the new name too: a key lost to a crash loses its funds
    return key


#: a key draft older than this is a crashed creator's: its key was never linked (so never
#: shown, never funded) or is the live key file's second name
DRAFT_GRACE = 60.0


def _draft_name(path: Path) -> str:
    return f".{path.name}.new-"


def draft_path(path: Path) -> Path:
    """A fresh name next to `path` for a key being written; one a crash leaves behind is
    removed by the next `load_wallet` once `DRAFT_GRACE` has passed."""
    return path.with_name(f"{_draft_name(path)}{os.getpid()}-{secrets.token_hex(4)}")


def _remove_stale_drafts(path: Path) -> None:
    """Delete key drafts (`draft_path`) that a crash left behind: files holding a private
    key should not linger in the data directory."""
    try:
        drafts = [p for p in path.parent.iterdir() if p.name.startswith(_draft_name(path))]
    except OSError:
        return
    for draft in drafts:
        try:
            if time.time() - draft.lstat().st_mtime > DRAFT_GRACE:
                draft.unlink()
        except OSError:
            continue


def write_private(path: Path, text: str | bytes) -> None:
    """Create `path` (never an existing one) with mode 0600 and `text` (bytes: as they are,
    for a backup), synced to disk; a write that fails leaves nothing behind."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        path.unlink(missing_ok=True)
        raise
