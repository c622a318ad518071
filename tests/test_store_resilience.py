"""The image store when its disk lets it down: a paid image still reaches the client in the
format asked, fresh images are not evicted under a tiny cap, concurrent misses share one read,
a deleted image directory is made again, and HEAD, bare ids and file modes are as GET and the
owner expect.

Real gateways and the sandbox upstream (`conftest`), real stores in `tmp_path`. Tests run as
root here, so an unwritable directory is made by putting a file where the directory was (no
mode bits stop root).
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import stat
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from clawrouter.store import ImageMeta, ImageStore
from clawrouter.store import store as store_module
from tests.test_store import META, on_loop, png, serving_store

PNG = b"\x89PNG\r\n\x1a\n"


def generate(gw: Any, **body: Any) -> httpx.Response:
    r = gw.http.post("/v1/images/generations", json={"prompt": "x", **body})
    assert r.status_code == 200, r.text
    return r


def block_the_image_dir(gw: Any) -> Path:
    """The images directory replaced by a file: every write fails (ENOTDIR), even as root,
    and the directory cannot be made again."""
    root = gw.gw.store.root
    shutil.rmtree(root)
    root.write_bytes(b"in the way")
    return root


def stream_events(gw: Any, **body: Any) -> list[str]:
    with httpx.stream("POST", gw.v1 + "/images/generations", timeout=30,
                      json={"prompt": "x", "stream": True, **body}) as r:
        assert r.status_code == 200
        return [line for line in r.read().decode().splitlines() if line.startswith("event:")]


# --- 1. a store failure after the download keeps the bytes -----------------------------------
@pytest.mark.parametrize("model", ["cogview", "gpt-image-1"])  # a URL result, a data URI
@pytest.mark.parametrize("fmt", ["b64_json", "url"])
def test_an_image_that_cannot_be_stored_is_answered_in_the_format_asked(make_gateway, model,
                                                                        fmt):
    gw = make_gateway()
    block_the_image_dir(gw)
    r = generate(gw, model=model, response_format=fmt)
    [item] = r.json()["data"]
    assert r.headers["x-clawrouter-not-stored"] == "1"
    if fmt == "b64_json":
        assert "url" not in item and base64.b64decode(item["b64_json"]).startswith(PNG)
    elif model == "cogview":  # the upstream's own URL works: that is what it would answer
        assert "b64_json" not in item and item["url"].startswith("http://127.0.0.1:")
        assert httpx.get(item["url"]).content.startswith(PNG)
    else:  # no URL anywhere: the bytes, as BlockRun gives them for this model
        assert "b64_json" not in item and item["url"].startswith("data:image/png;base64,")
        assert base64.b64decode(item["url"].partition(",")[2]).startswith(PNG)


@pytest.mark.parametrize("model", ["cogview", "gpt-image-1"])
def test_a_stream_gets_an_image_that_cannot_be_stored(make_gateway, model):
    gw = make_gateway()
    block_the_image_dir(gw)
    assert stream_events(gw, model=model) == ["event: image_generation.completed"]


def test_a_downloaded_image_the_disk_has_no_room_for_is_kept_and_storing_retried(
        make_gateway, monkeypatch):
    """Disk full (a fault in the writer): the bytes are answered, the store tries again."""
    from clawrouter.store import files

    def no_space(*args: Any, **kwargs: Any) -> Path:
        raise OSError(28, "No space left on device")

    gw = make_gateway()
    monkeypatch.setattr(files, "write_atomic", no_space)
    item = generate(gw, model="cogview", response_format="b64_json").json()["data"][0]
    assert base64.b64decode(item["b64_json"]).startswith(PNG)
    assert len(gw.gw.store._pending) == 1  # the existing retry of a failed store stays


# --- 2. fresh images are not evicted ---------------------------------------------------------
def test_an_image_bigger_than_the_cap_is_not_evicted_while_fresh(tmp_path: Path,
                                                                 caplog) -> None:
    async def scenario() -> tuple[list[str], bool, list[str]]:
        async with ImageStore(tmp_path, max_bytes=20_000) as store:
            image = await store.put_bytes(png(25_000, 1), META)
            spared = await store.prune()
            there = image.path.exists()
            store._fresh_seconds = 0.0  # ... and once it is old
            return spared, there, await store.prune()

    spared, there, later = run(scenario())
    assert spared == [] and there
    assert len(later) == 1
    assert "bigger than the store's cap" in caplog.text


def test_a_fresh_url_from_a_gateway_with_a_tiny_cap_can_be_fetched(make_gateway, sandbox):
    sandbox.configure(image_bytes=25_000)
    gw = make_gateway(image_max_gb=0.00002)  # ~21 KB
    url = generate(gw, model="cogview", response_format="url").json()["data"][0]["url"]
    assert on_loop(gw.server, gw.gw.store.prune()) == []
    assert httpx.get(url).status_code == 200


def test_fresh_images_alone_over_the_cap_do_not_wake_a_prune_per_put(tmp_path: Path) -> None:
    """Nothing a prune may take: no wake (each would sort the whole index for nothing); once
    an image is no longer fresh, a put over the cap wakes one again."""
    async def scenario() -> tuple[bool, bool]:
        async with ImageStore(tmp_path, max_bytes=20_000) as store:
            for i in range(3):
                await store.put_bytes(png(10_000, i), META)
            fresh_only = store._wake.is_set()
            store._fresh_seconds = 0.0  # they are old now
            await store.put_bytes(png(10_000, 9), META)
            return fresh_only, store._wake.is_set()

    assert run(scenario()) == (False, True)


def test_eviction_spares_the_ids_it_is_told_to() -> None:
    from clawrouter.store.eviction import choose_victims

    entries = [(f"id{i}", 10_000, 1000.0 + i) for i in range(10)]
    chosen = choose_victims(entries, now=2000.0, ttl_seconds=86400, max_bytes=95_000,
                            spare={"id0"})
    assert [v for v, _ in chosen] == ["id1", "id2"]  # the sizes of the spared still count


# --- 3. one read for concurrent misses -------------------------------------------------------
def test_concurrent_misses_for_one_image_share_one_read(tmp_path: Path, monkeypatch) -> None:
    reads: list[Path] = []
    real = store_module._read_bytes

    def counting(path: Path) -> bytes:
        reads.append(path)
        time.sleep(0.05)  # a read still under way when the others miss
        return real(path)

    async def scenario() -> tuple[int, int, bytes]:
        async with ImageStore(tmp_path) as store:
            data = png(1_900_000, 3)
            image = await store.put_bytes(data, META)
            store.cache.discard(image.id)  # as after a restart
            monkeypatch.setattr(store_module, "_read_bytes", counting)
            leaver = asyncio.ensure_future(store.read(image))
            await asyncio.sleep(0)
            copies = asyncio.gather(*(store.read(image) for _ in range(200)))
            leaver.cancel()  # one reader leaving does not cancel the others' read
            got = await copies
            again = await store.read(image)  # cached now: no read at all
            return len({id(c) for c in got}), int(again is got[0]), got[0]

    distinct, cached, first = run(scenario())
    assert len(reads) == 1 and distinct == 1 and cached == 1 and first.startswith(PNG)


# --- 4. a deleted image directory ------------------------------------------------------------
def test_a_deleted_image_directory_is_made_again_with_its_index(tmp_path: Path) -> None:
    root = tmp_path / "images"
    later = png(3000, 2)

    async def scenario() -> str:
        async with ImageStore(root) as store:
            await store.put_bytes(png(3000, 1), META)
            shutil.rmtree(root)  # `rm -rf images/` on a running gateway
            image = await store.put_bytes(later, ImageMeta(prompt="after", source="b64"))
            assert image.path.read_bytes() == later
            return image.id

    image_id = run(scenario())
    assert stat.S_IMODE(root.stat().st_mode) == 0o700

    async def reopened() -> list[dict[str, Any]]:
        async with ImageStore(root) as store:
            return await store.ls()

    [row] = run(reopened())  # its row was written to the index on disk, not the deleted one
    assert row["id"] == image_id and row["prompt"] == "after" and row["source"] == "b64"


def test_maintenance_notices_a_deleted_directory_without_a_put(tmp_path: Path) -> None:
    root = tmp_path / "images"

    async def scenario() -> bool:
        async with ImageStore(root, flush_interval=0.05) as store:
            await store.start()
            shutil.rmtree(root)
            for _ in range(200):
                if (root / store_module.DB_NAME).exists():
                    return True
                await asyncio.sleep(0.02)
            return False

    assert run(scenario())


def test_an_index_deleted_under_a_running_store_keeps_its_rows(tmp_path: Path) -> None:
    """The connection still holds the deleted index: its rows are written to the new file,
    not lost at the next start (the images they name are still there)."""
    root = tmp_path / "images"

    async def scenario() -> str:
        async with ImageStore(root, flush_interval=0.05) as store:
            await store.start()
            image = await store.put_bytes(png(3000, 1), ImageMeta(prompt="before", source="b64"))
            for part in ("", "-wal", "-shm"):
                (root / (store_module.DB_NAME + part)).unlink(missing_ok=True)
            for _ in range(200):
                if (root / store_module.DB_NAME).exists():
                    break
                await asyncio.sleep(0.02)
            return image.id

    image_id = run(scenario())

    async def reopened() -> list[dict[str, Any]]:
        async with ImageStore(root) as store:
            return await store.ls()

    [row] = run(reopened())
    assert row["id"] == image_id and row["prompt"] == "before"


def test_the_cli_saves_an_image_that_could_not_be_stored_and_shows_no_data_uri(
        tmp_path: Path, make_gateway) -> None:
    """Megabytes of base64 are no address: not printed, nor put in `--json` (an agent's
    context); the file is saved as for any other image."""
    from tests.test_cli_tools import as_json, run as cli

    gw = make_gateway()
    block_the_image_dir(gw)
    done = cli(tmp_path, "generate", "x", "--model", "gpt-image-1", "--json", url=gw.url)
    assert done.returncode == 0, done.stderr
    [image] = as_json(done)["images"]
    assert image["url"] == "" and Path(image["path"]).read_bytes().startswith(PNG)
    text = cli(tmp_path, "generate", "y", "--model", "gpt-image-1", url=gw.url)
    assert text.returncode == 0 and "data:" not in text.stdout and len(text.stdout) < 1000


# --- 5. HEAD, bare ids, modes ----------------------------------------------------------------
def stored_one(root: Path, seed: int) -> Any:
    """One small image put into the store at `root`, the store closed again."""
    async def put() -> Any:
        async with ImageStore(root) as store:
            return await store.put_bytes(png(1000, seed), META)

    return run(put())


def test_head_of_an_image_whose_file_was_deleted_is_404_as_get_is(tmp_path: Path) -> None:
    image = stored_one(tmp_path, 4)
    with serving_store(tmp_path) as (server, _):
        url = f"{server.url}/images/{image.name}"
        assert httpx.head(url).status_code == 200
        image.path.unlink()
        assert httpx.head(url).status_code == 404
        assert httpx.get(url).status_code == 404


def test_a_bare_id_redirects_to_the_one_canonical_url(tmp_path: Path) -> None:
    image = stored_one(tmp_path, 5)
    with serving_store(tmp_path) as (server, _):
        r = httpx.get(f"{server.url}/images/{image.id}")
        assert r.status_code == 308 and r.headers["location"] == image.name
        r = httpx.get(f"{server.url}/images/{image.id}", follow_redirects=True)
        assert r.status_code == 200 and str(r.url).endswith(image.name)


def test_the_store_is_the_owners_only_new_or_made_by_an_older_version(tmp_path: Path) -> None:
    fresh, old = tmp_path / "fresh", tmp_path / "old"
    old.mkdir(mode=0o755)
    old.chmod(0o755)
    (old / store_module.DB_NAME).touch(mode=0o644)
    (old / store_module.DB_NAME).chmod(0o644)

    async def open_close(root: Path) -> None:
        async with ImageStore(root):
            pass

    run(open_close(fresh))
    run(open_close(old))
    for root in (fresh, old):
        assert stat.S_IMODE(root.stat().st_mode) == 0o700, root
        assert stat.S_IMODE((root / store_module.DB_NAME).stat().st_mode) == 0o600, root


def run(coro: Any) -> Any:
    return asyncio.run(coro)
