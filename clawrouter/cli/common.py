"""What every command shares: settings loading and one way to stop with a message and code."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from clawrouter.config import Settings, load_settings

#: the data directory of the settings this command loaded: a file there that cannot be used
#: is explained with what to do about the data directory (`file_problem`)
_home: Path | None = None

#: sqlite errors about the database file itself (not about our SQL, which are bugs)
_FILE_ERRORS = {"SQLITE_NOTADB": "is damaged or not a database",
                "SQLITE_CORRUPT": "is damaged",
                "SQLITE_CANTOPEN": "cannot be opened",
                "SQLITE_READONLY": "is read-only",
                "SQLITE_PERM": "cannot be written (permission denied)",
                "SQLITE_IOERR": "cannot be read or written (an I/O error)",
                "SQLITE_FULL": "cannot grow: the disk is full"}


class CommandError(Exception):
    """Stop the command: `main()` prints `clawrouter: <message>` on stderr and exits `code`
    (1 a failed request or check, 2 a usage or configuration error); `name` is the error's
    code in the JSON a `--json` command prints (`fail`)."""

    def __init__(self, code: int, message: str, *, name: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.name = name or ("usage_error" if code == 2 else "failed")


#: The `type` of a `--json` error the command raised itself (the gateway's carry their own,
#: as in its HTTP answers): something on the command line or in the settings to fix, a key
#: the gateway wants, no gateway to talk to; anything else is the command's own ("cli_error":
#: the data directory, the wallet, saving an image, Ctrl-C).
CLI_ERROR_TYPES = {
    **dict.fromkeys(("usage_error", "invalid_configuration", "bad_gateway_url",
                     "bad_output_dir"), "invalid_request_error"),
    "invalid_api_key": "authentication_error",
    **dict.fromkeys(("gateway_unreachable", "no_gateway", "timeout", "connection_error",
                     "not_clawrouter", "other_data_directory", "gateway_start_failed"),
                    "connection_error"),
}


def fail(args: argparse.Namespace, message: str, status: int, code: str | None,
         detail: dict[str, Any] | None = None, *, line: bool = True) -> int:
    """End a command that failed: `clawrouter: <message>` on stderr (unless `line` is False:
    said already) and, with `--json`, one document on stdout, `{"error": {"message", "type",
    "param", "code", "status", ...detail}}` (`status`: the gateway's HTTP status, None when
    none answered), so that a script reading stdout always has one to read, in one shape.
    Returns `status`, the exit code."""
    if getattr(args, "json", False):
        error = {"message": message, "type": None, "param": None, "code": code,
                 "status": None} | (detail or {})
        error["type"] = error["type"] or CLI_ERROR_TYPES.get(code or "", "cli_error")
        print(json.dumps({"error": error}, indent=2))
    if line:
        print(f"clawrouter: {message}", file=sys.stderr)
    return status


def settings_from(args: argparse.Namespace, **overrides: object) -> Settings:
    global _home
    try:
        settings = load_settings(getattr(args, "config", None), **overrides)
    except (ValueError, FileNotFoundError) as exc:
        raise CommandError(2, f"invalid configuration: {exc}",
                           name="invalid_configuration") from None
    _home = settings.home
    return settings


#: How every command that reads the settings names its `--config`.
CONFIG_HELP = ("TOML settings file (default $CLAWROUTER_CONFIG, else "
               "$CLAWROUTER_HOME/config.toml, ~/.clawrouter/config.toml by default)")


def add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help=CONFIG_HELP)


@contextmanager
def config_named(args: argparse.Namespace) -> Iterator[None]:
    """`--config FILE` is `CLAWROUTER_CONFIG=FILE` while the command runs: whatever part of it
    reads the settings (the gateway it finds or starts, the MCP server's tools) reads that
    file, not only the part that was handed `args`."""
    config = getattr(args, "config", None)
    if not config:
        yield
        return
    before = os.environ.get("CLAWROUTER_CONFIG")
    os.environ["CLAWROUTER_CONFIG"] = str(Path(config).expanduser().absolute())
    try:
        yield
    finally:  # (a caller embedding `main` keeps its own environment)
        if before is None:
            os.environ.pop("CLAWROUTER_CONFIG", None)
        else:
            os.environ["CLAWROUTER_CONFIG"] = before


class _CommandLines(logging.Handler):
    """A warning logged where nothing set logging up (the gateway a command runs in-process,
    its reconciler...) as one `clawrouter: …` line, like the command's own, rather than
    Python's bare message. On whatever `sys.stderr` is when it comes: a stream bound here
    could be closed by then (a caller, or a test, swaps sys.stderr per command)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr
            above = "\r\033[K" if stream.isatty() else ""  # over a spinner's line, not after it
            stream.write(f"{above}clawrouter: {self.format(record)}\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - as logging's own handlers: never fail the caller
            self.handleError(record)


@contextmanager
def warnings_as_lines() -> Iterator[None]:
    """While a command runs, warnings nobody handles read as the command's lines. Warnings,
    not more: they are rare and concern the user's payments or machine (a payment's fate
    unknown, file descriptors running out), which a `--verbose` to ask for would hide;
    `serve` sets its own logging up (JSON lines), which this leaves alone."""
    before, logging.lastResort = logging.lastResort, _CommandLines()
    try:
        yield
    finally:
        logging.lastResort = before


def file_problem(exc: BaseException) -> str | None:
    """One line for a file the command cannot use (the data directory not writable, or a
    file, a damaged ledger...), naming it and what to do; None for anything else (a bug, a
    network error), whose traceback is worth more than a guess."""
    if isinstance(exc, sqlite3.DatabaseError):
        what = _FILE_ERRORS.get(getattr(exc, "sqlite_errorname", ""))
        if what is None:
            return None
        path = _database_path(exc)
        name = str(path) if path else "a database in the data directory"
        fix = ("make the data directory writable by you, or set CLAWROUTER_HOME"
               if "damaged" not in what else "restore it from a backup, or move it away to "
               "start afresh" + (" (it holds the spend history the budgets count)"
                                 if path and path.name.startswith("ledger") else ""))
        return f"{name} {what} ({exc}): {fix}"
    if not isinstance(exc, OSError) or not exc.filename:
        return None
    path, reason = Path(exc.filename), exc.strerror or str(exc)
    fix = "make the data directory writable by you"
    file = _file_in_the_way(path) if isinstance(exc, (FileExistsError,
                                                      NotADirectoryError)) else None
    if file is not None:
        problem, fix = f"cannot use {path}: {file} is a file, not a directory", "move it away"
    elif isinstance(exc, IsADirectoryError):
        problem, fix = f"cannot use {path}: it is a directory, not a file", "move it away"
    else:
        problem = f"cannot use {path}: {reason}"
    if _home is None or not (path == _home or _home in path.parents):
        return problem  # not the data directory's: the fix is the user's to judge
    return f"{problem} — {fix}, or set CLAWROUTER_HOME to another data directory"


def _file_in_the_way(path: Path) -> Path | None:
    """The file that stands where `path` or one of its folders should be a directory."""
    for part in (*reversed(path.parents), path):
        if part.exists() and not part.is_dir():
            return part
    return None


def _database_path(exc: BaseException) -> Path | None:
    """The file of the database that failed: sqlite's errors do not say, but the objects
    that open ours (the ledger, the image index) keep it as `path`."""
    found, tb = None, exc.__traceback__
    while tb is not None:
        path = getattr(tb.tb_frame.f_locals.get("self"), "path", None)
        if isinstance(path, Path):
            found = path
        tb = tb.tb_next
    return found


def setup_problem(exc: BaseException | None) -> str | None:
    """One line for what stopped a gateway starting that is the user's set-up to fix (the
    wallet key, the ledger, the port, a file), as `main` says it when `serve` fails so and
    exits 2; None for anything else (a request's failure)."""
    from clawrouter.launch import AddressInUse
    from clawrouter.payment.ledger import LedgerBusy, LedgerUnusable
    from clawrouter.payment.wallet import WalletError
    from clawrouter.store.db import NewerIndex

    if isinstance(exc, (WalletError, LedgerBusy, LedgerUnusable, NewerIndex, AddressInUse)):
        return str(exc)  # (their messages never contain a key)
    if isinstance(exc, (OSError, sqlite3.DatabaseError)):
        return file_problem(exc)
    return None


def at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse `type`: a whole number from `minimum` (to `maximum`), else a usage error."""
    def count(value: str) -> int:
        n = int(value)
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more")
        if maximum is not None and n > maximum:
            raise argparse.ArgumentTypeError(f"must be {maximum} or less")
        return n
    count.__name__ = "count"  # argparse's "invalid count value: 'x'"
    return count
