"""`clawrouter` command line: one module per command group, assembled here."""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys

from clawrouter import __version__
from clawrouter.cli.client import BadGatewayUrl
from clawrouter.cli.common import CommandError, config_named, file_problem
from clawrouter.launch import AddressInUse
from clawrouter.payment.ledger import LedgerBusy, LedgerUnusable
from clawrouter.payment.wallet import WalletError
from clawrouter.cli import serve
from clawrouter.cli import generate, mcp, models, status
from clawrouter.cli import stats, wallet
from clawrouter.cli import images


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
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


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with config_named(args):
            code = int(args.run(args) or 0)
        sys.stdout.flush()  # here, not at exit, so that a closed pipe is caught below
        return code
    except BrokenPipeError:
        # The reader left (`clawrouter images ls | head -1`): nothing more can be shown, and
        # nothing is worth a traceback. Exit as a program killed by SIGPIPE does.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except CommandError as exc:
        print(f"clawrouter: {exc}", file=sys.stderr)
        return exc.code
    except (WalletError, LedgerBusy, LedgerUnusable, AddressInUse, BadGatewayUrl) as exc:
        # one line each, the user's to settle (messages never contain a key)
        print(f"clawrouter: {exc}", file=sys.stderr)
        return 2
    except (OSError, sqlite3.DatabaseError) as exc:
        # A data directory that cannot be written, a file where a folder goes, a damaged
        # ledger: one line naming the file and the fix. Anything else is a bug: traceback.
        message = file_problem(exc)
        if message is None:
            raise
        print(f"clawrouter: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
