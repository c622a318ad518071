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
    # Only Python's own handler is replaced: a SIGINT the process was started ignoring
    # (`clawrouter serve &` in a script) stays ignored, and a handler set outside Python stays.
    interrupted: list[int] = []
    noting = signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if noting:
        try:
            signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
        except ValueError:  # not the main thread (a caller embedding us): signals are not ours
            noting = False
    try:
        from clawrouter.cli.commands import main as run
    finally:
        if noting:
            signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted:
        return 130  # nothing ran yet
    try:
        return run(argv)
    except KeyboardInterrupt:  # while reading the arguments: nothing ran yet
        return 130


def parser() -> argparse.ArgumentParser:
    from clawrouter.cli.commands import parser as every_command

    return every_command()
