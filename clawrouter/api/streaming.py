"""`stream: true`: BlockRun does not stream, so we synthesize the OpenAI SSE events.

One `image_generation.completed` (or `image_edit.completed`) event per image with `b64_json`
and `usage`, an `error` event on failure (the SDK raises `APIError` from it), and comment
keep-alives every 10 s while the upstream works, so long 202 jobs survive proxies and client
read timeouts. A client that leaves stops the work at its next safe point; the work runs on in
a task of its own until then, which stopping the gateway waits for (`stopping.Draining`), so its
outcome reaches the ledger before the ledger closes. The 200 waits (up to the first
keep-alive) until the work ends or its slow job is accepted, so a failure that paid nothing is
an HTTP error instead, which the SDK raises with its status and retries
(`images.inputs_judged`).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from clawrouter.api.encoding import Base64, json_bytes
from clawrouter.api.middleware import note_error
from clawrouter.context import RequestContext
from clawrouter.errors import ClawError, ClientGone, internal_error
from clawrouter.offloop import off_loop
from clawrouter.pipeline import Result
from clawrouter.validate import ImageJob

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 10.0
USAGE = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0,
         "input_tokens_details": {"image_tokens": 0, "text_tokens": 0}}


def sse(event: str, data: dict[str, Any]) -> bytes:
    return b"".join((b"event: ", event.encode(), b"\ndata: ", json_bytes(data), b"\n\n"))


class _EventStream(StreamingResponse):
    """A stream whose `finish` runs however sending ends: completed, the client gone, a send
    that raised (Starlette then skips a background task) or never started at all."""

    def __init__(self, events: AsyncGenerator[bytes, None],
                 finish: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self._events = events
        self._finish = finish

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()  # a stream left at a `yield` runs its `finally` now
            self._finish()


def stream_response(work: Awaitable[Result], job: ImageJob, ctx: RequestContext,
                    obs: dict[str, Any], ended: Callable[[], None] = lambda: None
                    ) -> StreamingResponse:
    """Server-sent events for `work`; `ended` (idempotent) runs once the work is over (the
    stream ended, or its client left and the work stopped), or at once if it never started."""
    from clawrouter.api.images import evicted, image_bytes, observed, output_format

    started = False

    async def events() -> AsyncGenerator[bytes, None]:
        nonlocal started
        started = True
        task = asyncio.ensure_future(work)
        try:
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=KEEPALIVE_SECONDS)
                if not done:
                    yield b": keep-alive\n\n"
            try:
                result = task.result()
            except ClawError as error:
                note_error(obs, error)
                yield sse("error", error.envelope())
                return
            except ClientGone:  # nobody left to tell
                return
            except Exception as exc:  # a bug: the stream still ends with an envelope
                log.error("unhandled error in a stream (request %s)", ctx.request_id,
                          exc_info=(type(exc), exc, exc.__traceback__))
                obs["error_code"] = "internal_error"
                yield sse("error", internal_error(ctx.request_id).envelope())
                return
            observed(obs, result)
            kind = "image_generation" if job.route == "generations" else "image_edit"
            images = [await image_bytes(image) for image in result.images]
            gone = next((i for i, data in zip(result.images, images) if data is None), None)
            if gone is not None:
                error = evicted(gone, result.shared)
                note_error(obs, error)
                yield sse("error", error.envelope())
                return
            for image, data in zip(result.images, images):
                event = {
                    "type": f"{kind}.completed",
                    "b64_json": await off_loop(Base64, data, size=len(data)),
                    "created_at": result.created, "size": job.size, "quality": "auto",
                    "background": "auto", "output_format": output_format(image) or "png",
                    "usage": USAGE}
                yield await off_loop(sse, event["type"], event, size=len(data))
            yield b"data: [DONE]\n\n"
        finally:
            if task.done():
                ended()
            else:  # the client went away mid-stream: the work stops at its next safe point
                ctx.leave()
                task.add_done_callback(stopped)

    def stopped(task: asyncio.Future[Result]) -> None:
        if not task.cancelled():
            task.exception()  # retrieved: its client left, there is nobody to tell
        ended()

    def finish() -> None:
        if started:
            return
        if isinstance(work, asyncio.Future) and not work.done():
            ctx.leave()  # started before the stream (`inputs_judged`): it stops at a safe point
            work.add_done_callback(stopped)
            return
        if inspect.iscoroutine(work):
            work.close()  # never scheduled: nothing ran, nothing was paid
        elif isinstance(work, asyncio.Future) and not work.cancelled():
            work.exception()  # retrieved: nobody is left to tell
        ended()

    return _EventStream(events(), finish)
