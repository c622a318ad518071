"""Faults, one test each: the upstream misbehaves, the client leaves, the host fails.

For every fault: the gateway stays up, the client gets a clear envelope, nothing is paid twice,
and the ledger agrees with what the sandbox saw.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import subprocess
import threading
import time

import httpx
import openai
import pytest

from clawrouter.payment import policy
from clawrouter.sandbox import verify as sandbox_verify
from clawrouter.sandbox.images import make_png
from clawrouter.upstream import jobs
from tests.servers import free_port
from tests.servers import leaving, until

COGVIEW = {"model": "cogview", "size": "512x512"}


def gen(gw, prompt="fault", timeout=30, **extra):
    return httpx.post(gw.v1 + "/images/generations", timeout=timeout,
                      json={**COGVIEW, "prompt": prompt, **extra})


def rows(gw):
    return gw.http.get("/v1/spend").json()["latest"]


def still_serving(gw, sandbox):
    sandbox.faults()
    assert gen(gw, "after the fault").status_code == 200


def error(r):
    body = r.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}
    return body["error"]


# --- upstream ------------------------------------------------------------------------------

def test_reset_before_payment_is_a_502_that_paid_nothing(gateway, sandbox):
    sandbox.faults({"kind": "drop", "phase": "unpaid"})
    r = gen(gateway)
    assert r.status_code == 502 and "Nothing was paid" in error(r)["message"]
    assert sandbox.stats()["payments_count"] == 0 and rows(gateway) == []
    still_serving(gateway, sandbox)


@pytest.mark.parametrize("phase, status, paid", [("unpaid", 504, 0), ("paid", 502, 1)])
def test_an_upstream_that_hangs_past_the_timeout(make_gateway, own_sandbox, monkeypatch,
                                                 phase, status, paid):
    """Unpaid, `upstream_timeout` is the limit. Paid, the payment can settle until its
    authorization expires, so the gateway waits that long (here 6 s) before it gives up,
    rather than hang up on an image that is then paid for."""
    sandbox = own_sandbox  # the hung request ends after the test, unseen by the next one
    # The sandbox (in this process) accepts an authorization valid for 2 s more, not only for
    # x402's 6, and the gateway signs one: the wait is for the authorization, whatever its
    # length.
    monkeypatch.setattr(sandbox_verify, "MIN_VALIDITY_SECONDS", 2)
    monkeypatch.setattr(policy, "MIN_TIMEOUT_SECONDS", 2)
    sandbox.configure(max_timeout_seconds=6)
    gw = make_gateway(sandbox.api, upstream_timeout=0.5)
    # the hang outlasts what the gateway may wait by far: 0.5 s unpaid, 6 s paid
    sandbox.faults({"kind": "delay", "phase": phase, "seconds": 12 if paid else 6, "times": 1})
    started = time.monotonic()
    r = gen(gw)
    assert r.status_code == status, r.text
    # waited for the authorization (paid), or the 0.5 s, not even half of it (unpaid)
    assert (time.monotonic() - started > 4) is bool(paid)
    assert r.headers.get("x-should-retry") == ("false" if paid else None)
    # sent and never answered: it may have settled, and is pending until the chain tells
    assert ("may have settled" in error(r)["message"]) is bool(paid)
    assert sandbox.stats()["payments_count"] == paid
    assert [row["status"] for row in rows(gw)] == ["failed_after_payment"] * paid
    still_serving(gw, sandbox)


def test_a_paid_request_slower_than_the_upstream_timeout_is_waited_for(make_gateway, sandbox):
    """An answer that comes after `upstream_timeout` but while the payment can still settle
    is the image the user pays for: the gateway waits for it."""
    gw = make_gateway(upstream_timeout=0.5)
    sandbox.faults({"kind": "delay", "phase": "paid", "seconds": 1.5, "times": 1})
    r = gen(gw, "slow but paid")
    assert r.status_code == 200, r.text
    assert sandbox.stats()["settled_count"] == 1
    assert [row["status"] for row in rows(gw)] == ["settled"]


@pytest.mark.parametrize("status, headers", [(500, {}), (503, {"Retry-After": "3"})])
def test_unpaid_5xx_pass_through_with_retry_after(gateway, sandbox, status, headers):
    sandbox.faults({"kind": "respond", "phase": "unpaid", "status": status, "headers": headers,
                    "body": {"error": "upstream trouble"}})
    r = gen(gateway)
    assert r.status_code == status and "upstream trouble" in error(r)["message"]
    assert r.headers.get("retry-after") == headers.get("Retry-After")
    assert error(r)["payment"] == "none"
    assert sandbox.stats()["payments_count"] == 0


@pytest.mark.parametrize("phase, status", [("unpaid", 401), ("unpaid", 403), ("paid", 401)])
def test_the_upstreams_401_and_403_are_not_passed_off_as_this_gateways(gateway, sandbox,
                                                                       phase, status):
    """The upstream refusing *our* access (a wrong upstream_url, say) is an upstream failure,
    a 502: passed through, the OpenAI SDK raises AuthenticationError and its user suspects
    the gateway's own API key."""
    sandbox.faults({"kind": "respond", "phase": phase, "status": status,
                    "body": {"error": "API key required"}})
    client = openai.OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0)
    with pytest.raises(openai.InternalServerError) as raised:
        client.images.generate(model="cogview", prompt="fault", size="512x512")
    body = raised.value.body
    assert raised.value.status_code == 502 and body["code"] == "upstream_auth"
    assert f"HTTP {status}" in body["message"] and "API key required" in body["message"]
    assert body["payment"] == ("signed" if phase == "paid" else "none")


@pytest.mark.parametrize("status", [429, 503])
def test_a_paid_failure_carries_no_retry_after(gateway, sandbox, status):
    """After a payment no answer invites a retry: not `x-should-retry` (the OpenAI SDK's),
    and not the upstream's `Retry-After` either, which other clients honour (one waiting
    past the coalescing window would pay again)."""
    sandbox.faults({"kind": "respond", "phase": "paid", "status": status,
                    "headers": {"Retry-After": "90", "Retry-After-Ms": "90000"},
                    "body": {"error": "busy"}})
    r = gen(gateway)
    assert r.status_code == status and error(r)["payment"] == "signed", r.text
    assert r.headers["x-should-retry"] == "false"
    assert "retry-after" not in r.headers and "retry-after-ms" not in r.headers
    assert sandbox.stats()["payments_count"] == 1


@pytest.mark.parametrize("body", [
    {"error": {"message": "bad\x1b]52;c;ZXZpbA==\x07\x1b[2J\r\u2028" + "x" * 5000,
               "code": "evil\x1b[31m"}},
    "bad\x1b[2J\r" + "y" * 5000,  # not JSON: its first 300 bytes
])
def test_an_upstream_message_reaches_clients_as_plain_bounded_text(gateway, sandbox, body):
    """The upstream's words reach terminals (`clawrouter generate`), agents and the ledger:
    no terminal escapes (a clipboard write, a cleared screen), no line breaks, bounded."""
    sandbox.faults({"kind": "respond", "phase": "unpaid", "status": 400, "body": body})
    r = gen(gateway)
    assert r.status_code == 400, r.text
    message, code = error(r)["message"], error(r)["code"]
    assert message.startswith("Upstream error: bad ") and len(message) < 600
    assert not any(ord(c) < 32 or 0x7f <= ord(c) <= 0x9f or c in "\u2028\u2029"
                   for c in message + code)
    assert sandbox.stats()["payments_count"] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_the_request_log_says_what_became_of_a_failed_paid_request(gateway, sandbox, caplog,
                                                                 stream):
    """A stream's error comes after its 200: the log line must still say it failed, and for
    any failed request whether a payment was involved (here: signed and sent)."""
    import logging

    caplog.set_level(logging.INFO, logger="clawrouter.access")
    sandbox.faults({"kind": "respond", "phase": "paid", "status": 500,
                    "body": {"error": "provider down"}})
    r = gen(gateway, "logged", stream=stream)
    assert (r.status_code == 200) is stream, r.text

    def lines() -> list[dict]:  # written once the response has ended, on the server's thread
        return [json.loads(rec.getMessage()) for rec in caplog.records
                if rec.name == "clawrouter.access" and "generations" in rec.getMessage()]

    deadline = time.monotonic() + 5
    while not lines() and time.monotonic() < deadline:
        time.sleep(0.02)
    (line,) = lines()
    assert line["outcome"] == "failed_after_payment" and line["payment"] == "signed", line
    assert line["status"] == r.status_code


def test_the_request_log_names_refusals_made_before_the_app(make_gateway, caplog):
    """Refusals the middleware makes itself (an oversized body by its declared length, a
    missing API key) are logged by their code, as the app's own errors are."""
    import logging

    caplog.set_level(logging.INFO, logger="clawrouter.access")
    gw = make_gateway(max_image_mb=0.01, api_key="k")  # bodies over 40 KB are refused
    big = httpx.post(gw.v1 + "/images/generations", content=b"x" * 100_000,
                     headers={"authorization": "Bearer k", "content-type": "application/json"})
    keyless = httpx.get(gw.v1 + "/models")
    assert (big.status_code, keyless.status_code) == (413, 401)

    def outcomes() -> list[str]:
        return [json.loads(rec.getMessage())["outcome"] for rec in caplog.records
                if rec.name == "clawrouter.access"]

    deadline = time.monotonic() + 5
    while len(outcomes()) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sorted(outcomes()) == ["body_too_large", "invalid_api_key"]


def test_a_failed_jobs_reason_reaches_the_client_and_ledger_as_plain_text(make_gateway,
                                                                         sandbox):
    """A slow job's failure reason is the upstream's text too: plain, bounded, in the answer
    and in the ledger's note."""
    gw = make_gateway(poll_deadline=30)
    evil = "bad\x1b]52;c;ZXZpbA==\x07\x1b[2J\r\nline2" + "x" * 5000
    sandbox.faults({"kind": "job"}, {"kind": "respond", "phase": "poll", "status": 500,
                                      "body": {"status": "failed", "error": evil}})
    r = gen(gw)
    assert r.status_code == 502 and error(r)["code"] == "job_failed", r.text
    (row,) = rows(gw)
    for text in (error(r)["message"], row["note"]):
        assert "bad" in text and len(text) < 1500
        assert not any(ord(c) < 32 or 0x7f <= ord(c) <= 0x9f for c in text), text[:80]


@pytest.mark.parametrize("body, content_type", [
    ("<html>oops</html>", "text/html"),
    ({"created": 1, "data": []}, None),
    # items with no image in any usable form: not a 200 with empty entries
    ({"created": 1, "data": [{"revised_prompt": "x"}, {"url": "/relative.png"},
                             {"url": "data:image/png;base64,%%%"}]}, None),
    ("[" * 50_000 + "]" * 50_000, "application/json"),  # nesting deeper than any parser allows
])
def test_a_paid_200_without_images_is_reported_not_retried(gateway, sandbox, body, content_type):
    rule = {"kind": "respond", "phase": "paid", "status": 200, "body": body}
    if content_type:
        rule["content_type"] = content_type
    sandbox.faults(rule)
    r = gen(gateway)
    assert r.status_code == 502 and r.headers["x-should-retry"] == "false"
    assert "payment of $0.01675 was signed" in error(r)["message"]
    assert sandbox.stats()["payments_count"] == 1
    assert gen(gateway).status_code == 502  # the same request is not paid again
    assert sandbox.stats()["payments_count"] == 1
    # Nothing delivered and no receipt: whether it settled is the chain's to say, so the
    # payment stays pending (reconciled), not counted as settled spend for good.
    (row,) = rows(gateway)
    assert row["status"] == "failed_after_payment", row
    assert gateway.http.get("/v1/spend").json()["today"]["micro"] == 0


def test_a_receipt_with_a_malformed_transaction_still_delivers_the_image(gateway, sandbox):
    """The receipt is the upstream's word, unauthenticated: a hash that is not one (here with
    a newline after it, which a regex's `$` lets through) must not break a paid answer."""
    receipt = {"success": True, "transaction": "0x" + "ab" * 32 + "\n"}
    sandbox.faults({"kind": "respond", "phase": "paid", "status": 200,
                    "body": {"created": 1, "data": [
                        {"b64_json": base64.b64encode(make_png(8, 8, 1)).decode()}]},
                    "headers": {"PAYMENT-RESPONSE": base64.b64encode(
                        json.dumps(receipt).encode()).decode()}})
    r = gen(gateway)
    assert r.status_code == 200, r.text
    assert "x-clawrouter-transaction" not in r.headers
    (row,) = rows(gateway)
    assert row["transaction"] is None and sandbox.stats()["payments_count"] == 1


def test_an_answer_with_some_empty_entries_delivers_the_images_at_their_true_price(gateway,
                                                                                 sandbox):
    png = base64.b64encode(make_png(8, 8, 3)).decode()
    sandbox.faults({"kind": "respond", "phase": "paid", "status": 200, "settle": True,
                    "body": {"created": 1, "data": [{"revised_prompt": "empty"},
                                                    {"b64_json": "@@@@"},  # decodes to b""
                                                    {"b64_json": png}]}})
    r = gen(gateway, "some empty")
    assert r.status_code == 200 and len(r.json()["data"]) == 1, r.text
    (image,) = gateway.http.get("/v1/images").json()["data"]
    assert image["cost_usd"] == 0.01675  # the whole price, not half of it


def test_a_streamed_image_the_gateway_could_not_store_is_a_paid_error_with_its_url(
        gateway, sandbox):
    """Only the upstream's URL is known (its download failed): a stream carries bytes, so it
    ends in an error event naming the payment and that URL, never an empty `b64_json`."""
    missing = sandbox.url + "/media/doesnotexist.png"
    sandbox.faults({"kind": "respond", "phase": "paid", "status": 200, "settle": True,
                    "body": {"created": 1, "data": [{"url": missing}]}})
    with httpx.stream("POST", gateway.v1 + "/images/generations", timeout=30,
                      json={**COGVIEW, "prompt": "streamed", "stream": True}) as r:
        events = [line for line in r.iter_lines() if line.startswith("data:")]
    assert len(events) == 1, events
    event = json.loads(events[0][len("data:"):])
    assert event["error"]["code"] == "image_not_stored"
    assert missing in event["error"]["message"]
    assert sandbox.stats()["payments_count"] == 1


def test_polls_that_fail_then_recover_still_complete(gateway, sandbox):
    sandbox.faults({"kind": "job"},
                   {"kind": "respond", "phase": "poll", "status": 500, "times": 2,
                    "body": {"error": "poll hiccup"}},
                   {"kind": "drop", "phase": "poll", "times": 1})
    r = gen(gateway)
    assert r.status_code == 200, r.text
    stats = sandbox.stats()
    assert stats["settled_count"] == 1 and stats["payments_count"] == 1
    assert [row["status"] for row in rows(gateway)] == ["settled"]


@pytest.mark.parametrize("running, data", [
    ("in_progress", None), ("processing", None),
    # `data` that holds no image: progress reports, placeholders
    ("in_progress", {"progress": 0.5}), ("in_progress", "pending"), ("in_progress", [{}]),
    ("in_progress", [None]), ("in_progress", [{"progress": 0.5}]),
])
def test_a_poll_is_done_only_when_its_job_says_so(gateway, sandbox, running, data):
    """BlockRun's SDKs end polling on the job's status, not the HTTP code: a 200 that says
    the job is still running (whatever it calls that) and brings no image settled nothing,
    and polling goes on to the image."""
    body = {"id": "img_1", "status": running}
    if data is not None:
        body["data"] = data
    # the two faked answers come first however soon the job is done: 0.2 s, not 0.6
    sandbox.configure(slow_seconds=0.2)
    sandbox.faults({"kind": "job"},
                   {"kind": "respond", "phase": "poll", "status": 200, "times": 2,
                    "body": body})
    r = gen(gateway)
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["url"].startswith(gateway.url + "/images/")
    stats = sandbox.stats()
    assert stats["settled_count"] == 1 and stats["polls"] >= 3
    assert stats["polls_with_another_authorization"] == 0  # never signed afresh for a poll
    assert [row["status"] for row in rows(gateway)] == ["settled"]


def test_a_poll_that_brings_images_ends_the_job_whatever_its_status_says(gateway, sandbox):
    sandbox.faults({"kind": "job"}, {"kind": "respond", "phase": "poll", "status": 200,
                                     "settle": True, "times": 1, "body": {
                                         "status": "succeeded", "data": [{"b64_json": base64.
                                         b64encode(make_png(8, 8, 2)).decode()}]}})
    r = gen(gateway)
    assert r.status_code == 200, r.text
    assert [row["status"] for row in rows(gateway)] == ["settled"]
    assert sandbox.stats()["polls"] == 1


def test_a_200_poll_without_status_or_images_leaves_the_payment_pending(make_gateway,
                                                                        sandbox):
    """Not the completed job we know, yet a 200 that may have been it: polling goes on, and
    if the job never says it completed, the payment stays pending (never recorded settled
    on a guess, nor let go)."""
    gw = make_gateway(poll_deadline=0.6)
    sandbox.configure(slow_seconds=30)
    sandbox.faults({"kind": "job"}, {"kind": "respond", "phase": "poll", "status": 200,
                                     "times": 1, "body": {"id": "img_1"}})
    r = gen(gw)
    assert r.status_code == 504 and error(r)["payment"] == "signed", r.text
    assert "may have settled" in error(r)["message"]
    assert sandbox.stats()["polls"] >= 2  # it polled on
    (row,) = rows(gw)
    assert row["status"] == "failed_after_payment" and "without a job status" in row["note"]


def test_a_poll_that_says_the_job_failed_ends_it_whatever_its_http_status(make_gateway,
                                                                          sandbox):
    gw = make_gateway(poll_deadline=30)
    sandbox.faults({"kind": "job"},
                   {"kind": "respond", "phase": "poll", "status": 500,
                    "body": {"status": "failed", "error": "content policy violation"}})
    started = time.monotonic()
    r = gen(gw)
    assert r.status_code == 502 and r.headers["x-should-retry"] == "false", r.text
    assert (error(r)["code"], error(r)["payment"]) == ("job_failed", "not_settled")
    assert "content policy violation" in error(r)["message"]
    assert time.monotonic() - started < 10  # told, not polled to the deadline
    assert sandbox.stats()["settled_count"] == 0
    assert [row["status"] for row in rows(gw)] == ["rejected"]


def test_a_poll_that_hangs_is_cut_at_the_deadline(make_gateway, own_sandbox):
    """Each poll gets only the time left before the deadline (and the moment a completing poll
    takes to settle), not a whole `upstream_timeout`: a hung poll sent just before it cannot
    keep the client waiting, nor outlive the authorization."""
    sandbox = own_sandbox  # the hung poll ends after the test, unseen by the next one
    gw = make_gateway(sandbox.api, poll_deadline=0.5)
    sandbox.configure(slow_seconds=30)
    sandbox.faults({"kind": "delay", "phase": "poll", "seconds": 8})
    started = time.monotonic()
    r = httpx.post(gw.v1 + "/images/generations", timeout=30,
                   json={"model": "gpt-image-2", "prompt": "hung poll"})
    assert r.status_code == 504, r.text
    assert time.monotonic() - started < 6.5, "a poll outlived the deadline by its own timeout"
    assert sandbox.stats()["settled_count"] == 0


def test_polls_still_running_at_the_deadline_cost_nothing(make_gateway, sandbox):
    gw = make_gateway(poll_deadline=0.6)
    sandbox.configure(slow_seconds=30)
    sandbox.faults({"kind": "job"}, {"kind": "respond", "phase": "poll", "status": 429})
    r = gen(gw)
    assert r.status_code == 504 and "No payment was settled" in error(r)["message"]
    assert r.headers["x-should-retry"] == "false"
    assert sandbox.stats()["settled_count"] == 0
    assert [row["status"] for row in rows(gw)] == ["rejected"]


def test_a_slow_job_is_signed_for_its_poll_window_and_never_polled_past_expiry(make_gateway,
                                                                              sandbox,
                                                                              monkeypatch):
    """A slow model's job settles on the poll that completes it, so its authorization must
    outlive the polling: the gateway raises a short `maxTimeoutSeconds` to the poll window
    (within `max_timeout_seconds`). Where it may not, it stops polling before the
    authorization expires and says so: nothing settled, no image."""
    # 3 s, which the sandbox (in this process) is made to accept and the gateway to sign
    # (x402's least is 6); the job outlives the short window (polls stop 2 s before it ends,
    # 0-1 s in), not the long one
    monkeypatch.setattr(sandbox_verify, "MIN_VALIDITY_SECONDS", 2)
    monkeypatch.setattr(policy, "MIN_TIMEOUT_SECONDS", 2)
    sandbox.configure(max_timeout_seconds=3, slow_seconds=2)
    signs_longer = make_gateway(poll_deadline=20)
    may_not = make_gateway(poll_deadline=20)
    may_not.gw.settings.max_timeout_seconds = 3  # (below what the settings let a user set)
    answers = {}

    def ask(name, gw):
        answers[name] = httpx.post(gw.v1 + "/images/generations", timeout=30,
                                   json={"model": "gpt-image-2", "prompt": name})

    threads = [threading.Thread(target=ask, args=item) for item in
               (("longer", signs_longer), ("expiring", may_not))]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers["longer"].status_code == 200, answers["longer"].text
    short, longer = sorted(p["valid_before"] for p in sandbox.stats()["payments_received"])
    assert abs((longer - short) - (80 - 3)) <= 1  # poll_deadline + 60 s, not the challenge's 3
    expiring = answers["expiring"]
    assert expiring.status_code == 504 and expiring.headers["x-should-retry"] == "false"
    assert "authorization was about to expire before the image was ready" \
        in error(expiring)["message"]
    assert "No payment was settled" in error(expiring)["message"]
    assert sandbox.stats()["settled_count"] == 1 and time.monotonic() - started < 15
    assert [row["status"] for row in rows(may_not)] == ["rejected"]


def test_a_lost_poll_answer_leaves_the_payment_pending_never_refunded(make_gateway, sandbox):
    """BlockRun settles on the poll that completes the job: one whose answer was lost may have
    settled, so the budget keeps holding the amount until the chain tells."""
    gw = make_gateway(poll_deadline=0.6)
    sandbox.faults({"kind": "job"}, {"kind": "drop", "phase": "poll", "settle": True})
    r = gen(gw)
    assert r.status_code == 504 and r.headers["x-should-retry"] == "false"
    assert "may have settled" in error(r)["message"] and error(r)["payment"] == "signed"
    assert sandbox.stats()["settled_count"] == 1
    (row,) = rows(gw)
    assert row["status"] == "failed_after_payment" and "poll 1" in row["note"]
    assert gw.http.get("/v1/spend").json()["today"]["pending"]["micro"] == row["amount"]


def test_a_failed_poll_answer_with_a_settlement_receipt_is_a_settled_payment(make_gateway,
                                                                            sandbox):
    """A 504 to the completing poll that still carries the settlement receipt is no lost
    answer: the money moved, and the client and the ledger say so, with the transaction."""
    gw = make_gateway(poll_deadline=0.6)
    sandbox.faults({"kind": "job"},
                   {"kind": "respond", "status": 504, "phase": "poll", "settle": True})
    r = gen(gw)
    assert r.status_code == 502 and r.headers["x-should-retry"] == "false"
    assert error(r)["payment"] == "settled" and sandbox.stats()["settled_count"] == 1
    (row,) = rows(gw)
    assert row["status"] == "settled" and row["transaction"] == error(r)["transaction"], row
    assert gw.http.get("/v1/spend").json()["today"]["micro"] == row["amount"]


def test_a_job_whose_202_was_lost_is_polled_not_paid_again(gateway, sandbox):
    """The paid POST started a job but its answer was lost; the resend of the same payment is
    refused as already used, naming the job (BlockRun: PAYMENT_REPLAY with `poll_url`): the
    gateway polls that job with the same header and delivers the image it paid for."""
    sandbox.faults({"kind": "job", "lost": True, "times": 1})
    r = gen(gateway, "lost 202")
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["url"].startswith(gateway.url + "/images/")
    stats = sandbox.stats()
    assert stats["payments_count"] == 1 and stats["settled_count"] == 1
    assert [row["status"] for row in rows(gateway)] == ["settled"]


@pytest.mark.parametrize("then", ["settlement refused", "job failed"])
def test_a_failure_after_a_lost_poll_answer_leaves_the_payment_pending(make_gateway, sandbox,
                                                                       then):
    """The lost poll may have completed the job and settled; a later poll that is refused (the
    authorization is used) or reports the job failed does not make it unpaid."""
    gw = make_gateway(poll_deadline=5)
    lost = {"kind": "drop", "phase": "poll", "settle": True, "times": 1}
    if then == "job failed":
        sandbox.faults({"kind": "job", "outcome": "failed"}, lost)
    else:
        sandbox.faults({"kind": "job"}, lost, {
            "kind": "respond", "phase": "poll", "status": 402,
            "body": {"error": "Payment settlement failed", "code": "PAYMENT_REPLAY"}})
    r = gen(gw)
    assert r.status_code in (402, 502) and r.headers["x-should-retry"] == "false", r.text
    assert error(r)["payment"] == "signed" and "may have settled" in error(r)["message"]
    assert sandbox.stats()["settled_count"] == 1
    (row,) = rows(gw)
    assert row["status"] == "failed_after_payment"
    assert gw.http.get("/v1/spend").json()["today"]["pending"]["micro"] == row["amount"]


def test_a_client_that_leaves_after_a_lost_poll_is_not_paid_for_again(make_gateway, sandbox,
                                                                      monkeypatch):
    monkeypatch.setattr(jobs, "REJOIN_SECONDS", 0.3)  # (how long polling waits for a resend)
    gw = make_gateway(poll_deadline=30)
    sandbox.configure(slow_seconds=30)
    sandbox.faults({"kind": "job"},
                   {"kind": "drop", "phase": "poll", "settle": True, "times": 1})
    with leaving(gw.v1 + "/images/generations", {**COGVIEW, "prompt": "left while polling"}):
        until(lambda: sandbox.stats()["polls"] > 1)  # polled on after the lost answer
    until(lambda: [row["status"] for row in rows(gw)] == ["failed_after_payment"])
    again = gen(gw, "left while polling")  # the SDK's retry of the same request
    assert again.status_code == 502 and again.headers["x-should-retry"] == "false"
    assert "lost" in error(again)["message"]
    assert "may have settled" in error(again)["message"]
    assert "should not have been charged" not in error(again)["message"]
    assert sandbox.stats()["payments_count"] == 1


@pytest.mark.parametrize("poll_url", ["http://[bad/x", "https://jobs.elsewhere.example/x",
                                      "the API's host over another scheme"])
def test_an_unusable_poll_url_after_payment_is_a_paid_failure_never_retried(gateway, sandbox,
                                                                           poll_url):
    if poll_url.startswith("the API's host"):  # the payment header must not change scheme
        poll_url = sandbox.url.replace("http://", "https://") + "/api/v1/images/generations/x"
    sandbox.faults({"kind": "respond", "phase": "paid", "status": 202,
                    "body": {"status": "queued", "poll_url": poll_url}})
    for _ in range(2):  # the retry gets the first outcome, it does not sign again
        r = gen(gateway, "odd poll url")
        assert r.status_code == 502 and r.headers["x-should-retry"] == "false", r.text
        assert "was signed and sent" in error(r)["message"]
    assert sandbox.stats()["payments_count"] == 1
    assert [row["status"] for row in rows(gateway)] == ["failed_after_payment"]


def test_a_settlement_failure_on_the_poll_is_reported_as_not_charged(gateway, sandbox):
    sandbox.faults({"kind": "job"}, {"kind": "reject", "phase": "poll", "code": "PAYMENT_UNFUNDED"})
    r = gen(gateway)
    assert r.status_code == 402 and r.headers["x-should-retry"] == "false"
    assert [row["status"] for row in rows(gateway)] == ["rejected"]


# --- client --------------------------------------------------------------------------------

def test_a_client_that_leaves_after_signing_still_gets_its_image_stored(gateway, sandbox):
    sandbox.faults({"kind": "delay", "phase": "paid", "seconds": 2.0})
    with leaving(gateway.v1 + "/images/generations", {**COGVIEW, "prompt": "paid then gone"}):
        until(lambda: sandbox.paid() == 1)  # its payment is on its way: then it leaves
    # stored after the ledger update
    until(lambda: gateway.http.get("/v1/images").json()["data"])
    assert [row["status"] for row in rows(gateway)] == ["settled"]
    assert gateway.http.get("/v1/images").json()["data"][0]["prompt"] == "paid then gone"
    again = gen(gateway, "paid then gone")  # coming back for it does not pay again
    assert again.status_code == 200 and sandbox.stats()["payments_count"] == 1


# --- host ----------------------------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path):
    """A real, small filesystem for the image store: room for its index, not for an image."""
    home = tmp_path / "home-full"
    images = home / "images"
    images.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(images)],
                             capture_output=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield home
    subprocess.run(["umount", "-l", str(images)], check=False)


def test_disk_full_while_storing_still_delivers_the_paid_image(make_gateway, sandbox, tiny_disk):
    gw = make_gateway(home=tiny_disk)
    sandbox.configure(image_bytes=600_000)
    try:
        r = gen(gw, "no room")
    finally:
        sandbox.configure(image_bytes=None)
    assert r.status_code == 200, r.text
    item = r.json()["data"][0]
    data = base64.b64decode(item["b64_json"]) if "b64_json" in item else httpx.get(item["url"]).content
    assert data.startswith(b"\x89PNG") and len(data) >= 600_000
    assert [row["status"] for row in rows(gw)] == ["settled"]
    still_serving(gw, sandbox)


def test_a_busy_store_database_does_not_lose_the_image(gateway, sandbox):
    gen(gateway, "warm up")
    db = sqlite3.connect(gateway.gw.settings.images_dir / "index.sqlite3", timeout=1,
                         check_same_thread=False)
    db.execute("BEGIN EXCLUSIVE")
    released = threading.Timer(1.0, db.rollback)
    released.start()
    try:
        r = gen(gateway, "while busy")
    finally:
        released.join()
        db.close()
    assert r.status_code == 200, r.text
    assert httpx.get(r.json()["data"][0]["url"]).status_code == 200
    assert [row["status"] for row in rows(gateway)] == ["settled", "settled"]


def test_a_second_gateway_on_the_same_home_refuses_to_start(tmp_path, make_gateway, sandbox):
    import os
    import sys

    # The first in this process, holding the ledger and saying where it listens, as `serve`
    # does once it listens (test_cli_tools runs a real one): one Python start less.
    first = make_gateway(home=tmp_path)
    first.gw.ledger.advertise(first.url)
    env = {**os.environ, "CLAWROUTER_HOME": str(tmp_path), "BLOCKRUN_API_URL": sandbox.api,
           "CLAWROUTER_NETWORK": "base-sepolia"}
    second = subprocess.run([sys.executable, "-m", "clawrouter", "serve", "--no-sandbox",
                             "--port", str(free_port())], env=env, capture_output=True,
                            text=True, timeout=30)
    assert second.returncode == 2
    assert "another clawrouter process" in second.stderr and "Traceback" not in second.stderr
    assert f"(pid {os.getpid()}, serving {first.url})" in second.stderr


def test_a_dropped_probe_is_resent_once_and_the_image_arrives(gateway, sandbox):
    sandbox.faults({"kind": "drop", "phase": "unpaid", "times": 1})
    assert gen(gateway, "resent probe").status_code == 200
    assert sandbox.stats()["payments_count"] == 1


def test_a_dropped_paid_request_is_resent_with_the_same_authorization(gateway, sandbox):
    """The connection drops after the upstream received the payment (not settled): the
    identical request is resent once — the same nonce, so it can never pay twice."""
    sandbox.faults({"kind": "drop", "phase": "paid", "times": 1})
    r = gen(gateway, "resent")
    assert r.status_code == 502 and r.headers["x-should-retry"] == "false"
    stats = sandbox.stats()
    assert stats["payments_count"] == 1 and stats["rejected"] == {"PAYMENT_REPLAY": 1}
    assert stats["settled_count"] == 0
    assert [row["status"] for row in rows(gateway)] == ["failed_after_payment"]


def test_a_lost_response_after_settlement_is_never_recorded_as_rejected(gateway, sandbox):
    sandbox.faults({"kind": "drop", "phase": "paid", "settle": True, "times": 1})
    r = gen(gateway, "lost")
    assert r.status_code == 502 and r.headers["x-should-retry"] == "false"
    assert "identical resend" in error(r)["message"]
    assert sandbox.stats()["settled_count"] == 1
    assert [row["status"] for row in rows(gateway)] == ["failed_after_payment"]


def test_a_dropped_probe_says_nothing_was_paid_but_not_that_it_never_left(gateway, sandbox):
    """The upstream closed the unpaid probe's connection, twice (it and its resend arrived):
    nothing was paid, but "it never left this machine" would be false."""
    sandbox.faults({"kind": "drop", "phase": "unpaid", "times": 2})
    r = gen(gateway)
    assert r.status_code == 502 and error(r)["payment"] == "none", r.text
    assert "Nothing was paid" in error(r)["message"]
    assert "never left" not in error(r)["message"]
