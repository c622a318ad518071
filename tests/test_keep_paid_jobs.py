"""`x-clawrouter-keep-paid-job: true`: a client that may leave, and will retry, asks the gateway
to finish a slow job it paid for. A real gateway and the sandbox upstream: once the job is paid
and accepted, polling goes on to its end whoever left, and the retry gets the stored result
without paying again; before the payment a client that leaves still pays nothing; without the
header a job whose client left is abandoned, as it always was."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import pytest

from clawrouter.cli.client import FIRST_TRY, KEEP_PAID_JOB
from clawrouter.context import KEEP_PAID_JOB as HEADER
from clawrouter.upstream import jobs
from tests.servers import leaving, until

SLOW = {"model": "gpt-image-2", "size": "1024x1024", "response_format": "url"}
#: how long polling waits for a client that left to come back (5 s in use)
REJOIN = 0.3
#: how long the sandbox's slow job runs once accepted: the client leaves, and the gateway
#: gives up on a job nobody keeps, well before it ends on a busy machine too
JOB_SECONDS = 3.0


def ask(gw: Any, prompt: str, headers: dict[str, str], timeout: float = 30) -> httpx.Response:
    """The request as `clawrouter mcp` sends it: a call's first try (and `headers`)."""
    return httpx.post(gw.v1 + "/images/generations", timeout=timeout,
                      json={**SLOW, "prompt": prompt}, headers={**FIRST_TRY, **headers})


def asking(gw: Any, prompt: str, headers: Mapping[str, str]
           ) -> contextlib.AbstractContextManager[socket.socket]:
    """`ask`, as a client that hangs up unanswered when the block ends (`leaving`)."""
    return leaving(gw.v1 + "/images/generations", {**SLOW, "prompt": prompt},
                   headers={**FIRST_TRY, **headers})


def rows(gw: Any) -> list[dict[str, Any]]:
    return gw.http.get("/v1/spend").json()["latest"]


def polled(sandbox: Any) -> Callable[[], bool]:
    """Whether the sandbox's job has been polled: paid, accepted, and running."""
    return lambda: sandbox.stats()["polls"] > 0


def probed(sandbox: Any) -> Callable[[], bool]:
    """Whether the sandbox has the unpaid request (the probe) of a generation."""
    return lambda: bool(sandbox.stats()["requests"].get("generations", {}).get("unpaid"))


def test_a_paid_slow_job_whose_client_left_is_finished_and_kept_for_its_retry(
        gateway: Any, sandbox: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(jobs, "REJOIN_SECONDS", REJOIN)
    sandbox.configure(slow_seconds=JOB_SECONDS)
    with asking(gateway, "finish it", KEEP_PAID_JOB):
        until(polled(sandbox))  # paid and accepted, then gone
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
    sandbox.configure(slow_seconds=JOB_SECONDS)
    with asking(gateway, "abandon it", {}):
        until(polled(sandbox))
    until(lambda: [row["status"] for row in rows(gateway)] == ["rejected"])
    retry = ask(gateway, "abandon it", {})
    assert retry.status_code == 409 and retry.json()["error"]["code"] == "job_abandoned"
    assert sandbox.stats()["payments_count"] == 1


@pytest.mark.parametrize("value", ["false", "1", ""])
def test_only_true_asks_to_keep_the_job(gateway: Any, sandbox: Any, monkeypatch: Any,
                                       value: str) -> None:
    monkeypatch.setattr(jobs, "REJOIN_SECONDS", REJOIN)
    sandbox.configure(slow_seconds=JOB_SECONDS)
    with asking(gateway, f"abandon it {value!r}", {HEADER: value}):
        until(polled(sandbox))
    until(lambda: [row["status"] for row in rows(gateway)] == ["rejected"])


def test_with_the_header_a_client_that_leaves_before_the_payment_pays_nothing(
        gateway: Any, sandbox: Any) -> None:
    sandbox.configure(slow_seconds=0.3)
    sandbox.faults({"kind": "delay", "phase": "unpaid", "seconds": 1.5, "times": 1})
    with asking(gateway, "gone before paying", KEEP_PAID_JOB):
        until(probed(sandbox))  # it leaves during the unpaid probe
    time.sleep(2.0)  # the probe has answered: nothing may be signed for the client now
    assert sandbox.stats()["payments_count"] == 0 and rows(gateway) == []
    retry = ask(gateway, "gone before paying", KEEP_PAID_JOB)  # a new call, paid once
    assert retry.status_code == 200 and "x-clawrouter-shared" not in retry.headers
    assert sandbox.stats()["payments_count"] == 1


def test_a_request_that_joins_with_the_header_keeps_the_shared_job(
        gateway: Any, sandbox: Any, monkeypatch: Any) -> None:
    """An SDK script and an MCP call with one API key are one client: the first without the
    header starts the job, the MCP call joins it with the header, both leave. The job is
    kept for the MCP call's retry, as it was promised, even when both leave during the pause
    between polls that began before the MCP call joined."""
    monkeypatch.setattr(jobs, "REJOIN_SECONDS", REJOIN)
    gateway.gw.settings.poll_interval = 2.0  # (a pause long enough to join and leave within)
    sandbox.configure(slow_seconds=JOB_SECONDS)
    with asking(gateway, "shared", {}):
        until(polled(sandbox))
        with asking(gateway, "shared", KEEP_PAID_JOB):  # joins the job in flight
            until(lambda: any(len(entry.clients) == 2
                              for entry in gateway.gw.coalescer._entries()))
    # both gone
    until(lambda: [row["status"] for row in rows(gateway)] == ["settled"])
    retry = ask(gateway, "shared", KEEP_PAID_JOB)
    assert retry.status_code == 200 and retry.headers["x-clawrouter-shared"] == "true"
    assert sandbox.stats()["payments_count"] == 1
