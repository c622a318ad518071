"""End to end: a real gateway, the sandbox upstream as a separate real server, real clients."""

from __future__ import annotations

import base64
import time

import httpx
import pytest
import openai
from openai import OpenAI

from clawrouter.catalog import BY_ID, estimate_micro

PNG = b"\x89PNG\r\n\x1a\n"


def sdk(gateway, **kwargs) -> OpenAI:
    return OpenAI(base_url=gateway.v1, api_key="unused", **kwargs)


def test_openai_sdk_generates_pays_once_and_serves_the_image(gateway, sandbox):
    result = sdk(gateway).images.generate(model="cogview", prompt="a lighthouse at dusk",
                                          size="512x512")
    url = result.data[0].url
    assert url.startswith(gateway.url + "/images/") and url.endswith(".png")
    assert (result.size, result.output_format) == ("512x512", "png")  # what it is, as OpenAI
    image = httpx.get(url)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content.startswith(PNG)
    stats = sandbox.stats()
    expected = estimate_micro(BY_ID["zai/cogview-4"], "512x512", 1)
    assert [p["amount"] for p in stats["payments_received"]] == [expected]
    assert stats["settled_total_micro"] == expected
    assert stats["bodies"][-1]["model"] == "zai/cogview-4"


def test_curl_style_request_reports_cost_and_transaction(gateway, sandbox):
    r = gateway.http.post("/v1/images/generations",
                          json={"model": "google/nano-banana", "prompt": "a red fox"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.headers["x-clawrouter-cost-usd"] == "0.0535"
    assert r.headers["x-clawrouter-transaction"] == sandbox.stats()["settled"][0]["transaction"]
    assert r.headers["x-request-id"]
    assert set(r.json()) == {"created", "data", "size", "output_format"}


@pytest.mark.parametrize("alias, model_id", [
    ("nano-banana", "google/nano-banana"), ("BANANA", "google/nano-banana"),
    ("banana-2", "google/nano-banana-2"), ("gpt-image", "openai/gpt-image-1"),
    ("grok-imagine", "xai/grok-imagine-image"), ("cogview-4", "zai/cogview-4"),
])
def test_aliases_reach_the_upstream_as_full_ids(gateway, sandbox, alias, model_id):
    r = gateway.http.post("/v1/images/generations", json={"model": alias, "prompt": "x"})
    assert r.status_code == 200, r.text
    assert sandbox.stats()["bodies"][-1]["model"] == model_id


def test_only_fields_blockrun_accepts_are_forwarded(gateway, sandbox):
    r = gateway.http.post("/v1/images/generations", json={
        "model": "nano-banana", "prompt": "x", "quality": "hd", "style": "vivid", "user": "u1",
        "response_format": "url", "background": None, "output_format": "png",
        "extra_thing": {"a": 1}, "n": None})
    assert r.status_code == 200, r.text
    assert sandbox.stats()["bodies"][-1] == {"model": "google/nano-banana", "prompt": "x",
                                             "size": "1024x1024", "n": 1}


@pytest.mark.parametrize("body, status, param, fragment", [
    ({"model": "unknown-model", "prompt": "x"}, 404, "model", "Available"),
    ({"model": "flux", "prompt": "x"}, 400, "model", "dropped"),
    ({"model": "nano-banana", "prompt": "x", "size": "512x512"}, 400, "size", "1024x1024"),
    ({"model": "cogview", "prompt": "x", "size": "big"}, 400, "size", "1440x1440"),
    ({"prompt": "x", "n": 0}, 400, "n", "between 1 and 10"),
    ({"prompt": "x", "n": 11}, 400, "n", "between 1 and 10"),
    ({"prompt": "x", "n": "2"}, 400, "n", "integer"),
    ({"prompt": "x", "n": True}, 400, "n", "integer"),
    ({"prompt": "   "}, 400, "prompt", "non-empty"),
    ({"model": "nano-banana"}, 400, "prompt", "Missing"),
    ({"prompt": 42}, 400, "prompt", "string"),
    ({"prompt": "x" * 32_001}, 400, "prompt", "32000"),
    ({"prompt": "x", "response_format": "png"}, 400, "response_format", "url"),
    # OpenAI's ranges, though BlockRun takes neither field: a 400 there, not a paid image here
    ({"prompt": "x", "partial_images": 9}, 400, "partial_images", "3"),
    ({"prompt": "x", "output_compression": 500}, 400, "output_compression", "100"),
])
def test_invalid_requests_are_400s_that_reach_nothing_upstream(gateway, sandbox, body, status,
                                                               param, fragment):
    r = gateway.http.post("/v1/images/generations", json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["param"] == param and fragment in error["message"]
    assert r.headers["x-should-retry"] == "false"
    assert sandbox.round_trips() == 0


def test_sdk_sees_typed_errors(gateway):
    import openai

    with pytest.raises(openai.NotFoundError) as err:
        sdk(gateway, max_retries=0).images.generate(model="dall-e-2", prompt="x")
    assert err.value.code == "model_not_found" and err.value.param == "model"
    with pytest.raises(openai.BadRequestError) as err:
        sdk(gateway, max_retries=0).images.generate(model="nano-banana", prompt="x",
                                                    size="1536x1024")
    assert err.value.param == "size"


def test_b64_json_returns_the_image_bytes(gateway):
    result = sdk(gateway).images.generate(model="gpt-image-1", prompt="x",
                                          response_format="b64_json")
    data = base64.b64decode(result.data[0].b64_json)
    assert data.startswith(PNG) and result.data[0].url is None


def test_several_images_are_each_stored(gateway, sandbox):
    r = gateway.http.post("/v1/images/generations", json={"model": "cogview", "prompt": "x", "n": 3})
    urls = [d["url"] for d in r.json()["data"]]
    assert len(set(urls)) == 3
    assert all(httpx.get(u).content.startswith(PNG) for u in urls)
    assert sandbox.paid() == 1


def test_slow_model_is_polled_to_completion_and_settles_once(gateway, sandbox):
    r = gateway.http.post("/v1/images/generations", json={"model": "dall-e-3", "prompt": "x",
                                                          "size": "1792x1024"})
    assert r.status_code == 200, r.text
    stats = sandbox.stats()
    assert stats["bodies"][-1]["model"] == "openai/gpt-image-2"
    assert stats["bodies"][-1]["size"] == "1536x1024"
    assert stats["polls"] >= 1 and len(stats["settled"]) == 1
    assert httpx.get(r.json()["data"][0]["url"]).status_code == 200


def test_client_disconnect_during_polling_stops_polling(make_gateway, sandbox, monkeypatch):
    from clawrouter.upstream import jobs
    from tests.servers import leaving, until

    # Polling pauses for a client to come back, then gives up: 0.8 s here (not 5, which the
    # gateway's stop at the end waited out). Polled on, the job would end at the deadline
    # only, long after the wait below.
    monkeypatch.setattr(jobs, "REJOIN_SECONDS", 0.8)
    gateway = make_gateway(poll_deadline=300)
    sandbox.configure(slow_seconds=300)
    with leaving(gateway.v1 + "/images/generations", {"model": "gpt-image-2", "prompt": "x"}):
        until(lambda: sandbox.stats()["polls"] > 0)  # it leaves while its job is polled
    # given up (the job's payment is then unsettled), and polled no more
    until(lambda: [p["status"] for p in gateway.http.get("/v1/spend").json()["latest"]]
          == ["rejected"])
    polls = sandbox.stats()["polls"]
    time.sleep(0.5)
    stats = sandbox.stats()
    assert stats["polls"] == polls
    assert stats["settled"] == []


def test_an_upstream_that_is_a_sandbox_is_said_to_be_one_on_a_testnet_only(make_gateway,
                                                                           sandbox):
    """`clawrouter sandbox` alone, with `serve --upstream` in front of it: the gateway learns
    from its answers (`x-blockrun-sandbox`) that no real money moves, and says so in /health
    and on every response, as the built-in sandbox does. On Base mainnet an upstream's word is
    not taken: it would make real payments look like play money."""
    testnet = make_gateway()
    assert testnet.http.get("/health").json()["sandbox"] is False  # nothing asked yet
    made = testnet.http.post("/v1/images/generations", json={"prompt": "x", "model": "cogview"})
    assert made.status_code == 200 and made.headers["x-clawrouter-sandbox"] == "true"
    assert testnet.http.get("/health").json()["sandbox"] is True

    mainnet = make_gateway(network="base")
    refused = mainnet.http.post("/v1/images/generations",  # a Base Sepolia challenge: refused
                                json={"prompt": "x", "model": "cogview"})
    assert refused.status_code == 402 and "x-clawrouter-sandbox" not in refused.headers
    assert refused.json()["error"]["code"] == "payment_refused"
    assert refused.json()["error"]["check"] == "network"
    assert sandbox.stats()["payments_count"] == 1  # testnet's one: nothing signed on mainnet
    assert mainnet.gw.client.sandbox  # it did say so
    assert mainnet.http.get("/health").json()["sandbox"] is False

    sandbox.configure(marked=False)  # an upstream that does not say so: none
    quiet = make_gateway()
    assert quiet.http.post("/v1/images/generations",
                           json={"prompt": "x", "model": "cogview"}).status_code == 200
    assert quiet.http.get("/health").json()["sandbox"] is False


def test_health_and_models_are_free(gateway, sandbox):
    health = gateway.http.get("/health").json()
    assert health["status"] == "ok" and health["wallet"] == gateway.gw.address
    assert health["upstream"] == sandbox.api and health["sandbox"] is False
    models = gateway.http.get("/v1/models").json()
    assert models["object"] == "list"
    card = next(m for m in models["data"] if m["id"] == "openai/gpt-image-1")
    assert card["edits"] and card["mask"] and "gpt-image" in card["aliases"]
    assert card["prices"]["1536x1024"] == 0.042
    assert sdk(gateway).models.list().data[0].id
    # one model, as the SDK retrieves it: by id (with its slash), alias or retired name
    for name in ("openai/gpt-image-1", "gpt-image", "GPT-IMAGE-1"):
        assert sdk(gateway).models.retrieve(name).id == "openai/gpt-image-1"
    assert gateway.http.get("/v1/models/dall-e-3").json()["id"] == "openai/gpt-image-2"
    dropped = gateway.http.get("/v1/models/flux")
    assert dropped.status_code == 404 and "dropped" in dropped.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        sdk(gateway).models.retrieve("nope/model")
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError) as long:  # quoted back only in part
        sdk(gateway).models.retrieve("x" * 5000)
    assert (long.value.body["code"], long.value.body["param"]) == ("model_not_found", "model")
    assert len(long.value.body["message"]) < 1000
    assert sandbox.round_trips() == 0


@pytest.mark.parametrize("method, path, status", [
    ("GET", "/v1/images/generations", 405),
    ("POST", "/v1/nope", 404),
    ("GET", "/images/../../etc/passwd", 404),
    ("POST", "/v1/images/generations/", 404),  # no redirect built from the Host header
])
def test_envelope_on_404_and_405(gateway, method, path, status):
    r = gateway.http.request(method, path)
    assert r.status_code == status
    assert r.json()["error"]["code"] in ("not_found", "method_not_allowed")


@pytest.mark.parametrize("path", ["/health", "/healthz", "/readyz", "/metrics", "/v1/models",
                                  "/v1/models/gpt-image", "/v1/spend", "/v1/images", "/"])
def test_head_is_answered_wherever_get_is(gateway, sandbox, path):
    """Uptime checkers and `curl -I` probe with HEAD: the GET's status and headers, no body
    (a body would be read as the start of the next answer on this kept-alive connection)."""
    get = gateway.http.get(path)
    head = gateway.http.head(path)
    assert head.status_code == get.status_code == 200, head.text
    assert head.headers["content-type"] == get.headers["content-type"]
    assert gateway.http.get("/health").json()["status"] == "ok"  # the same connection, intact
    refused = gateway.http.post(path)
    assert refused.status_code == 405 and refused.headers["allow"] == "GET, HEAD"
    assert "GET, HEAD" in refused.json()["error"]["message"]
    assert sandbox.round_trips() == 0


def test_a_crash_is_a_500_envelope_that_no_client_retries(make_gateway, caplog):
    """A bug met after a payment left would otherwise be retried by the SDK into another."""
    gw = make_gateway()

    async def boom() -> None:
        raise RuntimeError("a bug")

    gw.app.add_api_route("/v1/boom", boom, methods=["POST"])
    r = gw.http.post("/v1/boom")
    assert r.status_code == 500 and r.headers["x-should-retry"] == "false"
    assert r.json()["error"]["code"] == "internal_error" and "a bug" not in r.text
    # Starlette answers a crash from outside every middleware; the request id is still there.
    assert r.headers["x-request-id"].startswith("req_")
    assert r.headers["x-request-id"] in r.json()["error"]["message"]


@pytest.mark.parametrize("content", [b"{not json", b"[1,2]", b"", b'"text"'])
def test_malformed_json_is_a_400_envelope(gateway, sandbox, content):
    r = gateway.http.post("/v1/images/generations", content=content,
                          headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert sandbox.round_trips() == 0


@pytest.mark.parametrize("route,content,param,says", [
    ("/v1/images/generations", b"[]", None, "must be a JSON object"),
    ("/v1/images/generations", b"", None, "must be a JSON object"),
    ("/v1/images/generations", b'{"prompt": ["a"]}', "prompt", "a valid string"),
    ("/v1/images/image2image", b'{"prompt": "a", "images": [{"image_url": 3}]}',
     "images[0][image_url]", "a valid string"),
    ("/v1/images/image2image", b'{"prompt": "a", "mask": 5}', "mask",
     "a valid string or an object"),
])
def test_validation_errors_name_the_field_as_the_client_wrote_it(gateway, sandbox, route,
                                                                 content, param, says):
    """Never pydantic's internals: no `'None'`, no union member names such as `ImageURL`."""
    r = gateway.http.post(route, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and says in error["message"], error
    assert "None" not in error["message"] and "ImageURL" not in error["message"]
    assert sandbox.round_trips() == 0


def test_query_parameters_are_named_as_sent(gateway):
    error = gateway.http.get("/v1/images?limit=many").json()["error"]
    assert error["param"] == "limit" and "'limit'" in error["message"], error


def test_routes_without_v1_and_with_query_strings(gateway):
    r = gateway.http.post("/images/generations?foo=1", json={"prompt": "x", "model": "cogview"})
    assert r.status_code == 200, r.text


def test_unreachable_upstream_is_a_502_that_paid_nothing(make_gateway):
    from tests.servers import dead_port

    gw = make_gateway(upstream=f"http://127.0.0.1:{dead_port()}/api")
    r = gw.http.post("/v1/images/generations", json={"prompt": "x"})
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_unreachable"
    assert "Nothing was paid" in r.json()["error"]["message"]
