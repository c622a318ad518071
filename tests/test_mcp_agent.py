"""`clawrouter mcp` driven as agents drive it: client timeouts that cancel slow calls and
retry them, a wallet another call holds, and the texts an agent acts on. The MCP SDK's own
client over stdio against a real gateway on the sandbox upstream, or the in-process parts."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.test_mcp import PNG_MAGIC, health_refusal, mcp_env, text

#: polling stops this soon (s) after its client left, not 5 s: a retry later than that found
#: the job abandoned before the fix, and the test waits out no more than it must
REJOIN = 0.5


def server_env(tmp_path: Path, sandbox: Any, url: str | None = None,
               **settings: str) -> dict[str, str]:
    """The MCP server's whole environment: the gateway at `url`, or one it starts for itself
    paying `sandbox` (not the built-in one), as a user's would."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAWROUTER_", "BLOCKRUN_"))}
    return env | mcp_env(tmp_path, url) | {
        "BLOCKRUN_API_URL": sandbox.api, "CLAWROUTER_SANDBOX": "false",
        "CLAWROUTER_NETWORK": "base-sepolia", "CLAWROUTER_RPC_URLS": "[]", **settings}


@contextlib.asynccontextmanager
async def agent(env: dict[str, str], constants: dict[str, object] | None = None
                ) -> AsyncIterator[ClientSession]:
    """`clawrouter mcp` as a stdio subprocess (module `constants` set first), initialized."""
    from tests.servers import clawrouter_command

    command = clawrouter_command("mcp", constants=constants)
    params = StdioServerParameters(command=command[0], args=command[1:], env=env)
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            yield session


async def until(condition: Callable[[], bool], seconds: float = 30) -> None:
    with anyio.fail_after(seconds):
        while not await anyio.to_thread.run_sync(condition):
            await anyio.sleep(0.05)


async def timed_out(session: ClientSession, tool: str, arguments: dict[str, Any],
                    when: Callable[[], bool]) -> None:
    """Call `tool` and give up on it (as a client's timeout does: the SDK sends
    `notifications/cancelled`) once `when()` holds."""
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            async def give_up() -> None:
                await until(when)
                scope.cancel()

            group.start_soon(give_up)
            await session.call_tool(tool, arguments)
    assert scope.cancelled_caught, "the call ended before it was given up"


def payment_sent(sandbox: Any) -> Callable[[], bool]:
    """Whether a payment (one more than now) has reached the upstream."""
    paid = sandbox.stats()["payments_count"]
    return lambda: sandbox.stats()["payments_count"] > paid


SLOW_CALL = {"prompt": "a sign that reads OPEN", "model": "gpt-image-2"}


@pytest.mark.parametrize("where", ["in-process", "serve"])
def test_a_slow_call_retried_after_the_agents_timeout_gets_its_image_without_paying_again(
        tmp_path: Path, sandbox: Any, make_gateway: Any, monkeypatch: Any, where: str) -> None:
    """A slow model outlives the agent's timeout, which cancels the call and its request; the
    agent retries later than the gateway waits for a client that left. The request asked the
    gateway to finish a paid job all the same (`KEEP_PAID_JOB`), and the server kept its own
    gateway for it, so the retry gets its image: paid once, the file saved. It is then
    delivered: the same call once more is a new image, paid again."""
    monkeypatch.setattr("clawrouter.upstream.jobs.REJOIN_SECONDS", REJOIN)  # a `serve` here
    sandbox.configure(slow_seconds=2.5)
    url = make_gateway().url if where == "serve" else None
    env = server_env(tmp_path, sandbox, url)

    async def use(session: ClientSession) -> tuple[Any, Any]:
        await timed_out(session, "generate_image", SLOW_CALL, payment_sent(sandbox))
        await anyio.sleep(REJOIN + 0.7)  # a gateway left alone would have given up by now
        retry = await session.call_tool("generate_image", SLOW_CALL)
        sandbox.configure(slow_seconds=0.2)
        return retry, await session.call_tool("generate_image", SLOW_CALL)

    async def main() -> tuple[Any, Any]:
        with anyio.fail_after(60):
            async with agent(env, {"clawrouter.upstream.jobs.REJOIN_SECONDS": REJOIN}) as s:
                return await use(s)

    retry, again = anyio.run(main)
    assert not retry.is_error, text(retry)
    assert retry.structured_content["shared"] is True and "nothing was paid again" in text(retry)
    assert "the same call made again makes new images" in text(retry)  # and it does, below
    saved = Path(retry.structured_content["images"][0]["path"])
    assert saved.parent == tmp_path / "out" and saved.read_bytes().startswith(PNG_MAGIC)
    assert str(saved) in text(retry)
    assert not again.is_error, text(again)
    assert again.structured_content["shared"] is False
    assert again.structured_content["images"][0]["path"] != str(saved)
    assert sandbox.stats()["payments_count"] == 2  # the first call's, and the last one's


def test_a_call_cancelled_before_the_gateway_paid_pays_nothing_and_its_retry_pays_once(
        tmp_path: Path, sandbox: Any) -> None:
    """The agent's timeout cancels a call while the gateway is still before its payment (it
    waits on the upstream's unpaid probe): the cancel reaches the gateway, whose client left,
    so nothing is signed (were the call left to go on, it would pay for an image nobody
    asked for any more). The agent's retry is a new call, paid once; meanwhile the server's
    own gateway, which keeps nothing for it, has let the wallet's ledger go."""
    # (the probe answers 4 s on: time for the cancel to reach the gateway on a loaded machine)
    sandbox.faults({"kind": "delay", "phase": "unpaid", "seconds": 4, "times": 1})
    call = {"prompt": "cancelled before paying", "model": "cogview"}

    def probed() -> bool:
        return bool(sandbox.stats()["requests"].get("generations", {}).get("unpaid"))

    from clawrouter.config import Settings
    from clawrouter.payment.ledger import in_use, lock_path

    lock = lock_path(Settings(home=tmp_path / "client-home").ledger_path_for("base-sepolia"))

    async def use(session: ClientSession) -> tuple[int, bool, Any]:
        await timed_out(session, "generate_image", call, probed)
        await anyio.sleep(4.5)  # the probe has answered: work that went on would have paid
        held = lock.exists() and in_use(lock)
        return (sandbox.stats()["payments_count"], held,
                await session.call_tool("generate_image", call))

    async def main() -> tuple[int, bool, Any]:
        with anyio.fail_after(60):
            async with agent(server_env(tmp_path, sandbox)) as session:
                return await use(session)

    paid_after_the_cancel, held, retry = anyio.run(main)
    assert paid_after_the_cancel == 0
    # nothing is kept for a retry, so the server's own gateway let the wallet's ledger go at
    # once (the user's other commands need it), not after the 60 s coalescing window
    assert not held
    assert not retry.is_error, text(retry)
    assert retry.structured_content["shared"] is False
    assert Path(retry.structured_content["images"][0]["path"]).read_bytes().startswith(PNG_MAGIC)
    assert sandbox.stats()["payments_count"] == 1


# --- progress -------------------------------------------------------------------------------

def test_a_running_paid_call_reports_progress(monkeypatch: Any) -> None:
    monkeypatch.setattr("clawrouter.agents.mcp_server.PROGRESS_EVERY", 0.05)
    seen: list[float] = []

    async def progress(elapsed: float) -> None:
        seen.append(elapsed)

    async def main() -> None:
        from clawrouter.agents.mcp_server import Connection
        from clawrouter.cli.client import ImageResult

        class Stand(Connection):  # its gateway call takes 0.3 s, over no HTTP
            async def run(self, use: Any) -> Any:
                return await use(None)

        async def use(gateway: Any) -> ImageResult:
            await anyio.sleep(0.3)
            return ImageResult("m", "0.05", None, [])

        await Stand().paid(use, progress)

    anyio.run(main)
    assert len(seen) >= 2 and seen == sorted(seen)


def test_a_slow_call_sends_progress_notifications_to_a_client_that_asks(
        tmp_path: Path, sandbox: Any) -> None:
    """Some clients restart their timeout on each progress notification: a slow model's
    call says it is still working while it runs."""
    sandbox.configure(slow_seconds=1.0)
    notes: list[tuple[float, str | None]] = []

    async def noted(progress: float, total: float | None, message: str | None) -> None:
        notes.append((progress, message))

    async def main() -> Any:
        with anyio.fail_after(60):
            async with agent(server_env(tmp_path, sandbox), {
                    "clawrouter.agents.mcp_server.PROGRESS_EVERY": 0.2}) as session:
                return await session.call_tool("generate_image", SLOW_CALL,
                                               progress_callback=noted)

    result = anyio.run(main)
    assert not result.is_error, text(result)
    assert notes and [p for p, _ in notes] == sorted(p for p, _ in notes)
    assert all("openai/gpt-image-2 still working" in (m or "") for _, m in notes)


# --- the wallet busy --------------------------------------------------------------------------

def test_a_call_that_finds_the_wallet_busy_says_nothing_was_paid_and_to_try_again(
        tmp_path: Path, monkeypatch: Any) -> None:
    """Another process holds the wallet's ledger (a command's own gateway mid-payment): the
    call gives up well inside the 60 s after which agents' clients give up on it, and says
    what an agent can do: nothing was paid, try again shortly. Not the terminal's advice to
    stop that process (mid-payment) or use another data directory (another, empty wallet)."""
    from clawrouter.agents import mcp_server
    from clawrouter.config import Settings
    from clawrouter.payment.ledgerlock import exclusive_lock, lock_path
    from tests.servers import dead_port

    assert mcp_server.LEDGER_WAIT <= 45  # and the gateway's start, within a 60 s timeout
    monkeypatch.setattr(mcp_server, "LEDGER_WAIT", 0.3)
    home = tmp_path / "client-home"
    monkeypatch.setenv("CLAWROUTER_HOME", str(home))
    monkeypatch.setenv("CLAWROUTER_SANDBOX", "true")
    monkeypatch.setenv("CLAWROUTER_PORT", str(dead_port()))
    lock = lock_path(Settings(home=home).ledger_path_for("base-sepolia"))
    lock.parent.mkdir(parents=True)

    with exclusive_lock(lock, "another"):
        message = health_refusal()
    assert message.startswith("Nothing was sent or paid: another clawrouter call"), message
    assert f"(pid {os.getpid()})" in message and "Try this call again shortly." in message
    assert "CLAWROUTER_HOME" not in message and "stop it" not in message


# --- what the texts say -----------------------------------------------------------------------

def test_a_paid_failure_and_its_replay_point_the_agent_to_wallet_status(
        tmp_path: Path, sandbox: Any, gateway: Any) -> None:
    """A failure after payment tells a terminal user to check `clawrouter stats`; an agent has
    the wallet_status tool instead. The same call again gets that failure, marked as the
    earlier call's (the gateway's replay), and pays nothing more."""
    from clawrouter.coalesce import REPLAYED

    sandbox.faults({"kind": "respond", "phase": "paid", "status": 500,
                    "body": {"error": "provider down"}, "times": 1})
    call = {"prompt": "fails after paying", "model": "cogview"}

    async def main() -> tuple[Any, Any]:
        with anyio.fail_after(60):
            async with agent(server_env(tmp_path, sandbox, gateway.url)) as session:
                first = await session.call_tool("generate_image", call)
                return first, await session.call_tool("generate_image", call)

    first, replay = anyio.run(main)
    assert first.is_error and "provider down" in text(first)
    for result in (first, replay):
        assert "clawrouter stats" not in text(result) and "wallet_status tool" in text(result)
    assert replay.is_error and REPLAYED in text(replay)
    assert sandbox.stats()["payments_count"] == 1


def test_wallet_status_after_a_call_on_its_own_gateway_of_a_testnet_sandbox(
        tmp_path: Path, sandbox: Any) -> None:
    """No `serve`: each call starts a gateway, so wallet_status's has not paid the upstream
    yet and cannot tell it is a sandbox, which the call's result said: it still says so. Its
    URL died with it; one payment is "1 payment"; no RPC is not "does not report it"."""
    async def main() -> tuple[Any, Any]:
        with anyio.fail_after(60):
            async with agent(server_env(tmp_path, sandbox)) as session:
                made = await session.call_tool("generate_image", {"prompt": "x",
                                                                  "model": "cogview"})
                return made, await session.call_tool("wallet_status", {})

    made, wallet = anyio.run(main)
    assert made.structured_content["sandbox"] is True and "in a sandbox" in text(made)
    assert "built-in" not in text(made)
    status = wallet.structured_content
    assert status["sandbox"] is True and status["testnet"] is True
    assert status["gateway"] is None and status["in_process"] is True
    body = text(wallet)
    assert "(sandbox: no real payments)" in body and "(1 payment)" in body
    assert "Balance: unknown (the gateway could not read it: no RPC URLs configured)" in body


def test_wallet_status_shows_held_money_and_the_per_request_limit() -> None:
    from types import SimpleNamespace

    from clawrouter.agents.mcp_server import describe_wallet, wallet_summary

    health = {"wallet": "0xabc", "network": "base", "sandbox": False, "balance_usd": 12.5}
    spend = {"today": {"usd": 0.1, "payments": 2, "pending": {"usd": 0.0}},
             "budget": {"request": {"limit_usd": 1.0},
                        "day": {"limit_usd": 5.0, "remaining_usd": 4.836, "held_usd": 0.064},
                        "month": {"remaining_usd": None}, "total": {"remaining_usd": None}}}
    status = wallet_summary(health, spend, SimpleNamespace(in_process=False,
                                                           url="http://127.0.0.1:8402"))
    assert status["held_today_usd"] == 0.064 and status["per_request_limit_usd"] == 1.0
    assert status["gateway"] == "http://127.0.0.1:8402" and status["testnet"] is False
    body = describe_wallet(status)
    assert "Held today: $0.064" in body and "Per-request limit: $1.00" in body
    assert "(2 payments)" in body and "Balance: $12.50 USDC" in body
    assert "testnet" not in body and "sandbox" not in body


def test_inline_images_stop_at_the_cap_and_the_rest_are_named_by_path(
        tmp_path: Path, monkeypatch: Any) -> None:
    from clawrouter.agents import mcp_server
    from clawrouter.cli.client import ImageResult, SavedImage

    monkeypatch.setattr(mcp_server, "INLINE_MAX_CHARS", 1_900)
    images = []
    for i, size in enumerate((600, 900, 300), 1):  # 800, 1200, 400 chars of base64
        path = tmp_path / f"{i}.png"
        path.write_bytes(PNG_MAGIC + bytes(size - len(PNG_MAGIC)))
        images.append(SavedImage("", str(path)))
    result = anyio.run(mcp_server._image_result, "Generated",
                       ImageResult("m", "0.1", None, images), True)
    inlined = [c for c in result.content if c.type == "image"]
    assert [len(c.data) for c in inlined] == [800, 400]  # the second would not fit
    assert "Not inlined (over the" in text(result) and "image 2; read the file path" in text(
        result)


def test_maybe_paid_points_an_agent_to_wallet_status() -> None:
    from clawrouter.agents.mcp_server import for_agents
    from clawrouter.cli.client import MAYBE_PAID

    said = for_agents(f"Lost the gateway. {MAYBE_PAID}")
    assert "wallet_status tool" in said and "clawrouter stats" not in said
    assert "GET /v1/spend" not in said  # an agent has no HTTP client for it


def test_calls_that_overlap_uncancelled_leave_the_wallet_free_when_they_end(
        tmp_path: Path, sandbox: Any) -> None:
    """One call ending while another still ran made the server keep its own gateway (and so
    the wallet's ledger) for the whole retry window after both, though nobody cancelled
    anything: the user's next command waited a minute for the wallet."""
    import json
    import time

    from clawrouter.config import Settings
    from clawrouter.payment.ledger import in_use, lock_path
    from tests.test_mcp import McpProcess

    mcp = McpProcess(tmp_path, sandbox, CLAWROUTER_COALESCE_WINDOW_SECONDS="60")
    lock = lock_path(Settings(home=tmp_path / "client-home").ledger_path_for("base-sepolia"))
    try:
        sandbox.faults({"kind": "delay", "phase": "paid", "seconds": 1.0, "times": 1})
        for request_id, prompt in ((1, "first"), (2, "second")):
            mcp.send({"id": request_id, "method": "tools/call", "params": {
                "name": "generate_image", "arguments": {"prompt": prompt, "model": "cogview"}}})
            time.sleep(0.4)  # the second starts while the first is still paying
        answered = {json.loads(mcp.proc.stdout.readline())["id"] for _ in range(2)}
        assert answered == {1, 2}
        deadline = time.monotonic() + 15  # a stop takes a moment; the window is 60 s
        while in_use(lock):
            assert time.monotonic() < deadline, "the wallet is kept though nothing was cancelled"
            time.sleep(0.05)
    finally:
        mcp.close()
