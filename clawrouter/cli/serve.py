"""`clawrouter serve` (the gateway) and `clawrouter sandbox` (the offline upstream alone)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

import aiohttp
import uvicorn

from clawrouter.config import DEFAULT_UPSTREAM, Settings
from clawrouter.cli.common import settings_from

SANDBOX_NETWORK = "base-sepolia"  # the sandbox never receives a mainnet authorization


def register(commands: Any) -> None:
    p = commands.add_parser("serve", help="run the gateway on localhost:8402",
                            description="Run the gateway. Offline (BlockRun unreachable) it "
                            "starts the built-in sandbox upstream unless --no-sandbox is given.")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8402)")
    p.add_argument("--config", help="TOML settings file (default $CLAWROUTER_HOME/config.toml)")
    p.add_argument("--upstream", help="BlockRun API base URL (default https://blockrun.ai/api)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--sandbox", dest="sandbox", action="store_const", const=True,
                       help="use the built-in sandbox upstream (fake payments, local images)")
    group.add_argument("--no-sandbox", dest="sandbox", action="store_const", const=False,
                       help="always use the real upstream, even when it does not answer")
    p.set_defaults(run=run_serve)

    s = commands.add_parser("sandbox", help="run only the BlockRun-compatible sandbox upstream",
                            description="Run the sandbox upstream alone (BlockRun's routes "
                            "under /api, real x402 challenges and verification, local PNGs).")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8403)
    s.add_argument("--network", default=SANDBOX_NETWORK, choices=["base", "base-sepolia"])
    s.add_argument("--slow-seconds", type=float, default=3.0,
                   help="how long a slow model's 202 job takes")
    s.add_argument("--latency-ms", type=float, default=0.0,
                   help="delay added to every answer (stands in for the internet)")
    s.set_defaults(run=run_sandbox)


def run_serve(args: argparse.Namespace) -> int:
    settings = settings_from(args, host=args.host, port=args.port, upstream_url=args.upstream,
                             sandbox=args.sandbox)
    return asyncio.run(serve(settings))


async def upstream_reachable(url: str, timeout: float = 3.0) -> bool:
    """A free GET of the model list; any HTTP answer means the upstream is there."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.get(url + "/v1/models") as resp:
                return resp.status < 500
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return False


async def serve(settings: Settings) -> int:
    from clawrouter.api.app import create_app
    from clawrouter.observe import setup_logging

    setup_logging(settings.log_level)
    if not settings.loopback and not settings.api_key:
        print(f"clawrouter: refusing to listen on {settings.host} without an API key: set "
              "CLAWROUTER_API_KEY (clients then send 'Authorization: Bearer <key>').",
              file=sys.stderr)
        return 2
    use_sandbox = settings.sandbox
    if use_sandbox == "auto":
        use_sandbox = (settings.upstream_url == DEFAULT_UPSTREAM
                       and not await upstream_reachable(settings.upstream_url))
    servers: list[uvicorn.Server] = []
    if use_sandbox:
        from clawrouter.sandbox import SandboxConfig, create_sandbox_app

        sandbox = uvicorn.Server(uvicorn.Config(
            create_sandbox_app(SandboxConfig(network=SANDBOX_NETWORK, pay_to=settings.pay_to)),
            host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
        servers.append(sandbox)
        port = await _start(sandbox)
        settings = settings.model_copy(update={
            "upstream_url": f"http://127.0.0.1:{port}/api", "network": SANDBOX_NETWORK})
    app = create_app(settings, sandbox=bool(use_sandbox))
    gateway = uvicorn.Server(uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level,
        access_log=False, lifespan="on", timeout_keep_alive=30))
    servers.append(gateway)
    port = await _start(gateway)
    mode = " (sandbox: no real payments)" if use_sandbox else ""
    host = "localhost" if settings.loopback else settings.host
    print(f"clawrouter ready on http://{host}:{port}/v1 — wallet {app.state.gw.address} — "
          f"upstream {settings.upstream_url}{mode}", flush=True)
    try:
        await asyncio.gather(*(s.main_task for s in servers))  # type: ignore[attr-defined]
    finally:
        for s in servers:
            s.should_exit = True
    return 0


async def _start(server: uvicorn.Server) -> int:
    """Start a uvicorn server as a task and return its bound port once it listens."""
    server.main_task = asyncio.create_task(server.serve())  # type: ignore[attr-defined]
    while not server.started:
        if server.main_task.done():  # type: ignore[attr-defined]
            server.main_task.result()  # type: ignore[attr-defined]
            raise SystemExit(2)
        await asyncio.sleep(0.01)
    return server.servers[0].sockets[0].getsockname()[1]


def run_sandbox(args: argparse.Namespace) -> int:
    from clawrouter.sandbox import SandboxConfig, run_sandbox as run

    logging.basicConfig(level=logging.WARNING)
    print(f"clawrouter sandbox on http://{args.host}:{args.port}/api (network {args.network})",
          flush=True)
    run(args.host, args.port, SandboxConfig(network=args.network, slow_seconds=args.slow_seconds,
                                            latency_ms=args.latency_ms))
    return 0
