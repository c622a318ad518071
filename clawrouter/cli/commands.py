"""The `clawrouter` command line: every command group's parser, and how a command's end is
said (its exit code, and one line for what stopped it)."""

from __future__ import annotations

import argparse
import os
import re
import sqlite3
import sys
from collections.abc import Sequence
from typing import NoReturn

from clawrouter import __version__
from clawrouter.cli.client import BadGatewayUrl
from clawrouter.cli.common import (
    CommandError, config_named, fail, file_problem, warnings_as_lines,
)
from clawrouter.launch import AddressInUse
from clawrouter.payment.ledger import LedgerBusy, LedgerUnusable
from clawrouter.payment.wallet import WalletError
from clawrouter.store.db import NewerIndex
from clawrouter.cli import serve
from clawrouter.cli import generate, mcp, models, status
from clawrouter.cli import stats, wallet
from clawrouter.cli import images


#: argparse's "argument --size: expected one argument": the argument a usage error is about
_ARGUMENT = re.compile(r"argument ([^:]+): ")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error on a command line with `--json` also prints the one JSON
    error document every `--json` failure prints (`fail`) on stdout: a script parsing
    stdout gets one to read, not an empty stdout. Subcommands' parsers are this class too
    (argparse makes them of their root's), and answer for the whole line."""

    #: whether the line `main` is reading asks for `--json` (a subcommand sees only its part)
    json_line = False

    def error(self, message: str) -> NoReturn:
        if Parser.json_line:
            named = _ARGUMENT.match(message)
            fail(argparse.Namespace(json=True), message, 2, "usage_error",
                 {"type": "invalid_request_error", "param": named.group(1) if named else None,
                  "status": None},  # (no HTTP status: nothing was sent)
                 line=False)  # (argparse's usage and error lines follow on stderr)
            sys.stdout.flush()
        super().error(message)


def asks_json(line: Sequence[str]) -> bool:
    """Whether `--json` (or a prefix argparse takes for it, `--js`) is among the options of
    `line`: anything after `--` is an argument (a prompt), not an option."""
    options = line[:line.index("--")] if "--" in line else line
    return any(len(word.split("=", 1)[0]) > 2 and "--json".startswith(word.split("=", 1)[0])
               for word in options)


def parser() -> argparse.ArgumentParser:
    root = Parser(
        prog="clawrouter",
        description="A local OpenAI-compatible image gateway that pays BlockRun per image "
                    "with x402 (USDC on Base).",
        epilog="Every command that reads the settings takes --config FILE; "
               "CLAWROUTER_CONFIG=FILE names it for all of them (and for an agent's "
               "`clawrouter mcp`). Precedence: flags > CLAWROUTER_* variables > that file > "
               "defaults.")
    root.add_argument("--version", action="version", version=f"clawrouter {__version__}")
    commands = root.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve.register(commands)
    generate.register(commands)
    models.register(commands)
    status.register(commands)
    mcp.register(commands)
    wallet.register(commands)
    stats.register(commands)
    images.register(commands)
    return root


#: what stops a command that is the user's to settle, by the code `--json` gives it
_SETTLE: dict[type[Exception], str] = {
    WalletError: "wallet_error", LedgerBusy: "ledger_busy", LedgerUnusable: "ledger_unusable",
    NewerIndex: "index_unusable",
    AddressInUse: "address_in_use", BadGatewayUrl: "bad_gateway_url"}


def main(argv: list[str] | None = None) -> int:
    Parser.json_line = asks_json(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    try:
        with config_named(args), warnings_as_lines():
            code = int(args.run(args) or 0)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
        return code
    except BrokenPipeError:
        # The reader left (`clawrouter images ls | head -1`): nothing more can be shown, and
        # nothing is worth a traceback. Exit as a program killed by SIGPIPE does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except CommandError as exc:
        return fail(args, str(exc), exc.code, exc.name)
    except tuple(_SETTLE) as exc:
        # one line each, the user's to settle (messages never contain a key)
        code = next(name for kind, name in _SETTLE.items() if isinstance(exc, kind))
        return fail(args, str(exc), 2, code)
    except (OSError, sqlite3.DatabaseError) as exc:
        # A data directory that cannot be written, a file where a folder goes, a damaged
        # ledger: one line naming the file and the fix. Anything else is a bug: traceback.
        message = file_problem(exc)
        if message is None:
            raise
        return fail(args, message, 2, "file_problem")
    except KeyboardInterrupt:  # (quiet, as Ctrl-C ends `serve`; `generate` says what it means)
        return fail(args, "interrupted", 130, "interrupted", line=False)

