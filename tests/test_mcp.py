"""`clawrouter mcp` as an agent sees it: the MCP SDK's own client over stdio, a real subprocess,
a real gateway on the sandbox upstream. Nothing mocked."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from clawrouter import catalog
from clawrouter.cli import models as model_table
from clawrouter.sandbox.images import make_png

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def mcp_env(tmp_path: Path, url: str | None) -> dict[str, str]:
    """The server's environment: the gateway at `url`; without one, nothing answers where its
    settings look (a dead CLAWROUTER_PORT), so it starts its own."""
    from tests.servers import dead_port

    where = {"CLAWROUTER_URL": url} if url else {"CLAWROUTER_PORT": str(dead_port())}
    return where | {"CLAWROUTER_HOME": str(tmp_path / "client-home"),
                    "CLAWROUTER_OUT": str(tmp_path / "out")}


@contextlib.asynccontextmanager
async def session_of(env: dict[str, str]) -> AsyncIterator[ClientSession]:
    """`clawrouter mcp` as a stdio subprocess, initialized; shut down on leaving."""
    params = StdioServerParameters(command=sys.executable, args=["-m", "clawrouter", "mcp"],
                                   env=env)
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            yield session


def with_session(env: dict[str, str], use: Callable[[ClientSession], Awaitable[Any]]) -> Any:
    """Start `clawrouter mcp` as a stdio subprocess, initialize, run `use`, shut it down."""
    async def main() -> Any:
        with anyio.fail_after(60):
            async with session_of(env) as session:
                return await use(session)

    return anyio.run(main)


def call(env: dict[str, str], tool: str, arguments: dict[str, Any] | None = None) -> Any:
    return with_session(env, lambda s: s.call_tool(tool, arguments or {}))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory, sandbox_server: Any
           ) -> Iterator[Callable[[Callable[[ClientSession], Awaitable[Any]]], Any]]:
    """One `clawrouter mcp` session, on one gateway paying the shared sandbox, for the tests
    whose calls pay nothing and leave nothing behind (lists, refusals): each would otherwise
    start its own server and gateway (about 1.3 s) for one call. Call it with what to do with
    the session; a test of payments or of the server's lifetime starts its own."""
    from anyio.from_thread import start_blocking_portal

    from clawrouter.api.app import create_app
    from clawrouter.launch import server_options
    from tests.conftest import gateway_settings
    from tests.servers import ServerThread

    tmp = tmp_path_factory.mktemp("shared-mcp")
    settings = gateway_settings(tmp / "gateway-home", sandbox_server.api)
    server = ServerThread(create_app(settings), **server_options(settings.header_timeout))
    server.start()
    try:
        with start_blocking_portal() as portal:
            with portal.wrap_async_context_manager(
                    session_of(mcp_env(tmp, server.url))) as session:
                def use(what: Callable[[ClientSession], Awaitable[Any]]) -> Any:
                    async def bounded() -> Any:
                        with anyio.fail_after(60):
                            return await what(session)

                    return portal.call(bounded)

                yield use
    finally:
        server.stop()


def text(result: Any) -> str:
    return "\n".join(c.text for c in result.content if c.type == "text")


def health_refusal(url: str | None = None) -> str:
    """The tool error a `Connection` (to `url`, else as the settings say) gives for one call
    that asks the gateway its health; a call that succeeds fails the test."""
    from mcp.server.mcpserver.exceptions import ToolError

    from clawrouter.agents.mcp_server import Connection

    async def main() -> str:
        connection = Connection(url)
        try:
            await connection.run(lambda gateway: gateway.health())
        except ToolError as exc:
            return str(exc)
        finally:
            await connection.aclose()
        raise AssertionError("the call did not fail")

    return anyio.run(main)


def test_lists_four_tools_with_schemas(shared: Any) -> None:
    tools = shared(lambda s: s.list_tools()).tools
    by_name = {t.name: t for t in tools}
    assert set(by_name) == {"generate_image", "edit_image", "list_image_models", "wallet_status"}
    gen = by_name["generate_image"].input_schema
    assert gen["required"] == ["prompt"]
    assert {"prompt", "model", "size", "n", "inline"} <= set(gen["properties"])
    edit = by_name["edit_image"].input_schema
    assert set(edit["required"]) == {"prompt", "image"}
    assert {"mask", "model", "size", "inline"} <= set(edit["properties"])
    assert all(t.description for t in tools)


def test_tool_descriptions_say_what_an_agent_needs_before_paying(shared: Any) -> None:
    """Which models are slow and what to do when their call times out, where the images go,
    and what `edit_image` takes: paths absolute (the server's working folder is not the
    agent's), and how many source images each model edits."""
    import re

    by_name = {t.name: t for t in shared(lambda s: s.list_tools()).tools}
    generate, edit = by_name["generate_image"].description, by_name["edit_image"].description
    for description in (generate, edit):
        assert all(m.id in description for m in catalog.MODELS if m.slow), description
        assert "same arguments" in description and "without paying again" in description
        assert re.search(r"Images are saved in /\S+/out\.", description), description
    assert "absolute local file path" in edit
    image = by_name["edit_image"].input_schema["properties"]["image"]["description"]
    assert "absolute local path" in image and "not yours" in image
    for model in catalog.MODELS:
        if model.edits:
            assert f"{model.id} (up to {model.max_images})" in edit


def test_generate_image_saves_a_png_and_reports_url_path_model_cost(
        tmp_path: Path, gateway: Any, sandbox: Any) -> None:
    async def use(session: ClientSession) -> tuple[Any, Any]:
        first = await session.call_tool("generate_image", {
            "prompt": "a lighthouse at dawn", "model": "gpt-image", "inline": True})
        # "Another one, please" with the same words (checked below): another image
        return first, await session.call_tool("generate_image", {
            "prompt": "a lighthouse at dawn", "model": "gpt-image"})

    result, again = with_session(mcp_env(tmp_path, gateway.url), use)
    assert not result.is_error, text(result)
    saved = result.structured_content
    assert saved["model"] == "openai/gpt-image-1"
    assert saved["cost_usd"] == "0.022"  # 0.02 × 1.05 + 0.001 fee
    image = saved["images"][0]
    path = Path(image["path"])
    assert path.parent == tmp_path / "out" and path.read_bytes().startswith(PNG_MAGIC)
    assert path.stem in image["url"] and image["url"].startswith(gateway.url)
    body = text(result)
    assert str(path) in body and image["url"] in body
    assert "openai/gpt-image-1" in body and "$0.022" in body
    inline = [c for c in result.content if c.type == "image"]
    assert len(inline) == 1 and inline[0].mime_type == "image/png"
    assert saved["shared"] is False and "paid again" not in body
    # "Another one, please" with the same words: a new call, as the SDK's second call is (each
    # is marked a first try), so a new image, paid for; not the first call's, delivered.
    assert again.structured_content["shared"] is False and "paid again" not in text(again)
    assert sandbox.paid() == 2


def test_edit_image_with_a_local_file(tmp_path: Path, gateway: Any) -> None:
    source = tmp_path / "photo.png"
    source.write_bytes(make_png(64, 64, seed=7))
    result = call(mcp_env(tmp_path, gateway.url), "edit_image",
                  {"prompt": "make it snow", "image": str(source)})
    assert not result.is_error, text(result)
    assert result.structured_content["model"] == catalog.DEFAULT_EDIT_MODEL
    saved = Path(result.structured_content["images"][0]["path"])
    assert saved.read_bytes().startswith(PNG_MAGIC)


@pytest.mark.parametrize("tool,arguments,message", [
    ("generate_image", {"prompt": "x", "model": "flux"}, "dropped"),
    ("generate_image", {"prompt": "x", "model": "no-such-model"}, "Unknown image model"),
    ("edit_image", {"prompt": "x", "image": "/etc/passwd"}, "outside the allowed folders"),
    # arguments that do not fit the schema: one plain line, not pydantic's report
    ("generate_image", {}, "generate_image: 'prompt' is required"),
    ("generate_image", {"prompt": "x", "n": 99}, "generate_image: 'n': input should be less "
                                                 "than or equal to 10"),
])
def test_refusals_are_tool_errors_with_the_gateways_message(
        shared: Any, sandbox: Any, tool: str, arguments: dict[str, Any], message: str) -> None:
    result = shared(lambda s: s.call_tool(tool, arguments))
    assert result.is_error
    assert message in text(result)
    assert "pydantic" not in text(result)
    assert sandbox.paid() == 0


def test_budget_refusal_is_a_tool_error(tmp_path: Path, make_gateway: Any) -> None:
    gateway = make_gateway(max_usd_per_day=0.01)
    result = call(mcp_env(tmp_path, gateway.url), "generate_image", {"prompt": "x"})
    assert result.is_error and "budget" in text(result).lower()


def test_list_image_models_covers_the_catalog(shared: Any) -> None:
    result = shared(lambda s: s.call_tool("list_image_models", {}))
    assert not result.is_error
    ids = [m["id"] for m in result.structured_content["models"]]
    assert ids == [m.id for m in catalog.MODELS]
    body = text(result)
    assert all(m.id in body for m in catalog.MODELS) and "dall-e-3" in body and "flux" in body
    assert model_table.retired_names() in body
    # every size's price, not a range, and which models take minutes
    for model in catalog.MODELS:
        row = next(line for line in body.splitlines() if line.startswith(f"| {model.id} |"))
        for size, price in model.prices.items():
            base = catalog.format_usd(catalog.to_micro(price * catalog.BASE_MARKUP))
            assert f"{size} {base}" in row, (model.id, size)
        assert ("slow" in row) == model.slow, row
    assert all(card["slow"] == m.slow for card, m in zip(
        result.structured_content["models"], catalog.MODELS))


def test_wallet_status_reports_address_spend_and_budget(tmp_path: Path, make_gateway: Any
                                                        ) -> None:
    gateway = make_gateway(max_usd_per_day=2.0)
    gateway.http.post("/v1/images/generations", json={"prompt": "x"}).raise_for_status()
    result = call(mcp_env(tmp_path, gateway.url), "wallet_status")
    assert not result.is_error, text(result)
    status = result.structured_content
    assert status["address"] == gateway.gw.address
    assert status["spent_today_usd"] == pytest.approx(0.0535)
    assert status["budget_left_today_usd"] == pytest.approx(2.0 - 0.0535)
    assert status["in_process"] is False
    assert gateway.gw.address in text(result) and "0.0535" in text(result)


def test_runs_the_gateway_in_process_when_none_answers(tmp_path: Path) -> None:
    env = mcp_env(tmp_path, None) | {"CLAWROUTER_SANDBOX": "true"}

    async def use(session: ClientSession) -> tuple[Any, Any]:
        made = await session.call_tool("generate_image", {"prompt": "a quiet harbour"})
        return made, await session.call_tool("wallet_status", {})

    made, wallet = with_session(env, use)
    assert not made.is_error, text(made)
    assert Path(made.structured_content["images"][0]["path"]).read_bytes().startswith(PNG_MAGIC)
    assert made.structured_content["in_process"] is True
    # Its gateway stopped after the call: no dead URL in the data either, only the file.
    assert made.structured_content["images"][0]["url"] is None
    # An agent must not report placeholder images bought with sandbox money as real ones.
    assert made.structured_content["sandbox"] is True
    assert "sandbox: no real payment" in text(made) and "USDC on Base" not in text(made)
    status = wallet.structured_content
    assert status["in_process"] is True and status["sandbox"] is True
    assert status["spent_today_usd"] == pytest.approx(0.0535)
    # The user's home was used: the wallet file was created there.
    assert (tmp_path / "client-home" / "wallet.key").is_file()


def stop_between_two_calls(env: dict[str, str], gateway: Any) -> tuple[Any, Any]:
    """Two `generate_image` calls in one session, `gateway` stopped between them."""
    async def use(session: ClientSession) -> tuple[Any, Any]:
        before = await session.call_tool("generate_image", {"prompt": "while serve runs"})
        await anyio.to_thread.run_sync(gateway.server.stop)
        return before, await session.call_tool("generate_image", {"prompt": "after it stopped"})

    return with_session(env, use)


def test_a_serve_that_stopped_between_calls_is_replaced_not_reported_as_maybe_paid(
        tmp_path: Path, gateway: Any, sandbox: Any) -> None:
    """The session keeps the `serve` it found where its settings look. Once that stops, the
    next call's connection is refused: nothing was sent, so the call goes to whatever gateway
    there is now (here one started in-process on the same upstream, paying from the same
    wallet) instead of failing with "may have paid"."""
    env = mcp_env(tmp_path, None) | {
        "CLAWROUTER_PORT": str(gateway.server.port), "BLOCKRUN_API_URL": sandbox.api,
        "BLOCKRUN_WALLET_KEY": gateway.gw.settings.wallet_key.get_secret_value(),
        "CLAWROUTER_NETWORK": "base-sepolia", "CLAWROUTER_RPC_URLS": "[]"}
    before, after = stop_between_two_calls(env, gateway)
    assert not before.is_error, text(before)
    assert before.structured_content["in_process"] is False
    assert "may already have paid" not in text(after)
    assert not after.is_error, text(after)
    assert after.structured_content["in_process"] is True
    assert Path(after.structured_content["images"][0]["path"]).read_bytes().startswith(PNG_MAGIC)
    assert sandbox.paid() == 2  # one payment per image: the refused attempt paid nothing


def test_a_named_serve_that_stopped_between_calls_is_not_replaced(
        tmp_path: Path, gateway: Any, sandbox: Any) -> None:
    """A gateway named by CLAWROUTER_URL (a container's, say) is the one the user chose to pay
    from: once it stops, the call fails saying so (nothing was sent, so not "may have paid"),
    and no gateway of this machine's starts to pay from its own wallet instead."""
    env = mcp_env(tmp_path, gateway.url) | {
        "BLOCKRUN_API_URL": sandbox.api, "CLAWROUTER_NETWORK": "base-sepolia",
        "CLAWROUTER_RPC_URLS": "[]"}
    before, after = stop_between_two_calls(env, gateway)
    assert not before.is_error, text(before)
    assert after.is_error and "may already have paid" not in text(after)
    assert f"No clawrouter gateway answers at {gateway.url} (named by CLAWROUTER_URL)" in text(
        after), text(after)
    assert not (tmp_path / "client-home" / "wallet.key").exists()
    assert sandbox.paid() == 1


def test_other_commands_run_between_an_mcp_sessions_calls(tmp_path: Path) -> None:
    """An agent's MCP server lives for the session, but a gateway it starts holds the wallet's
    ledger only during its calls: the user's other commands run in between, without waiting,
    and every payment lands in the one ledger."""
    import os
    import subprocess

    env = mcp_env(tmp_path, None) | {"CLAWROUTER_SANDBOX": "true"}
    cli = {k: v for k, v in os.environ.items()
           if not k.startswith(("CLAWROUTER_", "BLOCKRUN_"))} | env

    def clawrouter(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "clawrouter", *args], env=cli,
                              capture_output=True, text=True, timeout=30)

    async def use(session: ClientSession) -> tuple[Any, Any, Any]:
        made = await session.call_tool("generate_image", {"prompt": "a quiet harbour"})
        other = await anyio.to_thread.run_sync(clawrouter, "generate", "a pier", "--json")
        return made, other, await session.call_tool("wallet_status", {})

    made, other, wallet = with_session(env, use)
    assert not made.is_error, text(made)
    assert "url:" not in text(made)  # the call's own gateway is gone: the file is the result
    assert other.returncode == 0, other.stderr
    assert "waiting" not in other.stderr
    assert wallet.structured_content["spent_today_usd"] == pytest.approx(2 * 0.0535)


# --- the agent skill ------------------------------------------------------------------------

SKILL = Path(__file__).resolve().parent.parent / "skills" / "imagegen" / "SKILL.md"


def skill_units(text: str) -> list[str]:
    """Paragraphs, split further into list items, table rows and example lines."""
    units: list[str] = []
    for paragraph in text.split("\n\n"):
        for line in paragraph.splitlines():
            starts = line.lstrip().startswith(("- ", "|", "→", "User:", "```"))
            if starts or not units or units[-1].endswith("\n\n"):
                units.append(line)
            else:
                units[-1] += " " + line.strip()
        units[-1] += "\n\n"
    return units


def test_skill_names_every_model_and_alias_with_its_prices() -> None:
    text = SKILL.read_text()
    for model in catalog.MODELS:
        assert f"`{model.id}`" in text, model.id
        for alias in model.aliases:
            assert f"`{alias}`" in text, alias
        row = next(line for line in text.splitlines() if line.startswith(f"| `{model.id}` |"))
        for size, price in model.prices.items():
            base = catalog.format_usd(catalog.to_micro(price * catalog.BASE_MARKUP))
            assert f"{size} {base}" in row, (model.id, size)
        assert ("yes" if model.edits else "no") in row.split("|")[4]
        assert ("mask" in row) == model.mask
    assert f"${catalog.FEE_USD}" in text


def test_skill_recommends_no_retired_model() -> None:
    import re

    retired = sorted({*catalog.RENAMED, *catalog.DROPPED}, key=len, reverse=True)
    pattern = re.compile(r"(?<![\w./-])(" + "|".join(map(re.escape, retired)) + r")(?![\w.-])",
                         re.IGNORECASE)
    for unit in skill_units(SKILL.read_text()):
        if not pattern.search(unit) or unit.startswith("User:"):
            continue
        assert re.search(r"maps to|dropped|refused", unit), unit
        assert not unit.startswith("|"), f"a retired model in the model table: {unit}"
    # and the frontmatter tells an agent when to use the skill
    head = SKILL.read_text().split("---")[1]
    assert "name: imagegen" in head and "Trigger when" in head


def test_skill_requests_ask_for_urls() -> None:
    """The gateway's default format may be b64_json (config): every request the skill shows
    asks for a URL, or an agent gets megabytes of base64 and no `url` to show."""
    import json
    import re

    blocks = re.findall(r"```(\w*)\n(.*?)```", SKILL.read_text(), re.DOTALL)
    requests = [json.loads(body) for lang, body in blocks
                if lang == "json" and '"prompt"' in body]
    assert len(requests) >= 3  # generation, image2image, image2image with a mask
    for request in requests:
        assert request.get("response_format") == "url", request
    calls = [body for lang, body in blocks if lang == "python" and "client.images." in body]
    assert calls and all('response_format="url"' in body for body in calls)


def test_a_cancelled_call_still_stops_its_gateway_and_frees_the_wallet(tmp_path: Path) -> None:
    """MCP clients cancel a call that outlives their timeout (`notifications/cancelled`). The
    gateway started for it must stop, once the cancelled call's paid work (which it finishes,
    for the agent's retry) has ended and the window for that retry has passed, or it holds the
    wallet's ledger for the rest of the session: every later call and the user's own commands
    would wait."""
    import json
    import os
    import sqlite3
    import subprocess
    import time

    from clawrouter.config import Settings
    from clawrouter.payment.ledger import in_use, lock_path
    from tests.servers import clawrouter_command

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAWROUTER_", "BLOCKRUN_"))}
    env |= mcp_env(tmp_path, None) | {
        "CLAWROUTER_SANDBOX": "true", "CLAWROUTER_COALESCE_WINDOW_SECONDS": "1"}
    ledger = Settings(home=tmp_path / "client-home").ledger_path_for("base-sepolia")
    lock = lock_path(ledger)
    # polling waits 1 s, not 5, for the client that left to come back before it gives up
    command = clawrouter_command("mcp", constants={
        "clawrouter.upstream.jobs.REJOIN_SECONDS": 1.0})
    server = subprocess.Popen(command, env=env, text=True, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert server.stdin is not None and server.stdout is not None

    def send(message: dict[str, Any]) -> None:
        server.stdin.write(json.dumps({"jsonrpc": "2.0", **message}) + "\n")
        server.stdin.flush()

    def wait_for(condition: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + 30
        while not condition():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def signed() -> bool:
        """Whether the call's payment is in the ledger (its paid request is on its way)."""
        try:
            with contextlib.closing(sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)) as db:
                return db.execute("SELECT count(*) FROM payments").fetchone()[0] > 0
        except sqlite3.OperationalError:  # not created yet, or busy a moment
            return False

    try:
        send({"id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "test", "version": "1"}}})
        server.stdout.readline()
        send({"method": "notifications/initialized"})
        send({"id": 1, "method": "tools/call", "params": {
            "name": "generate_image",
            "arguments": {"prompt": "outlives the agent's timeout", "model": "gpt-image-2"}}})
        assert wait_for(lambda: lock.exists() and in_use(lock))  # its gateway runs the call
        assert wait_for(signed)  # and pays for it: the slow job is polled next
        send({"method": "notifications/cancelled", "params": {"requestId": 1}})
        assert wait_for(lambda: not in_use(lock)), "the cancelled call's gateway still runs"
    finally:
        server.stdin.close()
        server.wait(timeout=30)


class McpProcess:
    """`clawrouter mcp` as a subprocess, spoken to in raw JSON-RPC (to send cancellations),
    paying `sandbox` through the gateway it starts for itself."""

    def __init__(self, tmp_path: Path, sandbox: Any, **settings: str) -> None:
        import os
        import subprocess

        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("CLAWROUTER_", "BLOCKRUN_"))}
        env |= mcp_env(tmp_path, None) | {
            "BLOCKRUN_API_URL": sandbox.api, "CLAWROUTER_SANDBOX": "false",
            "CLAWROUTER_NETWORK": "base-sepolia", "CLAWROUTER_RPC_URLS": "[]", **settings}
        self.proc = subprocess.Popen([sys.executable, "-m", "clawrouter", "mcp"], env=env,
                                     text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL)
        self.send({"id": 0, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "test", "version": "1"}}})
        self.proc.stdout.readline()
        self.send({"method": "notifications/initialized"})

    def send(self, message: dict[str, Any]) -> None:
        import json

        self.proc.stdin.write(json.dumps({"jsonrpc": "2.0", **message}) + "\n")
        self.proc.stdin.flush()

    def call(self, request_id: int) -> None:
        self.send({"id": request_id, "method": "tools/call", "params": CANCELLED_CALL})

    def another_call(self, sandbox: Any, paid_seconds: float) -> None:
        """Call 2, with other words, its paid request answered after `paid_seconds`; returns
        once it has answered."""
        import json

        sandbox.faults({"kind": "delay", "phase": "paid", "seconds": paid_seconds, "times": 1})
        self.send({"id": 2, "method": "tools/call", "params": {
            "name": "generate_image", "arguments": {"prompt": "another picture",
                                                    "model": "cogview"}}})
        assert json.loads(self.proc.stdout.readline())["id"] == 2

    def cancel(self, request_id: int) -> None:
        self.send({"method": "notifications/cancelled", "params": {"requestId": request_id}})

    def succeeded(self, request_id: int) -> None:
        """The next reply answers `request_id`, with the tool's result (no error)."""
        import json

        reply = json.loads(self.proc.stdout.readline())
        assert reply["id"] == request_id and not reply["result"].get("isError"), reply

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@contextlib.contextmanager
def cancelled_while_paying(tmp_path: Path, sandbox: Any, paid_seconds: float,
                           **settings: str) -> Iterator[tuple[McpProcess, float]]:
    """An MCP server whose call 1 the agent cancels while its paid request waits
    `paid_seconds` for the upstream; yields it and when the cancel was sent."""
    import time

    sandbox.faults({"kind": "delay", "phase": "paid", "seconds": paid_seconds, "times": 1})
    mcp = McpProcess(tmp_path, sandbox, **settings)
    try:
        mcp.call(1)
        deadline = time.monotonic() + 30
        while sandbox.stats()["payments_count"] == 0:  # its paid request is in flight
            assert time.monotonic() < deadline
            time.sleep(0.05)
        started = time.monotonic()
        mcp.cancel(1)
        yield mcp, started
    finally:
        mcp.close()


CANCELLED_CALL = {"name": "generate_image",
                  "arguments": {"prompt": "retried after a cancel", "model": "cogview"}}


def test_a_call_retried_after_the_agent_cancelled_it_is_not_paid_again(tmp_path: Path,
                                                                       sandbox: Any) -> None:
    """An agent whose timeout cancels a call during its paid request, then calls again: the
    gateway finishes the paid work of the cancelled call's request (and is kept for it), so
    the retry gets the image that call paid for instead of paying a second time."""
    import time

    with cancelled_while_paying(tmp_path, sandbox, 2) as (mcp, _):
        time.sleep(0.3)
        mcp.call(2)
        mcp.succeeded(2)
        assert sandbox.stats()["payments_count"] == 1

def test_a_call_cancelled_twice_is_not_paid_again(tmp_path: Path, sandbox: Any) -> None:
    """A retry that joins the cancelled call's work and is cancelled in turn leaves that work
    kept: the agent's third try still collects it."""
    import time

    # (call 1's work runs 4.5 s; call 3 comes 1.1 s after it ended and its 5 s window has
    # 3.9 s to run, room for a loaded machine)
    with cancelled_while_paying(tmp_path, sandbox, 4.5,
                                CLAWROUTER_COALESCE_WINDOW_SECONDS="5") as (mcp, started):
        time.sleep(0.5)
        mcp.call(2)  # joins it
        time.sleep(1.5)
        mcp.cancel(2)
        time.sleep(max(0.0, started + 5.6 - time.monotonic()))  # past the first window only
        mcp.call(3)
        mcp.succeeded(3)
        assert sandbox.stats()["payments_count"] == 1

def test_a_retry_while_the_cancelled_calls_work_still_runs_joins_it(tmp_path: Path,
                                                                    sandbox: Any) -> None:
    """The agent retries after the coalescing window, while the cancelled call's paid request
    still waits for its answer (a paid call may wait minutes): the gateway is kept while that
    work runs, so the retry joins it instead of paying again."""
    import time

    with cancelled_while_paying(tmp_path, sandbox, 6.5,
                                CLAWROUTER_COALESCE_WINDOW_SECONDS="1") as (mcp, _):
        time.sleep(2.5)  # past the window; the paid request still waits (4 s more)
        mcp.call(2)
        mcp.succeeded(2)
        assert sandbox.stats()["payments_count"] == 1

def test_a_call_cancelled_while_its_gateway_starts_does_not_leave_it_running(
        tmp_path: Path, monkeypatch: Any) -> None:
    """A thread cannot be cancelled: the gateway a cancelled call was starting finishes
    starting, and must then be stopped, or it holds the wallet's ledger for the rest of the
    session (every later call, and the user's own commands, would wait for it)."""
    import threading
    import time

    from clawrouter.agents.mcp_server import Connection
    from clawrouter.cli import client as cli_client
    from clawrouter.config import Settings
    from clawrouter.payment.ledger import in_use, lock_path
    from tests.servers import dead_port

    home = tmp_path / "client-home"
    monkeypatch.setenv("CLAWROUTER_HOME", str(home))
    monkeypatch.setenv("CLAWROUTER_SANDBOX", "true")
    monkeypatch.setenv("CLAWROUTER_PORT", str(dead_port()))  # nothing answers: it starts one
    monkeypatch.delenv("CLAWROUTER_URL", raising=False)
    entered, started = threading.Event(), threading.Event()
    start = cli_client.LocalGateway.start

    def starting(self: Any, *args: Any, **kwargs: Any) -> str:
        entered.set()
        try:
            return start(self, *args, **kwargs)
        finally:
            started.set()

    monkeypatch.setattr(cli_client.LocalGateway, "start", starting)
    lock = lock_path(Settings(home=home).ledger_path_for("base-sepolia"))

    async def main() -> None:
        connection = Connection()
        with anyio.CancelScope() as scope:
            async def cancel_once_starting() -> None:
                while not entered.is_set():
                    await anyio.sleep(0.01)
                scope.cancel()  # the agent's notifications/cancelled

            async with anyio.create_task_group() as group:
                group.start_soon(cancel_once_starting)
                await connection.run(lambda gateway: gateway.health())
        assert await anyio.to_thread.run_sync(started.wait, 30)  # it did start, and hold it
        deadline = time.monotonic() + 20
        while lock.exists() and in_use(lock):
            assert time.monotonic() < deadline, "the cancelled call's gateway still runs"
            await anyio.sleep(0.1)
        await connection.aclose()

    anyio.run(main)


def test_a_retry_soon_after_the_cancelled_work_ended_is_not_paid_again(tmp_path: Path,
                                                                       sandbox: Any) -> None:
    """The window the gateway is kept for runs from the end of the cancelled call's work,
    not from whenever the gateway last looked."""
    import time

    # (a window from the cancel would have ended before the work did; the one from the
    # work's end has 3.5 s to run when call 2 comes, room for a loaded machine)
    with cancelled_while_paying(tmp_path, sandbox, 5,
                                CLAWROUTER_COALESCE_WINDOW_SECONDS="5") as (mcp, started):
        time.sleep(max(0.0, started + 6.5 - time.monotonic()))  # 1.5 s after the work ended
        mcp.call(2)
        mcp.succeeded(2)
        assert sandbox.stats()["payments_count"] == 1

def test_another_calls_end_does_not_stop_the_gateway_under_cancelled_paid_work(
        tmp_path: Path, sandbox: Any) -> None:
    """Call 1 is cancelled while its paid request waits; call 2 (other words) ends after call
    1's window, while call 1's work still runs: the gateway must stay for it (and call 2's
    answer must not wait for that work), or call 1's retry pays again on a new gateway."""
    import time

    # (call 1's work runs 8 s: call 2's answer, within 7, did not wait for it, even on a
    # loaded machine)
    with cancelled_while_paying(tmp_path, sandbox, 8,
                                CLAWROUTER_COALESCE_WINDOW_SECONDS="1") as (mcp, started):
        time.sleep(0.3)
        mcp.another_call(sandbox, 2)
        assert time.monotonic() - started < 7, "call 2's answer waited for call 1's work"
        time.sleep(max(0.0, started + 3.5 - time.monotonic()))
        mcp.call(3)  # call 1's retry, while its paid request still waits
        mcp.succeeded(3)
        assert sandbox.stats()["payments_count"] == 2  # call 1's and call 2's, no third


def test_a_retry_after_another_call_outlived_the_cancelled_work_is_not_paid_again(
        tmp_path: Path, sandbox: Any) -> None:
    """Call 2 (other words) runs past the end of cancelled call 1's work: the window for call
    1's retry still runs from that work's end, not from call 2's, whichever call ends last."""
    import time

    # (call 1's window, 7 s from its work's end, has some 5 s to run when call 3 comes)
    with cancelled_while_paying(tmp_path, sandbox, 4.5,
                                CLAWROUTER_COALESCE_WINDOW_SECONDS="7") as (mcp, _):
        time.sleep(0.3)
        mcp.another_call(sandbox, 5.5)
        time.sleep(0.3)
        mcp.call(3)  # call 1's retry, about 2 s after its work ended
        mcp.succeeded(3)
        assert sandbox.stats()["payments_count"] == 2  # call 1's and call 2's, no third
