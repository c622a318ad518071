"""One wallet, one set of caps: a second data directory's gateway paying from the same wallet on
Base mainnet is refused (`payment/walletlock`); the ledger's own lock covers one directory.

Every test keeps its wallet locks in its own directory (CLAWROUTER_WALLET_LOCKS), never the
real ~/.clawrouter/wallets."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account

from clawrouter.config import Settings
from clawrouter.launch import Running, run_async, start_gateway
from clawrouter.payment import walletlock
from clawrouter.payment.ledger import Ledger, LedgerBusy
from clawrouter.payment.networks import NETWORKS
from clawrouter.payment.wallet import WalletError
from clawrouter.payment.walletlock import ENVIRON, WalletBusy
from tests.servers import clawrouter_command, clawrouter_in_process, dead_port, serving

BASE = NETWORKS["base"]


@pytest.fixture
def locks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "wallet-locks"
    monkeypatch.setenv(ENVIRON, str(path))
    return path


@pytest.fixture
def upstream() -> Iterator[str]:
    """A sandbox upstream whose challenges are Base mainnet's (no real chain behind it)."""
    from clawrouter.sandbox import SandboxConfig, create_sandbox_app

    with serving(create_sandbox_app(SandboxConfig(network="base"))) as server:
        yield server.url + "/api"


def new_key() -> str:
    return Account.create().key.to_0x_hex()


def mainnet(home: Path, upstream: str, key: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(home=home, port=0, network="base", upstream_url=upstream,
                                  sandbox=False, wallet_key=key, rpc_urls=[])
    return Settings(**{**values, **overrides})


async def stop(running: Running) -> None:
    running.stop()
    await asyncio.gather(*running.tasks, return_exceptions=True)


def paid(upstream: str) -> int:
    return httpx.get(upstream.removesuffix("/api") + "/_sandbox/stats").json()["payments_count"]


def test_a_second_data_directory_paying_from_the_same_wallet_is_refused(
        tmp_path: Path, locks: Path, upstream: str) -> None:
    """The auditor's two `serve`s, one wallet, two CLAWROUTER_HOMEs: the second does not
    start, and names the first's data directory; its ledger is let go with it. In one data
    directory the ledger's lock answers first, as before (a command waits on it). Another
    network or another key is not refused; once the first stops, the wallet is free."""
    key, first_home, second_home = new_key(), tmp_path / "first", tmp_path / "second"

    async def main() -> None:
        first = await start_gateway(mainnet(first_home, upstream, key))
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{first.port}") as c:
                made = await c.post("/v1/images/generations", timeout=30,
                                    json={"prompt": "x", "model": "cogview"})
            assert made.status_code == 200, made.text
            with pytest.raises(LedgerBusy):  # one data directory: its ledger's lock says so
                await start_gateway(mainnet(first_home, upstream, key))  # (`generate` waits)
            with pytest.raises(WalletBusy) as refused:
                await start_gateway(mainnet(second_home, upstream, key))
            message = str(refused.value)
            assert f"for another data directory, {first_home.resolve()}" in message
            assert f"CLAWROUTER_HOME={first_home.resolve()}" in message
            assert "stop that gateway" in message and "\n" not in message
            assert paid(upstream) == 1  # the first's: nothing signed by the second
            Ledger(mainnet(second_home, upstream, key).ledger_path).close()  # let go
            for other in (mainnet(second_home, upstream, key, network="base-sepolia"),
                          mainnet(second_home, upstream, new_key())):
                await stop(await start_gateway(other))
        finally:
            await stop(first)
        second = await start_gateway(mainnet(second_home, upstream, key))
        try:
            holder = walletlock.read_holder(next(locks.iterdir()))
            assert holder == walletlock.Holder(os.getpid(), str(second_home.resolve()))
        finally:
            await stop(second)
        assert list(locks.iterdir()) == []  # let go, and its file removed with it

    run_async(main())


def test_a_killed_gateways_wallet_is_free_and_the_refusal_is_one_line(
        tmp_path: Path, locks: Path, upstream: str) -> None:
    """Real processes: `clawrouter serve` on another home exits 2 with one line naming the
    running one's data directory; after `kill -9` of the running one (no cleanup: its lock
    file stays), the other starts."""
    key, first_home, second_home = new_key(), tmp_path / "first", tmp_path / "second"
    env = {**os.environ, "HOME": str(tmp_path / "user"), "BLOCKRUN_WALLET_KEY": key,
           "BLOCKRUN_API_URL": upstream, "CLAWROUTER_NETWORK": "base", "CLAWROUTER_RPC_URLS": "[]"}
    command = clawrouter_command("serve", "--port", "0", "--no-sandbox")
    first = subprocess.Popen(command, env=env | {"CLAWROUTER_HOME": str(first_home)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "ready" in first.stdout.readline(), first.stderr.read()
        second = subprocess.run(command, env=env | {"CLAWROUTER_HOME": str(second_home)},
                                capture_output=True, text=True, timeout=30)
        assert second.returncode == 2 and second.stdout == ""
        assert second.stderr.count("\n") == 1 and second.stderr.startswith("clawrouter: ")
        assert f"another data directory, {first_home.resolve()} (its gateway is pid " \
               f"{first.pid})" in second.stderr
        stats = clawrouter_in_process("stats", "--json", env=env | {
            "CLAWROUTER_HOME": str(second_home), "CLAWROUTER_URL": f"http://127.0.0.1:{dead_port()}"})
        assert stats.returncode == 0, stats.stderr  # reads its own ledger: no wallet lock
        assert paid(upstream) == 0
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        first.kill()
        first.communicate()
    assert len(list(locks.iterdir())) == 1  # left behind by the killed one, and not held

    async def main() -> None:
        await stop(await start_gateway(mainnet(second_home, upstream, key)))

    run_async(main())


def test_the_lock_is_mainnet_only(tmp_path: Path, locks: Path) -> None:
    """Play money (Base Sepolia, the sandbox): no lock, so tests' gateways never meet."""
    for network, sandbox in ((NETWORKS["base-sepolia"], False), (BASE, True)):
        assert not walletlock.hold("0x" + "ab" * 20, network, tmp_path, sandbox=sandbox).held
    assert not locks.exists()


def test_without_a_writable_home_the_locks_live_in_a_private_temporary_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A container's HOME may be missing or read-only: the temporary directory stands in, one
    per user, only if nobody else may write to it; with neither, the gateway does not start."""
    monkeypatch.delenv(ENVIRON, raising=False)
    (tmp_path / "home-file").write_text("HOME is not a directory here")
    monkeypatch.setenv("HOME", str(tmp_path / "home-file"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    address, home = "0x" + "ab" * 20, tmp_path / "data"
    lock = walletlock.hold(address, BASE, home, sandbox=False)
    try:
        shared = tmp_path / "tmp" / f"clawrouter-{os.getuid()}-wallets"
        assert lock.held and lock.path == shared / f"{address}-base.lock"
        with pytest.raises(WalletBusy):
            walletlock.hold(address, BASE, tmp_path / "other", sandbox=False)
    finally:
        lock.release()
    shared.chmod(0o777)  # anyone's: not used
    with pytest.raises(WalletError) as refused:
        walletlock.hold(address, BASE, home, sandbox=False)
    assert not isinstance(refused.value, WalletBusy)
    assert "not this user's alone" in str(refused.value) and ENVIRON in str(refused.value)


def test_a_lock_file_removed_by_its_holder_while_being_taken_is_not_shared(
        tmp_path: Path, locks: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The releasing holder removes the file: a taker that opened the old one locks a file
    no longer at that name, so it takes the new one (two never hold the lock at once)."""
    address = "0x" + "cd" * 20
    first = walletlock.hold(address, BASE, tmp_path / "a", sandbox=False)
    real_flock, raced = walletlock.fcntl.flock, []

    def flock(handle: Any, flags: int) -> None:
        if not raced:  # the holder lets go between our open and our lock
            raced.append(True)
            first.release()
        real_flock(handle, flags)

    monkeypatch.setattr(walletlock.fcntl, "flock", flock)
    second = walletlock.hold(address, BASE, tmp_path / "b", sandbox=False)
    try:
        assert second.held and walletlock._still_named(second._handle, second.path)
        monkeypatch.setattr(walletlock.fcntl, "flock", real_flock)
        with pytest.raises(WalletBusy):
            walletlock.hold(address, BASE, tmp_path / "c", sandbox=False)
    finally:
        second.release()
    assert not second.held and list(locks.iterdir()) == []


def test_the_locks_live_in_the_users_home_made_private(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """By default ~/.clawrouter/wallets, whatever CLAWROUTER_HOME says. A ~/.clawrouter made
    here is 0700 as the data directory would have made it: it is the default one, and that
    keeps the mode it finds (its ledger and images would be other users' to read)."""
    monkeypatch.delenv(ENVIRON, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    (tmp_path / "user").mkdir()
    lock = walletlock.hold("0x" + "ef" * 20, BASE, tmp_path / "elsewhere", sandbox=False)
    try:
        folder = tmp_path / "user" / ".clawrouter"
        assert lock.path == folder / "wallets" / f"{'0x' + 'ef' * 20}-base.lock"
        assert [oct(p.stat().st_mode & 0o777) for p in (folder, folder / "wallets")] == [
            "0o700", "0o700"]
    finally:
        lock.release()


def test_a_start_refused_for_the_wallet_leaves_the_crash_record_for_the_next(
        tmp_path: Path, locks: Path) -> None:
    """A payment left in flight by a crash is remembered (`Ledger.interrupted`) by the start
    that gets the ledger, so the SDK's retry is refused, not paid again: a start refused for
    the wallet, in between, must not use that record up."""
    from clawrouter.api.app import create_app

    key = new_key()
    settings = mainnet(tmp_path / "home", "http://127.0.0.1:9/api", key)
    settings.home.mkdir()
    with Ledger(settings.ledger_path) as ledger:  # the process died with this one in flight
        payment = ledger.commit(ledger.signed(
            request_id="r1", route="/v1/images/generations", model="zai/cogview-4",
            size="512x512", n=1, amount=16750, payee=settings.pay_to, network=BASE.caip2,
            nonce="0x" + "11" * 32))
    other = walletlock.hold(Account.from_key(key).address, BASE, tmp_path / "other",
                            sandbox=False)
    try:
        with pytest.raises(WalletBusy):
            create_app(settings)
    finally:
        other.release()
    with Ledger(settings.ledger_path) as ledger:
        assert list(ledger.interrupted) == [payment]


def test_whoever_gets_the_ledger_next_finds_the_wallet_free_too(tmp_path: Path,
                                                                  locks: Path) -> None:
    """A command waiting for this data directory's ledger gets it the moment it is let go:
    the wallet's lock must be free by then, or it would be refused as if another data
    directory paid from the wallet (it would wait on the ledger, but not on that)."""
    home = tmp_path / "home"
    home.mkdir()
    path = home / "ledger.sqlite3"
    hold = functools.partial(walletlock.hold, "0x" + "ab" * 20, BASE, home, sandbox=False)
    successor: list[str] = []

    class Watched:
        """The wallet lock, and what a successor meets the moment it is released."""

        def __init__(self) -> None:
            self.inner = hold()

        def release(self) -> None:
            self.inner.release()
            try:
                Ledger(path, holding=hold).close()
                successor.append("started")
            except LedgerBusy:
                successor.append("waits for the ledger")  # as a command does
            except WalletBusy:
                successor.append("refused for the wallet")

    Ledger(path, holding=Watched).close()
    assert successor == ["waits for the ledger"]
