"""The floor: the least a Python gateway that pays and hands back its own URLs can do.

    python bench/floor.py --port P --upstream http://127.0.0.1:S/api   (key in BENCH_FLOOR_KEY)

Starlette + uvicorn (uvloop, httptools) in, one pooled aiohttp session out, our fast signer:
POST the body upstream unpaid, sign the 402's first `exact` requirement, POST it again paid,
then fetch each result (download the URL, or decode the data URI), keep the bytes in a dict and
answer with its own `/images/<key>.png` URL — the same job the gateway does for the client.
Nothing else: no validation, budget, ledger, coalescing, durable store, logs or metrics, and it
signs whatever the upstream asks. It exists only to be measured next to the gateway (the
"floor" side in bench/run.py): the distance between the two is the price of those features.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import secrets

import aiohttp
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clawrouter.launch import event_loop_factory
from clawrouter.payment.networks import NETWORKS
from clawrouter.payment.signer import Signer
from clawrouter.payment.wire import SIGNATURE_HEADER, parse_challenge

NETWORK = NETWORKS["base-sepolia"]
KEEP = 256  # images kept in memory, oldest dropped first (clients fetch at once)


def app(upstream: str, base: str, key: str) -> Starlette:
    signer = Signer(key)
    images: dict[str, bytes] = {}
    session: aiohttp.ClientSession | None = None

    async def fetch(url: str) -> bytes:
        if url.startswith("data:"):
            return base64.b64decode(url[url.index(",") + 1:])
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
        async with session.post(url, data=body,
                                headers={**headers, SIGNATURE_HEADER: payment.header}) as resp:
            raw = await resp.read()
            if resp.status != 200:
                return Response(raw, resp.status, media_type="application/json")
        result = json.loads(raw)
        for item in result["data"]:
            name = secrets.token_hex(16)
            images[name] = await fetch(item["url"])
            if len(images) > KEEP:
                del images[next(iter(images))]
            item["url"] = f"{base}/images/{name}.png"
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
    args = parser.parse_args()
    config = uvicorn.Config(app(args.upstream.rstrip("/"), f"http://127.0.0.1:{args.port}",
                                os.environ["BENCH_FLOOR_KEY"]),
                            host="127.0.0.1", port=args.port, log_level="warning",
                            http="httptools", access_log=False, lifespan="off")
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(uvicorn.Server(config).serve())


if __name__ == "__main__":
    main()
