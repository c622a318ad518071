"""What the OpenAI SDK (3.x) does that a gateway must meet: the answer format a gpt-image name
implies, deliberate repeats told from retries, its model names and edit fields, and bodies
that are not plain JSON. A real gateway, the sandbox upstream, the real SDK."""

from __future__ import annotations

import base64
import gzip
import io
import json

import openai
import pytest
from openai import OpenAI

from clawrouter.sandbox.images import make_png

PNG = b"\x89PNG\r\n\x1a\n"
SDK_KEY = "Bearer unused"  # the client the SDK below is (its key): repeats are per client


def sdk(gateway, **kwargs) -> OpenAI:
    return OpenAI(base_url=gateway.v1, api_key="unused", **kwargs)


def nothing_upstream(sandbox) -> None:
    stats = sandbox.stats()
    assert stats["round_trips"] == 0 and stats["payments_count"] == 0


def post(gateway, body: bytes | dict, route="/v1/images/generations", **headers):
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    return gateway.http.post(route, content=body,
                             headers={"content-type": "application/json", **headers})


# --- response_format absent: follow OpenAI for the name the client used ---------------------

def test_code_written_for_openai_gpt_image_reads_b64_json(gateway, sandbox):
    result = sdk(gateway).images.generate(model="gpt-image-1", prompt="a lighthouse")
    assert result.data[0].url is None
    assert base64.b64decode(result.data[0].b64_json).startswith(PNG)
    assert sandbox.stats()["bodies"][-1]["model"] == "openai/gpt-image-1"
    with io.BytesIO(make_png(32, 32, 1)) as photo:
        edited = sdk(gateway).images.edit(model="GPT-Image-1", image=photo, prompt="a hat")
    assert base64.b64decode(edited.data[0].b64_json).startswith(PNG)


@pytest.mark.parametrize("model, field", [
    ("gpt-image-1", "b64_json"), (" GPT-IMAGE-1 ", "b64_json"),
    ("gpt-image", "url"),  # our alias, not OpenAI's name
    ("openai/gpt-image-1", "url"), ("blockrun/gpt-image-1", "url"),  # BlockRun's ids
    ("dall-e-3", "url"),  # OpenAI's dall-e default
    ("cogview", "url"), (None, "url"),
])
def test_an_absent_response_format_follows_the_name_sent(gateway, sandbox, model, field):
    body = {"prompt": "x"} if model is None else {"prompt": "x", "model": model}
    r = post(gateway, body)
    assert r.status_code == 200, r.text
    assert set(r.json()["data"][0]) - {"revised_prompt"} == {field}


@pytest.mark.parametrize("setting, model, field", [
    ("url", "gpt-image-1", "url"), ("b64_json", "cogview", "b64_json"),
])
def test_a_configured_response_format_is_every_models_default(make_gateway, sandbox, setting,
                                                              model, field):
    gw = make_gateway(response_format=setting)
    r = post(gw, {"prompt": "x", "model": model})
    assert set(r.json()["data"][0]) - {"revised_prompt"} == {field}
    asked = post(gw, {"prompt": "y", "model": model, "response_format": "url"})
    assert set(asked.json()["data"][0]) - {"revised_prompt"} == {"url"}  # the client's wins


def test_clawrouters_own_edit_route_answers_its_alias_gpt_image_1_with_a_url(gateway, sandbox):
    """`gpt-image-1` is ClawRouter's alias too, and /v1/images/image2image its route, whose
    clients read `data[0].url` (the agent skill's edit): OpenAI's `b64_json` is for OpenAI's
    routes."""
    image = "data:image/png;base64," + base64.b64encode(make_png(32, 32, 1)).decode()
    r = post(gateway, {"prompt": "a hat", "model": "gpt-image-1", "image": image},
             route="/v1/images/image2image")
    assert r.status_code == 200, r.text
    assert set(r.json()["data"][0]) - {"revised_prompt"} == {"url"}


def test_an_explicit_response_format_wins_over_the_name(gateway, sandbox):
    r = post(gateway, {"prompt": "x", "model": "gpt-image-1", "response_format": "url"})
    assert r.json()["data"][0]["url"].startswith(gateway.url + "/images/")


# --- deliberate repeats (x-stainless-retry-count: 0) vs retries ----------------------------

def test_calling_the_sdk_three_times_makes_three_images(gateway, sandbox):
    client = sdk(gateway)
    made = [client.images.with_raw_response.generate(model="cogview", prompt="one more",
                                                     size="512x512") for _ in range(3)]
    assert all("x-clawrouter-shared" not in m.headers for m in made)
    assert len({m.parse().data[0].url for m in made}) == 3
    assert sandbox.stats()["payments_count"] == 3
    # a retry (count 1) of the same request shares the last one's result, as does a request
    # that does not say which try it is (curl)
    urls = set()
    for headers in ({"x-stainless-retry-count": "1"}, {}):
        again = post(gateway, {"model": "cogview", "prompt": "one more", "size": "512x512"},
                     authorization=SDK_KEY, **headers)
        assert again.headers["x-clawrouter-shared"] == "true"
        urls.add(again.json()["data"][0]["url"])
    assert urls == {made[-1].parse().data[0].url}
    assert sandbox.stats()["payments_count"] == 3


def test_a_first_try_still_shares_a_paid_failure(gateway, sandbox):
    sandbox.faults({"kind": "respond", "phase": "paid", "status": 500, "times": 1,
                    "body": {"error": "provider exploded"}})
    client = sdk(gateway)
    for _ in range(2):
        with pytest.raises(openai.InternalServerError) as err:
            client.images.generate(model="cogview", prompt="fails once", size="512x512")
        assert "was signed" in err.value.message
    assert sandbox.stats()["payments_count"] == 1


# --- sizes, model names, edit fields ------------------------------------------------------

def test_size_auto_is_the_size_an_omitted_one_gets(gateway, sandbox):
    for extra in ({"size": "auto"}, {}):
        r = post(gateway, {"model": "cogview", "prompt": f"sized {extra}", **extra})
        assert r.status_code == 200 and r.json()["size"] == "1024x1024"
    assert {b["size"] for b in sandbox.stats()["bodies"]} == {"1024x1024"}


def test_the_sdks_dated_snapshot_names_are_aliases(gateway, sandbox):
    sandbox.configure(slow_seconds=0.2)
    result = sdk(gateway).images.generate(model="gpt-image-2-2026-04-21", prompt="dated",
                                          size="1024x1024")
    assert result.data[0].b64_json  # an OpenAI name: OpenAI's format
    assert sandbox.stats()["bodies"][-1]["model"] == "openai/gpt-image-2"
    for name, model_id in (("gpt-image-2.5-flare-2026-09-08", "openai/gpt-image-2.5-flare"),
                           ("gpt-image-2.5-sunburst-2026-09-08",
                            "openai/gpt-image-2.5-sunburst")):
        assert sdk(gateway).models.retrieve(name).id == model_id


@pytest.mark.parametrize("name", ["gpt-image-1.5", "gpt-image-1-mini", "gpt-image-2.6-flare",
                                  # OpenAI's older names: not remapped as dall-e-3 is
                                  "dall-e-2", "DALL-E-2", "openai/dall-e-2"])
def test_openai_names_blockrun_lacks_are_404s_that_say_so(gateway, sandbox, name):
    with pytest.raises(openai.NotFoundError) as err:
        sdk(gateway).images.generate(model=name, prompt="x")
    assert err.value.code == "model_not_found" and err.value.param == "model"
    assert "OpenAI model that BlockRun does not offer" in err.value.message
    assert "openai/gpt-image-1, openai/gpt-image-2" in err.value.message
    nothing_upstream(sandbox)


def test_markup_is_refused_as_a_parameter_blockrun_does_not_take(gateway, sandbox):
    with io.BytesIO(make_png(32, 32, 1)) as photo, io.BytesIO(make_png(32, 32, 2)) as markup:
        with pytest.raises(openai.BadRequestError) as err:
            sdk(gateway).images.edit(model="gpt-image-1", image=photo, markup=markup,
                                     prompt="follow the sketch")
    assert (err.value.code, err.value.param) == ("unsupported_parameter", "markup")
    assert "BlockRun" in err.value.message and "Unexpected" not in err.value.message
    r = post(gateway, {"model": "gpt-image-1", "prompt": "x", "image": "https://e.com/a.png",
                       "markup": "data:image/png;base64,AAAA"}, route="/v1/images/image2image")
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_parameter"
    nothing_upstream(sandbox)


# --- bodies that are not plain JSON -------------------------------------------------------

@pytest.mark.parametrize("body, param", [
    (b'{"model": "cogview", "prompt": "x", "model": "banana-pro"}', "model"),
    (b'{"prompt": "x", "size": "512x512", "n": 1, "prompt": "y"}', "prompt"),
    (b'{"prompt": "x", "extra": {"a": 1, "a": 2}}', "a"),
])
def test_a_key_given_twice_is_refused_not_paid_as_its_last_value(gateway, sandbox, body, param):
    r = post(gateway, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("duplicate_field", param)
    assert f"'{param}' was given more than once" in error["message"]
    nested = post(gateway, {"prompt": "x", "images": [{"image_url": "a"}]},
                  route="/v1/images/edits")
    assert nested.status_code == 400  # (an unreadable image, not a duplicate)
    twice = post(gateway, b'{"prompt": "x", "images": [{"image_url": "a", "image_url": "b"}]}',
                 route="/v1/images/edits")
    assert twice.json()["error"]["code"] == "duplicate_field"
    nothing_upstream(sandbox)


def test_a_body_of_countless_tiny_fields_is_refused_not_walked(gateway, sandbox):
    """Looking for a key given twice walks what was parsed: a body of a hundred thousand
    tiny objects (and an escaped quote, which would ask for a second parse) is refused at the
    field limit instead of holding the event loop for seconds; a long key given twice is
    not echoed whole."""
    many = {"prompt": 'say "hi"', "extra": [{"a": 1}] * 100_000}  # json.dumps escapes it
    r = post(gateway, json.dumps(many).encode())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "too_many_fields"
    key = "k" * 100_000
    long = post(gateway, f'{{"prompt": "x", "{key}": 1, "{key}": 2}}'.encode())
    assert long.status_code == 400 and long.json()["error"]["code"] == "duplicate_field"
    assert len(long.content) < 1_000
    nothing_upstream(sandbox)


def test_quotes_in_a_prompt_are_not_taken_for_a_key_given_twice(gateway, sandbox):
    r = post(gateway, {"model": "cogview", "prompt": 'a sign that says "OPEN": "yes"',
                       "response_format": "", "user": "u"})
    assert r.status_code == 200, r.text
    assert sandbox.stats()["bodies"][-1]["prompt"] == 'a sign that says "OPEN": "yes"'


def test_a_byte_order_mark_before_the_json_is_ignored(gateway, sandbox):
    r = post(gateway, b"\xef\xbb\xbf" + json.dumps({"model": "cogview", "prompt": "bom"}).encode())
    assert r.status_code == 200, r.text
    assert sandbox.stats()["bodies"][-1]["prompt"] == "bom"


@pytest.mark.parametrize("route", ["/v1/images/generations", "/v1/images/image2image",
                                   "/v1/images/edits"])
def test_a_compressed_body_is_refused_as_such(gateway, sandbox, route):
    body = gzip.compress(json.dumps({"prompt": "x", "image": "https://e.com/a.png"}).encode())
    r = post(gateway, body, route, **{"content-encoding": "gzip"})
    assert r.status_code == 415, r.text
    error = r.json()["error"]
    assert error["code"] == "unsupported_content_encoding"
    assert "must not be compressed" in error["message"]
    form = gateway.http.post("/v1/images/edits", files={"image": ("a.png", make_png(8, 8, 1))},
                             data={"prompt": "x"}, headers={"content-encoding": "br"})
    assert form.status_code == 415 and "br" in form.json()["error"]["message"]
    nothing_upstream(sandbox)


@pytest.mark.parametrize("route", ["/v1/images/generations", "/v1/images/image2image"])
def test_a_multipart_form_sent_where_json_is_taken_says_where_forms_go(gateway, sandbox, route):
    r = gateway.http.post(route, files={"image": ("a.png", make_png(8, 8, 1))},
                          data={"prompt": "x"})
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "multipart form" in message and "/v1/images/edits" in message
    nothing_upstream(sandbox)


# --- upstream errors the SDK would retry for nothing --------------------------------------

@pytest.mark.parametrize("status", [401, 403])
def test_the_upstream_refusing_our_access_is_not_retried_by_the_sdk(gateway, sandbox, status):
    sandbox.faults({"kind": "respond", "phase": "unpaid", "status": status,
                    "body": {"error": "API key required"}})
    with pytest.raises(openai.InternalServerError) as err:
        sdk(gateway).images.generate(model="cogview", prompt="x", size="512x512")
    assert err.value.code == "upstream_auth"
    assert err.value.response.headers["x-should-retry"] == "false"
    stats = sandbox.stats()
    assert (stats["round_trips"], stats["payments_count"]) == (1, 0)  # no retries
