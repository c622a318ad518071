"""`clawrouter` command line: one module per command group, assembled in `commands`.

The console script (and `python -m clawrouter`) imports this module before anything runs, so
it imports nothing itself: Ctrl-C while the commands load (over half a second of imports)
ends the command as an interrupt at any later moment does, exit 130 without a traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse


def main(argv: list[str] | None = None) -> int:
    try:
        from clawrouter.cli.commands import main as run

        return run(argv)
    except KeyboardInterrupt:  # while loading, or reading the arguments: nothing ran yet
        return 130


def parser() -> argparse.ArgumentParser:
    from clawrouter.cli.commands import parser as every_command

    return every_command()
