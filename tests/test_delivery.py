"""Delivery end to end: serving /images/<id> through the gateway, response URLs, SSE streaming
with the real OpenAI SDK, and a paid image that survives a failed download."""

from __future__ import annotations

import base64
import time

import httpx
import openai
import pytest
from openai import OpenAI
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from clawrouter.sandbox.images import make_png
from tests.servers import serving

PNG = b"\x89PNG\r\n\x1a\n"


def generate(gw, **extra):
    r = gw.http.post("/v1/images/generations", json={"model": "cogview", "prompt": "x", **extra})
    assert r.status_code == 200, r.text
    return r


def test_images_are_served_with_cache_headers_etag_head_and_ranges(gateway):
    url = generate(gateway).json()["data"][0]["url"]
    full = httpx.get(url)
    assert full.headers["content-type"] == "image/png"
    assert full.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert full.headers["x-content-type-options"] == "nosniff"
    etag = full.headers["etag"]
    assert httpx.get(url, headers={"if-none-match": etag}).status_code == 304
    head = httpx.head(url)
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(full.content))
    part = httpx.get(url, headers={"range": "bytes=0-7"})
    assert part.status_code == 206 and part.content == PNG
    assert part.headers["content-range"] == f"bytes 0-7/{len(full.content)}"


@pytest.mark.parametrize("path", ["/images/0123", "/images/..%2F..%2Fwallet.key",
                                  "/images/" + "a" * 32 + ".png", "/images/wallet.key"])
def test_unknown_and_malformed_ids_are_404_envelopes(gateway, path):
    r = gateway.http.get(path)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_urls_use_the_loopback_host_the_client_used(gateway):
    port = gateway.server.port
    r = httpx.post(f"http://localhost:{port}/v1/images/generations",
                   json={"model": "cogview", "prompt": "x"})
    assert r.json()["data"][0]["url"].startswith(f"http://localhost:{port}/images/")
    spoofed = httpx.post(gateway.v1 + "/images/generations", headers={"host": "evil.example"},
                         json={"model": "cogview", "prompt": "y"})
    assert spoofed.status_code == 403  # tests/test_browser_guard.py: no other name is served


def test_public_url_setting_wins(make_gateway):
    gw = make_gateway(public_url="https://pics.example.com/", api_key="k")
    gw.http.headers["authorization"] = "Bearer k"
    assert generate(gw).json()["data"][0]["url"].startswith("https://pics.example.com/images/")


def test_with_an_api_key_image_urls_still_work_where_the_key_cannot_go(make_gateway):
    """A browser's `<img>`, a viewer or another program cannot send the key: a returned URL
    is a capability (128 bits of its content's hash), as OpenAI's result URLs are. Everything
    else, the listing of images included, still needs the key."""
    gw = make_gateway(api_key="k")
    assert gw.http.post("/v1/images/generations",
                        json={"model": "cogview", "prompt": "x"}).status_code == 401
    gw.http.headers["authorization"] = "Bearer k"
    url = generate(gw).json()["data"][0]["url"]
    anyone = httpx.Client()
    assert anyone.get(url).status_code == 200 and anyone.head(url).status_code == 200
    name = url.rsplit("/", 1)[1]
    for method, path in [("GET", "/v1/images"), ("GET", "/"), ("POST", f"/images/{name}"),
                         ("GET", f"/images/{name}/x"), ("GET", "/v1/models")]:
        r = anyone.request(method, gw.url + path)
        assert r.status_code == 401, (method, path, r.status_code)


def test_sdk_streaming_generation_yields_one_completed_event_per_image(gateway):
    client = OpenAI(base_url=gateway.v1, api_key="unused")
    events = list(client.images.generate(model="cogview", prompt="stream me", n=2, stream=True))
    assert [e.type for e in events] == ["image_generation.completed"] * 2
    assert all(base64.b64decode(e.b64_json).startswith(PNG) for e in events)
    assert events[0].usage is not None


def test_sdk_streaming_edit(gateway, tmp_path):
    path = tmp_path / "in.png"
    path.write_bytes(make_png(32, 32, 4))
    client = OpenAI(base_url=gateway.v1, api_key="unused")
    with open(path, "rb") as f:
        events = list(client.images.edit(image=f, prompt="edit", model="gpt-image-1",
                                          stream=True))
    assert [e.type for e in events] == ["image_edit.completed"]


def test_streaming_failure_is_an_sdk_error_event(gateway, sandbox):
    sandbox.faults({"kind": "respond", "phase": "paid", "status": 500, "body": {"error": "boom"}})
    client = OpenAI(base_url=gateway.v1, api_key="unused")
    with pytest.raises(openai.APIError, match="payment"):
        list(client.images.generate(model="cogview", prompt="x", stream=True))
    assert sandbox.stats()["payments_count"] == 1


def test_a_bug_in_a_stream_still_ends_it_with_an_error_event(make_gateway, caplog):
    gw = make_gateway()

    async def bug(job, ctx):
        raise RuntimeError("a bug")

    gw.gw.pipeline.run = bug
    client = OpenAI(base_url=gw.v1, api_key="unused", max_retries=0)
    with pytest.raises(openai.APIError, match="Internal error in the gateway") as raised:
        list(client.images.generate(model="cogview", prompt="x", stream=True))
    assert "a bug" not in str(raised.value) and "unhandled error in a stream" in caplog.text


def test_streaming_keeps_the_connection_alive_while_a_slow_job_runs(make_gateway, sandbox,
                                                                    monkeypatch):
    monkeypatch.setattr("clawrouter.api.streaming.KEEPALIVE_SECONDS", 0.2)
    sandbox.configure(slow_seconds=1.0)
    gw = make_gateway()
    with httpx.stream("POST", gw.v1 + "/images/generations", timeout=10,
                      json={"model": "gpt-image-2", "prompt": "slow", "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    assert text.count(": keep-alive") >= 2
    assert "image_generation.completed" in text and text.endswith("data: [DONE]\n\n")


def test_a_failed_result_download_keeps_the_paid_response_and_retries(make_gateway, sandbox):
    gateway = make_gateway(allow_private_urls=True)  # the image host below is on loopback
    image = make_png(48, 48, 9)
    hits = []

    async def flaky(request):
        hits.append(time.monotonic())
        return Response(b"busy", 503) if len(hits) == 1 else Response(image, 200)

    with serving(Starlette(routes=[Route("/r.png", flaky)])) as origin:
        remote = origin.url + "/r.png"
        sandbox.faults({"kind": "respond", "phase": "paid", "status": 200, "settle": True,
                        "body": {"created": 1, "data": [{"url": remote}]}})
        gateway.gw.store._pending._delays = (0.2,)  # retry soon (default: 10 s, 60 s, …)
        r = gateway.http.post("/v1/images/generations", json={"model": "cogview", "prompt": "x"})
        assert r.status_code == 200
        assert r.json()["data"][0]["url"] == remote  # the paid image is reachable meanwhile
        deadline = time.monotonic() + 30
        while not (listed := gateway.http.get("/v1/images").json()["data"]):  # retried, stored
            assert time.monotonic() < deadline, hits
            time.sleep(0.05)
    assert len(hits) == 2 and listed[0]["model"] == "zai/cogview-4"
    assert httpx.get(listed[0]["url"]).content == image


@pytest.mark.parametrize("where", ["other-host", "redirect"])
def test_a_result_url_into_the_local_network_is_never_fetched(make_gateway, sandbox, where):
    """A paid answer (from a compromised or spoofed upstream) names an address on the user's
    network: the gateway hands the URL back as it came and never connects to it, not even
    through a redirect from the upstream's own host."""
    hits = []

    async def internal(request):
        hits.append(request.url.path)
        return Response(make_png(8, 8, 1), 200, media_type="image/png")

    with serving(Starlette(routes=[Route("/admin.png", internal)])) as lan:
        # "localhost", not the upstream's 127.0.0.1: another origin, which resolves to loopback
        remote = lan.url.replace("127.0.0.1", "localhost") + "/admin.png"
        if where == "redirect":
            remote = sandbox.url + "/_sandbox/redirect?to=" + lan.url + "/admin.png"
        gw = make_gateway()
        sandbox.faults({"kind": "respond", "phase": "paid", "status": 200, "settle": True,
                        "body": {"created": 1, "data": [{"url": remote}]}})
        r = gw.http.post("/v1/images/generations", json={"model": "cogview", "prompt": "x"})
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["url"] == remote  # the client still gets what it paid for
        time.sleep(0.3)
        assert hits == []
        assert gw.http.get("/v1/images").json()["data"] == []
        # The same answer with allow_private_urls = true (a LAN the user trusts) is fetched.
        trusting = make_gateway(allow_private_urls=True)
        sandbox.faults({"kind": "respond", "phase": "paid", "status": 200, "settle": True,
                        "body": {"created": 1, "data": [{"url": remote}]}})
        r = trusting.http.post("/v1/images/generations", json={"model": "cogview", "prompt": "x"})
        assert r.json()["data"][0]["url"].startswith(trusting.url + "/images/"), r.text
        assert hits == ["/admin.png"]


@pytest.mark.parametrize("stream", [False, True])
def test_big_b64_answers_are_encoded_off_the_event_loop(gateway, sandbox, monkeypatch, stream):
    """Base64 for megabytes of image takes tens of milliseconds: on the event loop, every other
    client (a `/health` probe, a small request) would wait that long. It runs on a worker
    thread (where no event loop runs), and never goes through `json.dumps` (which would hold
    the interpreter lock throughout): the answer is the JSON it would have been."""
    import asyncio
    import json

    from clawrouter.api import encoding, images, streaming

    threads: list[str] = []

    class Spied(encoding.Base64):
        def __init__(self, image: bytes) -> None:
            try:
                asyncio.get_running_loop()
                threads.append("loop")
            except RuntimeError:
                threads.append("worker")
            super().__init__(image)

    dumped: list[int] = []  # the length of every JSON text json.dumps made
    real_dumps = json.dumps

    def dumps(*args, **kwargs):
        text = real_dumps(*args, **kwargs)
        dumped.append(len(text))
        return text

    monkeypatch.setattr(encoding.json, "dumps", dumps)
    monkeypatch.setattr(images, "Base64", Spied)
    monkeypatch.setattr(streaming, "Base64", Spied)
    sandbox.configure(image_bytes=2_000_000)
    try:
        r = gateway.http.post("/v1/images/generations", json={
            "model": "cogview", "size": "512x512", "prompt": f"big answer {stream}",
            "response_format": "b64_json", "stream": stream})
    finally:
        sandbox.configure(image_bytes=None)
    assert r.status_code == 200, r.text
    assert threads and set(threads) == {"worker"}, threads
    assert dumped and max(dumped) < 10_000, dumped  # the base64 was joined in, not dumped
    text = r.text.split("data: ", 1)[1].split("\n", 1)[0] if stream else r.text
    b64 = json.loads(text)["b64_json" if stream else "data"]
    image = base64.b64decode(b64 if stream else b64[0]["b64_json"])
    assert len(image) > 1_900_000 and image.startswith(b"\x89PNG")


def test_spliced_base64_makes_the_json_it_stands_for():
    """The JSON around a placeholder, with the base64 joined in, is the JSON `json.dumps`
    would have made: whatever the rest of the body says (quotes, the placeholder's shape,
    non-ASCII), and for several images."""
    import json

    from clawrouter.api.encoding import Base64, json_bytes

    images = [bytes(range(256)) * 40, b"", b"\xff" * 3]
    body = {"data": [{"b64_json": Base64(i), "revised_prompt": 'a "cat": x:0" — ü'}
                     for i in images], "created": 1, "size": "1024x1024"}
    expected = {"data": [{"b64_json": base64.b64encode(i).decode(),
                          "revised_prompt": 'a "cat": x:0" — ü'} for i in images],
                "created": 1, "size": "1024x1024"}
    assert json.loads(json_bytes(body)) == expected
    assert json_bytes(expected) == json.dumps(expected, ensure_ascii=False,
                                              separators=(",", ":")).encode()
