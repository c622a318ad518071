"""Reach a gateway from the terminal and from agents: the running one, or one started in-process.

Shared by `clawrouter generate/edit/status` and `clawrouter mcp`. The caller never needs to know
which kind it got: a running gateway is found at `--url` or `CLAWROUTER_URL`, else where the
user's settings make `clawrouter serve` listen (http://127.0.0.1:8402 by default); when nothing
answers there, the gateway is started inside this process with the user's settings, in its own
thread and event loop, so a slow upstream or the gateway's own file I/O never blocks the
caller's loop. A gateway the user named is never replaced: it may pay from another wallet
(a container's), and one started here would pay from this machine's.

The wallet's ledger is one process's at a time. `serve` writes where it listens into the
ledger's lock file, so the other commands find it even on a port they were not told. A
gateway started in-process is not for sharing (it goes away with its command, or between an
MCP session's calls): a second command waits for it to finish.

Results are downloaded into an output directory (`CLAWROUTER_OUT`, default
~/Pictures/clawrouter) because the gateway's own store evicts old images and agents want a path.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from clawrouter import catalog, context
from clawrouter.cli.wallet import key_in_use
from clawrouter.config import Settings, is_loopback_host
from clawrouter.errors import InvalidRequest
from clawrouter.inputs.addresses import is_public_address
from clawrouter.inputs.image import checked_image
from clawrouter.inputs.forms import Form, classify
from clawrouter.inputs.paths import path_from_file_url, read_local_image
from clawrouter.inputs.policy import InputPolicy
from clawrouter.inputs.refusals import LOCAL_FILES_DISABLED
from clawrouter.payment.ledger import Holder, LedgerBusy, holder, in_use, lock_path
from clawrouter.payment.networks import NETWORKS
from clawrouter.payment.wallet import WalletError
from clawrouter.sniff import EXTENSIONS, sniff_image
from clawrouter.store.download import DownloadFailed, download
from clawrouter.store.files import content_id, write_atomic
from clawrouter.store.links import image_name
from clawrouter.store.records import NAME
from clawrouter.store.sources import ResultSources

DEFAULT_URL = "http://127.0.0.1:8402"
#: How every command's help names the gateway it uses.
URL_HELP = ("gateway URL, http(s)://HOST:PORT (default $CLAWROUTER_URL; a gateway named either "
            "way is the only one used: if it does not answer, the command fails rather than "
            "start one here; else where `clawrouter serve` listens with your settings: "
            "http://127.0.0.1:8402 unless CLAWROUTER_PORT or config.toml say otherwise)")
#: Said whenever a paid request ends without an answer: a retry might pay again.
#: the code of a request that could not connect to the gateway, so never left this process
UNREACHABLE = "gateway_unreachable"
MAYBE_PAID = ("The gateway may already have paid for it: check `clawrouter stats` (or "
              "GET /v1/spend) before asking again.")
DEFAULT_OUT = "~/Pictures/clawrouter"
#: Sent with every paid request: each is a call's first try, as the OpenAI SDK marks one, so a
#: command run again makes a new image rather than get the one the last run received, while
#: it still joins the same request in flight, and gets one paid for that nobody received (a
#: run killed mid-request, run again). A retry would send its count; there is none: the only
#: resends (an edit's files as bytes, an MCP call after a refused connection) follow an answer
#: that nothing was paid, or a request that never left, so each is a first try too.
FIRST_TRY = {"x-stainless-retry-count": "0"}
#: Sent with paid requests by a `Gateway` asked to (`keep_paid_jobs`: `clawrouter mcp`, whose
#: agent cancels a slow call at its timeout and retries it): the gateway finishes a slow job
#: paid for after its client left, and keeps the result for the retry (`upstream/jobs.py`).
KEEP_PAID_JOB = {context.KEEP_PAID_JOB: "true"}
#: Sent with paid requests by a `Gateway` asked to (`new_calls`: `generate` and `edit`, each
#: run a command the user typed): never refused as the retry of a payment a stopped gateway
#: left in flight (`context.NEW_CALL`)
NEW_CALL = {context.NEW_CALL: "true"}
#: what `--out` names is a directory: a new one named like an image file is a mistake
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".gif"})
#: Slow models answer 202 and are polled for up to five minutes by the gateway.
REQUEST_TIMEOUT = httpx.Timeout(900.0, connect=5.0)
PROBE_TIMEOUT = httpx.Timeout(2.0)
#: How long a command waits for another process to let go of the wallet's ledger: a slow
#: model's job takes up to five minutes, then its download.
LEDGER_WAIT = 600.0
#: How long stopping an in-process gateway waits for it to end; and how long it waits for the
#: requests under way there before it cuts them off (`launch.Server`): short enough for the
#: cut (`launch.CUT_SECONDS`) and the ledger's closing to fit in `STOP_WAIT`.
STOP_WAIT = 10.0
STOP_GRACE = 3.0


class GatewayError(Exception):
    """A request the gateway refused, or a gateway we could not reach or start.

    `message` is the gateway's own (budget, refused input, payment) so callers can show it as-is.
    """

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 type: str | None = None, param: str | None = None,
                 payment: str | None = None, shared: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code
        self.type = type
        self.param = param
        self.payment = payment  # what the gateway says became of a payment, if one was made
        #: an identical earlier request's failure, replayed (`x-clawrouter-shared`): whatever
        #: it paid, this request paid nothing
        self.shared = shared

    def to_json(self) -> dict[str, Any]:
        """The error for `--json`; with `payment` when the gateway said what became of one,
        and `shared` when it is an earlier identical request's (a script deciding whether to
        ask again must know whether this one paid)."""
        shown = {"message": self.message, "type": self.type, "param": self.param,
                 "code": self.code, "status": self.status}
        return (shown | ({"payment": self.payment} if self.payment is not None else {})
                | ({"shared": True} if self.shared else {}))


class NoGateway(GatewayError):
    """Nothing answers at the gateway URL."""


class BadGatewayUrl(ValueError):
    """A gateway URL no gateway can answer at (no scheme, another scheme, malformed): a usage
    error, refused before anything is started, sent or paid."""


def checked_url(url: str, named_by: str) -> str:
    """`url` if it is an http(s) URL with a host, else BadGatewayUrl saying the form expected.
    `localhost:18402` would otherwise fail to connect and read as "no gateway there"."""
    try:
        parts = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise BadGatewayUrl(f"{named_by} {url!r} is not a valid URL ({exc}): give the "
                            f"gateway as {_URL_FORM}") from None
    if parts.scheme not in ("http", "https") or not parts.host:
        raise BadGatewayUrl(f"{named_by} {url!r} is not a gateway URL: give it as {_URL_FORM}")
    return url


_URL_FORM = "http://HOST:PORT, e.g. http://127.0.0.1:8402 (or https://...)"


def gateway_url(url: str | None = None, settings: Settings | None = None) -> str:
    """The gateway's root URL: `url`, else `CLAWROUTER_URL`, else where `settings` make
    `serve` listen; tolerates the OpenAI-style `.../v1` base URL."""
    url = url or os.environ.get("CLAWROUTER_URL") or (settings.url if settings else DEFAULT_URL)
    return url.rstrip("/").removesuffix("/v1")


def auth_headers(settings: Settings | None = None) -> dict[str, str]:
    """`CLAWROUTER_API_KEY`, else the key in `settings`: pass them only for a gateway they
    describe (one started with them, or found where they make `serve` listen), so a key meant
    for the local gateway never goes to another address."""
    key = (os.environ.get("CLAWROUTER_API_KEY") or "").strip()  # as the settings strip it
    if not key and settings is not None and settings.api_key is not None:
        key = settings.api_key.get_secret_value()
    return {"authorization": f"Bearer {key}"} if key else {}


def output_path(out: str | Path | None = None) -> Path:
    """Where saved images go: `out`, else CLAWROUTER_OUT, else the default (not created)."""
    return Path(out or os.environ.get("CLAWROUTER_OUT") or DEFAULT_OUT).expanduser().resolve()


def output_dir(out: str | Path | None = None) -> Path:
    """Where saved images go, created if needed (before paying: a failure here cost nothing)."""
    path = output_path(out)
    if (problem := file_like_dir(path)) is not None:
        raise GatewayError(f"{problem}. Nothing was sent or paid.", code="bad_output_dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "not writable")
    except OSError as exc:
        raise GatewayError(f"Cannot save images in {path}: {exc.strerror or exc}. Nothing was "
                           "sent or paid; choose another --out.", code="bad_output_dir") from None
    return path


def file_like_dir(path: Path) -> str | None:
    """Why `path` is refused as the output directory: a new one named like an image file
    (`--out x.png`) is a file name meant, which would become a directory of that name."""
    if path.suffix.lower() not in IMAGE_SUFFIXES or path.is_dir():
        return None
    return (f"{path.name!r} looks like a file name, but --out (or CLAWROUTER_OUT) names the "
            "directory to save into: give a directory (the files are named after the "
            "images), or create it first if you mean one of that name")


def model_id(name: str | None, default: str) -> str:
    """The full model id a request will use (the response body does not name it)."""
    try:
        return catalog.resolve(name).model.id if name else default
    except InvalidRequest:  # the gateway will refuse it with the full message
        return name or default


def source_arg(value: str) -> str:
    """A local path (or `file://` URL, as its path) made absolute, since the gateway's working
    folder differs from ours; any other form the gateway takes (URLs, data URIs, base64) as
    given. Told apart by the gateway's own `classify`, so both read a value the same way."""
    form = classify(value)
    if form is Form.FILE_URL:
        try:
            path = path_from_file_url(value.strip(), param="image")
        except InvalidRequest:  # names a host, or is malformed: the gateway refuses it, saying why
            return value
    elif form in _PATHS:
        path = value.strip()
    else:
        return value
    try:
        return str(Path(path).expanduser().resolve())
    except (ValueError, OSError):  # a NUL in it, say: the gateway refuses it, saying why
        return value


#: the forms the gateway reads as a local file's path
_PATHS = frozenset({Form.PATH, Form.BARE_NAME})


def _is_path(source: str) -> bool:
    return classify(source) in _PATHS


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


async def probe(url: str, settings: Settings | None = None) -> dict[str, Any] | None:
    """`GET /health`: the gateway's health if a clawrouter gateway answers, None if nothing does
    (`settings`: see `auth_headers`).

    Raises GatewayError when something answers that we cannot use (another program, or ours
    wanting an API key), since starting a second gateway would hide the problem.
    """
    try:
        # trust_env=False: an HTTP(S)_PROXY from the environment would receive the API key,
        # and could not reach a gateway on loopback anyway.
        async with httpx.AsyncClient(timeout=PROBE_TIMEOUT, headers=auth_headers(settings),
                                     trust_env=False) as http:
            resp = await http.get(url + "/health")
    except (httpx.TransportError, httpx.InvalidURL, OSError):  # (a URL named is `checked_url`)
        return None
    try:
        body = resp.json()
    except ValueError:
        body = None
    if resp.status_code == 401 or (isinstance(body, dict) and "wallet" not in body
                                   and body.get("api_key") == "required"):
        raise GatewayError(f"The gateway at {url} wants an API key: set CLAWROUTER_API_KEY.",
                           status=401, code="invalid_api_key")
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

    def __init__(self, settings: Settings,
                 notice: Callable[[str], None] | None = None) -> None:
        """`notice`: how to tell the user of a wallet key this start created (`_launch`)."""
        self.settings = on_this_machine(settings)  # no proxy reaches its ephemeral port
        self.notice = notice or to_stderr
        self.url = ""
        self.sandbox = False
        self._servers: list[Any] = []
        self._app: Any = None
        self._stopping = False
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

    def working(self) -> bool:
        """Whether paid work runs here that a client may yet come back for (`coalesce`): a
        request whose client left goes on to its end."""
        return self._app is not None and self._app.state.gw.coalescer.working()

    def keeps(self) -> bool:
        """Whether an outcome is kept here for a repeat (a paid one: `coalesce`)."""
        return self._app is not None and self._app.state.gw.coalescer.keeps()

    def stop(self) -> None:
        self._stopping = True  # (a launch still under way stops as soon as it is done)
        for server in self._servers:
            server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout=STOP_WAIT)

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
        if self._stopping:  # stopped while it started (a start that timed out, a cancel)
            for server in self._servers:
                server.should_exit = True
        self._ready.set()
        await asyncio.gather(*tasks)

    async def _launch(self) -> list[asyncio.Task[None]]:
        """What `clawrouter serve` does, on an ephemeral loopback port and without printing."""
        from clawrouter.launch import start_gateway

        running = await start_gateway(self.settings.model_copy(update={"port": 0}),
                                      grace=STOP_GRACE)
        wallet = running.app.state.gw.wallet
        if wallet.source == "created":  # as `serve` says it: the key's only copy is that file
            self.notice(created_key_notice(wallet.path))
        self._app = running.app
        self._servers.extend(running.servers)
        self.sandbox = running.sandbox
        self.url = f"http://127.0.0.1:{running.port}"
        return running.tasks


def created_key_notice(path: Path | None) -> str:
    """What the user must hear when a command made a new wallet key (never the key itself)."""
    return (f"created a new wallet key in {path} (mode 0600): back it up before funding the "
            "wallet; it is the only copy of this wallet's key")


def to_stderr(text: str) -> None:
    """A line for the user on stderr: stdout is a command's result (or MCP's protocol)."""
    print(f"clawrouter: {text}", file=sys.stderr, flush=True)


def on_this_machine(settings: Settings) -> Settings:
    """`settings` for this user's own process (a command, or the gateway it starts for one):
    on loopback, behind no proxy, so local files follow `allow_local_files` alone."""
    return settings.model_copy(update={"host": "127.0.0.1", "public_url": None})


class Gateway:
    """An HTTP client of one gateway, plus the in-process gateway if we started it."""

    def __init__(self, url: str, local: LocalGateway | None = None,
                 settings: Settings | None = None) -> None:
        """`settings`: those the gateway at `url` runs with, if known (for its API key)."""
        self.url = url
        self.local = local
        self.settings = local.settings if local else settings
        #: paid requests sent (or maybe sent): one that ends without an answer may have paid
        self.posted = 0
        #: ask the gateway to finish a slow job paid for if this client leaves (KEEP_PAID_JOB)
        self.keep_paid_jobs = False
        #: say each paid request is the user's new call, not a retry (NEW_CALL)
        self.new_calls = False
        self._policy: InputPolicy | None = None  # for local files sent as data (`_sendable`)
        self._read_here = False  # this machine's gateway refused paths: send files as data
        self.http = httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT, trust_env=False,
                                      headers=auth_headers(self.settings))

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

    async def spend(self, latest: int | None = None) -> dict[str, Any]:
        params = {} if latest is None else {"latest": latest}
        return (await self._send("GET", "/v1/spend", params=params)).json()

    # --- paid endpoints --------------------------------------------------------------------
    async def generate(self, prompt: str, *, model: str | None = None, size: str | None = None,
                       n: int | None = None, out: str | Path | None = None) -> ImageResult:
        directory = await asyncio.to_thread(output_dir, out)  # fail before paying
        body = _body(prompt, model=model, size=size, n=n)
        resp = await self._send("POST", "/v1/images/generations", json=body)
        return await self._save(resp, model_id(model, catalog.DEFAULT_GENERATE_MODEL), directory)

    async def edit(self, prompt: str, images: list[str], *, mask: str | None = None,
                   model: str | None = None, size: str | None = None,
                   out: str | Path | None = None) -> ImageResult:
        """`POST /v1/images/image2image`: images are URLs, data URIs or local paths (which a
        gateway on another machine gets as data URIs, see `_sendable`)."""
        directory = await asyncio.to_thread(output_dir, out)  # fail before paying
        params = ["image"] if len(images) == 1 else [f"image[{i}]" for i in range(len(images))]
        while True:
            body = _body(prompt, model=model, size=size, n=None)
            sent = [await self._sendable(source, param) for source, param in zip(images, params)]
            body["image"] = sent[0] if len(sent) == 1 else sent
            if mask:
                body["mask"] = await self._sendable(mask, "mask")
            try:
                resp = await self._send("POST", "/v1/images/image2image", json=body)
                break
            except GatewayError as exc:
                # It takes no paths (it serves others), and refused them before any payment:
                # send the files' bytes, read here, instead. Only the gateway's own refusal
                # (an upstream's error may carry any code, after a payment too).
                refused = (exc.code == LOCAL_FILES_DISABLED and exc.payment is None
                           and exc.type == "invalid_request_error")
                if not refused or self._read_here or not any(map(_is_path, [*images, mask or ""])):
                    raise
                self._read_here = True
                self.posted -= 1  # answered, and refused before any payment
        return await self._save(resp, model_id(model, catalog.DEFAULT_EDIT_MODEL), directory)

    # --- plumbing --------------------------------------------------------------------------
    async def _sendable(self, source: str, param: str) -> str:
        """A source the gateway can use. A gateway on this machine reads local paths itself,
        under its file policy, unless it refused them (it serves others: beyond loopback, or
        behind a proxy); one elsewhere would look on its own disk. Then the file is read here,
        under this machine's file policy, and sent as a data URI."""
        if not _is_path(source) or self._same_machine and not self._read_here:
            return source
        if self._policy is None:
            settings = self.settings or await _load_settings()
            self._policy = InputPolicy.from_settings(on_this_machine(settings))
        policy = self._policy
        try:
            return await asyncio.to_thread(_read_as_data_uri, source, policy, param)
        except InvalidRequest as exc:  # refused here, before anything is sent or paid
            raise GatewayError(exc.message, status=exc.status, code=exc.code,
                               type=exc.type, param=exc.param) from None

    @property
    def _same_machine(self) -> bool:
        return is_loopback_host(urlsplit(self.url).hostname or "")

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        maybe_paid = f" {MAYBE_PAID}" if method == "POST" else ""
        posting = method == "POST"
        if posting:
            kept = KEEP_PAID_JOB if self.keep_paid_jobs else {}
            anew = NEW_CALL if self.new_calls else {}
            kwargs["headers"] = {**kwargs.get("headers", {}), **FIRST_TRY, **kept, **anew}
        self.posted += posting  # counted as it leaves: an interrupted one may have paid
        try:
            resp = await self.http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:  # it never left
            self.posted -= posting
            raise GatewayError(f"Could not connect to the gateway at {self.url} ({exc}): "
                               f"nothing was sent, so nothing was paid.",
                               code=UNREACHABLE) from None
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
            # A file name is kept only from our own gateway's URLs; others (chosen by
            # whoever answered) are saved under their content hash, never over a file.
            name = image_name(url) or ""
            # a data: URI (an image the gateway could not store) is megabytes, no address:
            # not shown to the user, nor put in an agent's context
            shown = "" if url.startswith("data:") else url
            try:
                path = await asyncio.to_thread(_write, directory, name, data)
            except OSError as exc:  # paid for already: say where the image still is
                raise GatewayError(f"Paid, but could not save {self._kept(shown, name)} in "
                                   f"{directory}: {exc}", code="save_failed") from None
            result.images.append(SavedImage(shown, str(path), item.get("revised_prompt")))
        return result

    def _kept(self, url: str, name: str) -> str:
        """The paid image whose copy here failed, named by where it still is: the URL of a
        running gateway; the stored file of one started for this command (its URL dies with
        it; the data directory's store keeps the file)."""
        if not self.in_process or not name or self.settings is None:
            return url or "the image"
        stored = self.settings.images_dir.expanduser() / name
        return (f"image {name} (the gateway stored it as {stored}; `clawrouter images ls` "
                "lists it)")

    async def _fetch(self, url: str) -> bytes:
        """Download a result. Our own images are fetched from the gateway we talk to (with our
        auth header), whatever host it advertises. Anything else (a result the gateway did not
        store) is fetched as the gateway fetches results off its upstream's host: public
        addresses only, and only if it is an image."""
        if url.startswith("data:"):
            return _b64(url.split(",", 1)[1])
        name = image_name(url)
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


def _read_as_data_uri(path: str, policy: InputPolicy, param: str) -> str:
    if not policy.allow_local_files:
        raise InvalidRequest(f"{param}: local files are disabled (allow_local_files); give a "
                             "URL or a data URI", param=param, code=LOCAL_FILES_DISABLED)
    data = read_local_image(path, policy, cwd=Path.cwd(), param=param)
    return checked_image(data, max_bytes=policy.max_bytes, param=param).data_uri()


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
                  settings: Settings | None = None,
                  waiting: Callable[[str], None] | None = None,
                  wait: float = LEDGER_WAIT) -> Gateway:
    """The running gateway at `gateway_url(url)`, else (if `start`) one started in-process.

    `settings` default to the user's (`load_settings()`, read only when needed); a bad
    configuration raises ValueError/FileNotFoundError for the caller to report as such, a
    malformed `url` or CLAWROUTER_URL BadGatewayUrl (a ValueError too). A gateway the user
    named (by `url` or `CLAWROUTER_URL`) is the only one used: when it does not answer, this
    raises NoGateway and starts none (another wallet would pay). One the user did not name is
    used only if it is this data directory's (see `foreign`). When another process holds the
    ledger, its gateway is used if it says where it is (a `serve`); otherwise (one started
    in-process) this waits for it, up to `wait` seconds, and says so once through `waiting`.
    A wallet key created by the gateway started here is reported through `waiting`, or on
    stderr.
    """
    named_by = "--url" if url else "CLAWROUTER_URL" if os.environ.get("CLAWROUTER_URL") else None
    found_by_settings = named_by is None
    if named_by is not None:
        checked_url(url or os.environ["CLAWROUTER_URL"], named_by)
    if settings is None and found_by_settings:
        settings = await _load_settings()
    url = gateway_url(url, settings)
    keyed = settings if found_by_settings else None  # whose API key the gateway at url wants
    problem: GatewayError | None = None
    try:
        if await _usable(url, keyed):
            return Gateway(url, settings=keyed)
    except GatewayError as exc:  # something else there: our `serve` may be elsewhere
        problem = exc
    if keyed is not None:
        for there in await asyncio.to_thread(advertised, keyed):  # a `serve --port`, say
            if await _usable(there, keyed):
                return Gateway(there, settings=keyed)
    if problem is not None:
        raise problem
    if named_by is not None:
        raise NoGateway(f"No clawrouter gateway answers at {url} (named by {named_by}). "
                        "Nothing was started, sent or paid: start that gateway, or leave out "
                        f"{named_by} to use this data directory's own.", code="no_gateway")
    if not start:
        raise NoGateway(f"No clawrouter gateway answers at {url}. Start one with "
                        "`clawrouter serve`, or set CLAWROUTER_URL.", code="no_gateway")
    if settings is None:
        settings = await _load_settings()
    deadline = time.monotonic() + wait
    say = _once(waiting)
    while True:
        local = LocalGateway(settings, notice=waiting or to_stderr)
        starting = asyncio.ensure_future(asyncio.to_thread(local.start))
        try:
            return Gateway(await asyncio.shield(starting), local)
        except asyncio.CancelledError:
            # The start goes on in its thread (a thread cannot be cancelled): stop what it
            # starts, or it holds the wallet's ledger with nobody to stop it.
            stopping = asyncio.ensure_future(_stop_once_started(starting, local))
            _BACKGROUND.add(stopping)
            stopping.add_done_callback(_BACKGROUND.discard)
            raise
        except GatewayError as exc:
            await asyncio.to_thread(local.stop)
            busy = exc.__cause__
            if not isinstance(busy, LedgerBusy) or time.monotonic() > deadline:
                raise
        found = await _wait_for_ledger(busy, (url, keyed), settings, deadline, say)
        if found is not None:
            return Gateway(found[0], settings=found[1])


_BACKGROUND: set[asyncio.Task[None]] = set()  # (tasks the event loop must not forget)


async def _stop_once_started(starting: asyncio.Future[str], local: LocalGateway) -> None:
    await asyncio.gather(starting, return_exceptions=True)
    await asyncio.to_thread(local.stop)


async def _usable(url: str, settings: Settings | None) -> bool:
    """Whether a gateway answers at `url` that we may use: any the user named (`settings`
    None), else only this data directory's, asked with `settings`' API key. Raises
    GatewayError when something else answers there."""
    health = await probe(url, settings)
    if health is None:
        return False
    if settings is not None:
        reason = await asyncio.to_thread(foreign, url, health, settings)
        if reason is not None:
            raise GatewayError(reason, code="other_data_directory")
    return True


def foreign(url: str, health: dict[str, Any], settings: Settings) -> str | None:
    """Why the gateway whose `/health` answered at `url` is not this data directory's, or None
    when it is: the process holding one of its ledgers, or a gateway paying from its wallet.

    Anything else at the address these settings give (another CLAWROUTER_HOME's `serve`, a
    container's) would pay from a wallet, and count against budgets, the user did not name.
    """
    instance = health.get("instance")
    if instance and any(held.instance == instance for held in holders(settings)):
        return None
    try:
        mine = key_in_use(settings)
    except WalletError:  # this directory's own gateway would not start either
        mine = None
    own = mine.address if mine is not None else None
    theirs = str(health.get("wallet", ""))
    if own is not None and own.lower() == theirs.lower():
        return None
    return (f"The gateway at {url} belongs to another data directory: it pays from wallet "
            f"{theirs}, and this one ({settings.home}) has "
            + (f"wallet {own}" if own else "no wallet yet")
            + f". To use that gateway and its wallet, set CLAWROUTER_URL={url}; to use this "
            "data directory's, stop that gateway or set CLAWROUTER_PORT to a free port.")


def holders(settings: Settings) -> list[Holder]:
    """Who holds this data directory's ledgers (one per network), as their lock files say."""
    found = []
    for network in dict.fromkeys((settings.network, *NETWORKS)):
        lock = lock_path(settings.ledger_path_for(network))
        if lock.exists() and in_use(lock):
            held = holder(lock)
            if held is not None:
                found.append(held)
    return found


def advertised(settings: Settings) -> list[str]:
    """Where the `serve`s holding this data directory's ledgers say they listen."""
    return [held.url for held in holders(settings) if held.url]


async def _load_settings() -> Settings:
    from clawrouter.config import load_settings

    return await asyncio.to_thread(load_settings)


async def _wait_for_ledger(busy: LedgerBusy, ours: tuple[str, Settings | None],
                           settings: Settings, deadline: float, say: Callable[[str], None]
                           ) -> tuple[str, Settings | None] | None:
    """Until a gateway answers (its URL and whose key it wants, to use it) or the ledger is
    free (None: try starting ours again). The holder's own gateway is looked for where its
    lock file says, read afresh each time (a `serve` writes it once it listens); it shares
    our data directory, so our settings and key."""
    while True:
        now = await asyncio.to_thread(holder, busy.lock)
        candidates = [ours] + ([(now.url, settings)] if now and now.url else [])
        for candidate, keyed in candidates:
            if await _usable(candidate, keyed):
                return candidate, keyed
        if not await asyncio.to_thread(in_use, busy.lock) or time.monotonic() > deadline:
            return None
        who = f" ({now})" if now else ""
        say(f"another clawrouter process{who} is using this wallet's ledger; waiting for it "
            "to finish")
        await asyncio.sleep(0.25)


def _once(callback: Callable[[str], None] | None) -> Callable[[str], None]:
    """`callback`, called the first time only (or never, if None)."""
    said = callback is None

    def say(message: str) -> None:
        nonlocal said
        if not said:
            said = True
            callback(message)  # type: ignore[misc]

    return say


def _body(prompt: str, *, model: str | None, size: str | None, n: int | None) -> dict[str, Any]:
    # Always ask for URLs: we download them, and the gateway's default may be b64_json.
    body: dict[str, Any] = {"prompt": prompt, "response_format": "url"}
    for key, value in (("model", model), ("size", size), ("n", n)):
        if value is not None:
            body[key] = value
    return body


def _error(resp: httpx.Response) -> GatewayError:
    shared = resp.headers.get("x-clawrouter-shared") == "true"  # (a replay: `coalesce`)
    try:
        err = resp.json()["error"]
        return GatewayError(err.get("message") or f"HTTP {resp.status_code}",
                            status=resp.status_code, code=err.get("code"),
                            type=err.get("type"), param=err.get("param"),
                            payment=err.get("payment"), shared=shared)
    except (ValueError, KeyError, TypeError, AttributeError):
        return GatewayError(f"HTTP {resp.status_code} from the gateway: {resp.text[:200]}",
                            status=resp.status_code, shared=shared)


def _b64(text: str) -> bytes:
    return base64.b64decode(text)


def _write(directory: Path, name: str, data: bytes) -> Path:
    """Save under the gateway's file name for the image, else its content hash."""
    if not NAME.fullmatch(name):
        mime = sniff_image(data)
        name = f"{content_id(data)}.{EXTENSIONS.get(mime or '', 'bin')}"
    return write_atomic(directory, name, data, private=False)  # the user's file: their umask
