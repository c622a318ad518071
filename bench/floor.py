"""The floor: the least a Python gateway that pays and hands back its own URLs can do.

    python bench/floor.py --port P --upstream http://127.0.0.1:S/api   (key in BENCH_FLOOR_KEY)

Starlette + uvicorn (uvloop, httptools) in, one pooled aiohttp session out, our fast signer,
and the gateway's fast parsers for big answers (pydantic-core's JSON, pybase64):
POST the body upstream unpaid, sign the 402's first `exact` requirement, POST it again paid,
then fetch each result (download the URL, or decode the data URI), keep the bytes in a dict and
answer with its own `/images/<key>.png` URL — the same job the gateway does for the client.
Nothing else: no validation, budget, ledger, coalescing, durable store, logs or metrics, and it
signs whatever the upstream asks. It exists only to be measured next to the gateway (the
"floor" side in bench/run.py): the distance between the two is the price of those features.

`--durable DIR` adds the gateway's two durability promises and nothing more, done as cheaply as
we know how (group commit, clawrouter's own `GroupCommit` and `files`): each payment is a row in
a SQLite ledger (WAL, synchronous=FULL) committed before the paid request leaves, and marked
settled afterwards; each image is written under its sha256 name, fsynced, before its URL is
handed out (`bench/ablate.py` measures both variants).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pybase64
import pydantic_core
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clawrouter.groupcommit import GroupCommit, Outcome
from clawrouter.launch import event_loop_factory
from clawrouter.offloop import off_loop
from clawrouter.payment.networks import NETWORKS
from clawrouter.payment.signer import Signer
from clawrouter.payment.wire import SIGNATURE_HEADER, parse_challenge
from clawrouter.store import files

NETWORK = NETWORKS["base-sepolia"]
KEEP = 256  # images kept in memory, oldest dropped first (clients fetch at once)


class Durable:
    """A payment row on disk before the money leaves; an image file on disk before its URL."""

    def __init__(self, home: Path) -> None:
        self.images = home / "images"
        self.images.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(home / "ledger.sqlite3", isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE payments (id INTEGER PRIMARY KEY, nonce TEXT UNIQUE, "
                        "amount INTEGER, status TEXT)")
        self.ledger: GroupCommit[tuple[str, tuple[Any, ...]]] = GroupCommit("ledger", self._rows)
        self.store: GroupCommit[tuple[str, bytes]] = GroupCommit("store", self._files)

    def _rows(self, writes: list[tuple[str, tuple[Any, ...]]]) -> list[Outcome]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            ids = [self.db.execute(sql, args).lastrowid for sql, args in writes]
            self.db.execute("COMMIT")
        except BaseException:  # fail the batch, not every batch after it
            self.db.execute("ROLLBACK")
            raise
        return [(i, None) for i in ids]

    def _files(self, writes: list[tuple[str, bytes]]) -> list[Outcome]:
        for name, data in writes:
            files.write_atomic(self.images, name, data, sync_dir=False)
        files.fsync_dir(self.images)
        return [(None, None)] * len(writes)

    async def signed(self, nonce: str, amount: int) -> int:
        return await self.ledger.write(("INSERT INTO payments (nonce, amount, status) "
                                        "VALUES (?, ?, 'signed')", (nonce, amount)))

    async def settled(self, payment_id: int) -> None:
        await self.ledger.write(("UPDATE payments SET status = 'settled' WHERE id = ?",
                                 (payment_id,)))

    async def image(self, data: bytes) -> str:
        # as the store does: big images are hashed off the event loop
        name = await off_loop(files.content_id, data, size=len(data))
        await self.store.write((f"{name}.png", data))
        return name


def app(upstream: str, base: str, key: str, durable: Durable | None = None) -> Starlette:
    signer = Signer(key)
    images: dict[str, bytes] = {}
    session: aiohttp.ClientSession | None = None

    async def fetch(url: str) -> bytes:
        if url.startswith("data:"):
            return pybase64.b64decode(url[url.index(",") + 1:], validate=True)
        assert session is not None
        async with session.get(url) as resp:
            return await resp.read()

    async def generate(request: Request) -> Response:
        nonlocal session
        if session is None:
            session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
        url = upstream + request.url.path
        body = await request.body()
        headers = {"Content-Type": "application/json"}
        async with session.post(url, data=body, headers=headers) as resp:
            raw = await resp.read()
            if resp.status != 402:
                return Response(raw, resp.status, media_type="application/json")
            challenge = parse_challenge(resp.headers, raw)
        requirement = next(r for r in challenge.requirements if r.scheme == "exact")
        payment = signer.pay(challenge, requirement, NETWORK, url)
        payment_id = await durable.signed(payment.nonce, payment.amount) if durable else 0
        async with session.post(url, data=body,
                                headers={**headers, SIGNATURE_HEADER: payment.header}) as resp:
            raw = await resp.read()
            if resp.status != 200:
                return Response(raw, resp.status, media_type="application/json")
        settled = asyncio.ensure_future(durable.settled(payment_id)) if durable else None
        result = pydantic_core.from_json(raw)
        for item in result["data"]:
            data = await fetch(item["url"])
            name = await durable.image(data) if durable else secrets.token_hex(16)
            images[name] = data
            if len(images) > KEEP:
                del images[next(iter(images))]
            item["url"] = f"{base}/images/{name}.png"
        if settled is not None:
            await settled
        return JSONResponse(result)

    async def image(request: Request) -> Response:
        data = images.get(request.path_params["name"].removesuffix(".png"))
        if data is None:
            return Response(status_code=404)
        return Response(data, media_type="image/png")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[
        Route("/health", health),
        Route("/images/{name}", image),
        Route("/v1/images/generations", generate, methods=["POST"]),
        Route("/v1/images/image2image", generate, methods=["POST"]),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the sandbox's API base (…/api)")
    parser.add_argument("--durable", type=Path, metavar="DIR",
                        help="keep payments and images on disk in DIR (see the docstring)")
    args = parser.parse_args()
    durable = Durable(args.durable) if args.durable else None
    config = uvicorn.Config(app(args.upstream.rstrip("/"), f"http://127.0.0.1:{args.port}",
                                os.environ["BENCH_FLOOR_KEY"], durable),
                            host="127.0.0.1", port=args.port, log_level="warning",
                            http="httptools", access_log=False, lifespan="off")
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(uvicorn.Server(config).serve())


if __name__ == "__main__":
    main()
