"""`clawrouter mcp`: serve the image tools to an agent over stdio (Model Context Protocol)."""

from __future__ import annotations

import argparse
from typing import Any

from clawrouter.cli.client import URL_HELP
from clawrouter.cli.common import add_config


def register(commands: Any) -> None:
    p = commands.add_parser(
        "mcp", help="serve the image tools to an AI agent over stdio (MCP)",
        description="Run a Model Context Protocol server on stdin/stdout with the tools "
        "generate_image, edit_image, list_image_models and wallet_status. It uses the gateway "
        "--url or CLAWROUTER_URL names, and only that one (when it does not answer, a call "
        "fails and nothing is started or paid); without one, the running gateway where "
        "`clawrouter serve` listens with your settings (http://127.0.0.1:8402 by default; "
        "CLAWROUTER_API_KEY is sent as a bearer token when set) or, when none answers, one it "
        "starts inside this process with your settings for each call (between calls your "
        "other commands can use the wallet; after a call the agent cancelled, once its paid "
        "work is done and the time for the agent's retry, coalesce_window_seconds, has "
        "passed). Images are saved to CLAWROUTER_OUT (default ~/Pictures/clawrouter).",
        epilog="Example (Claude Desktop / Claude Code config): "
        '{"mcpServers": {"clawrouter": {"command": "/path/to/.venv/bin/clawrouter", '
        '"args": ["mcp"]}}} (the full path: an MCP client does not read your shell\'s PATH); '
        'add "env": {"CLAWROUTER_CONFIG": "/path/to/my.toml"} to use a settings file of '
        "your own (as `serve --config` does)")
    p.add_argument("--url", help=URL_HELP)
    add_config(p)
    p.add_argument("--out", metavar="DIR", help="directory for saved images (default "
                   "$CLAWROUTER_OUT or ~/Pictures/clawrouter)")
    p.set_defaults(run=run_mcp)


def run_mcp(args: argparse.Namespace) -> int:
    from clawrouter.agents.mcp_server import run

    return run(args.url, args.out)
