"""An upstream that quotes our payment back: the client, the stream and the ledger never get it.

`Hostile` is a real upstream on loopback in front of the sandbox (which still verifies and
settles every payment it is forwarded); in each mode it answers a paid request, or the probe
that follows a refused one, with text quoting the signed header in some form. The gateway is a
real one; `leaks` (test_secrets_scrub) looks for every form of the header in what came back.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clawrouter.payment.wire import b64_json, decode_b64_json
from clawrouter.plaintext import REDACTED
from tests.servers import ServerThread
from tests.test_secrets_scrub import leaks, signature_of, words

COGVIEW = {"model": "cogview", "size": "512x512"}
HOP = {"host", "content-length", "transfer-encoding", "connection", "content-encoding", "date",
       "server"}


class Hostile:
    """An upstream that forwards to the sandbox, except where its `mode` says to quote the
    payment header it was sent (`headers`, in the order received)."""

    def __init__(self, sandbox_url: str) -> None:
        self.sandbox_url = sandbox_url
        self.mode = "pass_"
        self.headers: list[str] = []
        self.app = Starlette(routes=[Route("/{path:path}", self.handle,
                                           methods=["GET", "POST", "HEAD"])])

    async def handle(self, request: Request) -> Response:
        body = await request.body()
        paid = request.headers.get("payment-signature") or request.headers.get("x-payment")
        if paid and paid not in self.headers:
            self.headers.append(paid)
        answer = getattr(self, self.mode)(request, paid)
        if answer is not None:
            return answer
        async with httpx.AsyncClient(timeout=30) as client:
            forwarded = await client.request(
                request.method, self.sandbox_url + request.url.path, content=body,
                headers={k: v for k, v in request.headers.items() if k.lower() not in HOP})
        return self.forwarded(request, paid, forwarded)

    def forwarded(self, request: Request, paid: str | None, resp: httpx.Response) -> Response:
        return Response(resp.content, resp.status_code,
                        {k: v for k, v in resp.headers.items() if k.lower() not in HOP})

    # --- modes: None forwards the request to the sandbox ------------------------------------
    def pass_(self, request: Request, paid: str | None) -> None:
        return None

    def refuse_quoting_hex(self, request: Request, paid: str | None) -> Response | None:
        """402 for a paid request, its message and code the signature in groups of 4."""
        if not paid:
            return None
        groups = words(signature_of(paid)[2:].upper(), 4, ":")
        return JSONResponse({"error": {"message": f"signature {groups} is invalid",
                                       "code": groups[:99], "param": None}}, 402)

    def fail_quoting_base64(self, request: Request, paid: str | None) -> Response | None:
        """500 for a paid request, quoting the header and the signature's bytes in words."""
        if not paid:
            return None
        raw = base64.b64encode(b"x" + bytes.fromhex(signature_of(paid)[2:])).decode()
        return JSONResponse({"error": "boom", "message": f"bad header {words(paid, 12)}",
                             "hint": words(raw, 10)}, 500)

    def job_fails_quoting_hex(self, request: Request, paid: str | None) -> Response | None:
        """A slow job (202) whose poll says it failed, quoting the signature."""
        if not paid:
            return None
        if request.method == "POST":
            return JSONResponse({"poll_url": "/api/hostile-job", "status": "queued"}, 202)
        sig = signature_of(paid)[2:]
        return JSONResponse({"status": "failed", "error": f"rejected {words(sig, 6, '. ')}"})

    def polls_elsewhere_quoting_hex(self, request: Request, paid: str | None
                                    ) -> Response | None:
        """A slow job whose poll_url is on another host, named by the signature."""
        if not paid:
            return None
        host = words(signature_of(paid)[2:], 4, ".")
        return JSONResponse({"poll_url": f"https://{host}.example/poll", "status": "queued"},
                            202)

    def delivers_nothing_quoting_json(self, request: Request, paid: str | None
                                      ) -> Response | None:
        """A paid 200 with no image, quoting the signature in a base64 JSON of its own."""
        if not paid:
            return None
        quoted = base64.b64encode(json.dumps({"seen": signature_of(paid)}).encode()).decode()
        return JSONResponse({"created": 1, "data": [], "message": words(quoted, 10)})

    def result_url_quoting_header(self, request: Request, paid: str | None) -> Response | None:
        """A paid 200 whose image is on a private address (refused), its query the header."""
        return _image_at("http://10.255.0.1/image.png", paid)

    def result_url_failing_quoting_header(self, request: Request, paid: str | None
                                          ) -> Response | None:
        """A paid 200 whose image, on the upstream's own origin, is not there (a 404 the
        gateway defers and retries), its query the header."""
        return _image_at(f"{request.base_url}missing.png", paid)

    def busy_quoting_an_earlier_payment(self, request: Request, paid: str | None
                                        ) -> Response | None:
        """A 429 for the unpaid probe of a request, quoting the payment of an earlier one."""
        if paid or not self.headers:
            return None
        earlier = self.headers[-1]
        return JSONResponse({"error": f"slow down, {words(earlier, 16)}"}, 429,
                            {"Retry-After": earlier[:100], "Retry-After-Ms": earlier[-100:]})

    def refuse_then_probe_quoting_it(self, request: Request, paid: str | None
                                     ) -> Response | None:
        """A pre-authorised payment refused, and the fresh probe after it quoting that one:
        in its message (`probe_answer`), its challenge's x402Version, or its network."""
        if paid:
            return JSONResponse({"error": "price changed"}, 402)
        if self.probe_answer == "network":
            return None  # `ForeignNetwork` rewrites the sandbox's challenge
        return (self._busy_quoting if self.probe_answer == "message"
                else self._challenge_quoting)()

    probe_answer = "message"

    def _busy_quoting(self) -> Response:
        groups = words(signature_of(self.headers[-1])[2:], 4)
        return JSONResponse({"error": {"message": f"busy; last payment {groups}"}}, 503)

    def _challenge_quoting(self) -> Response:
        groups = words(signature_of(self.headers[-1])[2:], 4)
        return JSONResponse({}, 402, {"PAYMENT-REQUIRED": b64_json({"x402Version": groups,
                                                                   "accepts": [{}]})})


class ForeignNetwork(Hostile):
    """`refuse_then_probe_quoting_it` whose probe gets the sandbox's real challenge, its
    network the refused payment's signature."""

    def forwarded(self, request: Request, paid: str | None, resp: httpx.Response) -> Response:
        challenge = resp.headers.get("payment-required")
        if self.mode != "refuse_then_probe_quoting_it" or paid or not challenge:
            return super().forwarded(request, paid, resp)
        data = decode_b64_json(challenge)
        data["accepts"][0]["network"] = words(signature_of(self.headers[-1])[2:], 4)
        return JSONResponse(json.loads(resp.content or b"{}"), 402,
                            {"PAYMENT-REQUIRED": b64_json(data)})


@pytest.fixture
def hostile(sandbox) -> Iterator[Hostile]:
    upstream = Hostile(sandbox.url)
    server = ServerThread(upstream.app).start()
    upstream.url = server.url + "/api"
    yield upstream
    server.stop()


def gen(gw, prompt: str, **extra) -> httpx.Response:
    return httpx.post(gw.v1 + "/images/generations", timeout=30,
                      json={**COGVIEW, "prompt": prompt, **extra})


def notes(gw) -> str:
    """What `/v1/spend` (and so `clawrouter stats` and agents) shows of the payments."""
    return gw.http.get("/v1/spend", params={"latest": 50}).text


def _image_at(url: str, paid: str | None) -> Response | None:
    """A paid 200 naming `url` as its image, the payment header in its query."""
    if not paid:
        return None
    return JSONResponse({"created": 1, "data": [{"url": f"{url}?p={quote(paid, safe='')}"}]})


def assert_scrubbed(text: str, hostile: Hostile) -> None:
    assert hostile.headers, "no payment was sent: the test proves nothing"
    for header in hostile.headers:
        assert leaks(text, header) == [], text[:400]


@pytest.mark.parametrize("mode, status", [
    ("refuse_quoting_hex", 402), ("fail_quoting_base64", 500),
    ("job_fails_quoting_hex", 502), ("polls_elsewhere_quoting_hex", 502),
    ("delivers_nothing_quoting_json", 502)])
def test_an_error_quoting_the_payment_reaches_client_and_ledger_scrubbed(
        make_gateway, hostile: Hostile, mode: str, status: int) -> None:
    """The audit's finding: the envelope (and `/v1/spend`'s notes) carried a complete
    authorization. Every path an upstream's words take into an error: a refusal (message and
    code), a failure after payment, a failed job, a poll_url refused, a 200 without images."""
    gw = make_gateway(upstream=hostile.url)
    hostile.mode = mode
    r = gen(gw, f"quote {mode}")
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert REDACTED in error["message"], error
    assert_scrubbed(r.text, hostile)
    assert_scrubbed(notes(gw), hostile)


def test_a_streamed_error_quoting_the_payment_is_scrubbed(make_gateway, hostile: Hostile) -> None:
    gw = make_gateway(upstream=hostile.url)
    hostile.mode = "refuse_quoting_hex"
    with httpx.stream("POST", gw.v1 + "/images/generations", timeout=30,
                      json={**COGVIEW, "prompt": "quoted in a stream", "stream": True}) as r:
        text = r.read().decode()
    assert "event: error" in text and REDACTED in text, text[:400]
    assert_scrubbed(text, hostile)


@pytest.mark.parametrize("probe_answer", ["message", "challenge", "network"])
def test_a_probe_quoting_the_refused_preauthorised_payment_is_scrubbed(
        make_gateway, sandbox, probe_answer: str) -> None:
    """A request pays first from a learned price; refused, it probes afresh: what that probe's
    answer quotes of the first payment is scrubbed too (a request scrubs all it sent)."""
    upstream = ForeignNetwork(sandbox.url)
    server = ServerThread(upstream.app).start()
    try:
        gw = make_gateway(upstream=server.url + "/api")
        upstream.mode = "pass_"
        assert gen(gw, "learn the price").status_code == 200
        upstream.mode, upstream.probe_answer = "refuse_then_probe_quoting_it", probe_answer
        r = gen(gw, "paid from the learned price")
        assert r.status_code in (402, 503), r.text
        error = r.json()["error"]
        assert error["payment"] == "rejected" and REDACTED in error["message"], error
        assert len(upstream.headers) == 2  # the delivered payment, then the refused one
        assert_scrubbed(r.text, upstream)
        assert_scrubbed(notes(gw), upstream)
    finally:
        server.stop()


def test_an_unpaid_error_quoting_another_requests_payment_is_redacted(
        make_gateway, hostile: Hostile) -> None:
    """Another request's header is not this one's to know: its long runs are redacted all the
    same, and the upstream's Retry-After passes only as a delay, never as its text."""
    gw = make_gateway(upstream=hostile.url)
    hostile.mode = "pass_"
    assert gen(gw, "an earlier request").status_code == 200
    hostile.mode = "busy_quoting_an_earlier_payment"
    r = httpx.post(gw.v1 + "/images/generations", timeout=30,
                   json={"model": "nano-banana", "prompt": "another request"})
    assert r.status_code == 429 and REDACTED in r.json()["error"]["message"], r.text
    assert "retry-after" not in r.headers and "retry-after-ms" not in r.headers
    assert_scrubbed(r.text + json.dumps(dict(r.headers)), hostile)


@pytest.mark.parametrize("mode, logged_as, names", [
    ("result_url_quoting_header", "refused", "10.255.0.1"),  # on a private address
    ("result_url_failing_quoting_header", "deferred", "missing.png"),  # not there yet
])
def test_a_result_url_quoting_the_payment_is_logged_scrubbed(make_gateway, hostile: Hostile,
                                                             caplog, mode: str, logged_as: str,
                                                             names: str) -> None:
    gw = make_gateway(upstream=hostile.url)
    hostile.mode = mode
    caplog.set_level(logging.WARNING, logger="clawrouter")
    gen(gw, "a result the gateway cannot store")
    logged = [rec.getMessage() for rec in caplog.records if logged_as in rec.getMessage()]
    assert logged and names in logged[0], caplog.text[-400:]
    assert_scrubbed("\n".join(logged), hostile)
