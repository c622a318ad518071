"""`clawrouter serve` (the gateway) and `clawrouter sandbox` (the offline upstream alone)."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from typing import Any

from clawrouter.config import Settings, url_host
from clawrouter.launch import SANDBOX_NETWORK, bind, run_async, start_gateway
from clawrouter.cli.client import created_key_notice
from clawrouter.cli.common import add_config, settings_from
from clawrouter.payment.wallet import WalletKey

log = logging.getLogger("clawrouter.serve")


def register(commands: Any) -> None:
    p = commands.add_parser("serve", help="run the gateway on localhost:8402",
                            description="Run the gateway. Offline (BlockRun unreachable) it "
                            "starts the built-in sandbox upstream unless --no-sandbox is given.")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to listen on (default 8402)")
    add_config(p)
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
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8403, help="port to listen on (default 8403)")
    # Base Sepolia only: a mainnet gateway pointed at a sandbox would sign real
    # authorizations for it, and record its fake settlements in the real ledger.
    s.add_argument("--network", default=SANDBOX_NETWORK, choices=[SANDBOX_NETWORK],
                   help=f"the network its challenges name: {SANDBOX_NETWORK} only (a gateway "
                   "pointed at it needs CLAWROUTER_NETWORK=base-sepolia; a mainnet one refuses "
                   "its challenges)")
    s.add_argument("--slow-seconds", type=duration, default=3.0,
                   help="how long a slow model's 202 job takes")
    s.add_argument("--latency-ms", type=duration, default=0.0,
                   help="delay added to every answer (stands in for the internet)")
    s.set_defaults(run=run_sandbox)


def run_serve(args: argparse.Namespace) -> int:
    settings = settings_from(args, host=args.host, port=args.port, upstream_url=args.upstream,
                             sandbox=args.sandbox)
    return run_async(serve(settings))


async def serve(settings: Settings) -> int:
    from clawrouter.observe import setup_logging

    setup_logging(settings.log_level)
    if (missing := missing_api_key(settings)) is not None:
        print(f"clawrouter: refusing to {missing[0]}: {missing[1]}.", file=sys.stderr)
        return 2
    running = await start_gateway(settings, advertise=True)  # its file problems: `main`
    report_wallet(running.app.state.gw.wallet, running.settings)
    mode = " (sandbox: no real payments)" if running.sandbox else ""
    # one write: log lines come from a thread of their own, and may share the pipe (2>&1)
    sys.stdout.write(f"clawrouter ready on {ready_address(settings.host, running.port)} — "
                     f"wallet {running.app.state.gw.address} — upstream "
                     f"{running.settings.upstream_url}{mode}\n")
    sys.stdout.flush()
    await running.wait()
    return 0


def missing_api_key(settings: Settings) -> tuple[str, str] | None:
    """What `serve` refuses to do without an API key, and the fix; None when it needs none.
    Others can reach an exposed gateway, and every request it serves is paid from the wallet
    (`doctor` fails the same set-up with the same words)."""
    if not settings.exposed or settings.api_key:
        return None
    where = (f"listen on {settings.host}" if not settings.loopback
             else f"serve {settings.public_url} (public_url)")
    return (f"{where} without an API key",
            "set CLAWROUTER_API_KEY (clients then send 'Authorization: Bearer <key>')")


#: hosts that mean "every interface": (a name a client here connects to, what they listen on)
_ALL_INTERFACES = {"0.0.0.0": ("localhost", "all interfaces: 0.0.0.0"),
                   "::": ("[::1]", "all IPv6 interfaces: [::]"),  # (bound IPv6 only)
                   "": ("localhost", "all interfaces: 0.0.0.0 and [::]")}


def ready_address(host: str, port: int) -> str:
    """The base URL the ready line shows: one a client can use. http://0.0.0.0:8402 (a
    container's) is where the gateway listens, not an address to connect to: a client on this
    machine uses localhost, others this machine's address, so the listen address is said
    apart."""
    if host in _ALL_INTERFACES:
        name, listening = _ALL_INTERFACES[host]
        return f"http://{name}:{port}/v1 (listening on {listening}, port {port})"
    # localhost is 127.0.0.1 to every client; another loopback address (::1, 127.0.0.2) is
    # named as it is, or a client would knock where nobody listens
    local = "localhost" if host in ("127.0.0.1", "localhost") else url_host(host)
    return f"http://{local}:{port}/v1"


def report_wallet(wallet: WalletKey, settings: Settings) -> None:
    """Say which key pays (never the key): a key made just now must be backed up before the
    wallet is funded, and a key from the environment hides the file's."""
    if wallet.source == "created":
        log.warning("%s", created_key_notice(wallet.path))
    elif wallet.source == "file":
        log.info("wallet key loaded from %s", wallet.path)
    else:
        log.info("wallet key from %s", settings.wallet_key_source)


def run_sandbox(args: argparse.Namespace) -> int:
    from clawrouter.sandbox import SandboxConfig, run_sandbox as run

    logging.basicConfig(level=logging.WARNING)
    listening = bind(args.host, args.port)  # a taken port: one line, not uvicorn's traceback
    port = listening[0].getsockname()[1]  # the one bound, for --port 0
    # an address to connect to: bracketed if IPv6, a name here for "every interface"
    host = _ALL_INTERFACES[args.host][0] if args.host in _ALL_INTERFACES else url_host(args.host)
    print(f"clawrouter sandbox on http://{host}:{port}/api (network {args.network})",
          flush=True)
    run(listening, SandboxConfig(network=args.network, slow_seconds=args.slow_seconds,
                                 latency_ms=args.latency_ms))
    return 0


def duration(value: str) -> float:
    """An argparse `type`: a finite number >= 0. NaN made every sandbox answer a 500 (its
    sleep refuses it), infinity never answered, a negative one is no delay at all."""
    number = float(value)  # (argparse says "invalid duration value" for what is no number)
    if not math.isfinite(number) or number < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, not {value!r}")
    return number
