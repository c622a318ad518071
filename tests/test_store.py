"""The image store: content-addressed files, crash safety, eviction, downloads and serving.

Real files in `tmp_path`, real uvicorn servers (`tests/servers.py`), real clients (httpx,
aiohttp, and http.client where a path must reach the server un-normalised).
"""

from __future__ import annotations

import asyncio
import errno
import gzip
import http.client
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Mount, Route

from clawrouter.store import (
    Deferred,
    DownloadFailed,
    ImageMeta,
    ImageServer,
    ImageStore,
    StoredImage,
)
from clawrouter.inputs.addresses import is_public_address
from clawrouter.store.download import DownloadRefused, download
from clawrouter.store.files import content_id
from clawrouter.store.sources import ResultSources
from tests.servers import ServerThread, free_port, serving

T = TypeVar("T")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff\xe0"
NOT_FOUND = {"error": {"message": "Image not found", "type": "invalid_request_error",
                       "param": None, "code": "not_found"}}
META = ImageMeta(model="openai/gpt-image-1", prompt="a lobster", size="1024x1024",
                 cost_micro=42_000, request_id="req_1", source="b64")


def png(size: int = 1000, seed: int = 0) -> bytes:
    """Distinct PNG-signed bytes (the store sniffs signatures, it does not decode)."""
    body = (seed.to_bytes(4, "big") + os.urandom(16)) * (size // 20 + 1)
    return PNG_MAGIC + body[: size - len(PNG_MAGIC)]


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def on_loop(server: ServerThread, coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on the server's event loop (where its store lives)."""
    assert server.loop is not None
    return asyncio.run_coroutine_threadsafe(coro, server.loop).result(10)


async def put_all(root: Path, *images: bytes, **options: Any) -> list[StoredImage]:
    async with ImageStore(root, **options) as store:
        return [await store.put_bytes(data, META) for data in images]


def rows(root: Path) -> list[tuple[Any, ...]]:
    with sqlite3.connect(root / "index.sqlite3") as db:
        return db.execute("SELECT id, ext, bytes, source FROM images ORDER BY id").fetchall()


def image_app(store: ImageStore) -> Starlette:
    """What the gateway does: open/start/close the store in the lifespan, mount the server."""
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await store.open()
        await store.start()
        try:
            yield
        finally:
            await store.aclose()

    server = ImageServer(store)
    # /raw mounts the same endpoint under a prefix, so that any path reaches our code.
    return Starlette(routes=[Route("/images/{name}", server), Mount("/raw", app=server)],
                     lifespan=lifespan)


@contextmanager
def serving_store(root: Path, **options: Any) -> Iterator[tuple[ServerThread, ImageStore]]:
    store = ImageStore(root, **options)
    with serving(image_app(store)) as server:
        yield server, store


# --- storing ------------------------------------------------------------------------------------
def test_dedupe_keeps_one_file_one_row_and_the_first_metadata(tmp_path: Path) -> None:
    data = png(5000)

    async def scenario() -> tuple[StoredImage, StoredImage, list[dict[str, Any]]]:
        async with ImageStore(tmp_path) as store:
            first = await store.put_bytes(data, META)
            second = await store.put_bytes(data, ImageMeta(model="other", source="data-uri"))
            big = png(300_000, 1)  # hashed in a thread: concurrent puts really interleave
            racing = await asyncio.gather(*(store.put_bytes(big, META) for _ in range(5)))
            assert len(set(racing)) == 1
            await store.prune()  # nothing to evict, but it must not disturb the dedupe
            return first, second, [r for r in await store.ls() if r["bytes"] == 5000]

    first, second, listed = run(scenario())
    assert first == second
    assert first.id == content_id(data) and len(first.id) == 32
    assert first.name == f"{first.id}.png" and first.content_type == "image/png"
    assert first.path.read_bytes() == data
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".png"]) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert (first.id, "png", 5000, "b64") in rows(tmp_path) and len(rows(tmp_path)) == 2
    [row] = listed
    assert (row["model"], row["prompt"], row["size"], row["cost_micro"], row["request_id"]) == (
        "openai/gpt-image-1", "a lobster", "1024x1024", 42_000, "req_1")
    assert row["last_served"] is not None  # the dedupe put counts as a use


def test_put_refuses_non_images_and_names_by_sniffed_type(tmp_path: Path) -> None:
    async def scenario() -> StoredImage:
        async with ImageStore(tmp_path) as store:
            with pytest.raises(ValueError):
                await store.put_bytes(b"<svg xmlns='http://www.w3.org/2000/svg'/>", META)
            return await store.put_bytes(JPEG_MAGIC + b"x" * 100, META)

    assert run(scenario()).name.endswith(".jpg")
    assert [r[1] for r in rows(tmp_path)] == ["jpg"]


def test_crash_leftovers_are_cleaned_recovered_or_dropped_at_open(tmp_path: Path) -> None:
    kept, recovered, truncated = png(3000, 1), png(3000, 2), png(3000, 3)
    [kept_image] = run(put_all(tmp_path, kept))
    # A crash mid-write leaves a hidden temporary file (old: from a previous run) ...
    stale = tmp_path / f".{content_id(truncated)}.png.k3j9x_.tmp"
    stale.write_bytes(truncated[:1000])
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    # ... a young one may be another process's write in progress: left alone, never served.
    young = tmp_path / f".{content_id(truncated)}.png.a8d2q1.tmp"
    young.write_bytes(truncated[:500])
    # A crash after the rename but before the commit: a complete file without a row.
    (tmp_path / f"{content_id(recovered)}.png").write_bytes(recovered)
    # A file under an image name whose bytes do not match it (half-written by hand, corrupt).
    half = tmp_path / f"{content_id(truncated)}.png"
    half.write_bytes(truncated[:1500])
    # A row whose file has the wrong size.
    sick = run(put_all(tmp_path, png(2000, 4)))[0]
    sick.path.write_bytes(sick.path.read_bytes()[:100])

    async def reopen() -> tuple[list[str], list[str | None], Any]:
        async with ImageStore(tmp_path) as store:
            names = [r["name"] for r in await store.ls()]
            found = [store.get(n) for n in (kept_image.name, half.name, sick.name, young.name)]
            got = [image.name if image else None for image in found]
            return names, got, await store.stats()

    names, got, stats = run(reopen())
    assert sorted(names) == sorted([kept_image.name, f"{content_id(recovered)}.png"])
    assert got == [kept_image.name, None, None, None]
    assert stats["count"] == 2 and stats["bytes"] == 6000
    assert not stale.exists() and not half.exists() and not sick.path.exists()
    assert young.exists()
    sources = {r[0]: r[3] for r in rows(tmp_path)}
    assert sources == {kept_image.id: "b64", content_id(recovered): "recovered"}

    with serving_store(tmp_path) as (server, _):
        for name in (young.name, half.name, stale.name, sick.name):
            r = httpx.get(f"{server.url}/raw/{name}")
            assert r.status_code == 404 and r.json() == NOT_FOUND
        assert httpx.get(f"{server.url}/images/{content_id(recovered)}.png").content == recovered


def test_temporary_files_a_crash_left_are_swept_in_the_background_once_stale(
        tmp_path: Path) -> None:
    """A restart within `temp_grace` of a crash spares its temporary files at open (they may
    be another process's write in progress); the periodic prune removes them once they are
    older, rather than the next start, and still spares young ones."""
    [image] = run(put_all(tmp_path, png(3000, 1)))
    crashed = tmp_path / f".{content_id(png(3000, 2))}.png.k3j9x_.tmp"
    crashed.write_bytes(png(3000, 2)[:2000])
    young = tmp_path / f".{content_id(png(3000, 3))}.png.a8d2q1.tmp"

    async def scenario() -> bool:
        async with ImageStore(tmp_path, temp_grace=60, flush_interval=0.02,
                              prune_interval=0) as store:
            kept_at_open = crashed.exists()
            young.write_bytes(png(3000, 3)[:500])
            os.utime(crashed, (time.time() - 120, time.time() - 120))  # the grace is over
            await store.start()
            for _ in range(500):
                if not crashed.exists():
                    break
                await asyncio.sleep(0.02)
            return kept_at_open

    assert run(scenario())
    assert not crashed.exists() and young.exists() and image.path.exists()


def test_a_file_without_a_row_is_deleted_only_if_its_bytes_are_wrong(tmp_path: Path,
                                                                     monkeypatch) -> None:
    """At open, a file that cannot be read now (too many open files, a permission) may be an
    image someone paid for: it is left for the next start, never deleted as corrupt; and one
    that another process (a gateway sharing the store) removes meanwhile is no error."""
    import errno

    unreadable, vanishing = png(1000, 1), png(1000, 2)
    paths = [tmp_path / f"{content_id(data)}.png" for data in (unreadable, vanishing)]
    for path, data in zip(paths, (unreadable, vanishing)):
        path.write_bytes(data)
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self == paths[0]:
            raise OSError(errno.EMFILE, "Too many open files")
        if self == paths[1]:
            self.unlink()  # evicted by the other gateway just now
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)

    async def reopen() -> list[str]:
        async with ImageStore(tmp_path) as store:
            return [r["name"] for r in await store.ls()]

    assert run(reopen()) == []
    assert paths[0].exists()  # still there, for the next start
    monkeypatch.setattr(Path, "read_bytes", real)
    assert run(reopen()) == [paths[0].name]  # readable again: recovered


def test_a_damaged_index_is_moved_aside_and_rebuilt_from_the_files(tmp_path: Path) -> None:
    """The images are files named by their hash: a damaged index (a disk error, a bad copy)
    loses their prompts, never the images, and never stops the gateway from starting."""
    images = run(put_all(tmp_path, png(1000, 1), png(1000, 2)))
    index = next(tmp_path.glob("*.sqlite3"))
    index.write_bytes(b"not a database, " * 100)

    async def reopen() -> list[dict]:
        async with ImageStore(tmp_path) as store:
            return await store.ls()

    listed = run(reopen())
    assert sorted(r["name"] for r in listed) == sorted(i.name for i in images)
    assert {r["source"] for r in listed} == {"recovered"}
    (aside,) = tmp_path.glob(f"{index.name}.damaged-*")
    assert aside.read_bytes().startswith(b"not a database")


def test_an_index_another_gateway_just_rebuilt_is_not_moved_aside(tmp_path: Path,
                                                                   monkeypatch) -> None:
    """Two gateways (another network's) share a store and find its index damaged: the first
    moves it aside and makes a new one; the second must open that one, not move it too."""
    from clawrouter.store.db import MetadataDB

    index = tmp_path / "index.sqlite3"
    index.write_bytes(b"not a database, " * 100)
    real, calls = MetadataDB._connect, []

    def connect(self: MetadataDB) -> sqlite3.Connection:
        calls.append(1)
        if len(calls) == 1:  # meanwhile, the other gateway moves it aside and starts anew
            index.rename(tmp_path / "theirs.damaged")
            real(self).close()
            damaged = sqlite3.DatabaseError("file is not a database")
            damaged.sqlite_errorname = "SQLITE_NOTADB"
            raise damaged
        return real(self)

    monkeypatch.setattr(MetadataDB, "_connect", connect)
    db = MetadataDB(index)
    db.open()
    db.close()
    assert not list(tmp_path.glob("index.sqlite3.damaged-*"))
    assert (tmp_path / "theirs.damaged").read_bytes().startswith(b"not a database")


def test_damage_past_the_index_header_is_found_at_open_too(tmp_path: Path) -> None:
    """A damaged page deep in the index opens fine and fails only when read: the store checks
    every page at open, so the gateway starts (rebuilt from the files) instead of failing."""
    images = run(put_all(tmp_path, *(png(1000, i) for i in range(60))))
    index = next(tmp_path.glob("*.sqlite3"))
    with sqlite3.connect(index) as conn:  # fold the WAL in: every row in the main file
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(index.read_bytes())
    page = 4096
    assert len(data) > 2 * page
    data[page + 100:2 * page] = b"\xff" * (page - 100)  # the second page: the table's
    index.write_bytes(bytes(data))

    async def reopen() -> list[dict]:
        async with ImageStore(tmp_path) as store:
            return await store.ls(limit=100)

    listed = run(reopen())
    assert sorted(r["name"] for r in listed) == sorted(i.name for i in images)
    moved = [p for p in tmp_path.glob(f"{index.name}.damaged-*")
             if not p.name.endswith(("-wal", "-shm"))]
    assert len(moved) == 1


def test_a_row_whose_file_vanished_is_dropped_at_open(tmp_path: Path) -> None:
    gone, stays = run(put_all(tmp_path, png(1000, 1), png(1000, 2)))
    gone.path.unlink()

    async def reopen() -> tuple[StoredImage | None, list[str]]:
        async with ImageStore(tmp_path) as store:
            return store.get(gone.name), [r["name"] for r in await store.ls()]

    assert run(reopen()) == (None, [stays.name])
    assert [r[0] for r in rows(tmp_path)] == [stays.id]


def test_ls_is_newest_first_with_paging(tmp_path: Path) -> None:
    images = run(put_all(tmp_path, *(png(500, i) for i in range(5))))

    async def listing() -> tuple[list[str], list[str]]:
        async with ImageStore(tmp_path) as store:
            return ([r["name"] for r in await store.ls(limit=2)],
                    [r["name"] for r in await store.ls(limit=10, offset=3)])

    newest = [i.name for i in reversed(images)]
    assert run(listing()) == (newest[:2], newest[3:])


# --- eviction -----------------------------------------------------------------------------------
def test_prune_evicts_images_idle_past_the_ttl(tmp_path: Path) -> None:
    old, new = run(put_all(tmp_path, png(1000, 1), png(1000, 2)))
    with sqlite3.connect(tmp_path / "index.sqlite3") as db:
        db.execute("UPDATE images SET created = ? WHERE id = ?", (time.time() - 31 * 86400, old.id))

    async def prune() -> tuple[list[str], list[str]]:
        async with ImageStore(tmp_path, ttl_days=30) as store:
            return await store.prune(), [r["name"] for r in await store.ls()]

    assert run(prune()) == ([old.name], [new.name])
    assert not old.path.exists() and new.path.exists()


def test_prune_under_a_size_cap_evicts_the_least_recently_served(tmp_path: Path) -> None:
    a, b, c = run(put_all(tmp_path, png(100_000, 1), png(100_000, 2), png(100_000, 3)))
    with serving_store(tmp_path, max_bytes=250_000) as (server, store):
        assert httpx.get(f"{server.url}/images/{a.name}").status_code == 200  # a: most recent
        assert on_loop(server, store.prune()) == [b.name]
        assert httpx.get(f"{server.url}/images/{a.name}").status_code == 200
        assert httpx.get(f"{server.url}/images/{c.name}").status_code == 200
        assert httpx.get(f"{server.url}/images/{b.name}").json() == NOT_FOUND
    assert not b.path.exists() and a.path.exists() and c.path.exists()
    assert sorted(r[0] for r in rows(tmp_path)) == sorted([a.id, c.id])


def test_background_eviction_runs_when_a_put_passes_the_cap(tmp_path: Path) -> None:
    async def scenario() -> tuple[dict[str, Any], bool]:
        async with ImageStore(tmp_path, max_bytes=25_000, fresh_seconds=0) as store:
            await store.start()
            first = await store.put_bytes(png(10_000, 1), META)
            for i in range(2, 5):
                await store.put_bytes(png(10_000, i), META)
            for _ in range(100):  # the index shrinks first, then the files go
                if (await store.stats())["bytes"] <= 25_000 and not first.path.exists():
                    break
                await asyncio.sleep(0.02)
            return await store.stats(), first.path.exists()

    stats, first_exists = run(scenario())
    assert stats["count"] == 2 and stats["bytes"] == 20_000 and not first_exists


# --- serving ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, StoredImage, bytes]]:
    root = tmp_path_factory.mktemp("images")
    data = png(200_000, 7)
    [image] = run(put_all(root, data))
    (root.parent / "secret.txt").write_text("TOP SECRET")
    with serving_store(root) as (server, _):
        yield server.url, image, data


def test_get_serves_the_bytes_with_caching_headers(served: tuple[str, StoredImage, bytes]) -> None:
    url, image, data = served
    r = httpx.get(f"{url}/images/{image.name}")
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-type"] == "image/png"
    assert r.headers["content-length"] == str(len(data))
    assert r.headers["etag"] == f'"{image.id}"'
    assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert r.headers["accept-ranges"] == "bytes"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "last-modified" in r.headers
    bare = httpx.get(f"{url}/images/{image.id}")  # one URL per image: the canonical one
    assert bare.status_code == 308 and bare.headers["location"] == image.name


def test_if_none_match_and_if_modified_since_give_304(
        served: tuple[str, StoredImage, bytes]) -> None:
    url, image, _ = served
    for tag in (f'"{image.id}"', f'W/"{image.id}"', f'"nope", "{image.id}"', "*"):
        r = httpx.get(f"{url}/images/{image.name}", headers={"If-None-Match": tag})
        assert r.status_code == 304 and r.content == b"", tag
        assert r.headers["etag"] == f'"{image.id}"'
        assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
    other = httpx.get(f"{url}/images/{image.name}", headers={"If-None-Match": '"other"'})
    assert other.status_code == 200
    split = httpx.get(f"{url}/images/{image.name}",  # one list over two header lines
                      headers=[("If-None-Match", f'"{image.id}"'), ("If-None-Match", '"other"')])
    assert split.status_code == 304
    last_modified = other.headers["last-modified"]
    r = httpx.get(f"{url}/images/{image.name}", headers={"If-Modified-Since": last_modified})
    assert r.status_code == 304
    for bad in ("yesterday", "Mon, 01 Jan 10000000000000000000000 00:00:00 GMT",
                "Mon, 99 Jan 2026 00:00:00 GMT"):  # not a date: served as if absent
        r = httpx.get(f"{url}/images/{image.name}", headers={"If-Modified-Since": bad})
        assert r.status_code == 200 and r.content, bad


def test_head_has_the_same_headers_and_no_body(served: tuple[str, StoredImage, bytes]) -> None:
    url, image, data = served
    get = httpx.get(f"{url}/images/{image.name}")
    head = httpx.head(f"{url}/images/{image.name}")
    assert head.status_code == 200 and head.content == b""
    for header in ("content-type", "content-length", "etag", "cache-control", "accept-ranges",
                   "x-content-type-options", "last-modified"):
        assert head.headers[header] == get.headers[header], header
    # Range is defined for GET only: a HEAD with one is answered as a HEAD (RFC 9110 §14.2)
    ranged = httpx.head(f"{url}/images/{image.name}", headers={"Range": "bytes=0-9"})
    assert ranged.status_code == 200 and ranged.headers["content-length"] == str(len(data))


def test_ranges(served: tuple[str, StoredImage, bytes]) -> None:
    url, image, data = served
    size = len(data)

    def get(value: str, **headers: str) -> httpx.Response:
        return httpx.get(f"{url}/images/{image.name}", headers={"Range": value, **headers})

    r = get("bytes=0-99")
    assert r.status_code == 206 and r.content == data[:100]
    assert r.headers["content-range"] == f"bytes 0-99/{size}"
    assert r.headers["content-length"] == "100"
    r = get("bytes=-500")
    assert r.status_code == 206 and r.content == data[-500:]
    assert r.headers["content-range"] == f"bytes {size - 500}-{size - 1}/{size}"
    r = get(f"bytes={size - 10}-")
    assert r.status_code == 206 and r.content == data[-10:]
    r = get(f"bytes=100-{size * 2}")  # the end is clamped
    assert r.status_code == 206 and r.content == data[100:]
    long = "9" * 5000  # more digits than int() takes (not a 500): past any real offset
    for whole in (f"bytes=0-{long}", f"bytes=-{long}", f"bytes=00-{'0' * 30}{size - 1}"):
        r = get(whole)
        assert r.status_code == 206 and r.content == data, whole[:40]
        assert r.headers["content-range"] == f"bytes 0-{size - 1}/{size}"
    for unsatisfiable in (f"bytes={size}-", f"bytes={size + 5}-{size + 9}", "bytes=-0",
                          f"bytes={long}-"):
        r = get(unsatisfiable)
        assert r.status_code == 416, unsatisfiable[:40]
        assert r.headers["content-range"] == f"bytes */{size}"
        assert r.json()["error"]["code"] == "range_not_satisfiable"
    for ignored in ("bytes=0-1,5-6", "items=0-1", "bytes=9-2", "bytes=x-y", f"bytes={long}-1"):
        r = get(ignored)
        assert r.status_code == 200 and r.content == data, ignored[:40]
    twice = httpx.get(f"{url}/images/{image.name}",
                      headers=[("Range", "bytes=0-9"), ("Range", "bytes=10-19")])
    assert twice.status_code == 200 and twice.content == data  # ambiguous: ignored
    assert get("bytes=0-9", **{"If-Range": f'"{image.id}"'}).status_code == 206
    assert get("bytes=0-9", **{"If-Range": '"stale"'}).status_code == 200


def test_content_type_comes_from_the_bytes_not_the_url(
        served: tuple[str, StoredImage, bytes]) -> None:
    url, image, data = served
    r = httpx.get(f"{url}/images/{image.id}.jpg")
    assert r.status_code == 308 and r.headers["location"] == image.name
    r = httpx.get(f"{url}/images/{image.id}.jpg", follow_redirects=True)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert str(r.url).endswith(f"/images/{image.name}") and r.content == data


def test_other_methods_are_405(served: tuple[str, StoredImage, bytes]) -> None:
    url, image, _ = served
    r = httpx.post(f"{url}/images/{image.name}")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD"
    assert r.json()["error"]["code"] == "method_not_allowed"


def test_unknown_and_malformed_names_are_404_and_never_leave_the_store(
        served: tuple[str, StoredImage, bytes]) -> None:
    url, image, _ = served
    root = image.path.parent
    stray = png(800, 99)  # a real image, well named, placed by hand: not in the index
    (root / f"{content_id(stray)}.png").write_bytes(stray)
    names = [
        "0" * 32 + ".png",  # unknown id
        image.id.upper() + ".png",
        image.id + "0.png",  # too long
        image.id[:-1] + ".png",  # too short
        image.name + "%0a",  # trailing newline
        image.id + ".PNG",
        image.id + ".p",
        "%2e%2e%2f%2e%2e%2fsecret.txt",
        "..%2f..%2fsecret.txt",
        "%2e%2e%2fimages%2findex.sqlite3",
        "index.sqlite3",
        f"{content_id(stray)}.png",
        "",
    ]
    for name in names:
        for prefix in ("/images/", "/raw/"):
            r = httpx.get(f"{url}{prefix}{name}")
            assert r.status_code == 404, (prefix, name)
            assert b"TOP SECRET" not in r.content and b"SQLite" not in r.content
            if prefix == "/raw/":  # reaches ImageServer whatever the path
                assert r.headers["content-type"] == "application/json"
                assert r.json() == NOT_FOUND, name
    # Dot segments sent as-is (httpx would normalise them away).
    host, port = url.removeprefix("http://").split(":")
    for path in ("/raw/../../secret.txt", "/raw/../secret.txt", f"/raw/{image.name}/..",
                 "/raw/./" + image.name, "/images/../../secret.txt"):
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        conn.close()
        assert response.status == 404, path
        assert b"TOP SECRET" not in body
        if path.startswith("/raw/"):
            assert json.loads(body) == NOT_FOUND, path


def test_a_duplicate_of_an_image_deleted_behind_the_stores_back_is_stored_again(
        tmp_path: Path) -> None:
    """The same bytes again reuse the stored image, unless its file went (deleted by hand,
    or by another process): then it is written again, never a URL to nothing."""
    data = png(1000, 7)

    async def main() -> tuple[bool, bool, list[dict[str, Any]]]:
        async with ImageStore(tmp_path) as store:
            first = await store.put_bytes(data, META)
            first.path.unlink()
            again = await store.put_bytes(data, META)
            rows = [r for r in await store.ls() if r["id"] == first.id]
            return again.path.exists(), again.path.read_bytes() == data, rows

    exists, same, rows = run(main())
    assert exists and same and len(rows) == 1
    # its old row stays: it counts as just used, or eviction would take it first
    assert rows[0]["last_served"] is not None


def test_open_beside_a_writer_keeps_what_it_stores_meanwhile(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening reads the rows and lists the files; an image another process stores between
    the two must keep its row (it was dropped as 'a row without a file' when the files were
    listed first)."""
    from clawrouter.store import files as store_files
    from clawrouter.store.db import MetadataDB

    run(put_all(tmp_path, png(1000, 1)))
    late = png(1000, 2)
    written: list[bool] = []

    def store_meanwhile() -> None:  # the other process's put, file then row
        if written:
            return
        written.append(True)
        run(put_all(tmp_path, late))

    real_scan, real_rows = store_files.scan, MetadataDB.index_rows

    def scan(*args: Any, **kwargs: Any) -> Any:
        found = real_scan(*args, **kwargs)
        store_meanwhile()
        return found

    def index_rows(self: MetadataDB) -> Any:
        rows = real_rows(self)
        store_meanwhile()
        return rows

    monkeypatch.setattr(store_files, "scan", scan)
    monkeypatch.setattr(MetadataDB, "index_rows", index_rows)

    async def main() -> list[dict[str, Any]]:
        async with ImageStore(tmp_path) as store:
            return await store.ls()

    rows = {r["id"]: r for r in run(main())}
    assert written and content_id(late) in rows
    assert rows[content_id(late)]["prompt"] == META.prompt  # its own row, not a recovered one


@pytest.mark.parametrize("error, raises", [(errno.EIO, True), (errno.EINVAL, False)])
def test_a_failed_directory_sync_is_an_error_unless_unsupported(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int, raises: bool) -> None:
    from clawrouter.store import files as store_files

    def fsync(fd: int) -> None:
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(store_files.os, "fsync", fsync)
    if raises:
        with pytest.raises(OSError):
            store_files.fsync_dir(tmp_path)
    else:
        store_files.fsync_dir(tmp_path)


def test_a_file_deleted_behind_the_stores_back_is_404(tmp_path: Path) -> None:
    [image] = run(put_all(tmp_path, png(1000, 1)))
    with serving_store(tmp_path) as (server, _):
        image.path.unlink()  # not cached yet: the server reads the disk and finds nothing
        assert httpx.get(f"{server.url}/images/{image.name}").json() == NOT_FOUND


def test_images_too_big_for_the_cache_are_streamed(tmp_path: Path) -> None:
    data = png(600_000, 5)
    [image] = run(put_all(tmp_path, data))
    with serving_store(tmp_path, cache_bytes=1_000_000) as (server, store):
        r = httpx.get(f"{server.url}/images/{image.name}")
        assert r.status_code == 200 and r.content == data
        r = httpx.get(f"{server.url}/images/{image.name}", headers={"Range": "bytes=300000-"})
        assert r.status_code == 206 and r.content == data[300000:]
        assert store.cache.used == 0


# --- downloads ----------------------------------------------------------------------------------
BOMB = gzip.compress(PNG_MAGIC + b"\0" * 20_000_000)

class Upstream:
    """A result host: serves an image, oversized bodies, a non-image, and a flaky URL."""

    def __init__(self) -> None:
        self.image = png(4000, 42)
        self.healthy = False
        self.hits = 0
        self.hits_elsewhere = 0  # requests that named another host than 127.0.0.1

    def app(self) -> Starlette:
        async def ok(request: Request) -> Response:
            if not request.headers.get("host", "").startswith("127.0.0.1:"):
                self.hits_elsewhere += 1
            return Response(self.image, media_type="application/octet-stream")

        async def redirect(request: Request) -> Response:
            return Response(status_code=302, headers={"location": request.query_params["to"]})

        async def big(request: Request) -> Response:
            return Response(PNG_MAGIC + b"\0" * 2_000_000, media_type="image/png")

        async def endless(request: Request) -> StreamingResponse:
            async def chunks() -> AsyncIterator[bytes]:
                yield PNG_MAGIC
                for _ in range(10_000):  # no Content-Length: the cap must stop the reading
                    yield b"\0" * 65536
            return StreamingResponse(chunks(), media_type="image/png")

        async def text(request: Request) -> Response:
            return Response("<html>not an image</html>", media_type="image/png")

        async def bomb(request: Request) -> Response:  # 20 KB on the wire, 20 MB inflated
            return Response(BOMB, media_type="image/png", headers={"content-encoding": "gzip"})

        async def flaky(request: Request) -> Response:
            self.hits += 1
            if not self.healthy:
                return Response("upstream hiccup", status_code=500)
            return Response(self.image, media_type="image/png")

        return Starlette(routes=[Route("/ok.png", ok), Route("/redirect", redirect),
                                 Route("/big", big),
                                 Route("/endless", endless), Route("/text", text),
                                 Route("/flaky", flaky), Route("/bomb", bomb)])


@pytest.fixture
def upstream() -> Iterator[tuple[str, Upstream]]:
    host = Upstream()
    with serving(host.app()) as server:
        yield server.url, host


def test_fetch_and_put_stores_checks_and_caps(tmp_path: Path,
                                              upstream: tuple[str, Upstream]) -> None:
    base, host = upstream

    async def scenario() -> tuple[StoredImage, list[str], list[dict[str, Any]]]:
        errors = []
        async with ImageStore(tmp_path, download_max_bytes=1_000_000) as store, \
                aiohttp.ClientSession() as session:
            image = await store.fetch_and_put(f"{base}/ok.png", ImageMeta(model="m"), session)
            for path in ("/big", "/endless", "/text", "/missing", "/flaky", "/bomb"):
                with pytest.raises(DownloadFailed) as failure:
                    await store.fetch_and_put(f"{base}{path}", ImageMeta(), session)
                errors.append(str(failure.value))
            with pytest.raises(DownloadFailed):
                await store.fetch_and_put("file:///etc/passwd", ImageMeta(), session)
            return image, errors, await store.ls()

    image, errors, listed = run(scenario())
    assert image.path.read_bytes() == host.image and image.content_type == "image/png"
    assert "cap" in errors[0] and "cap" in errors[1] and "not a PNG" in errors[2]
    assert errors[3] == "HTTP 404" and errors[4] == "HTTP 500"
    assert "cap" in errors[5]  # a small Content-Length does not vouch for the inflated size
    assert [(r["name"], r["source"]) for r in listed] == [(image.name, f"{base}/ok.png")]


def test_result_sources_trust_only_the_upstreams_own_host(
        tmp_path: Path, upstream: tuple[str, Upstream]) -> None:
    """Other hosts are reached only at public addresses, whatever form the address takes, and a
    redirect from the upstream's host is judged again; none of it is retried."""
    base, host = upstream
    port = base.rsplit(":", 1)[1]

    async def scenario() -> tuple[bytes, list[str], Any, dict[str, Any]]:
        refused = []
        async with aiohttp.ClientSession() as session, ImageStore(tmp_path) as store:
            sources = ResultSources(is_public_address, upstream=(base + "/api", session))
            try:
                await store.start(sources)
                deferred = await store.put_remote_or_defer(
                    f"http://localhost:{port}/ok.png", META, sources)
                stats = await store.stats()
                data = await download(base + "/ok.png", sources)
                for url in (f"http://localhost:{port}/ok.png", f"http://[::1]:{port}/ok.png",
                            f"http://2130706433:{port}/ok.png", f"http://0x7f.1:{port}/ok.png",
                            f"http://10.0.0.1:{port}/ok.png", f"https://127.0.0.1:{port}/x",
                            f"{base}/redirect?to=http://169.254.169.254/latest/meta-data"):
                    with pytest.raises(DownloadRefused) as caught:
                        await download(url, sources)
                    refused.append(str(caught.value))
            finally:
                await sources.aclose()
        return data, refused, deferred, stats

    data, refused, deferred, stats = run(scenario())
    assert data == host.image and len(refused) == 7, refused
    assert host.hits_elsewhere == 0
    assert isinstance(deferred, Deferred) and deferred.pending_id is None  # not retried
    assert stats["pending_downloads"] == 0 and stats["count"] == 0


def test_a_failed_download_is_deferred_and_retried_in_the_background(
        tmp_path: Path, upstream: tuple[str, Upstream]) -> None:
    base, host = upstream
    url = f"{base}/flaky"

    async def scenario() -> tuple[Any, list[Any], dict[str, Any], list[dict[str, Any]]]:
        async with ImageStore(tmp_path, retry_delays=(0.2, 0.2, 0.2)) as store, \
                aiohttp.ClientSession() as session:
            await store.start(session)  # the result host is on loopback: no address rule here
            result = await store.put_remote_or_defer(url, META, session)
            with sqlite3.connect(tmp_path / "index.sqlite3") as db:
                recorded = db.execute(
                    "SELECT url, last_error, state, request_id FROM pending").fetchall()
            assert (await store.stats())["pending_downloads"] == 1
            host.healthy = True
            for _ in range(150):
                stats = await store.stats()
                if stats["pending_downloads"] == 0 and stats["count"] == 1:
                    break
                await asyncio.sleep(0.02)
            return result, recorded, stats, await store.ls()

    result, recorded, stats, listed = run(scenario())
    assert isinstance(result, Deferred) and result.url == url and result.error == "HTTP 500"
    assert recorded == [(url, "HTTP 500", "pending", "req_1")]
    assert stats["pending_downloads"] == 0 and stats["failed_downloads"] == 0
    [row] = listed
    assert row["source"] == url and row["request_id"] == "req_1"
    assert Path(row["path"]).read_bytes() == host.image


def test_pending_downloads_survive_a_restart_and_give_up_after_the_last_retry(
        tmp_path: Path, upstream: tuple[str, Upstream]) -> None:
    base, host = upstream

    async def defer_then_close() -> Deferred | StoredImage:
        async with ImageStore(tmp_path) as store, aiohttp.ClientSession() as session:
            return await store.put_remote_or_defer(f"{base}/flaky", META, session)

    async def restart(delays: tuple[float, ...]) -> dict[str, Any]:
        with sqlite3.connect(tmp_path / "index.sqlite3") as db:
            db.execute("UPDATE pending SET next_attempt = ?", (time.time(),))  # due now
        async with ImageStore(tmp_path, retry_delays=delays) as store, \
                aiohttp.ClientSession() as session:
            await store.start(session)
            for _ in range(150):
                stats = await store.stats()
                if stats["pending_downloads"] == 0:
                    break
                await asyncio.sleep(0.02)
            return stats

    assert isinstance(run(defer_then_close()), Deferred)
    stats = run(restart(delays=(0.05,)))  # one retry, which fails: gives up
    assert (stats["pending_downloads"], stats["failed_downloads"], stats["count"]) == (0, 1, 0)
    assert host.hits == 2

    assert isinstance(run(defer_then_close()), Deferred)
    host.healthy = True
    stats = run(restart(delays=(60.0,)))  # the restored row is due at once
    assert (stats["pending_downloads"], stats["failed_downloads"], stats["count"]) == (0, 1, 1)


def test_a_retry_that_is_refused_gives_up_at_once(tmp_path: Path,
                                                  upstream: tuple[str, Upstream]) -> None:
    """A deferred download whose retry redirects into the local network is not asked again,
    and a store started without sources reaches public addresses only."""
    base, host = upstream
    away = f"{base}/redirect?to=http://localhost:{base.rsplit(':', 1)[1]}/ok.png"

    async def scenario() -> dict[str, Any]:
        async with aiohttp.ClientSession() as plain, \
                ImageStore(tmp_path, retry_delays=(0.05, 0.05, 0.05)) as store:
            deferred = await store.put_remote_or_defer(f"{base}/flaky", META, plain)
            assert isinstance(deferred, Deferred) and deferred.pending_id is not None
            with sqlite3.connect(tmp_path / "index.sqlite3") as db:
                db.execute("UPDATE pending SET url = ?", (away,))
            await store._pending.load()
            await store.start()  # its own sources: public addresses only
            for _ in range(100):
                stats = await store.stats()
                if stats["pending_downloads"] == 0:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # time for three more retries, were there any
            return stats

    stats = run(scenario())
    assert (stats["pending_downloads"], stats["failed_downloads"], stats["count"]) == (0, 1, 0)
    with sqlite3.connect(tmp_path / "index.sqlite3") as db:
        assert db.execute("SELECT attempts FROM pending").fetchall() == [(2,)]  # not 4
    assert host.hits_elsewhere == 0 and host.hits == 1  # the first attempt only


def test_a_file_that_cannot_be_written_leaves_no_row(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The row is written only after its file: when the file fails (disk full), nothing ever
    indexes a missing file."""
    from clawrouter.store import files

    def no_space(directory: Path, name: str, data: bytes, **options: Any) -> Path:
        raise OSError(28, "No space left on device")

    async def scenario() -> tuple[str, int, list[dict[str, Any]]]:
        async with ImageStore(tmp_path) as store:
            monkeypatch.setattr(files, "write_atomic", no_space)
            with pytest.raises(OSError) as failed:
                await store.put_bytes(png(5000), META)
            monkeypatch.undo()
            return str(failed.value), len(store._index), await store.ls()

    error, indexed, listed = run(scenario())
    assert "No space left" in error
    assert indexed == 0 and listed == [] and rows(tmp_path) == []
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".png"]


def test_concurrent_puts_share_a_commit_and_a_bad_file_fails_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Puts arriving together are written as one batch (files, one directory fsync, one
    transaction); one file that cannot be written fails only its own put."""
    from clawrouter.store import files

    images = [png(3000, i) for i in range(12)]
    doomed = f"{content_id(images[5])}.png"
    write = files.write_atomic
    dir_syncs: list[Path] = []
    fsync_dir = files.fsync_dir

    def fail_one(directory: Path, name: str, data: bytes, **options: Any) -> Path:
        if name == doomed:
            raise OSError(28, "No space left on device")
        return write(directory, name, data, **options)

    def counting_fsync_dir(directory: Path) -> None:
        dir_syncs.append(directory)
        fsync_dir(directory)

    async def scenario() -> list[Any]:
        async with ImageStore(tmp_path) as store:
            monkeypatch.setattr(files, "write_atomic", fail_one)
            monkeypatch.setattr(files, "fsync_dir", counting_fsync_dir)
            return await asyncio.gather(*(store.put_bytes(d, META) for d in images),
                                        return_exceptions=True)

    results = run(scenario())
    failed = [r for r in results if isinstance(r, BaseException)]
    assert [str(e) for e in failed] == ["[Errno 28] No space left on device"]
    assert isinstance(results[5], OSError)
    stored = sorted(r.name for r in results if isinstance(r, StoredImage))
    assert len(stored) == 11 and doomed not in stored
    assert sorted(f"{i}.{e}" for i, e, _, _ in rows(tmp_path)) == stored
    assert sorted(p.name for p in tmp_path.glob("*.png")) == stored
    assert 1 <= len(dir_syncs) < 11  # shared by the batch, not one per file


def test_the_index_costs_little_memory_per_image(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Every stored image stays in the in-memory index until evicted, so its entry must be
    small: a soak that stores tens of thousands of images must not look like a leak."""
    import tracemalloc

    # Memory is measured, not durability: 2,000 files' fsyncs took seconds on a busy disk.
    monkeypatch.setattr(os, "fsync", lambda fd: None)

    # Only what the store's own code allocates, itself or through what it calls (a Path is
    # allocated in pathlib's frames, under the store's): other threads of this test process
    # (servers left by earlier tests, finishing) allocate meanwhile too.
    ours = [tracemalloc.Filter(True, "*/clawrouter/store/*", all_frames=True)]

    def held() -> int:
        return sum(stat.size for stat in
                   tracemalloc.take_snapshot().filter_traces(ours).statistics("filename"))

    async def scenario() -> float:
        async with ImageStore(tmp_path, cache_bytes=0) as store:  # count the index alone
            images = [png(100, i) for i in range(2000)]
            tracemalloc.start(8)  # frames per allocation: enough to reach the store's
            before = held()
            for i in range(0, len(images), 100):
                await asyncio.gather(*(store.put_bytes(d, META) for d in images[i:i + 100]))
            per_image = (held() - before) / len(images)
            tracemalloc.stop()
            return per_image

    assert run(scenario()) < 450  # bytes (~250 here); a pathlib.Path per entry would add ~400


def test_the_header_cache_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Response headers are kept ready for recently made images only: serving many images
    must not grow memory with every image ever served."""
    from clawrouter.store import server as server_module

    async def scenario() -> int:
        async with ImageStore(tmp_path) as store:
            images = [await store.put_bytes(png(100, i), META) for i in range(50)]
            served = ImageServer(store)
            for image in images:
                served._headers_for(image)
            return len(served._headers)

    monkeypatch.setattr(server_module, "_HEADER_CACHE", 10)
    assert run(scenario()) == 10


def test_eviction_goes_below_the_cap_so_it_does_not_run_on_every_put() -> None:
    from clawrouter.store.eviction import choose_victims

    entries = [(f"id{i}", 10_000, 1000.0 + i) for i in range(10)]  # 100 KB, oldest first

    def pick(cap: int) -> list[str]:
        return [v for v, _ in choose_victims(entries, now=2000.0, ttl_seconds=86400,
                                             max_bytes=cap)]

    assert pick(100_000) == []  # at the cap is not over it
    assert pick(95_000) == ["id0", "id1"]  # over: down to 90 % of the cap, oldest first
    assert pick(50_000) == [f"id{i}" for i in range(6)]  # 40 KB <= 45 KB


@pytest.mark.parametrize("url, base, name", [
    ("http://127.0.0.1:8402/images/" + "a" * 32 + ".png", "http://localhost:8402",
     "a" * 32 + ".png"),  # any loopback name for any other
    ("http://[::1]:8402/images/" + "a" * 32, "http://localhost:8402", "a" * 32),
    # another port: a CLI run's own gateway on this data directory (ids are content hashes)
    ("http://localhost:8403/images/" + "a" * 32 + ".png", "http://localhost:8402",
     "a" * 32 + ".png"),
    ("http://127.0.0.1/images/" + "a" * 32, "https://claw.example", "a" * 32),
    ("https://claw.example/base/images/" + "a" * 32 + ".jpg?x=1",
     "https://claw.example:443/base", "a" * 32 + ".jpg"),  # a public_url with a path
    ("https://claw.example/images/" + "a" * 32 + ".jpg", "https://claw.example/base", None),
    ("https://other.example/images/" + "a" * 32 + ".png", "https://claw.example", None),
    ("http://localhost:99999/images/" + "a" * 32, "http://localhost:8402", None),
    ("http://localhost:8402/images/../wallet.key", "http://localhost:8402", None),
    ("file:///images/" + "a" * 32 + ".png", "http://localhost:8402", None),
])
def test_our_image_urls_are_known_again_at_our_origin_or_on_loopback(url: str, base: str,
                                                           name: str | None) -> None:
    from clawrouter.store.links import image_name

    assert image_name(url, base) == name


def test_kept_since_counts_each_requests_stored_and_queued_images(tmp_path: Path) -> None:
    """What a start checks a settled payment's images against (`api.app.undelivered`): the
    images stored and the downloads queued, per request, since a time; none of another
    request, none from before."""
    from dataclasses import replace

    refused = f"http://127.0.0.1:{free_port()}/gone.png"  # nothing listens: deferred

    async def scenario() -> tuple[dict[str, int], dict[str, int]]:
        async with ImageStore(tmp_path) as store, aiohttp.ClientSession() as session:
            await store.put_bytes(png(seed=1), replace(META, request_id="old"))
            since = time.time()
            await store.put_bytes(png(seed=2), replace(META, request_id="two"))
            await store.put_bytes(png(seed=3), replace(META, request_id="two"))
            deferred = await store.put_remote_or_defer(refused, replace(META, request_id="two"),
                                                       session)
            assert isinstance(deferred, Deferred)
            await store.put_bytes(png(seed=4), replace(META, request_id="one"))
            return await store.kept_since(since), await store.kept_since(0)

    recent, every = run(scenario())
    assert recent == {"two": 3, "one": 1}
    assert every == {"two": 3, "one": 1, "old": 1}


def test_undelivered_counts_images_per_request_id_summed_over_its_rows(tmp_path: Path) -> None:
    """What a start counts as cut off before its images were stored (`api.app.undelivered`):
    a settled payment with fewer images kept than it paid for. A client may send the same
    `x-request-id` with every request: one request's stored image must not hide another's
    missing one, so the rows sharing an id are counted together (both then count)."""
    from dataclasses import replace

    from clawrouter.api.app import undelivered
    from clawrouter.payment.ledger import Ledger
    from tests.test_ledger import record

    ledger = Ledger(tmp_path / "ledger.sqlite3")
    since = time.time() - 60

    def settled(request_id: str, n: int = 1, status: str = "settled") -> int:
        payment = record(ledger, request_id=request_id, n=n)
        ledger.commit(ledger.outcome(payment, status))
        return payment

    stored, short, missing, shared_a, shared_b = (
        settled("stored"), settled("short", n=2), settled("missing"), settled("mine"),
        settled("mine"))
    settled("refused", status="rejected")  # not settled: not the store's to account for

    async def scenario() -> dict[int, float]:
        async with ImageStore(tmp_path / "images") as store:
            for seed, request_id in enumerate(("stored", "short", "mine")):
                await store.put_bytes(png(seed=seed), replace(META, request_id=request_id))
            return await undelivered(ledger, store, since)

    try:
        found = run(scenario())
    finally:
        ledger.close()
    assert set(found) == {short, missing, shared_a, shared_b}
    assert stored not in found and all(t >= since for t in found.values())
