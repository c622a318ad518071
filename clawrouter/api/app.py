"""Assemble the gateway: settings and wallet at build time (so a bad key fails before we listen),
network clients, store and pipeline in the lifespan."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from fastapi import FastAPI

from clawrouter import __version__
from clawrouter.api import errors, gallery, images, meta
from clawrouter.api.heavy import HeavyPhase
from clawrouter.api.middleware import ApiKey, BodyLimit, BrowserGuard, HeadAsGet, RequestId
from clawrouter.api.stopping import CutOff, DrainedPipeline, Draining, StoppingSigner
from clawrouter.memory import Trimmer
from clawrouter.observe import Metrics, Observe
from clawrouter.coalesce import Coalescer
from clawrouter.config import Settings
from clawrouter.inputs import InputPolicy, InputResolver
from clawrouter.inputs.addresses import is_public_address
from clawrouter.payment.balance import BalanceMonitor, rpc_urls_for
from clawrouter.payment.budget import Budget
from clawrouter.payment.ledger import Ledger
from clawrouter.payment.networks import NETWORKS, Network
from clawrouter.payment.prices import PriceBook
from clawrouter.payment.reconcile import Reconciler, chain_network
from clawrouter.payment.signer import Signer
from clawrouter.payment.wallet import WalletKey, load_wallet
from clawrouter.payment import walletlock
from clawrouter.pipeline import ImagePipeline
from clawrouter.store import ImageServer, ImageStore
from clawrouter.store.sources import ResultSources
from clawrouter.upstream.client import BlockRunClient, new_session
from clawrouter.upstream.exchange import SETTLE_MARGIN_SECONDS, Exchange

log = logging.getLogger(__name__)

# FastAPI's built-in OpenTelemetry looks for configured providers on every request; we keep
# our own metrics (/metrics) and logs, so it is switched off where this FastAPI has it.
_FASTAPI_OPTIONS = ({"telemetry": {"tracing": False, "metrics": False, "logs": False,
                                   "operation_spans": False}}
                    if "telemetry" in inspect.signature(FastAPI).parameters else {})
@dataclass
class Gateway:
    """What the routes reach through `request.app.state.gw`."""

    settings: Settings
    wallet: WalletKey
    signer: Signer
    network: Network
    sandbox: bool
    store: ImageStore
    ledger: Ledger
    budget: Budget
    coalescer: Coalescer
    metrics: Metrics
    heavy: HeavyPhase
    trimmer: Trimmer
    pipeline: ImagePipeline | None = None
    balance: BalanceMonitor | None = None
    client: BlockRunClient | None = None
    draining: Draining = field(default_factory=Draining)

    @property
    def in_sandbox(self) -> bool:
        """No real money moves: the built-in sandbox, or an upstream that marks its answers as
        a sandbox's while we pay on a testnet (on Base mainnet an upstream's word would be
        enough to make real payments look like play money, so it is not taken)."""
        return self.sandbox or (self.network.testnet and self.client is not None
                                and self.client.sandbox)

    @property
    def address(self) -> str:
        return self.signer.address


#: how soon after a crash a supervisor (or the user) restarts the gateway, for a client's
#: retry of a request it cut off to still be coming
RESTART_SECONDS = 60.0
#: the longest a paid request's results take to download and store once the upstream answered
RESULT_SECONDS = 60.0


def longest_in_flight(settings: Settings) -> float:
    """The longest a paid request can run after signing (its paid call waits up to the
    authorization's life, `max_timeout_seconds` at most; a slow job is polled within it; the
    result is downloaded after), plus the time a restart takes: a payment the last run left in
    flight longer before this start has no client retrying it (`Coalescer`)."""
    return (max(settings.upstream_timeout, settings.max_timeout_seconds,
                settings.poll_deadline + SETTLE_MARGIN_SECONDS)
            + RESULT_SECONDS + RESTART_SECONDS)


async def undelivered(ledger: Ledger, store: ImageStore, since: float) -> dict[int, float]:
    """Payments signed since `since` that settled, but with fewer images in the store (or
    queued to download) than they paid for (id: time signed): the last run was cut off or
    killed while it fetched or stored them, so their clients never had an answer and are as
    likely to retry as those of the rows it left `signed` (`Ledger.interrupted`). Counted
    per request id, summed over the rows that share one (a client may send the same
    `x-request-id` each time): every row of an id short of images counts.

    Some answered requests count too: one the upstream answered with fewer images than
    asked, one whose image bytes the store could not keep (disk full) or already held for
    another request, any after the image index was rebuilt. An identical request within
    `coalesce_window_seconds` of the restart then hears of its payment (a 409) rather than
    paying again, as a retry of a payment left `signed` does. Should this fail, the start
    goes on without it (logged): a retry may then pay again, as before this check."""
    try:
        settled = await ledger.call(ledger.settled_since, since)
        kept = await store.kept_since(since) if settled else {}
    except Exception as exc:  # (a damaged file is for its own check to report)
        log.warning("could not tell which payments of the last run stored their images "
                    "(%s: %s): a retry of one cut off may pay again", type(exc).__name__, exc)
        return {}
    paid_for: dict[str, int] = {}
    for _, _, request_id, n in settled:
        paid_for[request_id] = paid_for.get(request_id, 0) + n
    return {payment_id: signed for payment_id, signed, request_id, _ in settled
            if kept.get(request_id, 0) < paid_for[request_id]}


def _wallet_holder(address: str, settings: Settings,
                   sandbox: bool) -> Callable[[], walletlock.WalletLock]:
    """The wallet's lock, taken once this data directory's ledger lock is ours (so a command
    waiting for that ledger never meets it) and before the ledger is recovered (refused, the
    ledger is let go untouched); released with the ledger."""
    return functools.partial(walletlock.hold, address, NETWORKS[settings.network],
                             settings.home, sandbox=sandbox)


def create_app(settings: Settings, *, sandbox: bool = False) -> FastAPI:
    settings.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = ImageStore.from_settings(settings)
    store.check()  # (before a first start creates a wallet it would not then announce)
    wallet = load_wallet(settings.home, settings.wallet_key.get_secret_value()
                         if settings.wallet_key else None, settings.wallet_key_source)
    draining = Draining()
    signer = StoppingSigner(wallet.key, draining)
    ledger = Ledger(settings.ledger_path, chain_network=chain_network(settings),
                    holding=_wallet_holder(signer.address, settings, sandbox))
    budget = Budget.from_settings(ledger, settings)
    prices = PriceBook(settings.price_ttl_seconds)
    trimmer = Trimmer()
    gw = Gateway(settings, wallet, signer, NETWORKS[settings.network], sandbox, store, ledger,
                 budget, Coalescer(settings.coalesce_window_seconds,
                                   recall=functools.partial(ledger.call, ledger.paid_for),
                                   interrupted=ledger.interrupted,
                                   in_flight_for=longest_in_flight(settings)),
                 Metrics(),
                 HeavyPhase(largest_body=4 * settings.max_image_bytes,
                            after_big=trimmer.poke), trimmer, draining=draining)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        session = new_session(settings.upstream_max_connections)
        policy = InputPolicy.from_settings(settings)
        inputs = InputResolver(policy)
        results = ResultSources(None if policy.allow_private_urls else is_public_address,
                                upstream=(settings.upstream_url, session),
                                connect_timeout=policy.connect_timeout)
        await store.open()
        gw.coalescer.interrupt(await undelivered(ledger, store, gw.coalescer.in_flight_since))
        await store.start(results)
        client = BlockRunClient(settings.upstream_url, session,
                                timeout=settings.upstream_timeout,
                                connect_timeout=settings.upstream_connect_timeout)
        gw.client = client
        balance = BalanceMonitor.from_settings(gw.address, settings, session=session)
        balance.start()
        gw.balance = balance
        reconciler = Reconciler(ledger, gw.network,
                                rpc_urls_for(settings.network, settings.rpc_urls), session,
                                interval=settings.reconcile_interval,
                                on_payment=gw.metrics.payment)
        reconciler.start()
        exchange = Exchange(client, signer, settings, gw.network, ledger, budget, prices,
                            balance=balance, on_payment=gw.metrics.payment)
        gw.pipeline = DrainedPipeline(exchange, store, inputs, results, gw.heavy.inputs,
                                       draining=draining)
        trimming = asyncio.create_task(trimmer.run())
        try:
            yield
        finally:
            trimming.cancel()
            await reconciler.aclose()
            await balance.aclose()
            await store.aclose()
            await results.aclose()
            await inputs.aclose()
            await session.close()
            ledger.close()  # (and the wallet's lock)

    app = FastAPI(title="clawrouter", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None, redirect_slashes=False,
                  **_FASTAPI_OPTIONS)
    app.state.gw = gw
    errors.install(app)
    app.include_router(images.router)
    app.include_router(meta.router)
    app.include_router(gallery.router)
    app.add_route("/images/{name}", ImageServer(store))
    # add_middleware wraps: the last added is the outermost.
    app.add_middleware(CutOff, draining=draining)  # (its answers logged like any other)
    app.add_middleware(HeadAsGet)
    app.add_middleware(BodyLimit, limit=4 * settings.max_image_bytes)
    if settings.api_key:
        app.add_middleware(ApiKey, key=settings.api_key.get_secret_value())
    app.add_middleware(BrowserGuard, loopback_only=settings.loopback,
                       public_url=settings.public_url)
    app.add_middleware(Observe, metrics=gw.metrics, log_prompts=settings.log_prompts)
    app.add_middleware(RequestId, sandbox=lambda: gw.in_sandbox)
    return app

