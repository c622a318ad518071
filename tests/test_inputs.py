"""clawrouter.inputs: every input form, and every refusal, against real servers and real files.

Two origin servers run on loopback: "public" on 127.0.0.2 (the tests declare it public through
`address_allowed`) and "private" on 127.0.0.1, whose hit counter must stay at zero whenever a
fetch is refused. DNS is the only fake: `FakeDNS` maps test names to those addresses.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import ipaddress
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult

from clawrouter.config import Settings
from clawrouter.errors import InvalidRequest
from clawrouter.inputs import ImageInput, InputPolicy, InputResolver
from clawrouter.inputs.addresses import is_public_address
from clawrouter.sandbox.images import make_png
from clawrouter.sniff import dimensions, sniff_image
from tests.servers import ServerThread

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- images ---------------------------------------------------------------------------------

def _png() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00\xff")) + chunk(b"IEND", b""))


PNG = _png()
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00\xff\xd9"
WEBP = (b"RIFF\x1a\x00\x00\x00WEBPVP8L\x0d\x00\x00\x00"
        b"\x2f\x00\x00\x00\x10\x07\x10\x11\x11\x88\x88\xfe\x07\x00")
GIF = b"GIF89a\x01\x00\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
IMAGES = {"png": (PNG, "image/png"), "jpeg": (JPEG, "image/jpeg"),
          "webp": (WEBP, "image/webp"), "gif": (GIF, "image/gif")}
SECRET = b"PRIVATE_KEY=0xdeadbeefdeadbeefdeadbeef\n"
CAP = 64 * 1024


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def padded_png(size: int) -> bytes:
    return PNG + b"\0" * (size - len(PNG))


# --- origin servers -------------------------------------------------------------------------

class Origin:
    """A raw ASGI origin: images, redirects, statuses, endless and slow bodies; counts hits."""

    def __init__(self) -> None:
        self.hits = 0
        self.closed: dict[str, threading.Event] = collections.defaultdict(threading.Event)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        self.hits += 1
        path = scope["path"]
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        parts = path.strip("/").split("/")
        if parts[0] == "img":
            data, _ = IMAGES[parts[1]]
            # A lying content type: the bytes decide.
            await _respond(send, 200, data, [(b"content-type", b"text/plain")])
        elif parts[0] == "text":
            await _respond(send, 200, SECRET, [(b"content-type", b"image/png")])
        elif parts[0] == "exact":
            size = int(parts[1])
            await _respond(send, 200, padded_png(size), chunked="chunked" in query)
        elif parts[0] == "redirect":
            left = int(parts[1])
            target = f"/redirect/{left - 1}" if left > 1 else "/img/png"  # `left` hops in all
            await _respond(send, 302, b"", [(b"location", target.encode())])
        elif parts[0] == "to":
            await _respond(send, 302, b"", [(b"location", query["u"].encode())])
        elif parts[0] == "status":
            await _respond(send, int(parts[1]), b"nope")
        elif parts[0] == "stream":
            await self._endless(receive, send, query["id"], declared=query.get("declared"),
                                interval=float(query.get("interval", 0)))
        elif parts[0] == "slow":
            if not await _disconnected_within(receive, float(query["s"])):
                await _respond(send, 200, PNG)
        else:
            await _respond(send, 404, b"")

    async def _endless(self, receive: Any, send: Any, key: str, *, declared: str | None,
                       interval: float) -> None:
        """Send image bytes until the client hangs up; record that it did."""
        headers = [(b"content-type", b"image/png")]
        if declared:
            headers.append((b"content-length", declared.encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gone.set()

        watcher = asyncio.create_task(watch())
        chunk = padded_png(16 * 1024) if not interval else b"\0"
        try:
            while not gone.is_set():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await asyncio.sleep(interval or 0.001)
                chunk = chunk if interval else b"\0" * 16 * 1024
            self.closed[key].set()
        finally:
            watcher.cancel()


async def _respond(send: Any, status: int, body: bytes,
                   headers: list[tuple[bytes, bytes]] | None = None, *,
                   chunked: bool = False) -> None:
    headers = list(headers or [])
    if not chunked:
        headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    if chunked:
        for i in range(0, len(body), 4096):
            await send({"type": "http.response.body", "body": body[i:i + 4096],
                        "more_body": True})
    else:
        await send({"type": "http.response.body", "body": body, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _disconnected_within(receive: Any, seconds: float) -> bool:
    async def wait() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
    try:
        await asyncio.wait_for(wait(), seconds)
        return True
    except TimeoutError:
        return False


class HostServer(ServerThread):
    """`ServerThread` bound to a chosen loopback address (127.0.0.2 plays a public host)."""

    def __init__(self, app: Any, host: str) -> None:
        super().__init__(app, host=host, log_level="error", timeout_graceful_shutdown=1)

    def _run(self) -> None:
        super()._run()
        assert self.loop is not None
        self.loop.close()  # ServerThread leaves its loop (and its self-pipe sockets) open


@pytest.fixture(scope="module")
def public() -> Iterator[tuple[HostServer, Origin]]:
    origin = Origin()
    server = HostServer(origin, "127.0.0.2").start()
    yield server, origin
    server.stop()


@pytest.fixture(scope="module")
def private() -> Iterator[tuple[HostServer, Origin]]:
    origin = Origin()
    server = HostServer(origin, "127.0.0.1").start()
    yield server, origin
    server.stop()


class FakeDNS(AbstractResolver):
    """The one fake: names to addresses, since the internet is not reachable here."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [{"hostname": host, "host": a, "port": port, "proto": 0,
                 "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                 "flags": socket.AI_NUMERICHOST} for a in self.table[host]]

    async def close(self) -> None:
        pass


DNS = {"public.example": ["127.0.0.2"], "evil.example": ["127.0.0.1"],
       "mixed.example": ["127.0.0.2", "127.0.0.1"], "meta.example": ["169.254.169.254"]}
PUBLIC = ipaddress.ip_address("127.0.0.2")


def only_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip == PUBLIC


def make_policy(root: Path, **overrides: Any) -> InputPolicy:
    settings: dict[str, Any] = dict(max_bytes=CAP, roots=(root,), forbidden=(root / "data",),
                                    connect_timeout=1.0, total_timeout=3.0, cwd=root)
    settings.update(overrides)
    return InputPolicy(**settings)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "granted"
    path.mkdir()
    return path


async def resolve(policy: InputPolicy, value: str, *, param: str = "image[0]",
                  **kwargs: Any) -> ImageInput:
    async with InputResolver(policy, **kwargs) as resolver:
        return await resolver.resolve(value, param=param)


async def refused(policy: InputPolicy, value: str, code: str, *, param: str = "image[0]",
                  **kwargs: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as caught:
        await resolve(policy, value, param=param, **kwargs)
    error = caught.value
    assert (error.code, error.param, error.status) == (code, param, 400), error.message
    assert error.message.startswith(f"{param}: ")
    return error


def via_dns() -> dict[str, Any]:
    return {"resolver": FakeDNS(DNS), "address_allowed": only_public}


# --- ImageInput, policy ---------------------------------------------------------------------

#: 3x5 images written by Pillow (an independent encoder), base64
SIZED = {
    "jpeg (progressive)": """
/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDAKBueIx4ZKCMgoy0qqC+8P//8Nzc8P////////////////////////////
//////////////////////////////2wBDAaq0tPDS8P//////////////////////////////////////////////
////////////////////////////////wgARCAAFAAMDASIAAhEBAxEB/8QAFQABAQAAAAAAAAAAAAAAAAAAAAL/xA
AVAQEBAAAAAAAAAAAAAAAAAAABAv/aAAwDAQACEAMQAAABkFf/xAAUEAEAAAAAAAAAAAAAAAAAAAAA/9oACAEBAAEF
An//xAAUEQEAAAAAAAAAAAAAAAAAAAAA/9oACAEDAQE/AX//xAAUEQEAAAAAAAAAAAAAAAAAAAAA/9oACAECAQE/AX
//xAAUEAEAAAAAAAAAAAAAAAAAAAAA/9oACAEBAAY/An//xAAUEAEAAAAAAAAAAAAAAAAAAAAA/9oACAEBAAE/IX//
2gAMAwEAAgADAAAAEPP/xAAUEQEAAAAAAAAAAAAAAAAAAAAA/9oACAEDAQE/EH//xAAUEQEAAAAAAAAAAAAAAAAAAA
AA/9oACAECAQE/EH//xAAUEAEAAAAAAAAAAAAAAAAAAAAA/9oACAEBAAE/EH//2Q==""",
    "webp (lossy)": """
UklGRjwAAABXRUJQVlA4IDAAAADQAQCdASoDAAUAAUAmJaACdLoB+AADsAD+9hNf/izkYjs83/4E78Cd+BO/8AAAAA
A=""",
    "webp (lossless)": "UklGRh4AAABXRUJQVlA4TBEAAAAvAgABEAdQhSJXoYCBiOh/AAA=",
    "webp (extended)": """
UklGRmAAAABXRUJQVlA4WAoAAAAQAAAAAgAABAAAQUxQSAoAAAABB1DAiAhERP8DVlA4IDAAAADQAQCdASoDAAUAAU
AmJaACdLoB+AADsAD+9hNf/izkYjs83/4E78Cd+BO/8AAAAAA=""",
    "gif": "R0lGODdhAwAFAIEAAMgKCgAAAAAAAAAAACwAAAAAAwAFAAAICAABCBxIsGBAADs=",
}


@pytest.mark.parametrize("kind", SIZED)
def test_dimensions_read_each_format_header(kind: str) -> None:
    data = base64.b64decode("".join(SIZED[kind].split()))
    assert sniff_image(data) is not None
    assert dimensions(data) == (3, 5)
    assert all(dimensions(data[:cut]) in (None, (3, 5)) for cut in range(len(data)))


def test_dimensions_give_up_early_on_a_hostile_jpeg() -> None:
    """Read on the event loop (a mask's check), so a JPEG is walked a bounded number of
    steps: 20 MB of fill bytes took 1.3 s one by one. The same frame is found behind a few
    segments and not behind thousands."""
    frame = b"\xff\xc0\x00\x11\x08\x00\x05\x00\x03" + bytes(12)
    comment = b"\xff\xfe\x00\x02"  # an empty COM segment
    assert dimensions(b"\xff\xd8" + comment * 10 + frame) == (3, 5)
    assert dimensions(b"\xff\xd8" + comment * 5_000 + frame) is None
    assert dimensions(b"\xff\xd8" + b"\xff" * 100_000 + frame) is None


def test_dimensions_of_a_png_and_of_what_is_not_an_image() -> None:
    assert dimensions(make_png(7, 2, 1)) == (7, 2)
    for junk in (b"", b"\xff\xd8", b"\xff\xd8\x00\x00", b"\xff\xd8\xff\xd9", b"RIFF0000WEBPVP8 ",
                 b"GIF89a\x01", SECRET):
        assert dimensions(junk) is None


def test_image_input_data_uri() -> None:
    image = ImageInput(PNG, "image/png")
    assert image.data_uri() == "data:image/png;base64," + b64(PNG)


def test_policy_from_settings(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home", max_image_mb=2, allow_local_files=False,
                        allow_private_urls=True, allowed_roots=[tmp_path])
    policy = InputPolicy.from_settings(settings)
    assert policy.max_bytes == 2 * 1024 * 1024
    assert policy.roots == (tmp_path.resolve(),)
    assert policy.forbidden == (tmp_path / "home",)
    assert (policy.allow_local_files, policy.allow_private_urls) == (False, True)


# --- uploads, data URIs, base64 -------------------------------------------------------------

@pytest.mark.parametrize("kind", IMAGES)
async def test_upload_data_uri_and_base64_forms(root: Path, kind: str) -> None:
    data, mime = IMAGES[kind]
    policy = make_policy(root)
    resolver = InputResolver(policy)
    assert resolver.from_upload(data, param="image[0]") == ImageInput(data, mime)
    urlsafe = base64.urlsafe_b64encode(data).decode()
    wrapped = "\n".join(b64(data)[i:i + 8] for i in range(0, len(b64(data)), 8))
    for value in (f"data:image/gif;base64,{b64(data)}",  # declared type is ignored
                  f"data:application/octet-stream;name=x;BASE64,{urlsafe.rstrip('=')}",
                  b64(data), urlsafe.rstrip("="), wrapped, f"  {b64(data)}\n"):
        image = await resolver.resolve(value, param="image[0]")
        assert (image.data, image.mime) == (data, mime), value
    await resolver.aclose()


async def test_long_base64_with_slashes_is_not_a_path(root: Path) -> None:
    data = PNG + bytes(range(256)) * 40  # plenty of '/' and '+' in the encoding
    text = b64(data)
    assert "/" in text and len(text) > 4096
    assert (await resolve(make_policy(root), text)).data == data
    assert (await resolve(make_policy(root), b64(JPEG))).mime == "image/jpeg"  # "/9j/…"


def test_upload_refusals(root: Path) -> None:
    resolver = InputResolver(make_policy(root))
    with pytest.raises(InvalidRequest) as caught:
        resolver.from_upload(SECRET, param="mask")
    assert (caught.value.code, caught.value.param) == ("invalid_image", "mask")
    assert "PRIVATE_KEY" not in caught.value.message
    with pytest.raises(InvalidRequest) as caught:
        resolver.from_upload(padded_png(CAP + 1), param="image[2]")
    assert (caught.value.code, caught.value.param) == ("image_too_large", "image[2]")
    assert resolver.from_upload(padded_png(CAP), param="image").data == padded_png(CAP)


async def test_data_uri_refusals(root: Path) -> None:
    policy = make_policy(root)
    error = await refused(policy, f"data:image/png;base64,{b64(SECRET)}", "invalid_image",
                          param="mask")
    assert "PRIVATE_KEY" not in error.message
    await refused(policy, "data:image/png,%89PNG", "invalid_data_uri")
    await refused(policy, "data:image/png;base64", "invalid_data_uri")
    await refused(policy, "data:image/png;base64,iVBO!!!!", "invalid_base64")
    await refused(policy, "data:image/png;base64,iVBORw0KG", "invalid_base64")
    # The length is judged before decoding: junk that is too long is "too large", not "invalid".
    await refused(policy, "data:image/png;base64," + "!" * (CAP * 2), "image_too_large")
    await refused(policy, "data:image/png;base64," + b64(padded_png(CAP + 1)), "image_too_large")
    assert (await resolve(policy, "data:image/png;base64," + b64(padded_png(CAP)))).mime


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
@pytest.mark.parametrize("prefix", ["", "data:image/png;base64,"])
async def test_wrapped_base64_is_sized_by_its_characters_not_its_line_breaks(
        root: Path, newline: str, prefix: str) -> None:
    """Base64 wrapped at 76 columns (MIME, `base64` on the command line) fits the cap exactly
    as unwrapped base64 does: line breaks are not counted as encoded bytes."""
    def wrapped(data: bytes) -> str:
        return prefix + base64.encodebytes(data).decode().replace("\n", newline)

    policy = make_policy(root)
    near = padded_png(CAP - 2)
    assert len(wrapped(near)) * 3 // 4 - 2 > CAP  # counting the breaks would refuse it
    assert (await resolve(policy, wrapped(near))).data == near
    assert (await resolve(policy, wrapped(padded_png(CAP)))).data == padded_png(CAP)
    await refused(policy, wrapped(padded_png(CAP + 1)), "image_too_large")
    await refused(policy, wrapped(padded_png(CAP + 4)), "image_too_large")


async def test_raw_base64_refusals(root: Path) -> None:
    policy = make_policy(root)
    error = await refused(policy, "*" * 5000, "invalid_base64")
    assert "*****" not in error.message
    error = await refused(policy, b64(SECRET * 200), "invalid_image")
    assert "PRIVATE_KEY" not in error.message and b64(SECRET)[:20] not in error.message
    await refused(policy, b64(padded_png(CAP + 3)), "image_too_large")
    await refused(policy, b64(SECRET), "unrecognized_input")  # short: could have been a name


async def test_unrecognized_input_lists_forms_and_truncates(root: Path) -> None:
    error = await refused(make_policy(root), "hello world " * 200, "unrecognized_input")
    assert "http(s) URL" in error.message and "data URI" in error.message
    assert "local file" in error.message and len(error.message) < 400
    error = await refused(make_policy(root, allow_local_files=False), "photo.png",
                          "unrecognized_input")
    assert "local file" not in error.message
    await refused(make_policy(root), "", "unrecognized_input")


async def test_a_missing_bare_file_name_is_said_to_be_missing(root: Path) -> None:
    """`cat.png` was meant as a file: "no such file" helps more than the list of forms."""
    for name in ("cat.png", "Photo.JPEG", "a b.webp"):
        error = await refused(make_policy(root), name, "file_not_found")
        assert "no such file" in error.message and "full path" in error.message
    await refused(make_policy(root), "cat", "unrecognized_input")  # no image ending: unknown


# --- local files ----------------------------------------------------------------------------

@pytest.fixture
def tree(root: Path, tmp_path: Path) -> dict[str, Path]:
    """granted/{pics/*.png, notes.png (text), .ssh/id.png, data/{wallet.key, real.png}} + outside."""
    (root / "pics").mkdir()
    for kind, (data, _) in IMAGES.items():
        (root / "pics" / f"a.{kind}").write_bytes(data)
    (root / "notes.png").write_bytes(SECRET)
    (root / ".ssh").mkdir()
    (root / ".ssh" / "id.png").write_bytes(PNG)
    (root / "data").mkdir()
    (root / "data" / "wallet.key").write_bytes(SECRET)
    (root / "data" / "real.png").write_bytes(PNG)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.png").write_bytes(PNG)
    return {"granted": root, "outside": outside}


@pytest.mark.parametrize("kind", IMAGES)
async def test_local_file_forms(tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                kind: str) -> None:
    root = tree["granted"]
    monkeypatch.setenv("HOME", str(root))
    (root / f"here.{kind}").write_bytes(IMAGES[kind][0])
    policy = make_policy(root)
    target = root / "pics" / f"a.{kind}"
    for value in (str(target), f"~/pics/a.{kind}", f"pics/a.{kind}", f"./pics/a.{kind}",
                  f"../granted/pics/a.{kind}", target.as_uri(), f"file://localhost{target}",
                  f"here.{kind}"):
        image = await resolve(policy, value)
        assert (image.data, image.mime) == IMAGES[kind], value


async def test_cwd_defaults_to_the_process_cwd(tree: dict[str, Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree["granted"] / "pics")
    assert (await resolve(make_policy(tree["granted"], cwd=None), "a.png")).data == PNG


async def test_secret_named_png_is_refused_without_echoing_it(tree: dict[str, Path]) -> None:
    error = await refused(make_policy(tree["granted"]), str(tree["granted"] / "notes.png"),
                          "invalid_image")
    assert "PRIVATE_KEY" not in error.message


async def test_paths_outside_roots(tree: dict[str, Path]) -> None:
    root, outside = tree["granted"], tree["outside"]
    policy = make_policy(root)
    await refused(policy, str(outside / "a.png"), "path_refused")
    await refused(policy, str(root / ".." / "outside" / "a.png"), "path_refused")
    await refused(policy, "../outside/a.png", "path_refused")
    await refused(policy, "pics/../../outside/a.png", "path_refused")
    await refused(policy, "/etc/passwd", "path_refused")
    # Outside the roots, a missing file looks exactly like a present one.
    await refused(policy, str(outside / "missing.png"), "path_refused")


async def test_a_bare_name_outside_the_roots_does_not_tell_whether_it_exists(
        tree: dict[str, Path]) -> None:
    """With the working folder outside the roots, a bare name gets the same answer whether or
    not the file exists, so names cannot probe for files the policy hides."""
    outside = tree["outside"]  # holds a.png
    (outside / "notes").write_bytes(SECRET)
    policy = make_policy(tree["granted"], cwd=outside)
    present = await refused(policy, "a.png", "path_refused")
    missing = await refused(policy, "b.png", "path_refused")
    assert present.message.replace("a.png", "b.png") == missing.message
    # A name that may be a file or any word: "not recognised" either way.
    present = await refused(policy, "notes", "unrecognized_input")
    missing = await refused(policy, "nodes", "unrecognized_input")
    assert present.message.replace("notes", "nodes") == missing.message


async def test_hidden_components(tree: dict[str, Path]) -> None:
    root = tree["granted"]
    policy = make_policy(root)
    for value in (str(root / ".ssh" / "id.png"), ".ssh/id.png", "pics/../.ssh/id.png"):
        error = await refused(policy, value, "path_refused")
        assert "hidden" in error.message
    # Through a visible symlink (resolved path is hidden) and a hidden symlink (written path is).
    (root / "keys").symlink_to(root / ".ssh")
    (root / ".pics").symlink_to(root / "pics")
    await refused(policy, str(root / "keys" / "id.png"), "path_refused")
    await refused(policy, str(root / ".pics" / "a.png"), "path_refused")
    (root / ".hidden.png").write_bytes(PNG)
    await refused(policy, str(root / ".hidden.png"), "path_refused")


async def test_a_root_inside_a_hidden_folder_is_usable(tree: dict[str, Path]) -> None:
    cache = tree["granted"] / ".cache" / "images"
    cache.mkdir(parents=True)
    (cache / "a.png").write_bytes(PNG)
    policy = make_policy(tree["granted"], roots=(tree["granted"], cache))
    assert (await resolve(policy, str(cache / "a.png"))).data == PNG
    await refused(policy, str(tree["granted"] / ".ssh" / "id.png"), "path_refused")


async def test_symlinks_escaping_a_root(tree: dict[str, Path]) -> None:
    root, outside = tree["granted"], tree["outside"]
    (root / "escape.png").symlink_to(outside / "a.png")
    (root / "elsewhere").symlink_to(outside)
    (root / "loop.png").symlink_to(root / "loop.png")
    policy = make_policy(root)
    await refused(policy, str(root / "escape.png"), "path_refused")
    await refused(policy, "elsewhere/a.png", "path_refused")
    await refused(policy, "loop.png", "path_refused")
    (root / "inside.png").symlink_to(root / "pics" / "a.png")
    assert (await resolve(policy, "inside.png")).data == PNG


async def test_forbidden_data_dir(tree: dict[str, Path]) -> None:
    root = tree["granted"]
    policy = make_policy(root)
    for name in ("wallet.key", "real.png"):
        error = await refused(policy, str(root / "data" / name), "path_refused")
        assert "data directory" in error.message and "PRIVATE_KEY" not in error.message
    (root / "link.png").symlink_to(root / "data" / "real.png")
    await refused(policy, "link.png", "path_refused")
    await refused(policy, (root / "data" / "real.png").as_uri(), "path_refused")
    # A hard link is the key by another name: read, but not an image, so refused, unechoed
    # (SECURITY.md says so; only what is sent is guarded here).
    os.link(root / "data" / "wallet.key", root / "key.png")
    error = await refused(policy, str(root / "key.png"), "invalid_image")
    assert "PRIVATE_KEY" not in error.message


def test_a_parent_folder_swapped_for_a_symlink_after_the_checks_is_not_followed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another local user who can write in a root (/tmp is one by default) swaps a folder for
    a symlink to the data directory just after the path was judged and before it is opened:
    the open must not follow it."""
    from clawrouter.inputs import paths

    root, data = tmp_path / "root", tmp_path / "data"
    (root / "x").mkdir(parents=True)
    data.mkdir()
    (root / "x" / "img.png").write_bytes(PNG)
    (data / "img.png").write_bytes(PNG + b"SECRET")
    policy = InputPolicy(max_bytes=CAP, roots=(root,), forbidden=(data,))
    judge = paths._judged_path

    def judged_then_swapped(*args: Any, **kwargs: Any) -> Path:
        real = judge(*args, **kwargs)
        (root / "x").rename(root / "was-x")
        (root / "x").symlink_to(data)
        return real

    monkeypatch.setattr(paths, "_judged_path", judged_then_swapped)
    with pytest.raises(InvalidRequest) as refused:
        paths.read_local_image(str(root / "x" / "img.png"), policy, cwd=root, param="image")
    assert refused.value.code == "path_refused" and "SECRET" not in refused.value.message


def test_a_file_replaced_after_it_was_judged_is_not_read(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The file itself replaced between its judgement (stat) and its open, by one no bigger
    (a hard link to a file outside the roots, say): the open must be refused, not read."""
    from clawrouter.inputs import paths

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "img.png").write_bytes(PNG + b"PUBLIC")
    (outside / "secret.png").write_bytes(PNG + b"SECRET")  # the same size
    policy = InputPolicy(max_bytes=CAP, roots=(root,))
    open_judged = paths._open_judged

    def swapped_then_opened(real: Path) -> int:
        (root / "img.png").unlink()
        os.link(outside / "secret.png", root / "img.png")
        return open_judged(real)

    monkeypatch.setattr(paths, "_open_judged", swapped_then_opened)
    with pytest.raises(InvalidRequest) as refused:
        paths.read_local_image(str(root / "img.png"), policy, cwd=root, param="image")
    assert refused.value.code == "path_refused" and "changed" in refused.value.message


async def test_default_forbidden_dir_is_hidden_in_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / ".clawrouter").mkdir(parents=True)
    (home / ".clawrouter" / "wallet.key").write_bytes(SECRET)
    policy = InputPolicy.from_settings(Settings(home=home / ".clawrouter",
                                                allowed_roots=[home], allow_local_files=True))
    await refused(policy, str(home / ".clawrouter" / "wallet.key"), "path_refused")


async def test_file_problems(tree: dict[str, Path]) -> None:
    root = tree["granted"]
    policy = make_policy(root)
    await refused(policy, str(root / "missing.png"), "file_not_found")
    await refused(policy, "pics", "path_refused")  # a directory
    os.mkfifo(root / "pipe.png")
    await refused(policy, "pipe.png", "path_refused")  # and no hang on open
    (root / "big.png").write_bytes(padded_png(CAP + 1))
    await refused(policy, "big.png", "image_too_large")
    with open(root / "huge.png", "wb") as sparse:  # 64 GB on paper: refused by its stat alone
        sparse.write(PNG)
        sparse.truncate(1 << 36)
    await refused(policy, "huge.png", "image_too_large")
    (root / "edge.png").write_bytes(padded_png(CAP))
    assert len((await resolve(policy, "edge.png")).data) == CAP
    await refused(policy, "file://example.com/etc/passwd", "path_refused")


async def test_local_files_disabled(tree: dict[str, Path]) -> None:
    root = tree["granted"]
    policy = make_policy(root, allow_local_files=False)
    target = root / "pics" / "a.png"
    for value in (str(target), target.as_uri(), "pics/a.png", "~/x.png", "file://host/x.png"):
        await refused(policy, value, "local_files_disabled")
    await refused(policy, "a.png", "unrecognized_input")  # a bare name is not even looked up


# --- URLs -----------------------------------------------------------------------------------

async def test_lookups_that_never_answer_tie_up_only_their_own_threads(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A URL whose name server never answers must not starve the threads the gateway reads
    files and stores images on (a lookup cannot be cancelled once it runs)."""
    from clawrouter.inputs import dns

    release = threading.Event()
    real = socket.getaddrinfo

    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        if host.endswith(".hangs.test"):
            release.wait(10)
            raise socket.gaierror(socket.EAI_AGAIN, "timed out")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(dns.socket, "getaddrinfo", getaddrinfo)
    resolver = dns.OwnThreadsResolver(threads=2)
    hung = [asyncio.ensure_future(resolver.resolve(f"{i}.hangs.test", 80)) for i in range(12)]
    try:
        await asyncio.sleep(0.05)
        # the default pool (files, the store) still answers at once
        await asyncio.wait_for(asyncio.gather(*(asyncio.to_thread(lambda: 1)
                                               for _ in range(16))), 1)
    finally:
        release.set()
        await asyncio.gather(*hung, return_exceptions=True)
    found = await resolver.resolve("localhost", 80, socket.AF_UNSPEC)
    assert {r["host"] for r in found} <= {"127.0.0.1", "::1"} and found[0]["port"] == 80
    await resolver.close()


def test_default_address_rule() -> None:
    public = ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"]
    forbidden = ["127.0.0.1", "127.0.0.2", "::1", "0.0.0.0", "::", "10.0.0.1", "172.16.0.1",
                 "192.168.1.1", "169.254.169.254", "fe80::1", "fc00::1", "100.64.0.1",
                 "224.0.0.1", "ff02::1", "240.0.0.1", "255.255.255.255", "::ffff:127.0.0.1",
                 "::ffff:10.0.0.1", "::ffff:169.254.169.254", "2002:7f00:1::", "64:ff9b::a00:1",
                 "192.0.2.1"]
    assert all(is_public_address(ipaddress.ip_address(a)) for a in public)
    assert not any(is_public_address(ipaddress.ip_address(a)) for a in forbidden)


@pytest.mark.parametrize("kind", IMAGES)
async def test_url_fetch(root: Path, public: tuple[HostServer, Origin], kind: str) -> None:
    image = await resolve(make_policy(root), f"http://public.example:{public[0].port}/img/{kind}",
                          **via_dns())
    assert (image.data, image.mime) == IMAGES[kind]


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:{port}/img/png",
    "http://[::1]:{port}/img/png",
    "http://[::ffff:127.0.0.1]:{port}/img/png",
    "http://0.0.0.0:{port}/img/png",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/img/png",
    "http://localhost:{port}/img/png",  # the real system resolver
    "http://127.1:{port}/img/png",
    "http://2130706433:{port}/img/png",
])
async def test_private_addresses_are_refused(root: Path, private: tuple[HostServer, Origin],
                                             url: str) -> None:
    server, origin = private
    before = origin.hits
    await refused(make_policy(root), url.format(port=server.port), "url_refused")
    assert origin.hits == before


@pytest.mark.parametrize("host", ["evil.example", "mixed.example", "meta.example"])
async def test_names_resolving_to_forbidden_addresses(
        root: Path, private: tuple[HostServer, Origin], host: str) -> None:
    server, origin = private
    before = origin.hits
    error = await refused(make_policy(root), f"http://{host}:{server.port}/img/png",
                          "url_refused", **via_dns())
    assert "resolves to" in error.message
    assert origin.hits == before


async def test_redirects(root: Path, public: tuple[HostServer, Origin],
                         private: tuple[HostServer, Origin]) -> None:
    base = f"http://public.example:{public[0].port}"
    policy = make_policy(root)
    assert (await resolve(policy, f"{base}/redirect/3", **via_dns())).data == PNG
    assert (await resolve(policy, f"{base}/to?u=/img/gif", **via_dns())).data == GIF
    error = await refused(policy, f"{base}/redirect/4", "url_refused", **via_dns())
    assert "more than 3 redirects" in error.message
    origin = private[1]
    before = origin.hits
    for target in (f"http://127.0.0.1:{private[0].port}/img/png",
                   f"http://evil.example:{private[0].port}/img/png",
                   f"http://[::ffff:127.0.0.1]:{private[0].port}/img/png"):
        await refused(policy, f"{base}/to?u={target}", "url_refused", **via_dns())
    await refused(policy, f"{base}/to?u=file:///etc/passwd", "url_refused", **via_dns())
    assert origin.hits == before


async def test_allow_private_urls(root: Path, private: tuple[HostServer, Origin]) -> None:
    server, origin = private
    before = origin.hits
    policy = make_policy(root, allow_private_urls=True)
    assert (await resolve(policy, f"http://127.0.0.1:{server.port}/img/png")).data == PNG
    assert (await resolve(policy, f"http://evil.example:{server.port}/img/jpeg",
                          **via_dns())).data == JPEG
    assert origin.hits == before + 2


async def test_url_refusals(root: Path, public: tuple[HostServer, Origin]) -> None:
    base = f"http://public.example:{public[0].port}"
    policy = make_policy(root)
    error = await refused(policy, f"http://user:hunter2@public.example:{public[0].port}/img/png",
                          "url_refused", **via_dns())
    assert "hunter2" not in error.message
    await refused(policy, "ftp://public.example/a.png", "url_refused", **via_dns())
    await refused(policy, "gopher://public.example/", "url_refused", **via_dns())
    error = await refused(policy, f"{base}/status/404", "url_fetch_failed", **via_dns())
    assert "404" in error.message
    await refused(policy, f"{base}/status/500", "url_fetch_failed", **via_dns())
    await refused(policy, "http://nowhere.example/a.png", "url_fetch_failed", **via_dns())
    error = await refused(policy, f"{base}/text", "invalid_image", **via_dns())
    assert "PRIVATE_KEY" not in error.message


#: URLs whose host no parser or resolver takes: each was a 500 `internal_error` (a UnicodeError
#: from IDNA in yarl or `getaddrinfo`, a ValueError from `urlsplit`), not a refusal
MALFORMED = [
    ("http://a..b/x.png", "url_refused"),  # an empty label: getaddrinfo's IDNA encoding
    ("http://" + "a" * 64 + ".com/x.png", "url_refused"),  # a label over 63 characters
    ("https://xn--a/x.png", "url_refused"),  # a bad punycode label: yarl's `url.host`
    ("file://[/tmp/x.png", "path_refused"),  # an unbalanced bracket: urlsplit
    ("file://]/x", "path_refused"),
]


def _nothing_upstream(sandbox: Any) -> None:
    stats = sandbox.stats()
    assert stats["round_trips"] == 0 and stats["payments_count"] == 0


def _edit(gateway: Any, image: str) -> dict[str, Any]:
    """POST an edit of `image`; the 400 envelope's error, which names the input."""
    r = gateway.http.post("/v1/images/edits", json={"model": "openai/gpt-image-1",
                                                     "prompt": "x", "image": image})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == "image"
    return error


@pytest.mark.parametrize("value, code", MALFORMED)
def test_a_malformed_url_is_a_400_that_costs_nothing(gateway: Any, sandbox: Any, value: str,
                                                     code: str) -> None:
    assert _edit(gateway, value)["code"] == code
    _nothing_upstream(sandbox)


@pytest.mark.parametrize("target", ["http://a..b/", "http://xn--a/x.png"])
def test_a_redirect_to_a_malformed_url_is_refused(make_gateway: Any, sandbox: Any,
                                                   private: tuple[HostServer, Origin],
                                                   target: str) -> None:
    """Every hop is judged alike: the origin answers once, with the redirect, and that is all."""
    server, origin = private
    gateway = make_gateway(allow_private_urls=True)  # the origin is on loopback
    before = origin.hits
    error = _edit(gateway, f"http://127.0.0.1:{server.port}/to?u={target}")
    assert error["code"] == "url_refused" and "malformed host" in error["message"]
    assert origin.hits == before + 1
    _nothing_upstream(sandbox)


@pytest.mark.parametrize("value", [v for v, code in MALFORMED if code == "path_refused"])
def test_the_cli_leaves_a_malformed_file_url_to_the_gateway(tmp_path: Path, gateway: Any,
                                                           sandbox: Any, value: str) -> None:
    """`clawrouter edit` and the MCP `edit_image` tool make paths absolute (`source_arg`): a
    file URL they cannot parse goes as it came, for the gateway's one-line refusal."""
    from clawrouter.cli.client import source_arg
    from tests.servers import clawrouter_in_process

    assert source_arg(value) == value
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAWROUTER_", "BLOCKRUN_"))}
    env.update(CLAWROUTER_HOME=str(tmp_path / "cli-home"), CLAWROUTER_OUT=str(tmp_path / "out"),
               CLAWROUTER_URL=gateway.url)
    proc = clawrouter_in_process("edit", value, "x", env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "malformed file URL" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    _nothing_upstream(sandbox)


async def test_url_size_cap(root: Path, public: tuple[HostServer, Origin]) -> None:
    base = f"http://public.example:{public[0].port}"
    policy = make_policy(root)
    for suffix in ("", "?chunked=1"):
        assert len((await resolve(policy, f"{base}/exact/{CAP}{suffix}", **via_dns())).data) == CAP
        await refused(policy, f"{base}/exact/{CAP + 1}{suffix}", "image_too_large", **via_dns())


async def test_oversize_declared_length_is_refused_before_reading(
        root: Path, public: tuple[HostServer, Origin]) -> None:
    server, origin = public
    started = time.monotonic()
    await refused(make_policy(root), f"http://public.example:{server.port}/stream"
                  f"?id=declared&declared={10**9}&interval=0.05", "image_too_large", **via_dns())
    assert time.monotonic() - started < 2.5  # (reading it would take the whole 3 s, and fail)
    assert await asyncio.to_thread(origin.closed["declared"].wait, 5)


async def test_endless_stream_is_cut_at_the_cap(root: Path,
                                                public: tuple[HostServer, Origin]) -> None:
    """No Content-Length, chunked, never ends: only reading at most cap+1 bytes can stop it."""
    server, origin = public
    policy = make_policy(root, total_timeout=10.0)
    started = time.monotonic()
    await refused(policy, f"http://public.example:{server.port}/stream?id=endless",
                  "image_too_large", **via_dns())
    assert time.monotonic() - started < 5
    assert await asyncio.to_thread(origin.closed["endless"].wait, 5)


async def test_total_timeout(root: Path, public: tuple[HostServer, Origin]) -> None:
    server, origin = public
    policy = make_policy(root, total_timeout=0.5)
    for path in ("/slow?s=10", "/stream?id=trickle&interval=0.05"):
        started = time.monotonic()
        error = await refused(policy, f"http://public.example:{server.port}{path}",
                              "url_fetch_failed", **via_dns())
        assert "longer than 0.5 s" in error.message
        assert time.monotonic() - started < 5  # its 0.5 s, not the answer's 10 s (or never)
    assert await asyncio.to_thread(origin.closed["trickle"].wait, 5)


async def test_one_session_serves_many_inputs(root: Path,
                                              public: tuple[HostServer, Origin]) -> None:
    base = f"http://public.example:{public[0].port}"
    async with InputResolver(make_policy(root), **via_dns()) as resolver:
        images = await asyncio.gather(*(resolver.resolve(f"{base}/img/{kind}", param=f"image[{i}]")
                                        for i, kind in enumerate(IMAGES)))
        assert [image.mime for image in images] == [mime for _, mime in IMAGES.values()]
        with pytest.raises(InvalidRequest):
            await resolver.resolve(f"{base}/status/404", param="mask")
        assert (await resolver.resolve(f"{base}/img/png", param="mask")).data == PNG


async def test_big_files_and_urls_are_sized_before_they_are_read(
        tree: dict[str, Path], public: tuple[HostServer, Origin]) -> None:
    """`open` judges a big file or URL without reading it and says what reading it will hold
    (the gateway waits for that much room first): a file's size, a declared length, else the
    cap. Small ones are read at once; an unread response is closed."""
    from clawrouter.inputs import Pending
    from clawrouter.inputs.resolver import READ_AT_ONCE

    root = tree["granted"]
    server, origin = public
    base = f"http://public.example:{server.port}"
    cap = 4 * READ_AT_ONCE
    big = padded_png(READ_AT_ONCE + 1)
    (root / "big.png").write_bytes(big)
    async with InputResolver(make_policy(root, max_bytes=cap), **via_dns()) as resolver:
        assert isinstance(await resolver.open("pics/a.png", param="image"), ImageInput)
        assert isinstance(await resolver.open(f"{base}/img/png", param="image"), ImageInput)
        pending = await resolver.open("big.png", param="image")
        assert isinstance(pending, Pending) and pending.size == len(big)
        assert (await pending.read()).data == big
        declared = await resolver.open(f"{base}/exact/{READ_AT_ONCE + 1}", param="image")
        assert isinstance(declared, Pending) and declared.size == READ_AT_ONCE + 1
        assert len((await declared.read()).data) == READ_AT_ONCE + 1
        chunked = await resolver.open(f"{base}/exact/100?chunked=1", param="image")
        assert isinstance(chunked, Pending) and chunked.size == cap  # no length: the cap
        assert len((await chunked.read()).data) == 100
        unread = await resolver.open(f"{base}/stream?id=unread&declared={cap}", param="image")
        assert isinstance(unread, Pending) and unread.size == cap
        unread.close()
        assert await asyncio.to_thread(origin.closed["unread"].wait, 5)
        # A file that grew after it was sized is refused, not read past what was counted.
        pending = await resolver.open("big.png", param="image")
        (root / "big.png").write_bytes(big + b"\0" * 10)
        with pytest.raises(InvalidRequest) as grown:
            await pending.read()
        assert grown.value.code == "path_refused" and "changed" in grown.value.message


@pytest.mark.parametrize("shape, forwarded", [
    ("canonical", True), ("wrapped", False), ("unpadded", False), ("urlsafe", False),
    ("other_label", False)])
async def test_a_canonical_data_uri_is_forwarded_as_it_came(tmp_path: Path, shape: str,
                                                          forwarded: bool) -> None:
    data = _png() + bytes([251, 255, 254]) * 50  # bytes whose base64 has '+' and '/' in it
    b = base64.b64encode(data).decode()
    payload = {"canonical": b, "wrapped": "\n".join(b[i:i + 76] for i in range(0, len(b), 76)),
               "unpadded": b.rstrip("="), "other_label": b,
               "urlsafe": b.replace("+", "-").replace("/", "_")}[shape]
    label = "image/gif" if shape == "other_label" else "image/png"
    uri = f"data:{label};base64,{payload}"
    async with InputResolver(make_policy(tmp_path)) as resolver:
        image = await resolver.resolve(uri, param="image")
    assert image.data == data and image.mime == "image/png"
    assert (image.uri == uri) is forwarded
    assert image.data_uri() == "data:image/png;base64," + b
