"""What every command shares: settings loading and one way to stop with a message and code."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from clawrouter.config import Settings, load_settings


class CommandError(Exception):
    """Stop the command: `main()` prints `clawrouter: <message>` on stderr and exits `code`
    (1 a failed request or check, 2 a usage or configuration error)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def settings_from(args: argparse.Namespace, **overrides: object) -> Settings:
    try:
        return load_settings(getattr(args, "config", None), **overrides)
    except (ValueError, FileNotFoundError) as exc:
        raise CommandError(2, f"invalid configuration: {exc}") from None


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse `type`: a whole number no smaller than `minimum` (else a usage error)."""
    def count(value: str) -> int:
        n = int(value)
        if n < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more")
        return n
    count.__name__ = "count"  # argparse's "invalid count value: 'x'"
    return count
