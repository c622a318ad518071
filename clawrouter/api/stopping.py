"""The gateway's part in stopping (Ctrl-C, SIGTERM), which `launch.Server.shutdown` drives:
no payment signed once it begins, the pipeline runs under way tracked so that stopping can wait
for them and then cut them off, and a client whose request was cut off told so in the OpenAI
envelope (or an `error` event) instead of uvicorn's plain-text 500."""

from __future__ import annotations

import asyncio
import functools
from typing import Any, Awaitable, Callable, TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clawrouter.api.middleware import note_error, send_error, state
from clawrouter.api.streaming import sse
from clawrouter.context import RequestContext
from clawrouter.errors import GatewayStopped, GatewayStopping
from clawrouter.payment.signer import SignedPayment, Signer
from clawrouter.pipeline import ImagePipeline, Result
from clawrouter.validate import ImageJob

T = TypeVar("T")


class Draining:
    """The gateway's part in stopping (Ctrl-C, SIGTERM: `launch.Server.shutdown`).

    Once it `begin`s, no payment is signed: a request that signed none ends in a 503 saying
    nothing was paid, which its client may simply send again once the gateway runs. The
    pipeline runs under way are tracked, each with the task running it (a stream's runs in a
    task of its own, which outlives its client), so stopping can wait for them and, past its
    grace, `cut` them. A payment a cut run signed stays `signed` in the ledger, as after a
    crash: the next start marks it `unknown` for the chain to settle (`reconcile`), and refuses
    a retry of its request instead of paying again (`Ledger.interrupted`, `coalesce`)."""

    def __init__(self) -> None:
        self.stopping = False
        self.cutting = False  # `cut`: what is still running is being cancelled
        self.runs: set[asyncio.Task[Any]] = set()

    def begin(self) -> None:
        self.stopping = True

    def check(self) -> None:
        """Refuse to start paid work (a run, a signature) once stopping has begun."""
        if self.stopping:
            raise GatewayStopping(
                "The gateway is stopping (Ctrl-C or SIGTERM), so it signs no new payment: "
                "nothing was paid for this request. Send it again once the gateway runs.",
                headers={"Retry-After": "5"}, extra={"payment": "none"})

    def cut(self) -> None:
        """Cancel every run still under way (the server cancels the requests)."""
        self.cutting = True
        for task in self.runs:
            task.cancel()

    async def run(self, work: Callable[[], Awaitable[T]]) -> T:
        """`await work()`, tracked as a run of the current task."""
        self.check()
        task = asyncio.current_task()
        assert task is not None
        self.runs.add(task)
        try:
            return await work()
        finally:
            self.runs.discard(task)


def stopped_error() -> GatewayStopped:
    """What a client still waiting is told of a request that stopping cut off."""
    return GatewayStopped(
        "The gateway stopped (Ctrl-C or SIGTERM) before this request finished. If it had "
        "signed a payment, the payment stays in the ledger (`clawrouter stats`) until the "
        "chain settles it, and a retry of this request soon after the gateway restarts "
        "(within coalesce_window_seconds; a day with the same Idempotency-Key) is refused "
        "rather than paid twice (`clawrouter generate` run again is paid).")


class StoppingSigner(Signer):
    """The signer, refusing once the gateway is stopping: the last gate before money."""

    def __init__(self, private_key: str, draining: Draining) -> None:
        super().__init__(private_key)
        self._draining = draining

    def pay(self, *args: Any, **kwargs: Any) -> SignedPayment:
        self._draining.check()
        return super().pay(*args, **kwargs)


class DrainedPipeline(ImagePipeline):
    """The pipeline, each run tracked by `Draining` (and none started once stopping)."""

    def __init__(self, *args: Any, draining: Draining) -> None:
        super().__init__(*args)
        self._draining = draining

    async def run(self, job: ImageJob, ctx: RequestContext) -> Result:
        return await self._draining.run(functools.partial(super().run, job, ctx))


class CutOff:
    """Answer a request that stopping cut off (cancelled: `Draining.cut`) with the OpenAI
    envelope, or, for an event stream already under way, an `error` event that ends it, not
    uvicorn's traceback and plain-text 500. Any other answer already begun is cut short: the
    server aborts its connection (the request's state says which: `EVENT_STREAM`)."""

    def __init__(self, app: ASGIApp, *, draining: Draining) -> None:
        self.app = app
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = {"start": False, "end": False}

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                sent["start"] = True
                if _event_stream(message):
                    state(scope)[EVENT_STREAM] = True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                sent["end"] = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except asyncio.CancelledError:
            if not self.draining.cutting:
                raise
            if not sent["start"]:
                await send_error(scope, send, stopped_error())
            elif state(scope).get(EVENT_STREAM) and not sent["end"]:
                error = stopped_error()
                note_error(state(scope), error)
                await send({"type": "http.response.body",
                            "body": sse("error", error.envelope()), "more_body": False})


#: in a request's state: its answer is an event stream (`CutOff`)
EVENT_STREAM = "event_stream"


def _event_stream(start: Message) -> bool:
    return any(name.lower() == b"content-type" and value.startswith(b"text/event-stream")
               for name, value in start.get("headers", []))
