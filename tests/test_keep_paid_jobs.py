"""`x-clawrouter-keep-paid-job: true`: a client that may leave, and will retry, asks the gateway
to finish a slow job it paid for. A real gateway and the sandbox upstream: once the job is paid
and accepted, polling goes on to its end whoever left, and the retry gets the stored result
without paying again; before the payment a client that leaves still pays nothing; without the
header a job whose client left is abandoned, as it always was."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from clawrouter.cli.client import FIRST_TRY, KEEP_PAID_JOB
from clawrouter.context import KEEP_PAID_JOB as HEADER
from clawrouter.upstream import jobs

SLOW = {"model": "gpt-image-2", "size": "1024x1024", "response_format": "url"}
#: how long polling waits for a client that left to come back (5 s in use)
REJOIN = 0.3


def ask(gw: Any, prompt: str, headers: dict[str, str], timeout: float = 30) -> httpx.Response:
    """The request as `clawrouter mcp` sends it: a call's first try (and `headers`)."""
    return httpx.post(gw.v1 + "/images/generations", timeout=timeout,
                      json={**SLOW, "prompt": prompt}, headers={**FIRST_TRY, **headers})


def left(gw: Any, prompt: str, headers: dict[str, str], seconds: float) -> None:
    """The client gives up on the request after `seconds` (its timeout), as an agent does."""
    with pytest.raises(httpx.ReadTimeout):
        ask(gw, prompt, headers, timeout=seconds)


def rows(gw: Any) -> list[dict[str, Any]]:
    return gw.http.get("/v1/spend").json()["latest"]


def until(condition: Callable[[], bool], seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_paid_slow_job_whose_client_left_is_finished_and_kept_for_its_retry(
        gateway: Any, sandbox: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(jobs, "REJOIN_SECONDS", REJOIN)
    sandbox.configure(slow_seconds=1.5)
    left(gateway, "finish it", KEEP_PAID_JOB, 0.5)  # paid and accepted, then gone
    assert sandbox.stats()["payments_count"] == 1
    # polled on to its end, long after the REJOIN_SECONDS that would have abandoned it
    until(lambda: [row["status"] for row in rows(gateway)] == ["settled"])
    retry = ask(gateway, "finish it", KEEP_PAID_JOB)
    assert retry.status_code == 200, retry.text
    assert retry.headers["x-clawrouter-shared"] == "true"
    image = gateway.http.get(retry.json()["data"][0]["url"])  # stored by the gateway
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert sandbox.stats()["payments_count"] == 1
    sandbox.configure(slow_seconds=0.1)
    again = ask(gateway, "finish it", KEEP_PAID_JOB)  # received once: a new call is new
    assert again.status_code == 200 and "x-clawrouter-shared" not in again.headers
    assert sandbox.stats()["payments_count"] == 2


def test_without_the_header_a_slow_job_whose_client_left_is_abandoned(
        gateway: Any, sandbox: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(jobs, "REJOIN_SECONDS", REJOIN)
    sandbox.configure(slow_seconds=1.5)
    left(gateway, "abandon it", {}, 0.5)
    until(lambda: [row["status"] for row in rows(gateway)] == ["rejected"])
    retry = ask(gateway, "abandon it", {})
    assert retry.status_code == 409 and retry.json()["error"]["code"] == "job_abandoned"
    assert sandbox.stats()["payments_count"] == 1


@pytest.mark.parametrize("value", ["false", "1", ""])
def test_only_true_asks_to_keep_the_job(gateway: Any, sandbox: Any, monkeypatch: Any,
                                       value: str) -> None:
    monkeypatch.setattr(jobs, "REJOIN_SECONDS", REJOIN)
    sandbox.configure(slow_seconds=1.5)
    left(gateway, f"abandon it {value!r}", {HEADER: value}, 0.5)
    until(lambda: [row["status"] for row in rows(gateway)] == ["rejected"])


def test_with_the_header_a_client_that_leaves_before_the_payment_pays_nothing(
        gateway: Any, sandbox: Any) -> None:
    sandbox.configure(slow_seconds=0.3)
    sandbox.faults({"kind": "delay", "phase": "unpaid", "seconds": 1.5, "times": 1})
    left(gateway, "gone before paying", KEEP_PAID_JOB, 0.5)  # during the unpaid probe
    time.sleep(1.5)  # the probe has answered: nothing may be signed for the client now
    assert sandbox.stats()["payments_count"] == 0 and rows(gateway) == []
    retry = ask(gateway, "gone before paying", KEEP_PAID_JOB)  # a new call, paid once
    assert retry.status_code == 200 and "x-clawrouter-shared" not in retry.headers
    assert sandbox.stats()["payments_count"] == 1


def test_a_request_that_joins_with_the_header_keeps_the_shared_job(
        gateway: Any, sandbox: Any, monkeypatch: Any) -> None:
    """An SDK script and an MCP call with one API key are one client: the first without the
    header starts the job, the MCP call joins it with the header, both leave. The job is
    kept for the MCP call's retry, as it was promised."""
    import threading

    monkeypatch.setattr(jobs, "REJOIN_SECONDS", REJOIN)
    sandbox.configure(slow_seconds=2.5)
    starter = threading.Thread(target=left, args=(gateway, "shared", {}, 1.0))
    starter.start()
    time.sleep(0.3)
    left(gateway, "shared", KEEP_PAID_JOB, 0.7)  # joins the job in flight; both gone by ~1 s
    starter.join()
    until(lambda: [row["status"] for row in rows(gateway)] == ["settled"])
    retry = ask(gateway, "shared", KEEP_PAID_JOB)
    assert retry.status_code == 200 and retry.headers["x-clawrouter-shared"] == "true"
    assert sandbox.stats()["payments_count"] == 1
