"""A local BlockRun-compatible image API for tests, benchmarks and offline use.

It validates like BlockRun, issues real x402 v2 challenges, verifies EIP-3009 payments
strictly offline (testnet by default), answers with real PNGs (inline, URL or 202 + poll), and
can misbehave on request (faults.py). Control endpoints live under `/_sandbox/` (control.py).
"""

from __future__ import annotations

import socket

from clawrouter.sandbox.app import create_sandbox_app
from clawrouter.sandbox.config import SandboxConfig

__all__ = ["SandboxConfig", "create_sandbox_app", "run_sandbox"]


def run_sandbox(sockets: list[socket.socket], config: SandboxConfig | None = None) -> None:
    """Serve a sandbox on bound sockets until interrupted (blocking; `clawrouter sandbox`)."""
    import uvicorn

    host, port = sockets[0].getsockname()[:2]
    server = uvicorn.Server(uvicorn.Config(create_sandbox_app(config), host=host, port=port,
                                           log_level="warning"))
    server.run(sockets=sockets)
