"""The one pipeline for a paid image request, shared by generations and edits:

validate (at the edge) → resolve inputs → pay and forward → poll → store → shape.

A route only translates HTTP into an `ImageJob` and a `Result` back into HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import pybase64

from clawrouter.context import RequestContext
from clawrouter.errors import InvalidRequest, UpstreamError, forget_frames
from clawrouter.inputs import ImageInput, InputResolver, Pending
from clawrouter.inputs.budget import InputBudget, InputHold
from clawrouter.offloop import off_loop
from clawrouter.sniff import dimensions
from clawrouter.store import ImageMeta, ImageStore, StoredImage
from clawrouter.store.links import image_name
from clawrouter.store.store import Unsaved
from clawrouter.upstream.errors import paid_error
from clawrouter.upstream.exchange import Exchange, Outcome, UpstreamCall
from clawrouter.upstream.results import entry_image
from clawrouter.validate import ImageJob

log = logging.getLogger("clawrouter.pipeline")
T = TypeVar("T")


@dataclass
class ResultImage:
    stored: StoredImage | None  # None only when storing failed: then the bytes or URL are kept
    data: bytes | None = None  # (not stored: the bytes, whenever they were had)
    remote_url: str | None = None
    revised_prompt: str | None = None


@dataclass
class Result:
    created: int
    images: list[ResultImage]
    amount: int  # micro-USDC signed for this request
    transaction: str | None
    upstream_ms: float = 0.0
    #: the outcome of an earlier identical request (`coalesce`): this one paid nothing more
    shared: bool = False


def upstream_body(job: ImageJob, images: list[ImageInput], mask: ImageInput | None) -> bytes:
    """The JSON we forward: an allowlist of fields, with data URIs spliced in as bytes.

    Base64 never needs JSON escaping, so big images skip the JSON encoder, and the body is
    assembled with a single join (one copy of each image, not one per concatenation).
    """
    fields: dict[str, Any] = {"model": job.model.id, "prompt": job.prompt, "size": job.size,
                              "n": job.n}
    if job.quality is not None:
        fields["quality"] = job.quality
    head = json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()
    if not images:
        return head
    parts = [head[:-1], b',"image":', b"[" if len(images) > 1 else b""]
    for i, image in enumerate(images):
        parts += [b"," if i else b"", b'"', *_data_uri_parts(image), b'"']
    parts.append(b"]" if len(images) > 1 else b"")
    if mask is not None:
        parts += [b',"mask":"', *_data_uri_parts(mask), b'"']
    parts.append(b"}")
    return b"".join(parts)


def _data_uri_parts(image: ImageInput) -> list[bytes]:
    if image.uri is not None:  # the client's canonical data URI, as it came
        return [image.uri.encode("ascii")]
    return [b"data:", image.mime.encode(), b";base64,", pybase64.b64encode(image.data)]


class ImagePipeline:
    def __init__(self, exchange: Exchange, store: ImageStore, inputs: InputResolver,
                 session: Any, budget: InputBudget) -> None:
        self.exchange = exchange
        self.store = store
        self.inputs = inputs
        self.session = session  # what result URLs are downloaded with (`ResultSources`)
        #: bounds the URL and path inputs all runs hold at once (`HeavyPhase.inputs`)
        self.budget = budget

    async def run(self, job: ImageJob, ctx: RequestContext) -> Result:
        # Inputs read from URLs and paths are held (as images, then as the upstream body)
        # until the run ends, or its slow job is accepted: so is their share of the budget.
        hold = self.budget.hold()
        try:
            return await self._run(job, ctx, hold)
        except BaseException as exc:
            forget_frames(exc)
            raise
        finally:
            hold.release()

    async def _run(self, job: ImageJob, ctx: RequestContext, hold: InputHold) -> Result:
        images, mask = await self._resolve_inputs(job, hold, ctx)
        def accepted() -> None:  # nothing is sent again: what the body held goes
            hold.release()
            ctx.job_accepted()

        # (base64 of the uploads, then one join: tens of ms for big edits, off the loop)
        body = await off_loop(upstream_body, job, images, mask,
                              size=sum(len(i.data) for i in (*images, mask) if i is not None))
        call = UpstreamCall(job.upstream_path, body, job.model, job.size, job.n,
                            (job.quality, len(images), mask is not None), on_accepted=accepted)
        # The call's body now holds the only copy we need: drop the decoded images and mask,
        # and the client's copies of them, before the (possibly long) upstream wait, so memory
        # is one copy per request (and none once a slow job is `accepted`).
        del body, images, mask
        job.let_go_of_inputs()
        ctx.body_built()
        started = time.perf_counter()
        outcome = await self.exchange.run(call, ctx)
        upstream_ms = (time.perf_counter() - started) * 1000
        try:
            result = await self._store_results(job, outcome, ctx)
        finally:
            await outcome.settled()  # the client hears of nothing the ledger does not know
        result.upstream_ms = upstream_ms  # everything spent waiting on BlockRun, polls included
        return result

    async def _resolve_inputs(self, job: ImageJob, hold: InputHold, ctx: RequestContext
                              ) -> tuple[list[ImageInput], ImageInput | None]:
        """Every input checked; then the URLs and paths among them read, once `hold` has room
        for all of them together (one share per run: see `api/heavy.py`)."""
        async def one(source) -> ImageInput | Pending:
            if isinstance(source.value, bytes):
                return self.inputs.from_upload(source.value, param=source.param)
            stored = self._stored(source.value, ctx.base_url, param=source.param)
            if stored is not None:
                return await self.inputs.open_stored(stored.path, stored.bytes,
                                                     param=source.param)
            return await self.inputs.open(source.value, param=source.param)

        found = await _all([one(s) for s in job.sources])
        resolved = (await _read_pending(found, hold, ctx)
                    if any(isinstance(f, Pending) for f in found) else found)
        mask = resolved.pop() if job.mask else None
        if mask is not None:
            _check_mask(mask, resolved[0])
        return resolved, mask

    def _stored(self, value: str, base_url: str, *, param: str) -> StoredImage | None:
        """The stored image an input names by this gateway's own `/images/` URL, if any."""
        name = image_name(value.strip(), base_url) if isinstance(value, str) else None
        if name is None:
            return None
        image = self.store.get(name)
        if image is None:
            raise InvalidRequest(f"{param}: {name} is not in this gateway's image store (it was "
                                 "deleted, or another gateway made it: send its bytes or its "
                                 "path instead).", param=param, code="file_not_found")
        return image

    async def _store_results(self, job: ImageJob, outcome: Outcome,
                             ctx: RequestContext) -> Result:
        body = outcome.body
        items = body.get("data") if isinstance(body, dict) else None
        if not isinstance(items, list) or not items:
            if not outcome.amount:
                raise UpstreamError("The upstream answered without images. Nothing was paid.",
                                    status=502, extra={"payment": "none"})
            raise paid_error(outcome.response, outcome.amount, transaction=outcome.transaction,
                             detail="the upstream answered without images")
        # An entry with no image in any usable form (no URL, no bytes, bytes that do not
        # decode) is no image: never a 200 with an empty entry for the client to find, nor
        # a share of the price.
        found = [f for f in map(_decoded, items) if f is not None]
        outcome.judged(delivered=bool(found))
        if not found:
            if not outcome.amount:
                raise UpstreamError("The upstream answered without a usable image. Nothing was "
                                    "paid.", status=502, extra={"payment": "none"})
            raise paid_error(outcome.response, outcome.amount, transaction=outcome.transaction,
                             detail="the upstream answered without a usable image")
        if len(found) < len(items):
            log.warning("%d of the %d images in an answer were unusable (no image in them)",
                        len(items) - len(found), len(items))
        meta = ImageMeta(model=job.model.id, prompt=job.prompt, size=job.size,
                         cost_micro=outcome.amount // len(found), request_id=ctx.request_id)
        images = list(await asyncio.gather(*(self._store_one(f, meta) for f in found)))
        created = body.get("created")
        return Result(created if isinstance(created, int) else int(time.time()), images,
                      outcome.amount, outcome.transaction)

    async def _store_one(self, found: _Found, meta: ImageMeta) -> ResultImage:
        try:
            if found.data is not None:
                stored = await self.store.put_bytes(found.data,
                                                    replace(meta, source=found.source))
                return ResultImage(stored, found.data, None, found.revised)
            assert found.remote is not None
            # A failed download is retried in the background; the client gets the upstream
            # URL meanwhile, so a paid image is never lost. One downloaded but not stored
            # (disk full) is answered from its bytes, as the client asked.
            saved = await self.store.put_remote_or_defer(
                found.remote, replace(meta, source=found.remote), self.session)
            if isinstance(saved, StoredImage):
                return ResultImage(saved, None, found.remote, found.revised)
            data = saved.data if isinstance(saved, Unsaved) else None
            return ResultImage(None, data, found.remote, found.revised)
        except Exception as exc:  # a paid image is never lost because of our own store
            log.warning("storing a result failed (%s: %s); returning it without a local copy",
                        type(exc).__name__, exc)
            return ResultImage(None, found.data, found.remote, found.revised)


@dataclass(frozen=True)
class _Found:
    """One answer entry's image: its decoded bytes, or (when it has none) its URL."""

    data: bytes | None
    source: str  # what `ImageMeta.source` records: "b64_json", "data-uri" or the URL
    remote: str | None
    revised: str | None


def _decoded(entry: Any) -> _Found | None:
    """The entry's image, its base64 decoded (bytes that do not decode, or decode to nothing,
    leave only its URL); None when it has no usable image."""
    image = entry_image(entry)
    if image is None:
        return None
    revised = entry.get("revised_prompt")
    revised = revised if isinstance(revised, str) else None
    if image.encoded is not None:
        try:
            data = _b64decode(image.encoded)
        except ValueError:
            data = b""
        if data:
            return _Found(data, image.source, image.remote, revised)
    return _Found(None, image.remote, image.remote, revised) if image.remote else None


async def _read_pending(found: list[ImageInput | Pending], hold: InputHold,
                        ctx: RequestContext) -> list[ImageInput]:
    """`found` with each `Pending` input read, after waiting for room for all of them (a
    client that leaves meanwhile stops waiting)."""
    pending = [f for f in found if isinstance(f, Pending)]
    try:
        await ctx.unless_gone(hold.take(sum(p.size for p in pending)))
        read = iter(await _all([p.read() for p in pending]))
    finally:
        _close(pending)
    return [next(read) if isinstance(f, Pending) else f for f in found]


def _check_mask(mask: ImageInput, image: ImageInput) -> None:
    """OpenAI's rules for a mask, checked before anything is paid: a PNG (transparency marks
    the area to edit) the size of the image it applies to."""
    if mask.mime != "image/png":
        raise InvalidRequest(f"The mask must be a PNG (with transparency marking the area to "
                             f"edit); got {mask.mime}.", param="mask", code="mask_not_png")
    mask_size, image_size = dimensions(mask.data), dimensions(image.data)
    if mask_size and image_size and mask_size != image_size:
        raise InvalidRequest("The mask must be the same size as the image: the mask is "
                             "{}x{}, the image {}x{}.".format(*mask_size, *image_size),
                             param="mask", code="mask_size_mismatch")


async def _all(awaitables: list[Awaitable[T]]) -> list[T]:
    """`gather`, except that on a failure the others are cancelled and waited for before it is
    raised: nothing goes on reading after its run let go of its share (except a file read
    already running in its thread, which ends on its own), and what the others
    opened is closed."""
    if len(awaitables) == 1:  # the usual single input: no task needed
        return [await awaitables[0]]
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        _close([t.result() for t in tasks if not t.cancelled() and t.exception() is None])
        raise


def _close(found: list[Any]) -> None:
    for item in found:
        if isinstance(item, Pending):
            item.close()


def _b64decode(text: str) -> bytes:
    try:  # strict first: one SIMD pass for what upstreams send; lenient only if that fails
        return pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:
        return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"result is not base64: {exc}") from None

