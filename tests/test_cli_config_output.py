"""What the commands print, as a newcomer reads it: the ready line of a gateway listening on all
interfaces (a container's), `clawrouter stats` pointing to the sandbox's ledger first when the
one asked for is empty, and `clawrouter images ls` in straight columns. Real processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from clawrouter.cli.serve import ready_address
from clawrouter.config import Settings
from clawrouter.payment.ledger import SETTLED, Ledger
from clawrouter.sandbox.images import make_png
from clawrouter.store import ImageMeta, ImageStore
from tests.servers import dead_port, free_port


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAWROUTER_", "BLOCKRUN_"))}
    (tmp_path / "user").mkdir(exist_ok=True)
    env.update(HOME=str(tmp_path / "user"), CLAWROUTER_HOME=str(tmp_path / "home"),
               # offline and alone: no gateway at the configured port, no RPC answering
               CLAWROUTER_PORT=str(dead_port()),
               CLAWROUTER_RPC_URLS=json.dumps([f"http://127.0.0.1:{dead_port()}/"]), **extra)
    return env


def clawrouter(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clawrouter", *args], env=env,
                          capture_output=True, text=True, timeout=60)


# --- the ready line -------------------------------------------------------------------------

def test_on_all_interfaces_the_ready_line_gives_a_url_that_answers(tmp_path: Path) -> None:
    """http://0.0.0.0:8402 (the container's listen address) is nowhere to connect to: the line
    gives a URL a client here can use, and says where it listens apart."""
    port = free_port()
    env = environment(tmp_path, CLAWROUTER_API_KEY="k")
    serve = subprocess.Popen([sys.executable, "-m", "clawrouter", "serve", "--sandbox",
                              "--host", "0.0.0.0", "--port", str(port)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert serve.stdout is not None
        line = serve.stdout.readline()
        shown = line.removeprefix("clawrouter ready on ").split(" ", 1)[0]
        assert shown == f"http://localhost:{port}/v1", line
        assert f"(listening on all interfaces: 0.0.0.0, port {port}) — wallet 0x" in line
        assert "0.0.0.0:" not in line  # no URL to connect to names it
        answer = httpx.get(shown.removesuffix("/v1") + "/healthz", timeout=10)
        assert answer.status_code == 200
    finally:
        serve.terminate()
        serve.wait(timeout=20)


def test_the_ready_address_names_a_host_clients_can_reach() -> None:
    assert ready_address("127.0.0.1", 8402) == "http://localhost:8402/v1"
    assert ready_address("::1", 8402) == "http://[::1]:8402/v1"
    assert ready_address("127.0.0.2", 8402) == "http://127.0.0.2:8402/v1"
    assert ready_address("192.168.1.20", 8402) == "http://192.168.1.20:8402/v1"
    assert ready_address("fd00::5", 8402) == "http://[fd00::5]:8402/v1"
    # `::` is bound IPv6-only: its loopback is ::1
    assert ready_address("::", 8402).startswith("http://[::1]:8402/v1 (listening on all IPv6")
    assert ready_address("", 8402).startswith("http://localhost:8402/v1 (listening on all")


# --- stats ----------------------------------------------------------------------------------

def pay(path: Path, model: str = "google/nano-banana") -> None:
    with Ledger(path) as ledger:
        paid = ledger.commit(ledger.signed(
            request_id=f"req_{model}", route="/v1/images/generations", model=model,
            size="1024x1024", n=1, amount=53_500, nonce="0x01", network="base-sepolia",
            payee="0xe9030014F5DAe217d0A152f02A043567b16c1aBf"))
        ledger.commit(ledger.outcome(paid, SETTLED, transaction="0x" + "ab" * 32))


def test_stats_says_first_where_the_sandbox_payments_are_when_the_ledger_asked_for_is_empty(
        tmp_path: Path) -> None:
    """After a sandbox-only session, `stats` (mainnet by default) shows nothing: where the
    payments are is the first thing to read, not a line after empty tables."""
    env = environment(tmp_path)
    home = tmp_path / "home"
    sepolia = Settings(home=home, network="base-sepolia").ledger_path
    sepolia.parent.mkdir(parents=True)
    pay(sepolia)
    pointer = (f"Payments on base-sepolia (the sandbox's and testnet ones) are kept apart, in "
               f"{sepolia}: CLAWROUTER_NETWORK=base-sepolia clawrouter stats")
    empty = clawrouter(env, "stats")
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.startswith(pointer + "\n\nSpending on base "), empty.stdout
    assert empty.stdout.count(pointer) == 1

    pay(Settings(home=home).ledger_path)  # now what was asked for has payments: them first
    full = clawrouter(env, "stats")
    assert full.stdout.startswith("Spending on base "), full.stdout
    assert full.stdout.rstrip().endswith(pointer)


# --- images ls ------------------------------------------------------------------------------

def test_images_ls_keeps_its_columns_straight_whatever_the_costs(tmp_path: Path) -> None:
    """Costs differ in width ($0.021, $0.0535, $0.01575), sizes and models too: every row's
    cost ends, and its prompt starts, in the same column."""
    rows = [("zai/cogview-4", "512x512", 15_750), ("google/nano-banana", "1024x1024", 53_500),
            ("openai/gpt-image-1", "1024x1024", 21_000), ("xai/grok-imagine-image-pro",
                                                         "1024x1024", 1_073_500)]

    async def fill() -> None:
        async with ImageStore(tmp_path / "home" / "images") as store:
            for i, (model, size, cost) in enumerate(rows):
                await store.put_bytes(make_png(16, 16, i), ImageMeta(
                    model=model, prompt=f"prompt {i}", size=size, cost_micro=cost))

    asyncio.run(fill())
    done = clawrouter(environment(tmp_path), "images", "ls")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if "prompt " in line]
    assert len(lines) == len(rows)
    starts = {line.index("prompt ") for line in lines}
    assert len(starts) == 1, done.stdout
    costs = {line.index("$") + len(line.split("$")[1].split()[0]) for line in lines}
    assert len(costs) == 1, done.stdout  # right-aligned: every cost ends in one column
    for model, size, _ in rows:
        assert any(model in line and size in line for line in lines)
