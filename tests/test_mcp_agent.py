"""`clawrouter mcp` driven as agents drive it: client timeouts that cancel slow calls and
retry them, a wallet another call holds, and the texts an agent acts on. The MCP SDK's own
client over stdio against a real gateway on the sandbox upstream, or the in-process parts."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from tests.test_mcp import PNG_MAGIC, mcp_env, text

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


async def timed_out(session: ClientSession, sandbox: Any, tool: str,
                    arguments: dict[str, Any]) -> None:
    """Call `tool` and give up on it (as a client's timeout does: the SDK sends
    `notifications/cancelled`) once its payment has reached the upstream."""
    paid = sandbox.stats()["payments_count"]
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as group:
            async def give_up() -> None:
                await until(lambda: sandbox.stats()["payments_count"] > paid)
                scope.cancel()

            group.start_soon(give_up)
            await session.call_tool(tool, arguments)
    assert scope.cancelled_caught, "the call ended before its payment was sent"


SLOW_CALL = {"prompt": "a sign that reads OPEN", "model": "gpt-image-2"}


@pytest.mark.parametrize("where", ["in-process", "serve"])
def test_a_slow_call_retried_after_the_agents_timeout_gets_its_image_without_paying_again(
        tmp_path: Path, sandbox: Any, make_gateway: Any, monkeypatch: Any, where: str) -> None:
    """A slow model outlives the agent's timeout, which cancels the call; the agent retries
    later than the gateway waits for a client that left. The cancelled call's request went on
    in the background, so the retry gets its image: paid once, the file saved. It is then
    delivered: the same call once more is a new image, paid again."""
    monkeypatch.setattr("clawrouter.upstream.jobs.REJOIN_SECONDS", REJOIN)  # a `serve` here
    sandbox.configure(slow_seconds=2.5)
    url = make_gateway().url if where == "serve" else None
    env = server_env(tmp_path, sandbox, url)

    async def use(session: ClientSession) -> tuple[Any, Any]:
        await timed_out(session, sandbox, "generate_image", SLOW_CALL)
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


# --- a paid call's work, in-process: cancels, retries, delivery -----------------------------

class Scripted:
    """A `Connection` whose gateway calls run `use` on a stand-in gateway (no HTTP): the
    paid calls' work as the agent's cancels and retries see it."""

    @staticmethod
    def connection(window: float = 60.0) -> Any:
        from types import SimpleNamespace

        from clawrouter.agents.mcp_server import Connection

        class Stand(Connection):
            async def run(self, use: Any) -> Any:
                return await use(SimpleNamespace(
                    settings=SimpleNamespace(coalesce_window_seconds=window)))

        return Stand()


def paid_work(sends: list[str], seconds: float, *, fail: str | None = None,
              before_sending: float = 0.0) -> Callable[[Any], Any]:
    """A paid call's gateway work: `before_sending` s, its request sent (as the httpx hook
    marks it), `seconds` s for the answer; then images, or the tool error `fail`."""
    import httpx
    from mcp.server.mcpserver.exceptions import ToolError

    from clawrouter.agents.mcp_server import _mark_sent
    from clawrouter.cli.client import ImageResult, SavedImage

    async def use(gateway: Any) -> ImageResult:
        await anyio.sleep(before_sending)
        await _mark_sent(httpx.Request("POST", "http://127.0.0.1/v1/images/generations"))
        sends.append("sent")
        number = len(sends)  # this call's image is named after its send
        await anyio.sleep(seconds)
        if fail:
            raise ToolError(fail)
        return ImageResult("m", "0.05", None, [SavedImage("", f"/out/{number}.png")])

    return use


async def cancelled_after(seconds: float, call: Awaitable[Any]) -> None:
    with anyio.move_on_after(seconds) as scope:
        await call
    assert scope.cancelled_caught


def test_a_retry_joins_the_cancelled_calls_work_and_then_it_is_delivered() -> None:
    sends: list[str] = []

    async def main() -> tuple[Any, Any]:
        connection = Scripted.connection()
        await cancelled_after(0.1, connection.paid("call", paid_work(sends, 0.3)))
        retry = await connection.paid("call", paid_work(sends, 0.3))  # joins it, running
        again = await connection.paid("call", paid_work(sends, 0.0))
        return retry, again

    retry, again = anyio.run(main)
    assert retry.shared is True and retry.images[0].path == "/out/1.png"
    assert again.shared is False and again.images[0].path == "/out/2.png"
    assert sends == ["sent", "sent"]  # the cancelled call's, and the last call's


def test_a_retry_after_the_cancelled_work_ended_takes_its_outcome_within_the_window() -> None:
    sends: list[str] = []

    async def main() -> tuple[Any, Any]:
        connection = Scripted.connection(window=0.4)
        await cancelled_after(0.05, connection.paid("a", paid_work(sends, 0.1)))
        await cancelled_after(0.05, connection.paid("b", paid_work(sends, 0.1)))
        await anyio.sleep(0.2)  # both ended; "a" is retried within its window, "b" after it
        retry = await connection.paid("a", paid_work(sends, 0.0))
        await anyio.sleep(0.4)
        late = await connection.paid("b", paid_work(sends, 0.0))
        return retry, late

    retry, late = anyio.run(main)
    assert retry.shared is True and retry.images[0].path == "/out/1.png"
    assert late.shared is False and sends == ["sent", "sent", "sent"]


def test_a_call_cancelled_before_its_request_was_sent_stops_and_pays_nothing() -> None:
    sends: list[str] = []

    async def main() -> Any:
        connection = Scripted.connection()
        await cancelled_after(0.05, connection.paid("call", paid_work(
            sends, 0.0, before_sending=0.2)))
        await anyio.sleep(0.3)  # it would have sent by now
        assert sends == []
        return await connection.paid("call", paid_work(sends, 0.0))  # a new call

    assert anyio.run(main).shared is False and sends == ["sent"]


def test_a_retry_of_cancelled_work_that_failed_says_whose_failure_it_is() -> None:
    from mcp.server.mcpserver.exceptions import ToolError

    from clawrouter.agents.mcp_server import EARLIER_FAILED

    sends: list[str] = []

    async def main() -> tuple[str, Any]:
        connection = Scripted.connection()
        await cancelled_after(0.05, connection.paid("call", paid_work(
            sends, 0.1, fail="clawrouter: Upstream failed after payment")))
        try:
            await connection.paid("call", paid_work(sends, 0.0))
        except ToolError as exc:
            failed = str(exc)
        return failed, await connection.paid("call", paid_work(sends, 0.0))

    failed, again = anyio.run(main)
    assert failed == EARLIER_FAILED + "clawrouter: Upstream failed after payment"
    assert again.shared is False and sends == ["sent", "sent"]


def test_a_running_paid_call_reports_progress(monkeypatch: Any) -> None:
    monkeypatch.setattr("clawrouter.agents.mcp_server.PROGRESS_EVERY", 0.05)
    seen: list[float] = []

    async def progress(elapsed: float) -> None:
        seen.append(elapsed)

    async def main() -> None:
        await Scripted.connection().paid("call", paid_work([], 0.3), progress)

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
    from mcp.server.mcpserver.exceptions import ToolError

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

    async def main() -> str:
        connection = mcp_server.Connection()
        try:
            await connection.run(lambda gateway: gateway.health())
        except ToolError as exc:
            return str(exc)
        finally:
            await connection.aclose()
        raise AssertionError("the call did not fail")

    with exclusive_lock(lock, "another"):
        message = anyio.run(main)
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
