"""The wallet's USDC balance, read on chain (`onchain.Rpc.usdc_balance`).

BlockRun has no balance endpoint for the wallet rail (blockrun-api.md §11), so we ask public
Base RPCs: all at once, each lookup given a short time, the highest answer believed (a lagging
RPC must not refuse a funded wallet). A slow RPC thus reads as failed, which only switches the
check off. When all fail we report "unknown" (None), never a fake 0 — a 0 would tell the user
to fund a wallet that may be full.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any, Callable

import aiohttp

from clawrouter.catalog import to_usd
from clawrouter.config import Settings
from clawrouter.payment.networks import NETWORKS, Network
from clawrouter.payment.onchain import ChainUnavailable, check_address, every_answer
from clawrouter.wake import stop

__all__ = ["BalanceMonitor", "fetch_usdc_balance", "rpc_urls_for", "usdc_balance"]

#: the settings' default RPCs, which are Base mainnet's
MAINNET_RPC_URLS: tuple[str, ...] = tuple(Settings.model_fields["rpc_urls"].default)
#: used instead of the mainnet default when another network is configured without RPC URLs
DEFAULT_RPC_URLS: dict[str, tuple[str, ...]] = {
    "base": MAINNET_RPC_URLS,
    "base-sepolia": ("https://sepolia.base.org", "https://base-sepolia-rpc.publicnode.com"),
}


def rpc_urls_for(network: Network | str, configured: Sequence[str]) -> list[str]:
    """The RPCs to ask: the configured ones, except that the (mainnet) default RPC list on a
    testnet means "not configured" and becomes that network's public RPC."""
    name = network.name if isinstance(network, Network) else network
    if tuple(configured) == MAINNET_RPC_URLS:
        return list(DEFAULT_RPC_URLS.get(name, configured))
    return list(configured)


async def fetch_usdc_balance(address: str, network: Network | str, rpc_urls: Sequence[str], *,
                             timeout: float = 3.0,
                             session: aiohttp.ClientSession | None = None) -> int:
    """The balance in micro-USDC: the highest any RPC answers (all are asked at once, each
    lookup given `timeout` seconds in all), since it is used to refuse, and one lagging behind
    the chain must not refuse a wallet just funded; raises `ChainUnavailable` when none
    answers. (An RPC lying high only switches the check off: the upstream still refuses.)"""
    check_address(address)
    chain = _network(network)
    async with contextlib.AsyncExitStack() as stack:
        if session is None:
            session = await stack.enter_async_context(
                aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()))
        answers, _ = await every_answer(
            rpc_urls, lambda rpc: asyncio.wait_for(rpc.usdc_balance(address, chain), timeout),
            session=session, timeout=timeout)
        return max(answers)


async def usdc_balance(address: str, network: Network | str, rpc_urls: Sequence[str], *,
                       timeout: float = 3.0,
                       session: aiohttp.ClientSession | None = None) -> int | None:
    """The balance in micro-USDC, or None when no RPC answered (offline)."""
    try:
        return await fetch_usdc_balance(address, network, rpc_urls, timeout=timeout,
                                        session=session)
    except ChainUnavailable:
        return None


def _network(network: Network | str) -> Network:
    return network if isinstance(network, Network) else NETWORKS[network]


class BalanceMonitor:
    """Keeps a recent balance for `/health`, and for refusing a payment the wallet cannot cover.

    `start()` runs a background task: a positive balance is re-read every `interval` seconds; a
    zero balance sooner (`retry_min`: the user is probably funding it right now); a failure is
    retried with exponential backoff from `retry_min` to `retry_max`. After a failure the last
    known balance stays in the snapshot, with its `checked` time and the `error`. The request
    path reads the cached balance only (`short_of`), except to re-read a low one before refusing.
    """

    def __init__(self, address: str, network: Network | str, rpc_urls: Sequence[str], *,
                 low_balance_usd: float = 1.0, interval: float = 30.0, retry_min: float = 5.0,
                 retry_max: float = 300.0, timeout: float = 3.0, recheck: float = 2.0,
                 session: aiohttp.ClientSession | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        check_address(address)  # fail now on a bad address or network
        self.address = address
        self.network = _network(network)
        self.rpc_urls = list(rpc_urls)
        self.low_balance_usd = low_balance_usd
        self.interval = interval
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.timeout = timeout
        self.recheck = recheck  # a low balance older than this is re-read before it refuses
        self._session = session
        self._owns_session = session is None
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._micro: int | None = None
        self._checked: float | None = None
        self._error: str | None = None
        self._failures = 0
        self._read_from = 0.0  # when the lookup behind `_micro` started (`refresh`)
        self._rereading: asyncio.Task[int | None] | None = None
        self._reread_failed: float | None = None  # when `short_of`'s last re-read failed

    @classmethod
    def from_settings(cls, address: str, settings: Settings, **kwargs: Any) -> BalanceMonitor:
        return cls(address, settings.network, rpc_urls_for(settings.network, settings.rpc_urls),
                   low_balance_usd=settings.low_balance_usd, **kwargs)

    def start(self) -> None:
        """Launch the refresh loop (call from a running event loop; idempotent). Without RPC
        URLs (`rpc_urls = []` turns lookups off) nothing runs."""
        if not self.rpc_urls:
            self._error = "no RPC URLs configured"
        elif self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(),
                                                                name="balance-monitor")

    def snapshot(self) -> dict[str, Any]:
        """What `/health` shows; `None` values mean "not known (yet)"."""
        micro = self._micro
        usd = None if micro is None else to_usd(micro)
        return {"balance_usd": usd,
                "low": None if usd is None else usd < self.low_balance_usd,
                "checked": self._checked, "error": self._error}

    async def short_of(self, amount: int) -> int | None:
        """The wallet's balance in micro-USDC if it is known to be less than `amount`, else None.

        Only a known balance refuses: none yet, no RPCs or a failed re-read let the payment go
        (the upstream then decides, as without this check). A low balance older than `recheck`
        seconds is re-read first, by one lookup that concurrent requests share, so a wallet
        funded a moment ago is not refused for the rest of the `interval`; a request waits for
        it `timeout` seconds at most, and after a failed one none is tried for `recheck`
        seconds (RPCs that hang must not slow every payment down).
        """
        if self._micro is None or self._micro >= amount:
            return None
        now = self._clock()
        if self._checked is not None and now - self._checked <= self.recheck:
            return self._micro
        if self._reread_failed is not None and now - self._reread_failed <= self.recheck:
            return None
        if self._rereading is None:
            self._rereading = asyncio.create_task(self.refresh())
            self._rereading.add_done_callback(self._reread)
        try:
            if await asyncio.wait_for(asyncio.shield(self._rereading), self.timeout) is None:
                return None  # not re-read: refuse nothing on the old answer
        except asyncio.TimeoutError:
            return None
        micro = self._micro  # the newest answer: a lookup started later may have come first
        return micro if micro is not None and micro < amount else None

    def _reread(self, done: asyncio.Task[int | None]) -> None:
        self._rereading = None
        if done.cancelled() or done.result() is None:
            self._reread_failed = self._clock()

    async def refresh(self) -> int | None:
        """Look the balance up once now and update the snapshot (unless a lookup that started
        later has already: an old answer arriving late must not undo a newer one)."""
        if self._session is None:
            self._session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        started = self._clock()
        try:
            # Half the wait `short_of` gives a re-read: an RPC that hangs costs a request
            # that much, and the others' answers still decide it.
            micro = await fetch_usdc_balance(self.address, self.network, self.rpc_urls,
                                             timeout=self.timeout / 2, session=self._session)
        except Exception as exc:  # noqa: BLE001 - the loop must survive anything
            self._failures += 1
            self._error = str(exc) or type(exc).__name__
            return None
        if started >= self._read_from:
            self._micro, self._checked, self._read_from = micro, self._clock(), started
        self._error, self._failures = None, 0
        return micro

    def next_delay(self) -> float:
        """Seconds until the next lookup, from the outcome of the last one."""
        if self._failures:
            return min(self.retry_max, self.retry_min * 2 ** (self._failures - 1))
        if self._micro == 0:
            return min(self.interval, self.retry_min)
        return self.interval

    async def _run(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self.next_delay())

    async def aclose(self) -> None:
        task, self._task = self._task, None
        await stop(task)
        await stop(self._rereading)  # a request's re-read still running (its caller left)
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None
