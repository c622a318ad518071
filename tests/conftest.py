"""Shared fixtures: a real sandbox upstream and real gateways on loopback ports."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account

from tests.servers import ServerThread

# Tests never inherit the developer's or CI's clawrouter settings.
for _name in list(os.environ):
    if _name.startswith(("CLAWROUTER_", "BLOCKRUN_")):
        del os.environ[_name]
# ...nor take a wallet lock in the real ~/.clawrouter/wallets (mainnet gateways hold one)
os.environ["CLAWROUTER_WALLET_LOCKS"] = tempfile.mkdtemp(prefix="clawrouter-wallet-locks-")
atexit.register(shutil.rmtree, os.environ["CLAWROUTER_WALLET_LOCKS"], ignore_errors=True)


class Sandbox:
    """The sandbox upstream server plus its control API."""

    def __init__(self, server: ServerThread) -> None:
        self.server = server
        self.url = server.url
        self.api = server.url + "/api"
        self.http = httpx.Client(base_url=server.url, timeout=10)

    def stats(self) -> dict[str, Any]:
        return self.http.get("/_sandbox/stats").raise_for_status().json()

    def reset(self) -> None:
        self.http.post("/_sandbox/reset").raise_for_status()

    def faults(self, *rules: dict[str, Any]) -> None:
        self.http.post("/_sandbox/faults", json=list(rules)).raise_for_status()

    def configure(self, **values: Any) -> None:
        self.http.post("/_sandbox/config", json=values).raise_for_status()

    def paid(self) -> int:
        return len(self.stats()["payments_received"])

    def round_trips(self) -> int:
        return self.stats()["round_trips"]


def _start_sandbox() -> Sandbox:
    from clawrouter.sandbox import SandboxConfig, create_sandbox_app

    return Sandbox(ServerThread(create_sandbox_app(SandboxConfig(network="base-sepolia",
                                                                 slow_seconds=0.6))).start())


def _fresh(sandbox: Sandbox) -> Sandbox:
    sandbox.reset()
    sandbox.configure(latency_ms=0, slow_seconds=0.6, finality_seconds=0,
                      max_timeout_seconds=300, marked=True, url_results=True,
                      image_bytes=None, verify_cpu_ms=0, accept_v1=False,
                      max_accepted_timeout_seconds=600)
    return sandbox


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[Sandbox]:
    sandbox = _start_sandbox()
    yield sandbox
    sandbox.server.stop()


@pytest.fixture
def sandbox(sandbox_server: Sandbox) -> Sandbox:
    return _fresh(sandbox_server)


@pytest.fixture
def own_sandbox() -> Iterator[Sandbox]:
    """A sandbox of this test's alone, configured as `sandbox` is, for a test that leaves a
    request hanging in it (or a payment to settle later): in the shared one that request would
    end in a later test's sandbox (a settlement, a round trip), so the test had to wait it out.
    At the end it is told to stop, not waited for: the hung request ends on its own, unseen."""
    sandbox = _fresh(_start_sandbox())
    yield sandbox
    sandbox.http.close()
    sandbox.server.server.should_exit = True


class Gateway:
    def __init__(self, server: ServerThread, app: Any) -> None:
        self.server = server
        self.app = app
        self.url = server.url
        self.v1 = server.url + "/v1"
        self.gw = app.state.gw
        self.http = httpx.Client(base_url=server.url, timeout=30)


def gateway_settings(home: Path, upstream: str, **overrides: Any):
    from clawrouter.config import Settings

    values: dict[str, Any] = dict(
        home=home, upstream_url=upstream, network="base-sepolia",
        wallet_key=Account.create().key.to_0x_hex(), poll_delay=0.1, poll_interval=0.1,
        poll_deadline=20, sandbox=False, max_usd_per_day=0, rpc_urls=[])
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def make_gateway(tmp_path: Path, sandbox: Sandbox) -> Iterator[Callable[..., Gateway]]:
    from clawrouter.api.app import create_app
    from clawrouter.launch import server_options

    started: list[ServerThread] = []

    def make(upstream: str | None = None, **overrides: Any) -> Gateway:
        """A gateway on loopback, or listening on `overrides["host"]` when given."""
        home = overrides.pop("home", None) or tmp_path / f"home{len(started)}"
        settings = gateway_settings(home, upstream or sandbox.api, **overrides)
        app = create_app(settings)
        server = ServerThread(app, host=overrides.get("host", "127.0.0.1"),
                              **server_options(settings.header_timeout)).start()
        started.append(server)
        return Gateway(server, app)

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def gateway(make_gateway: Callable[..., Gateway]) -> Gateway:
    return make_gateway()


@pytest.fixture
def clock():
    """A settable clock for the ledger and budget tests."""
    from tests.test_ledger import Clock

    return Clock()


@pytest.fixture
def ledger(tmp_path: Path, clock):
    from clawrouter.payment.ledger import Ledger

    with Ledger(tmp_path / "ledger.sqlite3", clock=clock) as ledger:
        yield ledger
