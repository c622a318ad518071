"""Result URLs that no retry could fetch are refused (`DownloadRefused`), so they are never retried.

A result URL that redirects to another scheme (`file:`, `gopher:`), to a host no resolver takes,
or round in circles gets the same answer every time: the store used to defer such a download
and ask the original URL again four times over about 36 minutes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from clawrouter.store import ImageStore
from clawrouter.store.download import DownloadRefused, download
from clawrouter.store.records import Deferred, ImageMeta
from clawrouter.store.sources import ResultSources
from tests.servers import ServerThread

META = ImageMeta(model="openai/gpt-image-1", prompt="a lobster", size="1024x1024")


class Redirector:
    """`/to?u=<target>` redirects there; `/loop` redirects to itself. Counts hits."""

    def __init__(self) -> None:
        self.hits = 0

    async def to(self, request: Request) -> Response:
        self.hits += 1
        return Response(status_code=302, headers={"location": request.query_params["u"]})

    async def loop(self, request: Request) -> Response:
        self.hits += 1
        return Response(status_code=302, headers={"location": "/loop"})


@pytest.fixture(scope="module")
def redirector() -> Iterator[tuple[str, Redirector]]:
    origin = Redirector()
    app = Starlette(routes=[Route("/to", origin.to), Route("/loop", origin.loop)])
    server = ServerThread(app).start()
    yield server.url, origin
    server.stop()


#: (path, hops the origin answers before the refusal)
REFUSED = [
    ("/to?u=file:///etc/passwd", 1),
    ("/to?u=gopher://127.0.0.1/x", 1),
    ("/to?u=http://a..b/x.png", 1),  # an empty DNS label: IDNA (getaddrinfo) refuses it
    ("/to?u=http://xn--a/x.png", 1),  # a bad punycode label
    ("/loop", 6),  # the first request and 5 redirects
]


@pytest.mark.parametrize("path, hops", REFUSED)
def test_a_redirect_no_retry_could_follow_is_refused(redirector: tuple[str, Redirector],
                                                     path: str, hops: int) -> None:
    base, origin = redirector

    async def fetch() -> None:
        sources = ResultSources(None)  # any address: only the redirect decides
        try:
            await download(base + path, sources)
        finally:
            await sources.aclose()

    before = origin.hits
    with pytest.raises(DownloadRefused):
        asyncio.run(fetch())
    assert origin.hits == before + hops


@pytest.mark.parametrize("url", ["gopher://127.0.0.1/x.png", "http://xn--a/x.png"])
def test_a_result_url_no_retry_could_fetch_is_refused_before_any_request(url: str) -> None:
    with pytest.raises(DownloadRefused):
        asyncio.run(download(url, ResultSources(None)))  # nothing opened: nothing to close


@pytest.mark.parametrize("path", ["/to?u=file:///etc/passwd", "/loop"])
def test_the_store_never_retries_them(tmp_path: Path, redirector: tuple[str, Redirector],
                                      path: str) -> None:
    """Handed to the client as it came, and not recorded for a background retry."""
    base, _ = redirector

    async def scenario() -> tuple[Any, dict[str, Any]]:
        sources = ResultSources(None)
        try:
            async with ImageStore(tmp_path, retry_delays=(0.05, 0.05)) as store:
                await store.start(sources)
                deferred = await store.put_remote_or_defer(base + path, META, sources)
                return deferred, await store.stats()
        finally:
            await sources.aclose()

    deferred, stats = asyncio.run(scenario())
    assert isinstance(deferred, Deferred) and deferred.url == base + path
    assert deferred.pending_id is None
    assert stats["pending_downloads"] == 0 and stats["count"] == 0
