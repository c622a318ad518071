"""`clawrouter mcp`: the gateway as MCP tools over stdio, so an agent needs no glue code.

The tools talk to a running gateway (`--url` or `CLAWROUTER_URL`: that one only, never replaced
when it does not answer), or to one this process starts on first use when none answers where
the user's settings make `serve` listen (`cli/client.py`). Every failure a user can cause or
fix (budget, refused input, payment, no wallet) comes back as a tool error carrying the
gateway's message, never as a crash of the server: the agent reads it and can act on it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, ContentBlock, ImageContent, TextContent, ToolAnnotations
from pydantic import Field, ValidationError

from clawrouter import __version__, catalog
from clawrouter.cli import models as model_table
from clawrouter.cli.client import (
    UNREACHABLE, BadGatewayUrl, Gateway, GatewayError, ImageResult, checked_url, connect,
    source_arg,
)
from clawrouter.cli.common import CommandError
from clawrouter.validate import MAX_N

#: How long a tool call waits for another command's gateway to let go of the wallet's ledger
#: before it fails, naming that process (agents' tool calls time out sooner than terminals).
LEDGER_WAIT = 60.0
#: how long a call that ended (or was cancelled) may take to give its gateway back
RELEASE_WAIT = 30.0
#: how often (s) a gateway kept for a cancelled call's retry looks whether its work is done
WORK_CHECK = 0.5

INSTRUCTIONS = (
    "clawrouter makes and edits images through BlockRun and pays per image in USDC on Base "
    "from the user's local wallet. Each call costs money (see list_image_models); prefer the "
    "default model and n=1 unless asked. Results are saved as files; show the user the path "
    "or URL.")

T = TypeVar("T")

_MODELS = ", ".join(f"{m.aliases[0] if m.aliases else m.id}" for m in catalog.MODELS)
_EDITORS = ", ".join(m.id for m in catalog.MODELS if m.edits)
_MASKERS = ", ".join(m.id for m in catalog.MODELS if m.mask)


class Connection:
    """The gateway the tools use. A running one is found on first use and kept for the
    session. One this process starts is kept only while calls are in flight: it holds the
    wallet's ledger, which the user's other commands need between an agent's calls, and a
    session can end (its client kills the server seconds later) under any request that
    another process would have sent it. After a cancelled call that sent a paid request (the
    agent's timeout), though, it is kept while that work goes on and for
    `coalesce_window_seconds` after: the agent's retry of the call joins it (or gets its
    result) instead of paying again (`_close_later`)."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url
        self._gateway: Gateway | None = None
        self._users = 0  # calls using `_gateway` now
        self._lock = asyncio.Lock()
        self._lingering: asyncio.Task[None] | None = None  # the watcher (`_close_later`)
        self._lingering_for: Gateway | None = None  # the gateway it looks after
        #: (monotonic) until when a cancelled call's gateway is kept, for the agent's retry
        self._keep_until = 0.0

    async def _acquire(self) -> Gateway:
        async with self._lock:
            if self._gateway is None:
                try:
                    self._gateway = await connect(self.url, wait=LEDGER_WAIT,
                                                  waiting=logging.getLogger(__name__).warning)
                except (ValueError, FileNotFoundError) as exc:
                    raise ToolError(f"clawrouter's configuration is invalid: {exc}") from None
                except GatewayError as exc:  # something else answers, or ours would not start
                    raise ToolError(f"clawrouter is unavailable: {exc.message}") from None
            self._users += 1
            return self._gateway

    async def _release(self, gateway: Gateway, *, gone: bool = False,
                       cancelled: bool = False) -> None:
        """One call done; stop our own gateway after the last, forget a running one that
        went away (`gone`), so the next call looks again. After a `cancelled` call (one that
        sent a paid request), or while paid work runs there that a client left, a watcher
        stops it instead, once that work has ended and the window for its retry has passed."""
        async with self._lock:
            self._users -= 1
            if self._gateway is not gateway:
                return
            if gateway.in_process and not gone and gateway.local is not None and (
                    cancelled or self._watched() or gateway.local.working()):
                window = gateway.settings.coalesce_window_seconds if gateway.settings else 0.0
                if cancelled:
                    self._keep_until = max(self._keep_until, time.monotonic() + window)
                if not self._watched():
                    self._lingering = asyncio.create_task(self._close_later(gateway, window))
                    self._lingering_for = gateway
                return
            if not (gone or gateway.in_process and not self._users):
                return
            self._gateway = None
        await gateway.aclose()

    def _watched(self) -> bool:
        """Whether a watcher looks after the current gateway (`_close_later`)."""
        return (self._lingering is not None and not self._lingering.done()
                and self._lingering_for is self._gateway)

    async def _close_later(self, gateway: Gateway, window: float) -> None:
        """The watcher: stop our gateway once no work runs there that a retry could join, the
        window for that retry has passed (it runs from the work's end, seen to within a
        check) and no call is using it."""
        assert gateway.local is not None
        while True:
            await asyncio.sleep(WORK_CHECK)
            async with self._lock:
                if self._gateway is not gateway:
                    return
                now = time.monotonic()
                if gateway.local.working():
                    self._keep_until = max(self._keep_until, now + window + WORK_CHECK)
                    continue
                if self._users or now < self._keep_until:
                    continue
                self._gateway = None
            await gateway.aclose()
            return

    async def run(self, use: Callable[[Gateway], Awaitable[T]]) -> T:
        """Run one gateway call; its refusals become tool errors with the gateway's message.

        A failed call is not retried, as it may have paid, unless it provably sent nothing:
        a running gateway (a `serve`) that has since stopped refuses the connection. Then it
        is forgotten and the call made once more, on whatever gateway answers (or starts) now
        (a gateway the user named is not replaced: that call fails, saying it does not answer).
        """
        for attempt in (1, 2):
            gateway = await self._acquire()
            gone, cancelled, posted = False, False, gateway.posted
            try:
                return await use(gateway)
            except anyio.get_cancelled_exc_class():
                cancelled = gateway.posted != posted  # a paid request of it may go on
                raise
            except GatewayError as exc:
                # nothing of this call left (its paid request, if any, was never sent)
                unsent = exc.code == UNREACHABLE and gateway.posted == posted
                gone = not gateway.in_process and exc.code in ("connection_error", UNREACHABLE)
                if gone and unsent and attempt == 1:
                    continue  # `finally` forgets the gone gateway first
                code = f" (code: {exc.code})" if exc.code else ""
                raise ToolError(f"clawrouter: {exc.message}{code}") from None
            finally:
                # A cancelled call (the agent's timeout) must still give its gateway back: an
                # unshielded await here is cancelled at once, and the gateway would keep
                # running and hold the wallet's ledger for the rest of the session.
                with anyio.move_on_after(RELEASE_WAIT, shield=True):
                    await self._release(gateway, gone=gone, cancelled=cancelled)
        raise AssertionError("unreachable")  # the second attempt returns or raises

    async def aclose(self) -> None:
        if self._lingering is not None:
            self._lingering.cancel()
        if self._gateway is not None:
            await self._gateway.aclose()
            self._gateway = None


class _Server(MCPServer):
    async def call_tool(self, name: str, arguments: dict[str, Any],
                        context: Any = None) -> Any:
        """As the SDK's, but arguments that do not fit the schema are named in one plain line
        (the SDK passes on pydantic's report: model class names and a docs link)."""
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as exc:
            if not isinstance(exc.__cause__, ValidationError):
                raise
            raise ToolError(f"{name}: " + "; ".join(
                _argument_error(error) for error in exc.__cause__.errors())) from None


def _argument_error(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "arguments"
    if error["type"] == "missing":
        return f"'{where}' is required"
    return f"'{where}': {error['msg'][0].lower()}{error['msg'][1:]}"


def build_server(connection: Connection, out: str | None = None) -> MCPServer:
    """The MCP server with its four tools, bound to one gateway connection."""
    server: MCPServer = _Server("clawrouter", version=__version__, instructions=INSTRUCTIONS,
                                log_level="WARNING")
    paid = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                           open_world_hint=True)
    free = ToolAnnotations(read_only_hint=True, open_world_hint=False)

    @server.tool(annotations=paid, description=(
        "Generate images from a text prompt (paid per image in USDC). Returns the saved file "
        "path, the local URL, the model and the cost. Models (alias or full id): "
        f"{_MODELS}. Default {catalog.DEFAULT_GENERATE_MODEL} at {catalog.DEFAULT_SIZE}. "
        "Sizes depend on the model (see list_image_models)."))
    async def generate_image(
        prompt: Annotated[str, Field(description="What to draw.")],
        model: Annotated[str | None, Field(description="Model id or alias, e.g. 'nano-banana' "
                                           "(default), 'banana-pro', 'gpt-image-2'.")] = None,
        size: Annotated[str | None, Field(description="WIDTHxHEIGHT, e.g. '1024x1024' "
                                          "(default).")] = None,
        n: Annotated[int, Field(ge=1, le=MAX_N,
                                description="How many images (each is paid).")] = 1,
        inline: Annotated[bool, Field(description="Also return the image itself in the "
                                      "result (large).")] = False,
    ) -> CallToolResult:
        result = await connection.run(
            lambda gw: gw.generate(prompt, model=model, size=size, n=n, out=out))
        return await _image_result("Generated", result, inline)

    @server.tool(annotations=paid, description=(
        "Edit images with a text prompt (paid per image in USDC). `image` is a URL, an "
        "absolute local file path or a data: URI, or a list of them. Models "
        f"that edit: {_EDITORS} (default {catalog.DEFAULT_EDIT_MODEL}). A mask (PNG, "
        f"transparent = area to change) works with {_MASKERS} only."))
    async def edit_image(
        prompt: Annotated[str, Field(description="The change to make.")],
        image: Annotated[str | list[str], Field(description="Source image(s): URL, local path "
                                                "or data URI.")],
        mask: Annotated[str | None, Field(description="Optional PNG mask the size of the "
                                          "image (URL, path or data URI); transparent "
                                          "pixels mark what to edit.")] = None,
        model: Annotated[str | None, Field(description="Editing model id or alias (default "
                                           f"{catalog.DEFAULT_EDIT_MODEL}).")] = None,
        size: Annotated[str | None, Field(description="WIDTHxHEIGHT of the result.")] = None,
        inline: Annotated[bool, Field(description="Also return the image itself in the "
                                      "result (large).")] = False,
    ) -> CallToolResult:
        images = [image] if isinstance(image, str) else list(image)
        if not images:
            raise ToolError("Give at least one source image.")
        # Making paths absolute resolves their symlinks: file-system work, off the loop.
        sources, mask_source = await asyncio.to_thread(
            lambda: ([source_arg(s) for s in images], source_arg(mask) if mask else None))
        result = await connection.run(
            lambda gw: gw.edit(prompt, sources, mask=mask_source, model=model, size=size,
                               out=out))
        return await _image_result("Edited", result, inline)

    @server.tool(annotations=free, description=(
        "List the image models: ids, aliases, sizes, price per image on Base and edit/mask "
        "support. Free; needs no gateway."))
    async def list_image_models() -> CallToolResult:
        text = (model_table.markdown() + f"\n\nEvery request also pays a ${catalog.FEE_USD} fee.\n"
                + model_table.retired_names())
        return CallToolResult(content=[TextContent(type="text", text=text)],
                              structured_content={"models": model_table.cards(),
                                                  "fee_per_request_usd": catalog.FEE_USD})

    @server.tool(annotations=free, description=(
        "The wallet that pays for images: address, network, USDC balance (when known), money "
        "spent today and budget left. Free."))
    async def wallet_status() -> CallToolResult:
        async def read(gw: Gateway) -> dict[str, Any]:
            health, spend = await asyncio.gather(gw.health(), gw.spend())
            return wallet_summary(health, spend, gw)

        status = await connection.run(read)
        return CallToolResult(content=[TextContent(type="text", text=describe_wallet(status))],
                              structured_content=status)

    return server


def describe(verb: str, result: ImageResult) -> str:
    count = len(result.images)
    cost = f"${result.cost_usd}" if result.cost_usd is not None else "an unknown amount"
    paid = ("in the built-in sandbox: no real payment, and the images are placeholders, not "
            "real generations" if result.sandbox else "(USDC on Base)")
    lines = [f"{verb} {count} image{'s' * (count != 1)} with {result.model} for {cost} "
             f"{paid}."]
    if result.shared:
        lines.append("These are the images of an identical request that had not received them "
                     "(one still running, or a call cancelled before its answer); nothing was "
                     "paid again. Call again for different ones.")
    for i, image in enumerate(result.images, 1):
        lines.append(f"{i}. file: {image.path}")
        if image.url and not result.in_process:  # one started for the call stops after it
            lines.append(f"   url: {image.url}")
    if result.transaction:
        lines.append(f"Transaction: {result.transaction}")
    return "\n".join(lines)


async def _image_result(verb: str, result: ImageResult, inline: bool) -> CallToolResult:
    content: list[ContentBlock] = [TextContent(type="text", text=describe(verb, result))]
    if inline:
        for image in result.images:
            data = await asyncio.to_thread(Path(image.path).read_bytes)
            mime = {".jpg": "image/jpeg", ".webp": "image/webp",
                    ".gif": "image/gif"}.get(Path(image.path).suffix, "image/png")
            content.append(ImageContent(type="image", mime_type=mime,
                                        data=base64.b64encode(data).decode("ascii")))
    return CallToolResult(content=content, structured_content=structured(result))


def structured(result: ImageResult) -> dict[str, Any]:
    """The result as data. A gateway started for the call stopped after it, so its images'
    URLs (on its ephemeral port) are dead: null, like the text that leaves them out."""
    data = result.to_json()
    if result.in_process:
        for image in data["images"]:
            image["url"] = None
    return data


def wallet_summary(health: dict[str, Any], spend: dict[str, Any],
                   gateway: Gateway) -> dict[str, Any]:
    budget = spend.get("budget", {})
    today = spend.get("today", {})
    return {
        "address": health.get("wallet"),
        "network": health.get("network"),
        "sandbox": bool(health.get("sandbox")),
        "balance_usd": health.get("balance_usd"),
        "spent_today_usd": today.get("usd", 0),
        "pending_today_usd": today.get("pending", {}).get("usd", 0),
        "payments_today": today.get("payments", 0),
        "budget_left_today_usd": budget.get("day", {}).get("remaining_usd"),
        "daily_limit_usd": budget.get("day", {}).get("limit_usd"),
        "budget_left_month_usd": budget.get("month", {}).get("remaining_usd"),
        "budget_left_total_usd": budget.get("total", {}).get("remaining_usd"),
        "per_request_limit_usd": budget.get("request", {}).get("limit_usd"),
        "gateway": gateway.url,
        "in_process": gateway.in_process,
    }


def describe_wallet(s: dict[str, Any]) -> str:
    usd = catalog.format_dollars
    sandbox = " (sandbox: no real payments)" if s["sandbox"] else ""
    balance = (f"{usd(s['balance_usd'])} USDC" if s["balance_usd"] is not None
               else "unknown (the gateway does not report it)")
    left = ("no daily limit" if s["budget_left_today_usd"] is None
            else f"{usd(s['budget_left_today_usd'])} of {usd(s['daily_limit_usd'])}")
    lines = [f"Wallet {s['address']} on {s['network']}{sandbox}",
             f"Balance: {balance}",
             f"Spent today: {usd(s['spent_today_usd'])} ({s['payments_today']} payments"
             + (f", {usd(s['pending_today_usd'])} pending)" if s["pending_today_usd"] else ")"),
             f"Budget left today: {left}"]
    if s["budget_left_month_usd"] is not None:
        lines.append(f"Budget left this month: {usd(s['budget_left_month_usd'])}")
    if s["budget_left_total_usd"] is not None:
        lines.append(f"Budget left in total: {usd(s['budget_left_total_usd'])}")
    return "\n".join(lines)


def run(url: str | None = None, out: str | None = None) -> int:
    """Serve MCP over stdio until the client closes stdin. A gateway URL that cannot be one
    stops it at once (exit 2, on stderr): every tool call would fail for it."""
    named = ("--url", url) if url else ("CLAWROUTER_URL", os.environ.get("CLAWROUTER_URL"))
    if named[1]:
        try:
            checked_url(named[1], named[0])
        except BadGatewayUrl as exc:
            raise CommandError(2, str(exc)) from None
    connection = Connection(url)
    server = build_server(connection, out)

    async def main() -> None:
        try:
            await server.run_stdio_async()
        finally:
            with anyio.CancelScope(shield=True):
                await connection.aclose()

    anyio.run(main)
    return 0

