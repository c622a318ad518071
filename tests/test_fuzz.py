"""Hostile input at the HTTP edge: schemathesis from the gateway's own schema, then nasties.

Two invariants for every request, generated or hand-written: never a 5xx, and every error is the
OpenAI envelope `{"error": {"message", "type", "param", "code"}}` served as JSON. A real gateway
(on loopback, paying the sandbox upstream) answers; after the nasties it still answers `/health`,
and it paid only for requests it answered with an image.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import negative_data_rejection, not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode

from tests.conftest import Gateway, Sandbox

SEED = 402
EXAMPLES_PER_OPERATION = 40


def assert_envelope(status: int, content_type: str, body: bytes, what: str) -> None:
    """The invariants: no 5xx, and any error is the OpenAI envelope, as JSON."""
    assert status < 500, f"{what}: HTTP {status}: {body[:300]!r}"
    if status < 400:
        return
    assert content_type.split(";")[0].strip() == "application/json", (
        f"{what}: HTTP {status} served as {content_type!r}: {body[:300]!r}")
    try:
        envelope = json.loads(body)
    except ValueError:
        raise AssertionError(f"{what}: HTTP {status} body is not JSON: {body[:300]!r}") from None
    assert isinstance(envelope, dict) and set(envelope) == {"error"}, f"{what}: {envelope!r}"
    error = envelope["error"]
    assert isinstance(error, dict), f"{what}: {envelope!r}"
    assert {"message", "type", "param", "code"} <= set(error), f"{what}: {envelope!r}"
    assert isinstance(error["message"], str) and error["message"], f"{what}: {envelope!r}"
    assert isinstance(error["type"], str) and error["type"], f"{what}: {envelope!r}"
    assert error["param"] is None or isinstance(error["param"], str), f"{what}: {envelope!r}"
    assert error["code"] is None or isinstance(error["code"], str), f"{what}: {envelope!r}"


# --- schemathesis ---------------------------------------------------------------------------
# The schema is fetched from the running gateway; each operation gets its own bounded,
# derandomized hypothesis run (schemathesis's pytest loader cannot take a fixture on pytest 9).

@pytest.fixture
def fuzzed_gateway(make_gateway: Callable[..., Gateway], tmp_path: Path) -> Gateway:
    # Local paths that random strings happen to name are looked up only in an empty folder.
    roots = tmp_path / "roots"
    roots.mkdir()
    return make_gateway(allowed_roots=[roots])


def load_schema(gateway: Gateway) -> Any:
    config = SchemathesisConfig.from_dict({
        "seed": SEED,
        "generation": {"max-examples": EXAMPLES_PER_OPERATION, "deterministic": True},
        "request-timeout": 30,
    })
    return schemathesis.openapi.from_url(gateway.url + "/openapi.json", config=config)


def has_inputs(operation: Any) -> bool:
    return bool(operation.body) or any(True for _ in operation.iter_parameters())


POSITIVE, NEGATIVE = GenerationMode.POSITIVE, GenerationMode.NEGATIVE
GENERATIONS, IMAGE2IMAGE, EDITS = ("POST /v1/images/generations", "POST /v1/images/image2image",
                                   "POST /v1/images/edits")
#: Every operation of the schema, fuzzed in parts of a few seconds each so that the two
#: workers share them (one test per mode took up to 35 s under load, and set the suite's end
#: when it ran last). Each part checks that the parts cover the schema.
PARTS: dict[str, tuple[GenerationMode, tuple[str, ...]]] = {
    "positive-generations": (POSITIVE, (GENERATIONS,)),
    "positive-image2image-edits": (POSITIVE, (IMAGE2IMAGE, EDITS)),
    "positive-gets": (POSITIVE, ("GET /v1/models/{name}", "GET /v1/spend", "GET /v1/images",
                                 "POST /v1/images/variations", "GET /health", "GET /healthz",
                                 "GET /readyz", "GET /metrics", "GET /v1/models")),
    # nothing to make invalid in a bare GET: only the operations that take inputs
    "negative-generations-model": (NEGATIVE, (GENERATIONS, "GET /v1/models/{name}")),
    "negative-image2image-edits": (NEGATIVE, (IMAGE2IMAGE, EDITS)),
    "negative-spend-images": (NEGATIVE, ("GET /v1/spend", "GET /v1/images")),
}
#: what the positive generations left behind (8 paid images) when all ran in one test, for the
#: positive parts that ran after them: the listings then have images and payments to page
SEED_IMAGES = 8


def seed(gateway: Gateway, sandbox: Sandbox) -> None:
    """Images and payments for the listings (`SEED_IMAGES`)."""
    for i in range(SEED_IMAGES):
        made = gateway.http.post("/v1/images/generations", json={"prompt": f"seed {i}"})
        assert made.status_code == 200, made.text
    assert sandbox.paid() == SEED_IMAGES


def assert_parts_cover(operations: list[Any]) -> None:
    """Every operation is fuzzed in one positive part, and in one negative part if it takes
    inputs: a route added to the schema fails here until it is given a part."""
    for check in (POSITIVE, NEGATIVE):
        expected = [op.label for op in operations if check is POSITIVE or has_inputs(op)]
        listed = [label for mode, labels in PARTS.values() if mode is check for label in labels]
        assert sorted(listed) == sorted(expected), check


@pytest.mark.parametrize("part", PARTS)
def test_every_operation_from_the_schema(fuzzed_gateway: Gateway, sandbox: Sandbox,
                                         part: str) -> None:
    mode, labels = PARTS[part]
    schema = load_schema(fuzzed_gateway)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert_parts_cover(operations)
    if mode is POSITIVE and GENERATIONS not in labels:
        seed(fuzzed_gateway, sandbox)
    operations = [op for op in operations if op.label in labels]
    session = requests.Session()
    forms: list[Any] = []
    fuzzed: set[str] = set()
    for operation in operations:
        # Negative forms are out of schemathesis's reach (every one it draws is filtered out):
        # in that mode, a route that also takes JSON is fuzzed with JSON.
        json_only = mode is NEGATIVE and "multipart/form-data" in \
            operation.get_request_payload_content_types()

        # (hypothesis derives the examples' seed from this function's text: it is kept as it
        # was when one test fuzzed every operation, so each operation gets the same examples)
        @settings(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, deadline=None,
                  database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode,
                                          media_type="application/json" if json_only else None))
        def fuzz(case: Any) -> None:
            checks = [not_a_server_error, negative_data_rejection]
            if case.media_type == "multipart/form-data":
                forms.append(case)
                # Every form field is text: a "number" or an "object" is only words there,
                # so schemathesis's type violations need not be refused in a form.
                checks = [not_a_server_error]
            response = case.call(session=session, timeout=30)
            case.validate_response(response, checks=checks)
            content_type = (response.headers.get("content-type") or [""])[0]
            assert_envelope(response.status_code, content_type, response.content,
                            case.as_curl_command())
        try:
            fuzz()
        except Unsatisfiable:
            if mode is POSITIVE:
                raise
            continue  # nothing in its schema can be made invalid (a model name is any text)
        fuzzed.add(operation.label)
    assert forms or mode is NEGATIVE or EDITS not in labels, \
        "no multipart form was generated"
    assert {GENERATIONS, IMAGE2IMAGE, EDITS} & set(labels) <= fuzzed, fuzzed
    if mode is POSITIVE and GENERATIONS in labels:
        assert sandbox.paid() > 0  # valid bodies went all the way: paid and served
    assert fuzzed_gateway.http.get("/health").status_code == 200


# --- hand-written nasties -------------------------------------------------------------------

# Deep enough to break a recursive parser with the default limit. The 100,000-deep bombs go to
# a gateway in its own process (test_hostile.py): if they ever overflow the C stack again, the
# process dies, and only a separate process reports that as a failure instead of killing pytest.
DEEP = 5_000
JSON = {"content-type": "application/json"}


def nasties() -> Iterator[tuple[str, bytes, dict[str, str]]]:
    """(label, body, headers): what a hostile or broken client sends to a POST route."""
    def j(label: str, text: str) -> tuple[str, bytes, dict[str, str]]:
        return label, text.encode("utf-8", "surrogatepass"), JSON

    # Wrong content types.
    yield "json as text/plain", b'{"prompt": "a cat"}', {"content-type": "text/plain"}
    yield "xml", b"<prompt>a cat</prompt>", {"content-type": "application/xml"}
    yield "form-urlencoded", b"prompt=a+cat&n=1", {
        "content-type": "application/x-www-form-urlencoded"}
    yield "no content type", b'{"prompt": "a cat"}', {}
    yield "multipart without boundary", b"--x\r\n\r\n", {"content-type": "multipart/form-data"}
    yield "multipart, garbage", b"\x00\xff" * 64, {
        "content-type": "multipart/form-data; boundary=zzz"}
    yield "multipart, unterminated", (
        b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na cat'), {
        "content-type": "multipart/form-data; boundary=b"}
    yield "json declared utf-16", '{"prompt": "a cat"}'.encode("utf-16"), {
        "content-type": "application/json; charset=utf-16"}
    yield "content type junk", b'{"prompt": "a cat"}', {"content-type": "json/;;;=;boundary=\"\""}
    # Bytes that are not UTF-8, and text that is not Unicode.
    yield "invalid utf-8", b'{"prompt": "\xff\xfe\xc3\x28"}', JSON
    yield "utf-8 bom", b'\xef\xbb\xbf{"prompt": "a cat", "model": "nope"}', JSON
    yield j("lone surrogate prompt", '{"prompt": "\\ud800 cat"}')
    yield j("lone surrogate prompt, unknown model", '{"prompt": "\\ud800", "model": "nope"}')
    yield j("lone surrogate everywhere", '{"prompt": "\\udfff", "size": "\\ud800", '
            '"quality": "\\ud800", "user": "\\ud800", "image": "\\ud800", "mask": "\\udc00"}')
    yield j("lone surrogate paths", '{"prompt": "a cat", "images": '
            '[{"image_url": "/tmp/\\ud800.png"}], "mask": {"image_url": "./\\udfff"}}')
    yield j("lone surrogate urls", '{"prompt": "a cat", "image": ["file:///tmp/%ED%A0%80.png", '
            '"file:///\\ud800", "http://\\ud800.example/a.png"]}')
    yield j("lone surrogate key", '{"\\ud800": 1, "prompt": "a cat", "model": "nope"}')
    # JSON bombs: deep nesting at the top and inside an accepted extra field.
    yield j("deep arrays", "[" * DEEP + "]" * DEEP)
    yield j("deep objects", '{"a":' * DEEP + "1" + "}" * DEEP)
    yield j("deep extra field", '{"prompt": "a cat", "model": "nope", "x": '
            + "[" * DEEP + "]" * DEEP + "}")
    yield j("deep image", '{"prompt": "a cat", "image": ' + "[" * DEEP + "]" * DEEP + "}")
    yield j("wide object", "{" + ",".join(f'"k{i}": {i}' for i in range(100_000))
            + ', "prompt": "a cat", "model": "nope"}')
    # Numbers.
    yield j("n = 10**100", '{"prompt": "a cat", "n": ' + "1" + "0" * 100 + "}")
    yield j("n = -10**100", '{"prompt": "a cat", "n": -1' + "0" * 100 + "}")
    yield j("n of 5000 digits", '{"prompt": "a cat", "n": ' + "9" * 5000 + "}")
    yield j("n = 1e999", '{"prompt": "a cat", "n": 1e999}')
    yield j("n = 1.5", '{"prompt": "a cat", "n": 1.5}')
    yield j("n = NaN", '{"prompt": "a cat", "n": NaN}')
    yield j("n = Infinity", '{"prompt": "a cat", "n": Infinity}')
    yield j("n = -Infinity", '{"prompt": "a cat", "n": -Infinity}')
    yield j("n = true", '{"prompt": "a cat", "n": true}')
    yield j("n = '2'", '{"prompt": "a cat", "n": "2"}')
    yield j("compression NaN", '{"prompt": "a cat", "model": "nope", '
            '"output_compression": NaN, "partial_images": 1e400}')
    yield j("huge extra number", '{"prompt": "a cat", "model": "nope", "x": 1e400, '
            '"y": -0, "z": ' + "7" * 4000 + "}")
    # Duplicate keys: the last one wins in every parser we use, and is then checked.
    yield j("duplicate prompt", '{"prompt": "a cat", "prompt": "", "model": "nope"}')
    yield j("duplicate n", '{"prompt": "a cat", "n": 1, "n": 1000}')
    yield j("duplicate model", '{"model": "openai/dall-e-3", "prompt": "a", "model": ""}')
    # Sizes and characters.
    yield j("1 MB prompt", json.dumps({"prompt": "x" * 1_000_000}))
    yield j("1 MB model", json.dumps({"prompt": "a cat", "model": "m" * 1_000_000}))
    yield j("1 MB size", json.dumps({"prompt": "a cat", "size": "1" * 1_000_000}))
    yield j("1 MB image", json.dumps({"prompt": "a cat", "image": "/" * 1_000_000}))
    yield j("null byte prompt", '{"prompt": "a\\u0000cat", "model": "nope"}')
    yield "raw null byte", b'{"prompt": "a\x00cat"}', JSON
    yield j("null byte image path", '{"prompt": "a cat", "image": "/etc/passwd\\u0000.png"}')
    yield j("null byte model", '{"prompt": "a cat", "model": "\\u0000"}')
    yield j("rtl prompt and model", '{"prompt": "\\u202egnp.tac a", '
            '"model": "\\u202eananab-onan/elgoog", "size": "\\u202e1024x1024"}')
    yield j("zero width model", '{"prompt": "a cat", "model": "google/nano\\u200b-banana"}')
    # Arrays, scalars and objects where something else is expected.
    for shape in ("[]", '[{"prompt": "a cat"}]', '"a cat"', "42", "null", "true", "{}", ""):
        yield j(f"body {shape or 'empty'}", shape)
    yield j("whitespace body", " \n\t ")
    yield j("prompt is an object", '{"prompt": {"text": "a cat"}}')
    yield j("prompt is a list", '{"prompt": ["a", "cat"]}')
    yield j("image is an object", '{"prompt": "a cat", "image": {"url": "http://x"}}')
    yield j("images is an object", '{"prompt": "a cat", "images": {"0": "x"}}')
    yield j("images of junk", '{"prompt": "a cat", "images": [1, null, [], {}, {"image_url": 7}]}')
    yield j("mask is a list", '{"prompt": "a cat", "image": "x", "mask": ["x"]}')
    yield j("response_format junk", '{"prompt": "a cat", "response_format": "gif"}')
    yield j("stream junk", '{"prompt": "a cat", "stream": "yes"}')
    # Broken JSON.
    yield j("trailing comma", '{"prompt": "a cat",}')
    yield j("comment", '{"prompt": "a cat" /* hi */}')
    yield j("single quotes", "{'prompt': 'a cat'}")
    yield j("unterminated", '{"prompt": "a cat')
    yield j("two documents", '{"prompt": "a"}{"prompt": "b"}')
    # Multipart edits gone wrong.
    boundary = "nastyboundary"

    def form(*parts: tuple[str, bytes, str | None]) -> tuple[bytes, dict[str, str]]:
        body = b""
        for name, value, filename in parts:
            disposition = f'form-data; name="{name}"'
            if filename is not None:
                disposition += f'; filename="{filename}"'
            body += (f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n").encode()
            body += value + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        return body, {"content-type": f"multipart/form-data; boundary={boundary}"}

    body, headers = form(("prompt", b"a cat", None), ("image", b"not an image", "../../x.png"))
    yield "multipart, text image", body, headers
    body, headers = form(("prompt", b"a cat", None), ("n", b"9" * 5000, None))
    yield "multipart, n of 5000 digits", body, headers
    body, headers = form(("prompt", b"a cat", None), ("stream", b"maybe", None))
    yield "multipart, stream junk", body, headers
    body, headers = form(("prompt", b"\xff\xfe", None), ("image", b"\x89PNG", "a.png"))
    yield "multipart, invalid utf-8 field", body, headers
    body, headers = form(("prompt", b"a cat", None), ("evil", b"\x89PNG", "a.png"))
    yield "multipart, unexpected file field", body, headers
    body, headers = form(*[("image", b"x", f"{i}.png") for i in range(40)])
    yield "multipart, 40 files", body, headers
    body, headers = form(*[(f"f{i}", b"x", None) for i in range(300)])
    yield "multipart, 300 fields", body, headers
    body, headers = form(("prompt", b"a cat", None), ("image", b"/etc/passwd", None))
    yield "multipart, image path field", body, headers


def post_routes(gateway: Gateway) -> list[str]:
    """Every POST route the gateway serves, including those left out of the schema."""
    def walk(routes: list[Any]) -> Iterator[Any]:
        for route in routes:
            inner = getattr(route, "original_router", None)  # an included router
            yield from walk(inner.routes) if inner is not None else (route,)

    paths = [route.path for route in walk(gateway.app.routes)
             if "POST" in (getattr(route, "methods", None) or ())]
    assert "/v1/images/generations" in paths and "/images/edits" in paths, paths
    return paths


def test_nasty_bodies_on_every_post_route(fuzzed_gateway: Gateway, sandbox: Sandbox) -> None:
    routes = post_routes(fuzzed_gateway)
    corpus = list(nasties())
    answered = 0
    with httpx.Client(base_url=fuzzed_gateway.url, timeout=30) as client:
        for path in routes:
            for label, body, headers in corpus:
                response = client.post(path, content=body, headers=headers)
                assert_envelope(response.status_code, response.headers.get("content-type", ""),
                                response.content, f"POST {path} with {label}")
                answered += response.status_code == 200
        assert client.get("/health").status_code == 200
        assert client.get("/v1/models").status_code == 200
    # Refusals cost nothing: every payment bought an answer (identical ones may share one).
    assert sandbox.stats()["payments_count"] <= answered
