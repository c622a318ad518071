"""Reach a gateway from the terminal and from agents: the running one, or one started in-process.

Shared by `clawrouter generate/edit/status` and `clawrouter mcp`. The caller never needs to know
which kind it got: a running gateway is found at `CLAWROUTER_URL` (default
http://127.0.0.1:8402); when nothing answers there, the gateway is started inside this process
with the user's settings on an ephemeral loopback port, in its own thread and event loop, so a
slow upstream or the gateway's own file I/O never blocks the caller's loop.

Results are downloaded into an output directory (`CLAWROUTER_OUT`, default
~/Pictures/clawrouter) because the gateway's own store evicts old images and agents want a path.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from clawrouter import catalog
from clawrouter.config import Settings
from clawrouter.errors import InvalidRequest
from clawrouter.inputs.addresses import is_public_address
from clawrouter.sniff import EXTENSIONS, sniff_image
from clawrouter.store.download import DownloadFailed, download
from clawrouter.store.files import content_id, write_atomic
from clawrouter.store.records import NAME
from clawrouter.store.sources import ResultSources

DEFAULT_URL = "http://127.0.0.1:8402"
#: Said whenever a paid request ends without an answer: a retry might pay again.
MAYBE_PAID = ("The gateway may already have paid for it: check `clawrouter stats` (or "
              "GET /v1/spend) before asking again.")
DEFAULT_OUT = "~/Pictures/clawrouter"
#: Slow models answer 202 and are polled for up to five minutes by the gateway.
REQUEST_TIMEOUT = httpx.Timeout(900.0, connect=5.0)
PROBE_TIMEOUT = httpx.Timeout(2.0)


class GatewayError(Exception):
    """A request the gateway refused, or a gateway we could not reach or start.

    `message` is the gateway's own (budget, refused input, payment) so callers can show it as-is.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 type: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.type = type
        self.param = param

    def to_json(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.type, "param": self.param,
                "code": self.code, "status": self.status}


class NoGateway(GatewayError):
    """Nothing answers at the gateway URL."""


def gateway_url(url: str | None = None) -> str:
    """The gateway's root URL; tolerates the OpenAI-style `.../v1` base URL."""
    url = (url or os.environ.get("CLAWROUTER_URL") or DEFAULT_URL).rstrip("/")
    return url.removesuffix("/v1")


def auth_headers(settings: Settings | None = None) -> dict[str, str]:
    """`CLAWROUTER_API_KEY`, else the key in `settings` (an in-process gateway requires the
    key its settings name, wherever they came from)."""
    key = os.environ.get("CLAWROUTER_API_KEY")
    if not key and settings is not None and settings.api_key is not None:
        key = settings.api_key.get_secret_value()
    return {"authorization": f"Bearer {key}"} if key else {}


def output_dir(out: str | Path | None = None) -> Path:
    """Where saved images go, created if needed."""
    path = Path(out or os.environ.get("CLAWROUTER_OUT") or DEFAULT_OUT).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_id(name: str | None, default: str) -> str:
    """The full model id a request will use (the response body does not name it)."""
    try:
        return catalog.resolve(name).model.id if name else default
    except InvalidRequest:  # the gateway will refuse it with the full message
        return name or default


def source_arg(value: str) -> str:
    """URLs and data URIs pass through; a local path becomes absolute (the gateway's cwd
    differs from ours)."""
    if value.startswith(("http://", "https://", "data:")):
        return value
    return str(Path(value).expanduser().resolve())


@dataclass
class SavedImage:
    url: str
    path: str
    revised_prompt: str | None = None


@dataclass
class ImageResult:
    model: str
    #: USD as the gateway reports it in `x-clawrouter-cost-usd` (a string: exact, e.g. "0.0535")
    cost_usd: str | None
    transaction: str | None
    images: list[SavedImage] = field(default_factory=list)
    #: the URLs answer only while the in-process gateway runs (the files stay)
    in_process: bool = False
    #: the gateway paid its built-in sandbox: no real money, placeholder images
    sandbox: bool = False
    #: an identical earlier request's images and cost: nothing was paid for this one
    shared: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


async def probe(url: str) -> dict[str, Any] | None:
    """`GET /health`: the gateway's health if a clawrouter gateway answers, None if nothing does.

    Raises GatewayError when something answers that we cannot use (another program, or ours
    wanting an API key), since starting a second gateway would hide the problem.
    """
    try:
        # trust_env=False: an HTTP(S)_PROXY from the environment would receive the API key,
        # and could not reach a gateway on loopback anyway.
        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT, headers=auth_headers(),
                                     trust_env=False) as http:
            resp = await http.get(url + "/health")
    except (httpx.TransportError, OSError):
        return None
    if resp.status_code == 401:
        raise GatewayError(f"The gateway at {url} wants an API key: set CLAWROUTER_API_KEY.",
                           status=401, code="invalid_api_key")
    try:
        body = resp.json()
    except ValueError:
        body = None
    if resp.status_code != 200 or not isinstance(body, dict) or "wallet" not in body:
        raise GatewayError(f"{url} answers (HTTP {resp.status_code}) but is not a clawrouter "
                           "gateway: point CLAWROUTER_URL at one, or free that address.",
                           status=resp.status_code, code="not_clawrouter")
    return body


class LocalGateway:
    """The gateway (and, offline, the sandbox upstream) run by this process on loopback.

    It lives in its own thread and event loop: `start()` and `stop()` block, so async callers
    run them with `asyncio.to_thread`.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = ""
        self.sandbox = False
        self._servers: list[Any] = []
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="clawrouter-gateway", daemon=True)

    def start(self, timeout: float = 30.0) -> str:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise GatewayError("The in-process gateway did not start in time.")
        if self._error is not None:
            raise GatewayError(f"Could not start the gateway in-process: {self._error}",
                               code="gateway_start_failed") from self._error
        return self.url

    def stop(self) -> None:
        for server in self._servers:
            server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = self._error or exc
            self._ready.set()

    async def _main(self) -> None:
        try:
            tasks = await self._launch()
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await asyncio.gather(*tasks)

    async def _launch(self) -> list[asyncio.Task[None]]:
        """What `clawrouter serve` does, on an ephemeral loopback port and without printing."""
        from clawrouter.launch import start_gateway

        running = await start_gateway(self.settings.model_copy(update={"host": "127.0.0.1",
                                                                       "port": 0}))
        self._servers.extend(running.servers)
        self.sandbox = running.sandbox
        self.url = f"http://127.0.0.1:{running.port}"
        return running.tasks


class Gateway:
    """An HTTP client of one gateway, plus the in-process gateway if we started it."""

    def __init__(self, url: str, local: LocalGateway | None = None) -> None:
        self.url = url
        self.local = local
        self.http = httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT, trust_env=False,
                                      headers=auth_headers(local.settings if local else None))

    @property
    def in_process(self) -> bool:
        return self.local is not None

    async def aclose(self) -> None:
        await self.http.aclose()
        if self.local is not None:
            await asyncio.to_thread(self.local.stop)

    async def __aenter__(self) -> Gateway:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # --- free endpoints --------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        return (await self._send("GET", "/health")).json()

    async def spend(self) -> dict[str, Any]:
        return (await self._send("GET", "/v1/spend")).json()

    # --- paid endpoints --------------------------------------------------------------------
    async def generate(self, prompt: str, *, model: str | None = None, size: str | None = None,
                       n: int | None = None, out: str | Path | None = None) -> ImageResult:
        directory = await asyncio.to_thread(output_dir, out)  # fail before paying
        body = _body(prompt, model=model, size=size, n=n)
        resp = await self._send("POST", "/v1/images/generations", json=body)
        return await self._save(resp, model_id(model, catalog.DEFAULT_GENERATE_MODEL), directory)

    async def edit(self, prompt: str, images: list[str], *, mask: str | None = None,
                   model: str | None = None, size: str | None = None, n: int | None = None,
                   out: str | Path | None = None) -> ImageResult:
        """`POST /v1/images/image2image`: images are URLs, data URIs or paths the gateway reads."""
        directory = await asyncio.to_thread(output_dir, out)  # fail before paying
        body = _body(prompt, model=model, size=size, n=n)
        body["image"] = images[0] if len(images) == 1 else images
        if mask:
            body["mask"] = mask
        resp = await self._send("POST", "/v1/images/image2image", json=body)
        return await self._save(resp, model_id(model, catalog.DEFAULT_EDIT_MODEL), directory)

    # --- plumbing --------------------------------------------------------------------------
    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        maybe_paid = f" {MAYBE_PAID}" if method == "POST" else ""
        try:
            resp = await self.http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise GatewayError(f"The gateway at {self.url} did not answer {path} in time."
                               f"{maybe_paid}", code="timeout") from None
        except httpx.TransportError as exc:
            raise GatewayError(f"Lost the gateway at {self.url}: {exc}.{maybe_paid}",
                               code="connection_error") from None
        if resp.status_code >= 400:
            raise _error(resp)
        return resp

    async def _save(self, resp: httpx.Response, model: str, directory: Path) -> ImageResult:
        result = ImageResult(model, resp.headers.get("x-clawrouter-cost-usd"),
                             resp.headers.get("x-clawrouter-transaction"),
                             in_process=self.in_process,
                             sandbox=resp.headers.get("x-clawrouter-sandbox") == "true",
                             shared=resp.headers.get("x-clawrouter-shared") == "true")
        try:
            items = resp.json().get("data", [])
        except (ValueError, AttributeError) as exc:
            raise GatewayError(f"Paid, but the gateway's answer could not be read ({exc}). "
                               f"{MAYBE_PAID}", code="bad_response") from None
        for item in items:
            url = item.get("url") or ""
            try:
                data = await self._fetch(url) if url else _b64(item.get("b64_json", ""))
            except ValueError as exc:  # base64 that does not decode
                raise GatewayError(f"Paid, but an image in the gateway's answer could not be "
                                   f"read ({exc}).", code="bad_response") from None
            try:
                # A file name is kept only from our own gateway's URLs; others (chosen by
                # whoever answered) are saved under their content hash, never over a file.
                name = _own_image_name(url) or ""
                path = await asyncio.to_thread(_write, directory, name, data)
            except OSError as exc:  # paid for already: name the URL so the image is not lost
                raise GatewayError(f"Paid, but could not save {url or 'the image'} in "
                                   f"{directory}: {exc}", code="save_failed") from None
            result.images.append(SavedImage(url, str(path), item.get("revised_prompt")))
        return result

    async def _fetch(self, url: str) -> bytes:
        """Download a result. Our own images are fetched from the gateway we talk to (with our
        auth header), whatever host it advertises. Anything else (a result the gateway did not
        store) is fetched as the gateway fetches results off its upstream's host: public
        addresses only, and only if it is an image."""
        if url.startswith("data:"):
            return _b64(url.split(",", 1)[1])
        name = _own_image_name(url)
        if name is None:
            return await _download_elsewhere(url)
        try:
            resp = await self.http.get(f"/images/{name}")
        except httpx.HTTPError as exc:
            raise GatewayError(f"Paid, but could not download {url}: {exc}",
                               code="download_failed") from None
        if resp.status_code != 200:
            raise GatewayError(f"Paid, but could not download {url}: HTTP {resp.status_code}",
                               status=resp.status_code, code="download_failed")
        return resp.content


def _own_image_name(url: str) -> str | None:
    """`<id>.<ext>` when `url` is a gateway image URL (`/images/<id>.<ext>`), else None."""
    path = urlsplit(url).path if url.startswith(("http://", "https://")) else ""
    name = path.rsplit("/", 1)[-1]
    return name if path == f"/images/{name}" and NAME.fullmatch(name) else None


async def _download_elsewhere(url: str) -> bytes:
    sources = ResultSources(is_public_address)
    try:
        return await download(url, sources)
    except DownloadFailed as exc:
        raise GatewayError(f"Paid, but did not download {url}: {exc}. It was not stored by the "
                           "gateway either; fetch it yourself if you trust it.",
                           code="download_failed") from None
    finally:
        await sources.aclose()


async def connect(url: str | None = None, *, start: bool = True,
                  settings: Settings | None = None) -> Gateway:
    """The running gateway at `url`, else (if `start`) one started in-process.

    `settings` defaults to the user's (`load_settings()`); a bad configuration raises
    ValueError/FileNotFoundError for the caller to report as a configuration error.
    """
    url = gateway_url(url)
    if await probe(url) is not None:
        return Gateway(url)
    if not start:
        raise NoGateway(f"No clawrouter gateway answers at {url}. Start one with "
                        "`clawrouter serve`, or set CLAWROUTER_URL.", code="no_gateway")
    if settings is None:
        from clawrouter.config import load_settings

        settings = await asyncio.to_thread(load_settings)
    local = LocalGateway(settings)
    try:
        return Gateway(await asyncio.to_thread(local.start), local)
    except GatewayError:
        await asyncio.to_thread(local.stop)
        raise


def _body(prompt: str, *, model: str | None, size: str | None, n: int | None) -> dict[str, Any]:
    # Always ask for URLs: we download them, and the gateway's default may be b64_json.
    body: dict[str, Any] = {"prompt": prompt, "response_format": "url"}
    for key, value in (("model", model), ("size", size), ("n", n)):
        if value is not None:
            body[key] = value
    return body


def _error(resp: httpx.Response) -> GatewayError:
    try:
        err = resp.json()["error"]
        return GatewayError(err.get("message") or f"HTTP {resp.status_code}",
                            status=resp.status_code, code=err.get("code"),
                            type=err.get("type"), param=err.get("param"))
    except (ValueError, KeyError, TypeError, AttributeError):
        return GatewayError(f"HTTP {resp.status_code} from the gateway: {resp.text[:200]}",
                            status=resp.status_code)


def _b64(text: str) -> bytes:
    return base64.b64decode(text)


def _write(directory: Path, name: str, data: bytes) -> Path:
    """Save under the gateway's file name for the image, else its content hash."""
    if not NAME.fullmatch(name):
        mime = sniff_image(data)
        name = f"{content_id(data)}.{EXTENSIONS.get(mime or '', 'bin')}"
    return write_atomic(directory, name, data)
