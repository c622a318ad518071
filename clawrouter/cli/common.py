"""What every command shares: settings loading and one way to stop with a message and code."""

from __future__ import annotations

import argparse

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
