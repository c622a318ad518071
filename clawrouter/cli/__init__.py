"""`clawrouter` command line: one module per command group, assembled in `commands`.

The console script (and `python -m clawrouter`) imports this module before anything runs, so
it imports nothing itself (but `signal`): Ctrl-C while the commands load (over half a second
of imports) ends the command as an interrupt at any later moment does, exit 130 without a
traceback.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import argparse


def main(argv: list[str] | None = None) -> int:
    # Ctrl-C while the commands load is noted, not raised: a KeyboardInterrupt raised inside
    # the import machinery (a module lock's callback) is printed with a traceback by Python
    # itself, past any `except` of ours.
    interrupted: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
        noting = True
    except ValueError:  # not the main thread (a caller embedding us): signals are not ours
        noting = False
    try:
        from clawrouter.cli.commands import main as run
    finally:
        if noting:
            signal.signal(signal.SIGINT, signal.SIG_DFL if previous is None else previous)
    if interrupted:
        return 130  # nothing ran yet
    try:
        return run(argv)
    except KeyboardInterrupt:  # while reading the arguments: nothing ran yet
        return 130


def parser() -> argparse.ArgumentParser:
    from clawrouter.cli.commands import parser as every_command

    return every_command()
