"""`clawrouter mcp`: the gateway as MCP tools over stdio, so an agent needs no glue code.

The tools talk to a running gateway (`--url` or `CLAWROUTER_URL`: that one only, never replaced
when it does not answer), or to one this process starts on first use when none answers where
the user's settings make `serve` listen (`cli/client.py`). Every failure a user can cause or
fix (budget, refused input, payment, no wallet) comes back as a tool error carrying the
gateway's message, never as a crash of the server: the agent reads it and can act on it.

Agents' clients give up on a call after a timeout (60 s by default in the TypeScript SDK) and
cancel it, while a slow model takes minutes. The cancel reaches the gateway (the call's request
is cancelled, its client leaves), so a call cancelled before the gateway paid costs nothing;
every paid request asks the gateway to finish a slow job paid for all the same
(`client.KEEP_PAID_JOB`), and the agent's retry of the same call gets its outcome from the
gateway's coalescing instead of paying again (`Connection`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, ContentBlock, ImageContent, TextContent, ToolAnnotations
from pydantic import Field, ValidationError

from clawrouter import __version__, catalog
from clawrouter.cli import models as model_table
from clawrouter.cli.client import (
    MAYBE_PAID, UNREACHABLE, BadGatewayUrl, Gateway, GatewayError, ImageResult,
    checked_url, connect, model_id, output_path, source_arg,
)
from clawrouter.cli.common import CommandError
from clawrouter.config import Settings
from clawrouter.payment.ledger import LedgerBusy
from clawrouter.payment.networks import NETWORKS
from clawrouter.validate import MAX_N

#: How long a tool call waits for another command's gateway to let go of the wallet's ledger
#: before it fails saying so: well inside the 60 s after which agents' clients give up on a
#: call (the TypeScript SDK's default), or the agent sees a bare timeout instead.
LEDGER_WAIT = 40.0
#: how long a call that ended (or was cancelled) may take to give its gateway back
RELEASE_WAIT = 30.0
#: how often (s) a gateway kept for a cancelled call's retry looks whether its work is done
WORK_CHECK = 0.5
#: how often (s) a paid call still running says so (MCP progress): some clients restart their
#: timeout on each, so a slow model's minutes do not end the call
PROGRESS_EVERY = 10.0
#: The most base64 one result inlines (`inline`): 5 MB, the most an image may be in the
#: Anthropic API (others allow more), and a tool result an agent's host can hold; the images
#: beyond it are named by path only. Ten 4096² images would be tens of MB in one message.
INLINE_MAX_CHARS = 5_000_000

INSTRUCTIONS = (
    "clawrouter makes and edits images through BlockRun and pays per image in USDC on Base "
    "from the user's local wallet. Each call costs money (see list_image_models); prefer the "
    "default model and n=1 unless asked. Results are saved as files; show the user the path "
    "or URL. Slow models take minutes: if a call times out, call it again with the same "
    "arguments to collect its image (not paid again).")

T = TypeVar("T")

_MODELS = ", ".join(f"{m.aliases[0] if m.aliases else m.id}" for m in catalog.MODELS)
_EDITORS = ", ".join(f"{m.id} (up to {m.max_images})" for m in catalog.MODELS if m.edits)
_MASKERS = ", ".join(m.id for m in catalog.MODELS if m.mask)
_SLOW = ", ".join(m.id for m in catalog.MODELS if m.slow)
_SLOW_NOTE = (
    f"Slow models ({_SLOW}) take 1-3 minutes per call. If a call times out or is cancelled "
    "after its payment, its work goes on: call again with the same arguments and that call "
    "collects the same images without paying again (while it runs, or within the coalescing "
    "window, 60 s by default, after it ended).")


class Connection:
    """The gateway the tools use. A running one is found on first use and kept for the
    session. One this process starts is kept only while calls are in flight: it holds the
    wallet's ledger, which the user's other commands need between an agent's calls, and a
    session can end (its client kills the server seconds later) under any request that
    another process would have sent it. After a cancelled call that sent a paid request (the
    agent's timeout), though, it is kept while paid work runs there and for
    `coalesce_window_seconds` after, while an outcome is kept: the gateway finishes the paid
    work whose client left (a slow job too, as the request asks: `KEEP_PAID_JOB`) and keeps
    its result for the agent's retry, which gets it instead of paying again (`_close_later`).
    A call cancelled before payment leaves nothing to keep, and the gateway stops at once."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url
        self._gateway: Gateway | None = None
        self._users = 0  # calls using `_gateway` now
        self._lock = asyncio.Lock()
        self._lingering: asyncio.Task[None] | None = None  # the watcher (`_close_later`)
        self._lingering_for: Gateway | None = None  # the gateway it looks after
        #: (monotonic) until when a cancelled call's gateway is kept, for the agent's retry
        self._keep_until = 0.0
        #: a result of this session came from a sandbox: a gateway started afresh for
        #: `wallet_status` cannot tell an external sandbox before it has paid it
        self.sandbox_seen = False

    async def _acquire(self) -> Gateway:
        async with self._lock:
            if self._gateway is None:
                try:
                    self._gateway = await connect(self.url, wait=LEDGER_WAIT,
                                                  waiting=logging.getLogger(__name__).warning)
                except (ValueError, FileNotFoundError) as exc:
                    raise ToolError(f"clawrouter's configuration is invalid: {exc}") from None
                except GatewayError as exc:  # something else answers, or ours would not start
                    if isinstance(exc.__cause__, LedgerBusy):
                        raise ToolError(wallet_busy(exc.__cause__)) from None
                    raise ToolError(f"clawrouter is unavailable: {exc.message}") from None
                # The agent's retry comes for a slow job whose call its timeout cancelled.
                self._gateway.keep_paid_jobs = True
            self._users += 1
            return self._gateway

    async def _release(self, gateway: Gateway, *, gone: bool = False,
                       cancelled: bool = False) -> None:
        """One call done; stop our own gateway after the last, forget a running one that
        went away (`gone`), so the next call looks again. After a `cancelled` call (one that
        sent a paid request), or while paid work runs there that a client left (the last call
        is done, the work is not), a watcher stops it instead, once that work has ended and
        the window for its retry has passed. A call that ends while others still run leaves
        the gateway to them: the wallet stays free between calls nobody cancelled."""
        async with self._lock:
            self._users -= 1
            if self._gateway is not gateway:
                return
            if gateway.in_process and not gone and gateway.local is not None and (
                    cancelled or self._watched()
                    or not self._users and gateway.local.working()):
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
        check) or nothing is kept there for one, and no call is using it."""
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
                # (nothing kept for a retry, as after a cancel before payment: nothing to wait for)
                if self._users or now < self._keep_until and gateway.local.keeps():
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
        A cancelled call's request is cancelled with it: the gateway sees its client leave.
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
                raise ToolError(f"clawrouter: {for_agents(exc.message)}{code}"
                                + (REPLAYED_NOTE if exc.shared else "")) from None
            finally:
                # A cancelled call (the agent's timeout) must still give its gateway back: an
                # unshielded await here is cancelled at once, and the gateway would keep
                # running and hold the wallet's ledger for the rest of the session.
                with anyio.move_on_after(RELEASE_WAIT, shield=True):
                    await self._release(gateway, gone=gone, cancelled=cancelled)
        raise AssertionError("unreachable")  # the second attempt returns or raises

    async def paid(self, use: Callable[[Gateway], Awaitable[ImageResult]],
                   progress: Callable[[float], Awaitable[None]] | None = None) -> ImageResult:
        """`run` a paid call, telling `progress` the seconds so far every `PROGRESS_EVERY`
        while it runs. The agent's cancel (its timeout) cancels its request: before the
        gateway paid, that stops it at no cost; after, the gateway finishes it and keeps the
        result for the agent's retry (`KEEP_PAID_JOB`, `coalesce`)."""
        ticking = asyncio.create_task(_ticking(progress)) if progress is not None else None
        try:
            result = await self.run(use)
        finally:
            if ticking is not None:
                ticking.cancel()
        self.sandbox_seen |= result.sandbox
        return result

    async def aclose(self) -> None:
        """End of the session: a gateway kept for a retry that cannot come any more stops
        (a payment of work cut short stays in the ledger, for the chain to tell)."""
        if self._lingering is not None:
            self._lingering.cancel()
        if self._gateway is not None:
            await self._gateway.aclose()
            self._gateway = None


async def _ticking(progress: Callable[[float], Awaitable[None]]) -> None:
    """Tell `progress` the seconds so far every `PROGRESS_EVERY`, until cancelled."""
    started = time.monotonic()
    while True:
        await asyncio.sleep(PROGRESS_EVERY)
        await progress(time.monotonic() - started)


def wallet_busy(busy: LedgerBusy) -> str:
    """What an agent is told when another process kept the wallet for all of LEDGER_WAIT: not
    the terminal's advice (stopping a process mid-payment, or another data directory: another,
    empty wallet), and that nothing was paid."""
    who = f" ({busy.holder})" if busy.holder else ""
    return ("Nothing was sent or paid: another clawrouter call or command"
            f"{who} is using this wallet (a payment of its own, or a slow model's job), and "
            f"it did not finish within {LEDGER_WAIT:.0f} s. Try this call again shortly.")


#: said after a failure the gateway replayed (`GatewayError.shared`): the message's own words
#: ("may already have paid") are the earlier call's, and an agent must not count them twice
REPLAYED_NOTE = ("\nThis was not a new attempt: it is the outcome of an earlier identical "
                 "call, replayed by the gateway, and this call paid nothing (any payment "
                 "mentioned above is that earlier call's). The same call again within the "
                 "coalescing window (60 s by default) gets this answer again; a new attempt, "
                 "paid again, needs changed arguments or a later call.")


#: how the terminal's advice reads for an agent, which has tools, not a shell
_FOR_AGENTS = (
    (MAYBE_PAID, "The gateway may already have paid for it: check the wallet_status tool "
                 "(spent, pending and held today) before asking again."),
    ("`clawrouter stats`", "the wallet_status tool"),
)


def for_agents(message: str) -> str:
    for said, meant in _FOR_AGENTS:
        message = message.replace(said, meant)
    return message


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
    saved_in = f"Images are saved in {output_path(out)}."  # (made by the first call saving)

    @server.tool(annotations=paid, description=(
        "Generate images from a text prompt (paid per image in USDC). Returns the saved file "
        "path, the local URL, the model and the cost. Models (alias or full id): "
        f"{_MODELS}. Default {catalog.DEFAULT_GENERATE_MODEL} at {catalog.DEFAULT_SIZE}. "
        f"Sizes and prices depend on the model (see list_image_models). {saved_in} "
        f"{_SLOW_NOTE}"))
    async def generate_image(
        prompt: Annotated[str, Field(description="What to draw.")],
        ctx: Context,
        model: Annotated[str | None, Field(description="Model id or alias, e.g. 'nano-banana' "
                                           "(default), 'banana-pro', 'gpt-image-2' (slow).")
                         ] = None,
        size: Annotated[str | None, Field(description="WIDTHxHEIGHT, e.g. '1024x1024' "
                                          "(default).")] = None,
        n: Annotated[int, Field(ge=1, le=MAX_N,
                                description="How many images (each is paid).")] = 1,
        inline: Annotated[bool, Field(description=_INLINE)] = False,
    ) -> CallToolResult:
        result = await connection.paid(
            lambda gw: gw.generate(prompt, model=model, size=size, n=n, out=out),
            _progress(ctx, model_id(model, catalog.DEFAULT_GENERATE_MODEL)))
        return await _image_result("Generated", result, inline)

    @server.tool(annotations=paid, description=(
        "Edit images with a text prompt (paid per image in USDC). `image` is an image URL, a "
        "data: URI or an absolute local file path, or a list of them. Local files must be "
        "inside the folders the user allows (home and temp by default) and at most "
        f"{Settings.model_fields['max_image_mb'].default:g} MB each by default. Models that "
        f"edit, with how many source images each takes: {_EDITORS}; default "
        f"{catalog.DEFAULT_EDIT_MODEL}. A mask (PNG, transparent = area to change) works "
        f"with {_MASKERS} only. {saved_in} {_SLOW_NOTE}"))
    async def edit_image(
        prompt: Annotated[str, Field(description="The change to make.")],
        image: Annotated[str | list[str], Field(description=(
            "Source image(s): URL, data URI, or an absolute local path (a relative one "
            "would be read from this server's own working folder, not yours)."))],
        ctx: Context,
        mask: Annotated[str | None, Field(description="Optional PNG mask the size of the "
                                          "image (URL, absolute path or data URI); "
                                          "transparent pixels mark what to edit.")] = None,
        model: Annotated[str | None, Field(description="Editing model id or alias (default "
                                           f"{catalog.DEFAULT_EDIT_MODEL}).")] = None,
        size: Annotated[str | None, Field(description="WIDTHxHEIGHT of the result.")] = None,
        inline: Annotated[bool, Field(description=_INLINE)] = False,
    ) -> CallToolResult:
        images = [image] if isinstance(image, str) else list(image)
        if not images:
            raise ToolError("Give at least one source image.")
        # Making paths absolute resolves their symlinks: file-system work, off the loop.
        sources, mask_source = await asyncio.to_thread(
            lambda: ([source_arg(s) for s in images], source_arg(mask) if mask else None))
        result = await connection.paid(
            lambda gw: gw.edit(prompt, sources, mask=mask_source, model=model, size=size,
                               out=out),
            _progress(ctx, model_id(model, catalog.DEFAULT_EDIT_MODEL)))
        return await _image_result("Edited", result, inline)

    @server.tool(annotations=free, description=(
        "List the image models: ids, aliases, price per image for each size on Base, "
        "edit/mask support and which are slow (minutes per call). Free; needs no gateway."))
    async def list_image_models() -> CallToolResult:
        text = (models_markdown() + f"\n\nEvery request also pays a ${catalog.FEE_USD} fee. "
                + _SLOW_NOTE + "\n" + model_table.retired_names())
        return CallToolResult(content=[TextContent(type="text", text=text)],
                              structured_content={"models": model_table.cards(),
                                                  "fee_per_request_usd": catalog.FEE_USD})

    @server.tool(annotations=free, description=(
        "The wallet that pays for images: address, network, USDC balance (when known), money "
        "spent, pending and held today, budget left and the per-request limit. Free."))
    async def wallet_status() -> CallToolResult:
        async def read(gw: Gateway) -> dict[str, Any]:
            health, spend = await asyncio.gather(gw.health(), gw.spend())
            return wallet_summary(health, spend, gw, sandbox_seen=connection.sandbox_seen)

        status = await connection.run(read)
        return CallToolResult(content=[TextContent(type="text", text=describe_wallet(status))],
                              structured_content=status)

    return server


_INLINE = ("Also return the images themselves in the result (large; at most "
           f"{INLINE_MAX_CHARS // 1_000_000} MB of base64 in all, the rest by file path).")


def _progress(ctx: Context, model: str) -> Callable[[float], Awaitable[None]]:
    """MCP progress for a paid call still running (a no-op unless the client asked for it)."""
    async def report(elapsed: float) -> None:
        # a note that cannot be sent must not fail the paid work it reports on
        with contextlib.suppress(Exception):
            await ctx.report_progress(elapsed, None, f"{model} still working after "
                                                     f"{elapsed:.0f} s")
    return report


def models_markdown() -> str:
    """The catalog for agents: every size's price (not a range) and which models are slow."""
    lines = ["| Model | Aliases | Price per image by size (Base) | Edits | Speed |",
             "|---|---|---|---|---|"]
    for m in catalog.MODELS:
        prices = ", ".join(f"{size} {_usd(price)}" for size, price in m.prices.items())
        speed = "slow: 1-3 min" if m.slow else "fast"
        lines.append(f"| {m.id} | {', '.join(m.aliases) or '-'} | {prices} | "
                     f"{model_table.edits(m)} | {speed} |")
    return "\n".join(lines)


def _usd(list_price: float) -> str:
    return catalog.format_usd(catalog.to_micro(list_price * catalog.BASE_MARKUP))


def describe(verb: str, result: ImageResult) -> str:
    count = len(result.images)
    cost = f"${result.cost_usd}" if result.cost_usd is not None else "an unknown amount"
    # The header says a sandbox was paid, built-in or not: an external one on a testnet too.
    paid = ("in a sandbox: no real payment, and the images are placeholders, not real "
            "generations" if result.sandbox else "(USDC on Base)")
    lines = [f"{verb} {count} image{'s' * (count != 1)} with {result.model} for {cost} "
             f"{paid}."]
    if result.shared:
        lines.append("These are the images of an identical request that had not received them "
                     "(one still running, or a call cancelled before its answer); nothing was "
                     "paid again. They are now delivered: the same call made again makes new "
                     "images, paid again.")
    for i, image in enumerate(result.images, 1):
        lines.append(f"{i}. file: {image.path}")
        if image.url and not result.in_process:  # one started for the call stops after it
            lines.append(f"   url: {image.url}")
    if result.transaction:
        lines.append(f"Transaction: {result.transaction}")
    return "\n".join(lines)


async def _image_result(verb: str, result: ImageResult, inline: bool) -> CallToolResult:
    text = describe(verb, result)
    content: list[ContentBlock] = []
    if inline:
        blocks, left_out = await asyncio.to_thread(_inlined, result)
        content += blocks
        if left_out:
            text += (f"\nNot inlined (over the {INLINE_MAX_CHARS // 1_000_000} MB inline "
                     f"limit): image {', '.join(map(str, left_out))}; read the file path.")
    return CallToolResult(content=[TextContent(type="text", text=text), *content],
                          structured_content=structured(result))


def _inlined(result: ImageResult) -> tuple[list[ContentBlock], list[int]]:
    """The images as content, in order, while they fit INLINE_MAX_CHARS of base64 in all
    (sized before reading); and the numbers of those left out."""
    blocks: list[ContentBlock] = []
    left_out: list[int] = []
    room = INLINE_MAX_CHARS
    for i, image in enumerate(result.images, 1):
        path = Path(image.path)
        chars = 4 * -(-path.stat().st_size // 3)
        if chars > room:
            left_out.append(i)
            continue
        room -= chars
        mime = {".jpg": "image/jpeg", ".webp": "image/webp",
                ".gif": "image/gif"}.get(path.suffix, "image/png")
        blocks.append(ImageContent(type="image", mime_type=mime,
                                   data=base64.b64encode(path.read_bytes()).decode("ascii")))
    return blocks, left_out


def structured(result: ImageResult) -> dict[str, Any]:
    """The result as data. A gateway started for the call stopped after it, so its images'
    URLs (on its ephemeral port) are dead: null, like the text that leaves them out."""
    data = result.to_json()
    if result.in_process:
        for image in data["images"]:
            image["url"] = None
    return data


def wallet_summary(health: dict[str, Any], spend: dict[str, Any], gateway: Gateway, *,
                   sandbox_seen: bool = False) -> dict[str, Any]:
    """The wallet as data. `sandbox_seen`: a result of this session was a sandbox's (a
    gateway started just now has not paid its upstream yet, so cannot tell)."""
    budget = spend.get("budget", {})
    today = spend.get("today", {})
    network = NETWORKS.get(str(health.get("network")))
    return {
        "address": health.get("wallet"),
        "network": health.get("network"),
        "testnet": network.testnet if network is not None else None,
        "sandbox": bool(health.get("sandbox")) or sandbox_seen,
        "balance_usd": health.get("balance_usd"),
        # why the balance is not known, when it is not (no RPC, or the RPC failed)
        "balance_error": health.get("error") if health.get("balance_usd") is None else None,
        "spent_today_usd": today.get("usd", 0),
        "pending_today_usd": today.get("pending", {}).get("usd", 0),
        "held_today_usd": budget.get("day", {}).get("held_usd", 0),
        "payments_today": today.get("payments", 0),
        "budget_left_today_usd": budget.get("day", {}).get("remaining_usd"),
        "daily_limit_usd": budget.get("day", {}).get("limit_usd"),
        "budget_left_month_usd": budget.get("month", {}).get("remaining_usd"),
        "budget_left_total_usd": budget.get("total", {}).get("remaining_usd"),
        "per_request_limit_usd": budget.get("request", {}).get("limit_usd"),
        # a gateway started for this call stopped after it: its URL is dead
        "gateway": None if gateway.in_process else gateway.url,
        "in_process": gateway.in_process,
    }


def describe_wallet(s: dict[str, Any]) -> str:
    """`wallet_summary` as text (keys it added later may be missing: `get`)."""
    usd = catalog.format_dollars
    kind = (" (sandbox: no real payments)" if s["sandbox"]
            else " (testnet: no real money)" if s.get("testnet") else "")
    count = s["payments_today"]
    lines = [f"Wallet {s['address']} on {s['network']}{kind}",
             f"Balance: {_balance(s)}",
             f"Spent today: {usd(s['spent_today_usd'])} ({count} payment{'s' * (count != 1)}"
             + (f", {usd(s['pending_today_usd'])} pending)" if s["pending_today_usd"] else ")")]
    if s.get("held_today_usd"):
        lines.append(f"Held today: {usd(s['held_today_usd'])} (authorizations the upstream "
                     "refused or a slow job left, not yet expired: they count against the "
                     "budget until they expire)")
    left = ("no daily limit" if s["budget_left_today_usd"] is None
            else f"{usd(s['budget_left_today_usd'])} of {usd(s['daily_limit_usd'])}")
    lines.append(f"Budget left today: {left}")
    if s["budget_left_month_usd"] is not None:
        lines.append(f"Budget left this month: {usd(s['budget_left_month_usd'])}")
    if s["budget_left_total_usd"] is not None:
        lines.append(f"Budget left in total: {usd(s['budget_left_total_usd'])}")
    if "per_request_limit_usd" in s:
        limit = s["per_request_limit_usd"]
        lines.append("Per-request limit: " + ("none" if limit is None else usd(limit)))
    return "\n".join(lines)


def _balance(s: dict[str, Any]) -> str:
    if s["balance_usd"] is not None:
        return f"{catalog.format_dollars(s['balance_usd'])} USDC"
    if s.get("balance_error"):
        return f"unknown (the gateway could not read it: {s['balance_error']})"
    return "unknown (not read yet)"


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
