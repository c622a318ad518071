"""`stream: true` and errors, with the real OpenAI SDK: an error before any payment is an HTTP
error the SDK raises (and retries) as it does without streaming; once a payment is signed, a
failure is an `error` event in the stream, carrying the payment."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from openai import OpenAI

COGVIEW = {"model": "cogview", "size": "512x512"}
COGVIEW_PRICE = 16_750  # micro-USDC: 0.015 × 1.05 + 0.001
BUSY = {"kind": "respond", "phase": "unpaid", "status": 503, "headers": {"Retry-After": "0"},
        "body": {"error": "busy"}, "times": 1}


def sdk(gw, retries: int = 2) -> OpenAI:
    return OpenAI(base_url=gw.v1, api_key="unused", max_retries=retries)


def streamed(client: OpenAI, prompt: str = "x") -> list:
    return list(client.images.generate(**COGVIEW, prompt=prompt, stream=True))


def test_a_streamed_request_the_upstream_was_too_busy_for_is_retried_by_the_sdk(gateway,
                                                                                sandbox):
    sandbox.faults(BUSY)
    events = streamed(sdk(gateway))
    assert [e.type for e in events] == ["image_generation.completed"]
    assert sandbox.stats()["payments_count"] == 1


def test_without_retries_the_busy_upstream_is_an_sdk_status_error(gateway, sandbox):
    sandbox.faults(BUSY)
    with pytest.raises(openai.InternalServerError) as raised:
        streamed(sdk(gateway, retries=0))
    assert raised.value.status_code == 503 and raised.value.code == "upstream_error"
    assert raised.value.response.headers["retry-after"] == "0"
    assert sandbox.stats()["payments_count"] == 0


@pytest.mark.parametrize("refusal", ["budget_exceeded", "payment_refused"])
def test_a_streamed_request_refused_before_signing_is_an_http_402(make_gateway, sandbox,
                                                                  refusal):
    if refusal == "budget_exceeded":  # over the per-request cap
        gw = make_gateway(max_usd_per_request=0.01)
    else:  # a challenge that fails our checks
        gw = make_gateway()
        sandbox.faults({"kind": "challenge", "override": {"payTo": "0x" + "12" * 20}})
    with pytest.raises(openai.APIStatusError) as raised:
        streamed(sdk(gw))
    assert raised.value.status_code == 402 and raised.value.code == refusal
    assert raised.value.response.headers["x-should-retry"] == "false"
    assert sandbox.stats()["payments_count"] == 0


def test_a_pre_authorized_stream_over_the_day_budget_is_an_http_402(make_gateway, sandbox):
    """With a learned price the payment is signed without a probe: the budget still refuses
    it before signing, and the SDK hears that as a 402."""
    gw = make_gateway(max_usd_per_day=1.5 * COGVIEW_PRICE / 1e6, preauth=True)
    assert len(streamed(sdk(gw), "first")) == 1  # the price is learned
    trips = sandbox.round_trips()
    with pytest.raises(openai.APIStatusError) as raised:
        streamed(sdk(gw), "second")
    assert (raised.value.status_code, raised.value.code) == (402, "budget_exceeded")
    assert sandbox.round_trips() == trips and sandbox.stats()["payments_count"] == 1


def test_a_failure_after_payment_stays_an_error_event_that_names_the_payment(gateway, sandbox):
    sandbox.faults({"kind": "respond", "phase": "paid", "status": 500,
                    "body": {"error": "provider down"}})
    with httpx.stream("POST", gateway.v1 + "/images/generations", timeout=30,
                      json={**COGVIEW, "prompt": "x", "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = r.read().decode()
    event, data = text.strip().split("\n")
    error = json.loads(data.removeprefix("data: "))["error"]
    assert event == "event: error" and error["payment"] == "signed"
    assert "was signed and sent" in error["message"]
    with pytest.raises(openai.APIError, match="was signed and sent") as raised:
        streamed(sdk(gateway))  # the SDK raises it as an error without a status
    assert not isinstance(raised.value, openai.APIStatusError)
    assert sandbox.stats()["payments_count"] == 2


def test_a_coalesced_stream_hears_the_shared_refusal_as_an_http_error(gateway, sandbox):
    """A second identical stream joins the first's work (no hooks of its own): it too gets
    the busy upstream's 503, and neither paid."""
    # the first's probe is held 2.5 s: the second, 0.3 s later, joins it on a slow box too
    sandbox.faults({"kind": "delay", "phase": "unpaid", "seconds": 2.5, "times": 1}, BUSY)
    raised: list[BaseException] = []

    def one() -> None:
        try:
            streamed(sdk(gateway, retries=0), "together")
        except Exception as exc:
            raised.append(exc)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.3)
    for thread in threads:
        thread.join(30)
    assert [getattr(e, "status_code", e) for e in raised] == [503, 503]
    assert sandbox.stats()["payments_count"] == 0 and sandbox.round_trips() == 1


def test_a_client_that_leaves_while_its_stream_is_held_pays_nothing(gateway, sandbox):
    sandbox.faults({"kind": "delay", "phase": "unpaid", "seconds": 1.5, "times": 1})
    with pytest.raises(httpx.ReadTimeout):  # no answer yet: it gives up and hangs up
        httpx.post(gateway.v1 + "/images/generations", timeout=0.5,
                   json={**COGVIEW, "prompt": "x", "stream": True})
    time.sleep(2.5)  # the probe's answer comes, and the work stops before signing
    assert sandbox.stats()["payments_count"] == 0
    assert gateway.http.get("/v1/spend").json()["latest"] == []


def test_a_slow_job_streams_keep_alives_through_the_sdk(make_gateway, sandbox, monkeypatch):
    """The 202 ends the hold: the stream starts, and keeps the connection alive while the
    job runs."""
    monkeypatch.setattr("clawrouter.api.streaming.KEEPALIVE_SECONDS", 0.2)
    sandbox.configure(slow_seconds=1.0)
    gw = make_gateway()
    with httpx.stream("POST", gw.v1 + "/images/generations", timeout=10,
                      json={"model": "gpt-image-2", "prompt": "slow", "stream": True}) as r:
        assert r.status_code == 200
        text = r.read().decode()
    assert text.count(": keep-alive") >= 2 and text.endswith("data: [DONE]\n\n")
    events = list(sdk(gw).images.generate(model="gpt-image-2", prompt="slow 2", stream=True))
    assert [e.type for e in events] == ["image_generation.completed"]
