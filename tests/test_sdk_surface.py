"""An audit with the real OpenAI SDK, as a developer drives it: the async client, raw and
streaming responses, variations, the base URLs people type, the typed response, the upload
forms, and a retry loop of one's own. A real gateway, the sandbox upstream, the real SDK.

The first tests pin what the audit's findings came to: two fixed, one a trade-off kept."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import socket

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from clawrouter.payment.ledger import NEVER_SENT
from clawrouter.sandbox.images import make_png

PNG = b"\x89PNG\r\n\x1a\n"


def sdk(gateway, base_url: str | None = None, **kwargs) -> OpenAI:
    return OpenAI(base_url=base_url or gateway.v1, api_key="unused", **kwargs)


def nothing_upstream(sandbox) -> None:
    stats = sandbox.stats()
    assert stats["round_trips"] == 0 and stats["payments_count"] == 0


# --- defects ----------------------------------------------------------------------------

def test_a_new_call_after_the_upstream_fails_gets_the_last_calls_image_paid_once(
        make_gateway, own_sandbox):
    """A deliberate trade-off, kept: the SDK's retry of a new call that failed unpaid
    (retry-count 1) is answered with the identical earlier call's delivered result, put back
    by `coalesce` when the first try failed, because that is what keeps a retry whose
    response was lost from paying twice. So: the earlier image, marked
    `x-clawrouter-shared: true` with the earlier payment's cost and transaction, and no
    second payment that left the gateway; not the upstream's error."""
    gw = make_gateway(upstream=own_sandbox.api)
    client = sdk(gw)  # max_retries=2, as everyone's
    first = client.images.with_raw_response.generate(model="cogview", prompt="a cat")
    assert own_sandbox.stats()["payments_count"] == 1
    own_sandbox.server.stop()  # BlockRun goes down between two deliberate calls
    second = client.images.with_raw_response.generate(model="cogview", prompt="a cat")
    assert second.headers["x-clawrouter-shared"] == "true"
    assert second.parse().data[0].url == first.parse().data[0].url
    assert (second.headers["x-clawrouter-transaction"]
            == first.headers["x-clawrouter-transaction"])
    # The new call's first try signed at once (the price is known) for an upstream that
    # refused the connection: a row that never left, and cost nothing
    sent = [payment for payment in gw.app.state.gw.ledger.payments()
            if not (payment.note or "").startswith(NEVER_SENT)]
    assert [payment.transaction for payment in sent] == [
        first.headers["x-clawrouter-transaction"]]


def test_a_transparent_background_is_refused_before_paying(gateway, sandbox):
    """BlockRun's models return opaque images: an image that ignored it would be paid for
    (`validate.UNSUPPORTED_VALUES`; tests/test_unsupported_fields_and_urls.py covers the other routes)."""
    client = sdk(gateway, max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(model="gpt-image-1", prompt="a sticker of a fox",
                               background="transparent", output_format="png")
    assert (refused.value.param, refused.value.code) == ("background", "unsupported_value")
    assert "opaque" in refused.value.message
    nothing_upstream(sandbox)


def _lan_address() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this picks the outward interface
        except OSError:
            pytest.skip("no network interface but loopback")
        return s.getsockname()[0]


def test_a_client_on_another_machine_gets_an_image_url_it_can_fetch(make_gateway, sandbox):
    gw = make_gateway(host="0.0.0.0", api_key="k")
    address = f"{_lan_address()}:{gw.server.port}"
    client = OpenAI(base_url=f"http://{address}/v1", api_key="k")
    url = client.images.generate(model="cogview", prompt="from the LAN").data[0].url
    assert url.startswith(f"http://{address}/images/"), url


# --- what works, and nothing else tests with the SDK ------------------------------------

def test_the_async_client_does_what_the_sync_one_does(gateway, sandbox, tmp_path):
    photo = tmp_path / "photo.png"
    photo.write_bytes(make_png(32, 32, 3))

    async def main() -> None:
        client = AsyncOpenAI(base_url=gateway.v1, api_key="unused")
        made = await client.images.generate(model="cogview", prompt="async")
        assert httpx.get(made.data[0].url).content.startswith(PNG)
        edited = await client.images.edit(model="gpt-image-1", image=photo, prompt="a hat")
        assert base64.b64decode(edited.data[0].b64_json).startswith(PNG)
        stream = await client.images.generate(model="gpt-image-1", prompt="async stream",
                                              stream=True)
        assert [event.type async for event in stream] == ["image_generation.completed"]
        models = [model.id async for model in client.models.list()]
        assert "zai/cogview-4" in models
        assert (await client.models.retrieve("cogview")).id == "zai/cogview-4"
        with pytest.raises(openai.BadRequestError) as raised:
            await client.images.generate(model="cogview", prompt="x", size="13x13")
        assert (raised.value.code, raised.value.param) == ("invalid_size", "size")
        assert raised.value.request_id and raised.value.body["code"] == "invalid_size"
        # different prompts at once: one image each, each paid
        many = await asyncio.gather(*(client.images.generate(model="cogview", prompt=f"n{i}")
                                      for i in range(3)))
        assert len({result.data[0].url for result in many}) == 3

    asyncio.run(main())
    assert sandbox.stats()["payments_count"] == 6  # made, edited, streamed, 3 at once


def test_raw_and_streaming_responses_show_the_gateways_headers(gateway, sandbox):
    client = sdk(gateway)
    with client.images.with_streaming_response.generate(model="cogview",
                                                        prompt="headers") as response:
        assert response.headers["content-type"] == "application/json"
        assert response.headers["x-clawrouter-cost-usd"] == "0.01675"
        assert response.headers["x-clawrouter-transaction"].startswith("0x")
        assert response.request_id.startswith("req_")
        assert response.parse().data[0].url.startswith(gateway.v1.removesuffix("/v1"))
    with client.images.with_streaming_response.generate(model="cogview", prompt="sse",
                                                        stream=True) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert [event.type for event in response.parse()] == ["image_generation.completed"]
    assert sandbox.stats()["payments_count"] == 2


def test_create_variation_is_a_typed_400_that_sends_nothing(gateway, sandbox):
    image = ("square.png", make_png(64, 64, 1), "image/png")
    with pytest.warns(DeprecationWarning):
        with pytest.raises(openai.BadRequestError) as raised:
            sdk(gateway).images.create_variation(image=image, model="dall-e-2", n=2,
                                                 size="256x256", response_format="url")
    assert raised.value.code == "unsupported_endpoint" and raised.value.param is None
    assert "/v1/images/edits" in raised.value.message
    assert raised.value.response.headers["x-should-retry"] == "false"

    async def main() -> None:
        with pytest.raises(openai.BadRequestError):
            await AsyncOpenAI(base_url=gateway.v1, api_key="x").images.create_variation(
                image=image)

    with pytest.warns(DeprecationWarning):
        asyncio.run(main())
    nothing_upstream(sandbox)


@pytest.mark.parametrize("host, path", [
    ("localhost", "/v1"), ("localhost", "/v1/"), ("localhost", ""), ("localhost", "/"),
    ("127.0.0.1", "/v1"), ("LOCALHOST", "/v1"),
])
def test_the_base_urls_people_type_work_and_hand_back_urls_they_can_fetch(gateway, host, path):
    origin = f"http://{host}:{gateway.server.port}"
    client = sdk(gateway, base_url=origin + path)
    url = client.images.generate(model="cogview", prompt=f"via {host}{path}").data[0].url
    assert url.startswith(f"http://{host.lower()}:{gateway.server.port}/images/")
    fetched = httpx.get(url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert len(client.models.list().data) >= 10


def test_the_typed_response_carries_only_what_the_sdk_declares(gateway):
    made = sdk(gateway).images.generate(model="gpt-image-1", prompt="typed", n=2)
    assert made.model_extra == {} and all(image.model_extra == {} for image in made.data)
    assert isinstance(made.created, int) and made.size == "1024x1024"
    assert made.output_format == "png" and made.usage is None
    assert all(image.url is None and image.b64_json for image in made.data)
    dumped = made.model_dump(exclude_none=True)
    assert set(dumped) == {"created", "data", "size", "output_format"}


def test_every_upload_form_the_sdk_takes_reaches_the_upstream_as_sent(gateway, sandbox,
                                                                     tmp_path):
    """`pathlib.Path` (a name with spaces and non-ASCII letters), a nameless `BytesIO`, a
    tuple whose declared type is wrong, and OpenAI's `input_fidelity` (not forwarded)."""
    images = [make_png(48, 48, seed) for seed in (11, 12, 13)]
    path = tmp_path / "mon été.png"
    path.write_bytes(images[0])
    sdk(gateway).images.edit(
        model="gpt-image-1", prompt="three", input_fidelity="high",
        image=[path, io.BytesIO(images[1]), ("notes.txt", images[2], "text/plain")])
    body = sandbox.stats()["bodies"][-1]
    assert [image["sha256"] for image in body["image"]] == [
        hashlib.sha256(image).hexdigest() for image in images]
    assert "input_fidelity" not in body


def test_a_retry_loop_of_ones_own_never_pays_twice(gateway, sandbox):
    """`max_retries=0` and a loop around the call (tenacity and the like): every try says it
    is a first one, and the one after a timeout gets the image the timed-out one paid for."""
    patient = sdk(gateway, max_retries=0)
    patient.images.generate(model="cogview", prompt="warm up")  # the price is learned: the
    # next request is paid at once, well inside the impatient client's timeout
    sandbox.faults({"kind": "delay", "phase": "paid", "seconds": 3.0, "times": 1})
    with pytest.raises(openai.APITimeoutError):
        sdk(gateway, max_retries=0, timeout=1.5).images.generate(model="cogview",
                                                                 prompt="worth the wait")
    again = patient.images.with_raw_response.generate(model="cogview", prompt="worth the wait")
    assert again.headers["x-clawrouter-shared"] == "true"
    assert httpx.get(again.parse().data[0].url).content.startswith(PNG)
    assert sandbox.stats()["payments_count"] == 2
