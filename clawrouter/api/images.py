"""Image routes: translate HTTP into an `ImageJob`, run the pipeline, translate the result back.

Served with and without the `/v1` prefix (the OpenAI SDK's base_url includes it; some clients
leave it out). Query strings are ignored.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, TypeGuard, TypeVar

import aiofiles
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.datastructures import FormData, UploadFile

from clawrouter.api.encoding import Base64, json_bytes
from clawrouter.api.heavy import BIG_BODY, Slot
from clawrouter.api.multipart import read_multipart
from clawrouter.api.schemas import EditBody, GenerationBody
from clawrouter.api.streaming import KEEPALIVE_SECONDS, stream_response
from clawrouter.catalog import format_usd
from clawrouter.coalesce import fingerprint_parts
from clawrouter.config import is_loopback_authority
from clawrouter.context import KEEP_PAID_JOB, NEW_CALL, RequestContext
from clawrouter.errors import ClawError, InvalidRequest
from clawrouter.inputs.forms import Form, classify
from clawrouter.offloop import off_loop
from clawrouter.pipeline import Result
from clawrouter.sniff import EXTENSIONS, sniff_image
from clawrouter.store.links import image_url
from clawrouter.validate import (
    UNSUPPORTED, ImageJob, SourceImage, edit_job, generation_job, unsupported,
)

router = APIRouter()


def base_url(request: Request) -> str:
    """Where the client can fetch our images: the public URL, else the loopback name it used,
    else the address of ours it reached (a client on another machine: `localhost` would be
    its own). Never a Host header that is not loopback's: under DNS rebinding it is the
    attacker's name, and the URLs we hand out would point at the attacker."""
    settings = request.app.state.gw.settings
    if settings.public_url:
        return settings.public_url.rstrip("/")
    host = request.headers.get("host", "")
    if host and is_loopback_authority(host):
        return f"http://{host}"
    address, port = request.scope.get("server") or (None, None)
    return f"http://{_reached(address) or 'localhost'}:{port or settings.port}"


def _reached(address: str | None) -> str | None:
    """Our own end of the connection (uvicorn's `scope["server"]` is the accepted socket's
    `getsockname()`), as a URL's host: the client reached us there, so it can fetch there.
    Safe where the Host header is not: it is our socket's address, not anything the client
    sent. None where it names nothing a client can use: the wildcard (a server that gives its
    listening address), a scoped IPv6 address (`fe80::1%eth0`: the scope is ours), a Unix
    socket's path."""
    try:
        ip = ipaddress.ip_address(address or "")
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return None
        ip = ip.ipv4_mapped or ip  # an IPv4 client of a dual-stack socket
    if ip.is_unspecified:
        return None
    return f"[{ip}]" if ip.version == 6 else str(ip)


def context(request: Request) -> RequestContext:
    # "Same client" for coalescing: the same API key (every program holding it, as one user),
    # else the same caller address and program (user agent): two programs with no key that
    # ask the same thing still pay separately (SECURITY.md, "the same client").
    address = request.client.host if request.client else "local"
    client = request.headers.get("authorization") or (
        f"{address} {request.headers.get('user-agent', '')}")
    return RequestContext(request.scope.get("state", {}).get("request_id", ""),
                          base_url(request), client=client,
                          keep_paid_job=keeps_paid_job(request))


def keeps_paid_job(request: Request) -> bool:
    """Whether the client asks that a slow job it paid for be finished if it leaves
    (`KEEP_PAID_JOB: true`): it will retry for the result, which `coalesce` keeps for it."""
    return request.headers.get(KEEP_PAID_JOB, "").strip().lower() == "true"


@asynccontextmanager
async def watch_disconnect(request: Request, ctx: RequestContext) -> AsyncIterator[None]:
    """Set `ctx.gone` when the client disconnects, so work that costs money stops."""

    async def watch() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                ctx.leave()
                return

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()


def fingerprint(job: ImageJob) -> str:
    """What makes two requests the same paid request (the output format does not).

    Stable across processes: it goes into the ledger with a payment (`coalesce`), where a
    gateway restarted after a crash looks for the request its client retries. So image values
    enter whole, through SHA-256 (3 ms for a 4 MB image; on a worker thread when big), never
    by a per-process hash or a sample (an agent that changed a few pixels asks anew).
    """
    sources = [part for s in job.sources for part in (s.param, s.value)]
    return fingerprint_parts(job.route, job.model.id, job.prompt, job.size, job.n,
                             job.quality or "", *sources)


def first_try(request: Request) -> bool:
    """Whether the client says this is a call's first try, not a retry (the OpenAI SDK's
    `x-stainless-retry-count: 0`): a deliberate repeat, not to be answered with an earlier
    call's delivered result (`coalesce`)."""
    return request.headers.get("x-stainless-retry-count", "").strip() == "0"


def asked_anew(request: Request) -> bool:
    """Whether the client says its user asked for this anew (`NEW_CALL: true`)."""
    return request.headers.get(NEW_CALL, "").strip().lower() == "true"


def by_reference(job: ImageJob) -> bool:
    """Whether an input is read from a path or URL, whose bytes may change once it is done."""
    return any(isinstance(s.value, str) and classify(s.value) in _REFERENCES
               for s in job.sources)


async def inputs_judged(request: Request, work: Awaitable[Result], ctx: RequestContext,
                        slot: Slot) -> asyncio.Future[Result]:
    """Start a stream's work and hold its 200 (up to the stream's first keep-alive) until the
    work ends or its slow job is accepted, so that an error before any payment (a refused
    input, the cap, a busy upstream's 503) is an HTTP error the SDK raises, and retries, as it
    does without streaming, not an `error` event after a 200 (a bare `APIError`, never
    retried). A failure after signing still goes in the stream, with its payment. Work shared
    with an earlier request never says its job was accepted: it holds until the wait ends."""
    ready = asyncio.Event()
    accepted = ctx.job_accepted

    def job_accepted() -> None:
        accepted()
        ready.set()

    ctx.job_accepted = job_accepted
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(ready.wait())
    try:
        async with watch_disconnect(request, ctx):
            await asyncio.wait({task, waiter}, timeout=KEEPALIVE_SECONDS,
                               return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled: nobody will send the stream, the work must stop
        ctx.leave()
        close = slot.hand_off()  # and holds its place until it has

        def stopped(task: asyncio.Future[Result]) -> None:
            if not task.cancelled():
                task.exception()  # retrieved: nobody is left to tell
            close()

        task.add_done_callback(stopped)
        raise
    finally:
        waiter.cancel()
    error = task.exception() if task.done() and not task.cancelled() else None
    if _unpaid(error):
        raise error
    return task


def _unpaid(error: BaseException | None) -> TypeGuard[ClawError]:
    """An error that says nothing was paid (`coalesce` keeps only the others): a retry may
    simply run the request again."""
    return isinstance(error, ClawError) and error.extra.get("payment") in (None, "none")


async def run(request: Request, job: ImageJob, slot: Slot) -> Response:
    gw = request.app.state.gw
    ctx = context(request)
    ctx.body_built = slot.release
    ctx.job_accepted = slot.let_go
    obs = request.scope.setdefault("state", {}).setdefault("obs", {})
    obs["model"] = job.model.id
    if gw.settings.log_prompts:
        obs["prompt"] = job.prompt
    inputs = sum(len(s.value) for s in job.sources)
    work = gw.coalescer.run(ctx, await off_loop(fingerprint, job, size=inputs),
                            request.headers.get("idempotency-key"),
                            lambda shared: gw.pipeline.run(job, shared),
                            window=0 if by_reference(job) else None,
                            first_try=first_try(request), new_call=asked_anew(request))
    if job.stream:  # the work runs while the stream is sent: the slot is held until it ends
        work = await inputs_judged(request, work, ctx, slot)
        return stream_response(work, job, ctx, obs, ended=slot.hand_off())
    async with watch_disconnect(request, ctx):
        result = await work
    observed(obs, result)
    body = await shape(result, job, ctx.base_url)
    if any(isinstance(value, Base64) for item in body["data"] for value in item.values()):
        # megabytes of JSON (`encoding`): `b64_json`, or a `url` that is a data URI
        return Response(await off_loop(json_bytes, body), media_type="application/json",
                        headers=result_headers(result))
    return JSONResponse(body, headers=result_headers(result))


def observed(obs: dict[str, Any], result: Result) -> None:
    obs.update(amount=0 if result.shared else result.amount, upstream_ms=result.upstream_ms,
               images=len(result.images))


async def image_bytes(image: Any) -> bytes | None:
    """The image's bytes; None if there are none here: its file was deleted from the store
    (evicted) since, or it was never stored (only the upstream's URL is known)."""
    if image.data is None and image.stored is not None:
        try:
            async with aiofiles.open(image.stored.path, "rb") as f:
                image.data = await f.read()
        except FileNotFoundError:
            return None
    return image.data


def evicted(image: Any, shared: bool) -> ClawError:
    """An image with no bytes here to send (`image_bytes` gave None) where bytes are due (a
    stream), or gone from the store with no upstream copy to send instead."""
    if image.remote_url:  # no bytes here for a stream, but the upstream's copy is known
        what = ("could not be stored" if image.stored is None else
                "was deleted from the store since (image_ttl_days, image_max_gb)")
        return ClawError(
            f"This request's image was paid for, but it {what}, so it cannot be sent in the "
            f"stream; the upstream's copy: {image.remote_url}. Not paid again: `clawrouter "
            "stats` shows the payment.", status=502, headers={"x-should-retry": "false"},
            code="image_not_stored" if image.stored is None else "image_evicted")
    if shared:  # a kept result (`coalesce`) outlived its file
        return InvalidRequest(
            f"This request's image ({image.stored.name}) was paid for by an identical earlier "
            "request, and has since been deleted from the store (image_ttl_days, "
            "image_max_gb); it was not paid again. Send the request with a new "
            "Idempotency-Key, or wait out the coalescing window, to make a new one.",
            status=410, code="image_evicted")
    return ClawError(
        f"This request's image ({image.stored.name}) was paid for, then deleted from the store "
        "before it could be sent (is image_max_gb tiny?), and the upstream gave no other copy. "
        "Do not resend it expecting the same image: `clawrouter stats` shows the payment.",
        code="image_evicted", headers={"x-should-retry": "false"})


async def shape(result: Result, job: ImageJob, base: str) -> dict[str, Any]:
    """The OpenAI `ImagesResponse` body, each image in the field the client asked for."""
    data = []
    for image in result.images:
        item: dict[str, Any] = {}
        if job.response_format == "url":
            item["url"] = await _url(image, base)
        else:
            raw = await image_bytes(image)
            if raw is not None:
                item["b64_json"] = await off_loop(Base64, raw, size=len(raw))
            elif image.remote_url:  # never had, or evicted meanwhile: the upstream's copy
                item["url"] = image.remote_url
            else:
                raise evicted(image, result.shared)
        if image.revised_prompt:
            item["revised_prompt"] = image.revised_prompt
        data.append(item)
    body: dict[str, Any] = {"created": result.created, "data": data, "size": job.size}
    formats = {output_format(image) for image in result.images}
    if len(formats) == 1 and None not in formats:  # what the bytes are, whatever was asked
        body["output_format"] = formats.pop()
    return body


async def _url(image: Any, base: str) -> str | Base64 | None:
    """Our URL for a stored image; for one our store could not keep, the upstream's URL, else
    its bytes as a `data:` URI (as BlockRun itself gives the results of some models)."""
    if image.stored is not None:
        return image_url(base, image.stored.name)
    if image.remote_url:
        return image.remote_url
    if image.data is None:
        return None
    return await off_loop(data_uri, image.data, size=len(image.data))


def data_uri(raw: bytes) -> Base64:
    """`raw` as a `data:` URI, spliced into the JSON as `Base64` is (no escaping needed)."""
    mime = sniff_image(raw) or "application/octet-stream"
    return Base64(raw, prefix=b"data:%s;base64," % mime.encode())


def output_format(image: Any) -> str | None:
    """OpenAI's name for the image's format (`png`, `jpeg`, `webp`), when it is known here."""
    mime = image.stored.content_type if image.stored is not None else (
        sniff_image(image.data) if image.data else None)
    return EXTENSIONS.get(mime or "", "").replace("jpg", "jpeg") or None


def result_headers(result: Result) -> dict[str, str]:
    headers = {"x-clawrouter-cost-usd": format_usd(result.amount).lstrip("$")}
    if result.transaction:
        headers["x-clawrouter-transaction"] = result.transaction
    if result.shared:  # the cost and transaction are the first request's: nothing paid again
        headers["x-clawrouter-shared"] = "true"
    unstored = sum(image.stored is None for image in result.images)
    if unstored:  # answered from the bytes or the upstream's URL: no `/images/` copy here
        headers["x-clawrouter-not-stored"] = str(unstored)
    return headers


def _inline(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its `$defs` inlined, for `openapi_extra`."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return walk(defs[ref.removeprefix("#/$defs/")])
            return {k: walk(v) for k, v in node.items()}
        return [walk(v) for v in node] if isinstance(node, list) else node

    return walk(schema)


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` documenting a JSON body that the route parses itself."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": _inline(model.model_json_schema())}}}}


def edit_form_schema() -> dict[str, Any]:
    """`openapi_extra` for `/v1/images/edits`: its JSON body, and the multipart form the
    OpenAI SDK and `curl -F` send (text fields as in the JSON; `image` repeated, and `mask`,
    as uploads or text)."""
    json_schema = _inline(EditBody.model_json_schema())
    fields: dict[str, Any] = {}
    for name, field in json_schema["properties"].items():
        if name in ("image", "images", "mask"):
            continue
        kinds = [k for k in field.get("anyOf", [field]) if k.get("type") != "null"]
        fields[name] = {"title": field.get("title", name), **kinds[0]}
    binary = {"type": "string", "format": "binary"}
    fields["image"] = {"title": "Image", "type": "array", "items": binary, "minItems": 1}
    fields["mask"] = {"title": "Mask", **binary}
    form = {"type": "object", "properties": fields, "required": ["prompt", "image"]}
    extra = body_schema(EditBody)
    extra["requestBody"]["content"]["multipart/form-data"] = {"schema": form}
    return extra


Body = TypeVar("Body", bound=BaseModel)


async def read_body(request: Request, slot: Slot) -> bytearray:
    """The whole body in one growing buffer: no list of chunks plus a joined copy (with many
    big uploads at once, that halves the memory while reading), and nothing allocated ahead of
    what has arrived (a declared length is a promise, not a reason to reserve memory).

    A big body is read only once the request is admitted (see `api/heavy.py`)."""
    body = bytearray()
    async for chunk in admitted_stream(request, slot):
        body += chunk
    return body


def admitted_stream(request: Request, slot: Slot) -> AsyncIterator[bytes]:
    """The body's chunks, read once the request is admitted (`api/heavy.py`): by its declared
    length before the first, or, for a chunked body, as the largest allowed once more than
    `BIG_BODY` of it has arrived (how big it will get is unknown; a small one never waits)."""
    declared = _declared_length(request)

    async def chunks() -> AsyncIterator[bytes]:
        await slot.admit(declared or 0)
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if declared is None and seen > BIG_BODY:
                await slot.admit(None)
            yield chunk

    return chunks()


def _declared_length(request: Request) -> int | None:
    """The Content-Length (which the server holds the body to), None if none is declared."""
    value = request.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


async def read_json(request: Request, model: type[Body], slot: Slot) -> Body:
    """Parse a JSON body straight from the stream into the model, with pydantic's parser.

    Edits carry megabytes of base64: reading the stream ourselves keeps no cached raw body and
    no intermediate dict alive for the rest of the request (FastAPI's body parameter would),
    and pydantic's parser refuses what `json.loads` lets through (lone surrogates). A big body
    takes a heavy-phase slot before it is expanded (see `api/heavy.py`).
    """
    _refuse_compressed(request)
    raw = await read_body(request, slot)
    await slot.enter(len(raw))
    if raw.startswith(_BOM):  # RFC 8259 §8.1: a parser may ignore it (Windows tools add it)
        del raw[:len(_BOM)]
    try:
        # On the loop even when big: pydantic-core holds the interpreter lock throughout, so
        # on a worker thread the loop would wait just as long (a 40 MB body: no turn of the
        # loop in the 47 ms of its parse) and pay for the hop too.
        body = model.model_validate_json(raw or b"null")
    except ValidationError as exc:
        errors = exc.errors()
        if errors[0].get("type") == "json_invalid" and (form := _form_sent(request)):
            raise InvalidRequest(form, code="invalid_json") from None
        raise RequestValidationError(errors) from None
    _refuse_duplicates(raw, body)
    return body


_BOM = b"\xef\xbb\xbf"


def _refuse_compressed(request: Request) -> None:
    """A compressed body would otherwise be "invalid JSON" (or a malformed form): say why."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise InvalidRequest(f"Request bodies must not be compressed (Content-Encoding: "
                             f"{encoding[:40]}); send the body as it is, without that header.",
                             status=415, code="unsupported_content_encoding")


def _form_sent(request: Request) -> str | None:
    """What to say when a form, not JSON, was sent to a route that takes only JSON."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "application/x-www-form-urlencoded":
        return ("The body is a URL-encoded form, and this route takes JSON (curl: -H "
                "'Content-Type: application/json' -d '{\"prompt\": \"…\"}'); "
                "/v1/images/edits takes multipart/form-data too (curl -F).")
    if media_type == "multipart/form-data":
        return ("The body is a multipart form, and this route takes JSON (curl: -H "
                "'Content-Type: application/json' -d '{\"prompt\": \"…\"}'); multipart "
                "uploads are for /v1/images/edits (the OpenAI SDK's images.edit).")
    return None


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        self.key = key


def _refuse_duplicates(raw: bytes | bytearray, body: BaseModel) -> None:
    """A JSON object with a key twice (`{"model": "cogview", "model": "banana-pro"}`) would be
    paid for as its last value, which the client may not have meant: a 400, as a form's is.

    The parse kept one value per key; each key and string kept is two quotes in the body, so
    when the body has no more quotes than that, nothing was dropped: counting them is the cheap
    check (2 ms for 40 MB of base64, 4 µs for a generation). Only a body with more (a key given
    twice, or an escaped quote in a prompt) is parsed again, keeping every key, to name it:
    about as long as the first parse for a body of base64, several times it for one of
    thousands of tiny fields (no client's)."""
    kept = 2 * _strings(body, [MAX_FIELDS])  # (pydantic's parser bounds the depth)
    if _quotes(raw, kept) <= kept:
        return
    try:
        json.loads(raw, object_pairs_hook=_unique)
    except _Duplicate as exc:
        raise _twice(exc.key) from None
    except (ValueError, RecursionError):
        pass  # pydantic's parser took it: nothing duplicated that json.loads could name


def _quotes(raw: bytes | bytearray, most: int) -> int:
    """The quotes in `raw`, counted to one past `most`. A few (base64 and a handful of fields):
    by `find`, a memchr (3 ms for 40 MB, where `count` takes 30); many (thousands of fields):
    by `count`, rather than a turn of a Python loop for each."""
    if most > _FEW_QUOTES:
        return raw.count(b'"')
    at, seen = -1, 0
    while seen <= most and (at := raw.find(b'"', at + 1)) >= 0:
        seen += 1
    return seen


_FEW_QUOTES = 256

#: keys, strings and items a request body may hold (an image request has a few dozen): more is
#: refused rather than walked, so a body of a million tiny fields costs one parse, no more
MAX_FIELDS = 10_000


def _strings(value: Any, left: list[int]) -> int:
    """The keys and strings in a parsed body (an object kept as a model, or as a dict in an
    extra field). `left` is what remains of `MAX_FIELDS`, spent on every key, string and
    item walked; past it, the body is refused."""
    if isinstance(value, BaseModel):
        extra = value.model_extra or {}  # (its fields set include its extra ones)
        values = [*(getattr(value, k) for k in value.model_fields_set - extra.keys()),
                  *extra.values()]
        return _spend(left, len(values)) + sum(_strings(v, left) for v in values)
    if isinstance(value, dict):
        return _spend(left, len(value)) + sum(_strings(v, left) for v in value.values())
    if isinstance(value, list):
        _spend(left, len(value))
        return sum(_strings(v, left) for v in value)
    return int(isinstance(value, str))


def _spend(left: list[int], count: int) -> int:
    left[0] -= count
    if left[0] < 0:
        raise InvalidRequest(f"The body holds more than {MAX_FIELDS:,} fields and items; an "
                             "image request needs a few dozen.", code="too_many_fields")
    return count


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`object_pairs_hook`: an object, unless a key is in it twice."""
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _Duplicate(key)
        obj[key] = value
    return obj


@router.post("/v1/images/generations", openapi_extra=body_schema(GenerationBody))
@router.post("/images/generations", include_in_schema=False)
async def generations(request: Request) -> Response:
    """Text to image (OpenAI `images.generate`)."""
    async with request.app.state.gw.heavy.slot() as slot:
        body = await read_json(request, GenerationBody, slot)
        job = generation_job(body, request.app.state.gw.settings.response_format)
        return await run(request, job, slot)


@router.post("/v1/images/image2image", openapi_extra=body_schema(EditBody))
@router.post("/images/image2image", include_in_schema=False)
async def image2image(request: Request) -> Response:
    """Edit images given as URLs, local paths or data URIs (ClawRouter's route)."""
    async with request.app.state.gw.heavy.slot() as slot:
        body = await read_json(request, EditBody, slot)
        # ClawRouter's route answers as ClawRouter does: OpenAI's `b64_json` for OpenAI's
        # names ("auto") is for OpenAI's routes, and ClawRouter's own alias `gpt-image-1`
        # reads `url` here
        fmt = request.app.state.gw.settings.response_format
        job = edit_job(body, default_format="url" if fmt == "auto" else fmt)
        del body
        return await run(request, job, slot)


@router.post("/v1/images/edits", openapi_extra=edit_form_schema())
@router.post("/images/edits", include_in_schema=False)
async def edits(request: Request) -> Response:
    """OpenAI `images.edit`: multipart uploads, or JSON in OpenAI's or ClawRouter's shape."""
    default_format = request.app.state.gw.settings.response_format
    async with request.app.state.gw.heavy.slot() as slot:
        if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
            form_body, uploads, mask = await _read_form(request, slot)
            job = edit_job(form_body, uploads=uploads, mask_upload=mask,
                           default_format=default_format)
            del form_body, uploads, mask  # the job holds them until the pipeline lets them go
        else:
            job = edit_job(await read_json(request, EditBody, slot),
                           default_format=default_format)
        return await run(request, job, slot)


@router.post("/v1/images/variations")
@router.post("/images/variations", include_in_schema=False)
async def variations() -> Response:
    raise InvalidRequest("Variations are not offered by BlockRun (OpenAI has retired them "
                         "too). Use POST /v1/images/edits with a prompt instead.",
                         code="unsupported_endpoint")


_FILE_FIELDS = frozenset({"image", "image[]", "mask"})
#: input forms read by reference (`by_reference`)
_REFERENCES = frozenset({Form.URL, Form.FILE_URL, Form.PATH, Form.BARE_NAME})
_INT_FIELDS = ("n", "output_compression", "partial_images")
_BOOL_FIELDS = ("stream",)


async def _read_form(request: Request,
                     slot: Slot) -> tuple[EditBody, list[SourceImage], SourceImage | None]:
    settings = request.app.state.gw.settings
    _refuse_compressed(request)
    # A text field may be an image as a data URI: its base64 is 4/3 of the image's bytes, and
    # 78/76 of that when wrapped in lines of 76 with CRLF (MIME's; the decoder takes them).
    form = await read_multipart(request, admitted_stream(request, slot), max_files=32,
                                max_fields=200, file_fields=_FILE_FIELDS, max_text_bytes=4 * (
                                    settings.max_image_bytes // 3 + 1) * 78 // 76
                                + _DATA_URI_HEAD)
    images: list[str | bytes] = []  # uploads and text fields alike, in the form's order
    mask: SourceImage | None = None
    fields: dict[str, Any] = {}
    try:
        # Uploads were spooled to temporary files; reading them into memory is the big part.
        await slot.enter(_parsed_size(form))
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key in UNSUPPORTED:
                    raise unsupported(key)
                if key not in _FILE_FIELDS:
                    raise InvalidRequest(f"Unexpected file field '{key}'; send images as "
                                         "'image' or 'image[]' and a mask as 'mask'.", param=key)
                data = await _read_upload(value, settings.max_image_bytes, key)
                if key == "mask":
                    if mask is not None:
                        raise _twice(key)
                    mask = SourceImage("mask", data)
                else:
                    images.append(data)
            elif value == "":
                continue  # blank form fields mean unset
            elif key in ("image", "image[]"):
                images.append(value)
            elif key in fields:  # which one would be paid for? (repeated images are meant)
                raise _twice(key)
            else:
                fields[key] = _coerce(key, value)
    finally:
        await form.close()
    if mask is not None and "mask" in fields:
        raise _twice("mask")
    # Numbered by place in the form, whichever kind each is: the upstream gets them in that
    # order, and an error's `param` points at the right one.
    uploads = ([SourceImage("image", images[0])] if len(images) == 1 else
               [SourceImage(f"image[{i}]", value) for i, value in enumerate(images)])
    try:
        return EditBody.model_validate(fields), uploads, mask
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _twice(key: str) -> InvalidRequest:
    key = key[:80]  # a key is the client's: a megabyte of it is not echoed twice
    return InvalidRequest(f"'{key}' was given more than once; send it once.", param=key,
                          code="duplicate_field")


#: room for `data:image/png;base64,` and the like in front of an image sent as a text field
_DATA_URI_HEAD = 256


def _parsed_size(form: FormData) -> int:
    return sum(value.size or 0 if isinstance(value, UploadFile) else len(value)
               for _, value in form.multi_items())


async def _read_upload(upload: UploadFile, limit: int, param: str) -> bytes:
    if upload.size is not None and upload.size > limit:
        raise InvalidRequest(f"'{param}' is {upload.size} bytes; the most is {limit} "
                             "(CLAWROUTER_MAX_IMAGE_MB).", param=param, code="image_too_large")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise InvalidRequest(f"'{param}' is larger than {limit} bytes (CLAWROUTER_MAX_IMAGE_MB).",
                             param=param, code="image_too_large")
    return data


def _coerce(key: str, value: str) -> Any:
    if key in _INT_FIELDS:
        try:
            return int(value)
        except ValueError:
            raise InvalidRequest(f"'{key}' must be a whole number; got {value[:40]!r}.",
                                 param=key, code="invalid_type") from None
    if key in _BOOL_FIELDS:
        if value.lower() not in ("true", "false"):
            raise InvalidRequest(f"'{key}' must be true or false.", param=key,
                                 code="invalid_type")
        return value.lower() == "true"
    return value
