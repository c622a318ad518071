"""What the SDK surface showed (tests/test_sdk_surface.py): a transparent background refused
before paying, on every route and body; image URLs an exposed gateway's remote clients can
fetch, never built from their Host header (dall-e-2's 404: tests/test_compat_sdk.py)."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from clawrouter.api.images import _reached
from clawrouter.sandbox.images import make_png

PHOTO = make_png(32, 32, 5)
DATA_URI = "data:image/png;base64," + base64.b64encode(PHOTO).decode()


def sdk(gateway, **kwargs: Any) -> OpenAI:
    return OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0, **kwargs)


def nothing_upstream(sandbox) -> None:
    stats = sandbox.stats()
    assert stats["round_trips"] == 0 and stats["payments_count"] == 0


# --- background -------------------------------------------------------------------------

JSON_ROUTES = [
    ("/images/generations", {"model": "gpt-image-1", "prompt": "a fox sticker"}),
    ("/images/edits", {"model": "gpt-image-1", "prompt": "a hat", "image": DATA_URI}),
    ("/images/edits", {"model": "gpt-image-1", "prompt": "a hat",
                       "images": [{"image_url": DATA_URI}]}),
    ("/images/image2image", {"model": "gpt-image-1", "prompt": "a hat", "image": DATA_URI}),
]


@pytest.mark.parametrize("value", ["transparent", "TRANSPARENT", "clear"])
@pytest.mark.parametrize("path, body", JSON_ROUTES, ids=["generations", "edits",
                                                          "edits-openai-shape", "image2image"])
def test_a_background_blockrun_cannot_make_is_a_400_before_anything_is_paid(
        gateway, sandbox, path: str, body: dict[str, Any], value: str) -> None:
    r = httpx.post(gateway.v1 + path, json={**body, "background": value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (
        "background", "unsupported_value", "invalid_request_error")
    assert "opaque images" in error["message"] and "'auto', 'opaque' or null" in error["message"]
    nothing_upstream(sandbox)


def test_a_multipart_edit_with_a_transparent_background_is_refused_too(gateway, sandbox):
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(gateway).images.edit(model="gpt-image-1", prompt="a hat", background="transparent",
                                 image=("photo.png", PHOTO, "image/png"))
    assert (refused.value.param, refused.value.code) == ("background", "unsupported_value")
    nothing_upstream(sandbox)


@pytest.mark.parametrize("value", ["auto", "opaque", None, ""])
def test_backgrounds_that_ask_for_nothing_else_are_accepted_and_not_forwarded(
        gateway, sandbox, value: str | None) -> None:
    r = httpx.post(gateway.v1 + "/images/generations",
                   json={"model": "cogview", "prompt": f"bg {value!r}", "background": value})
    assert r.status_code == 200, r.text
    assert "background" not in sandbox.stats()["bodies"][-1]


def test_a_multipart_edit_with_an_opaque_background_is_made(gateway, sandbox):
    sdk(gateway).images.edit(model="gpt-image-1", prompt="a hat", background="opaque",
                             image=("photo.png", PHOTO, "image/png"))
    assert sandbox.stats()["payments_count"] == 1
    assert "background" not in sandbox.stats()["bodies"][-1]


# --- image URLs for clients on other machines -------------------------------------------

@pytest.mark.parametrize("address, host", [
    ("192.168.1.20", "192.168.1.20"), ("2001:db8::7", "[2001:db8::7]"),
    ("::ffff:10.0.0.2", "10.0.0.2"),  # an IPv4 client of a dual-stack socket
    ("127.0.0.1", "127.0.0.1"),
    ("0.0.0.0", None), ("::", None),  # a wildcard names no address to fetch from
    ("fe80::1%eth0", None),  # its scope is this machine's
    ("/run/clawrouter.sock", None), (None, None),  # a Unix socket, or no address at all
])
def test_the_address_a_client_reached_becomes_a_url_host(address: str | None,
                                                         host: str | None) -> None:
    assert _reached(address) == host


def test_an_exposed_gateway_never_builds_urls_from_a_host_header_that_is_not_loopback(
        make_gateway, sandbox):
    """DNS rebinding, or any client: a Host of its choosing must not become our URLs; the
    address of ours the connection reached does (here loopback: the only one every machine
    running the tests has)."""
    gw = make_gateway(host="0.0.0.0", api_key="k")
    r = httpx.post(f"http://127.0.0.1:{gw.server.port}/v1/images/generations",
                   headers={"host": "evil.example", "authorization": "Bearer k"},
                   json={"model": "cogview", "prompt": "rebound"})
    assert r.status_code == 200, r.text
    url = r.json()["data"][0]["url"]
    assert url.startswith(f"http://127.0.0.1:{gw.server.port}/images/"), url
    assert httpx.get(url).status_code == 200
