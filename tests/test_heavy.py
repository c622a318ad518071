"""Image inputs named by URL or path are read only as the input budget allows (`api/heavy.py`).

A request naming a local file costs the client a few bytes and the gateway the whole file, held
(as the image, then as the upstream body) while the upstream works; these tests check that what
is held at once stays bounded however many requests come, that a request bigger than the whole
budget is still served (alone), that requests with several inputs never deadlock, and that a
failed run's buffers go when it does.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import weakref
from pathlib import Path
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from clawrouter.sandbox.images import make_png
from tests.servers import leaving, until

MB = 1024 * 1024


def count_upstream_bodies(gw: Any, delay: float = 0.0) -> dict[str, int]:
    """Wrap the gateway's exchange: count the upstream bodies being sent at once (runs, bytes),
    each held `delay` seconds longer, as a slow upstream would."""
    exchange = gw.gw.pipeline.exchange
    real = exchange.run
    seen = {"runs": 0, "bytes": 0, "peak_runs": 0, "peak_bytes": 0, "total_bytes": 0}

    async def run(call: Any, ctx: Any) -> Any:
        size = len(call.body)
        seen["runs"] += 1
        seen["bytes"] += size
        seen["total_bytes"] += size
        seen["peak_runs"] = max(seen["peak_runs"], seen["runs"])
        seen["peak_bytes"] = max(seen["peak_bytes"], seen["bytes"])
        try:
            await asyncio.sleep(delay)
            return await real(call, ctx)
        finally:
            seen["runs"] -= 1
            seen["bytes"] -= size

    exchange.run = run
    return seen


def edit_all(gw: Any, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    async def send() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/images/image2image", json=body)
                                          for body in bodies))

    return asyncio.run(asyncio.wait_for(send(), 90))


def test_many_small_requests_naming_big_files_hold_no_more_than_the_budget(
        make_gateway, sandbox, tmp_path: Path) -> None:
    """The audit's attack, scaled down: tiny requests each naming a big local file three
    times. Unbounded, every request reads its files at once and holds them, as its upstream
    body, while the upstream works; bounded, only what fits the input budget is held at once."""
    gw = make_gateway()
    big = tmp_path / "big.png"
    big.write_bytes(make_png(64, 64, 1, pad_to=8 * MB))
    seen = count_upstream_bodies(gw, delay=0.5)
    # Different prompts: identical requests from one client would share one run.
    responses = edit_all(gw, [{"prompt": f"edit {i}", "image": [str(big)] * 3}
                              for i in range(6)])
    assert [r.status_code for r in responses] == [200] * 6, responses[0].text
    # 6 x 24 MB of inputs against a 64 MB budget: two requests' worth at a time, not all six.
    assert seen["peak_bytes"] <= seen["total_bytes"] // 2, seen
    budget = gw.gw.heavy.inputs
    assert budget.peak <= budget.total and budget.held == 0


def test_a_request_bigger_than_the_budget_is_served_alone_and_none_deadlocks(
        make_gateway, sandbox, tmp_path: Path) -> None:
    """With room for two files but not three: requests naming two or three files, all at
    once. Each run takes its share in one go, so none waits while holding part of what another
    needs; a three-file run, bigger than the whole budget, waits for all of it."""
    from clawrouter.inputs.budget import InputBudget

    gw = make_gateway()
    files = []
    for i in range(3):
        files.append(tmp_path / f"photo{i}.png")
        files[-1].write_bytes(make_png(32, 32, i, pad_to=100_000))
    budget = gw.gw.pipeline.budget = InputBudget(250_000)
    seen = count_upstream_bodies(gw, delay=0.1)
    bodies = [{"prompt": f"edit {i}", "image": [str(f) for f in files[: 2 + i % 2]]}
              for i in range(8)]
    responses = edit_all(gw, bodies)
    assert [r.status_code for r in responses] == [200] * 8, responses[0].text
    assert seen["peak_runs"] == 1, seen  # 200 KB + anything more does not fit 250 KB
    assert budget.peak == budget.total and budget.held == 0


def test_a_slow_job_gives_its_inputs_share_and_body_back_once_accepted(
        make_gateway, sandbox, tmp_path: Path) -> None:
    """A slow model's job is polled for minutes after its paid request was accepted; nothing
    is sent again, so its upstream body and its inputs' share are let go then, not at the end."""
    import threading

    gw = make_gateway()
    sandbox.configure(slow_seconds=3)
    photo = tmp_path / "photo.png"
    photo.write_bytes(make_png(32, 32, 1, pad_to=500_000))
    calls: list[Any] = []
    real = gw.gw.pipeline.exchange.run

    async def run(call: Any, ctx: Any) -> Any:
        calls.append(call)
        return await real(call, ctx)

    gw.gw.pipeline.exchange.run = run
    budget = gw.gw.heavy.inputs
    answer: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: answer.setdefault("r", httpx.post(
        gw.v1 + "/images/image2image", timeout=30,
        json={"model": "gpt-image-2", "prompt": "slow", "image": str(photo)})))
    thread.start()
    until(lambda: calls and sandbox.paid())
    held_before = budget.peak
    until(lambda: sandbox.stats()["polls"] > 0)  # the job runs 3 s: it is being polled now
    polling = (budget.held, len(calls[0].body), thread.is_alive())
    thread.join()
    assert answer["r"].status_code == 200, answer["r"].text
    assert held_before >= 500_000 and polling == (0, 0, True)


def test_a_failed_run_frees_its_upstream_body_at_once(make_gateway, sandbox,
                                                     tmp_path: Path) -> None:
    """An error outlives its run, in reference cycles (the coalescer's future, the frames of
    its traceback) until the garbage collector gets round to them. It must not keep the run's
    upstream body alive after the run gave its share of the budget back: with the audit's
    upstream, which answered 503, such leftovers still added up to gigabytes."""
    gw = make_gateway()
    photo = tmp_path / "photo.png"
    photo.write_bytes(make_png(64, 64, 1, pad_to=2 * MB))
    sandbox.faults({"kind": "respond", "phase": "unpaid", "status": 503,
                    "body": {"error": "busy"}})
    calls: list[weakref.ref[Any]] = []
    exchange = gw.gw.pipeline.exchange
    real = exchange.run

    async def run(call: Any, ctx: Any) -> Any:
        calls.append(weakref.ref(call))  # the upstream call, which holds the body
        return await real(call, ctx)

    exchange.run = run
    gc.collect()
    gc.disable()  # what is freed now is freed by reference counting, not by a later sweep
    try:
        r = gw.http.post("/v1/images/image2image", json={"prompt": "x", "image": str(photo)})
        assert r.status_code == 503, r.text
        assert calls and calls[0]() is None, "the failed run's upstream body is still alive"
    finally:
        gc.enable()


def test_big_bodies_are_admitted_by_their_bytes_and_an_undeclared_one_as_the_largest(
        make_gateway, sandbox) -> None:
    """Admission counts bytes, not requests: with the default 20 MB images a body may be
    80 MB, so a count of requests would let a burst of them hold gigabytes. Here, room for two
    4.5 MB bodies, not three; an upload that declares no length (chunked) counts as the
    largest body allowed once it is big, so it is served alone, and never while it is small."""
    from clawrouter.api.heavy import HeavyPhase

    gw = make_gateway(max_image_mb=4)
    gw.gw.heavy = HeavyPhase(body_bytes=10 * MB, largest_body=4 * gw.gw.settings.max_image_bytes)
    seen = count_upstream_bodies(gw, delay=0.3)
    image = "data:image/png;base64," + base64.b64encode(
        make_png(64, 64, 1, pad_to=3_300_000)).decode()
    bodies = [{"prompt": f"edit {i}", "image": image} for i in range(4)]
    responses = edit_all(gw, bodies)
    assert [r.status_code for r in responses] == [200] * 4, responses[0].text
    assert seen["peak_runs"] == 2, seen  # 4 x 4.5 MB against 10 MB: two at a time

    def chunked(route: str, bodies: list[dict[str, Any]]) -> int:
        """Send `bodies` at once without a Content-Length; the most run upstream at once."""
        async def stream(body: dict[str, Any]) -> AsyncIterator[bytes]:
            yield json.dumps(body).encode()

        async def send() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
                return await asyncio.gather(*(client.post(
                    route, content=stream(body), headers={"content-type": "application/json"})
                    for body in bodies))

        seen["peak_runs"] = 0
        responses = asyncio.run(asyncio.wait_for(send(), 90))
        assert [r.status_code for r in responses] == [200] * len(bodies), responses[0].text
        return seen["peak_runs"]

    # big ones, each counted as 16 MB (more than all the room): one at a time
    assert chunked("/v1/images/image2image",
                   [{"prompt": f"chunked {i}", "image": image} for i in range(3)]) == 1
    # small ones never wait, nor do small forms
    assert chunked("/v1/images/generations",
                   [{"prompt": f"small chunked {i}", "model": "cogview"} for i in range(3)]) == 3
    seen["peak_runs"] = 0
    png = make_png(32, 32, 2)

    async def form_chunks(i: int) -> AsyncIterator[bytes]:
        yield (f'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nsmall form {i}'
               '\r\n--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
               'Content-Type: image/png\r\n\r\n').encode() + png + b"\r\n--b--\r\n"

    async def send_forms() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=gw.url, timeout=60) as client:
            return await asyncio.gather(*(client.post(
                "/v1/images/edits", content=form_chunks(i),
                headers={"content-type": "multipart/form-data; boundary=b"}) for i in range(3)))

    responses = asyncio.run(asyncio.wait_for(send_forms(), 90))
    assert [r.status_code for r in responses] == [200] * 3, responses[0].text
    assert seen["peak_runs"] == 3, seen


def test_the_resend_of_a_big_slow_edit_joins_it_whatever_its_body_declares(
        make_gateway, sandbox) -> None:
    """A slow job gives back its request's admission once accepted (its body is gone): the
    SDK's resend after its own timeout, as big, is read at once and joins the job, rather
    than wait for room the job holds until it gives up waiting for a resend."""
    from clawrouter.api.heavy import HeavyPhase

    # The job, made once the body is read, is done 3 s later: the send leaves (its timeout)
    # once it is paid, well before; its polling pauses once its client has left, until the
    # resend joins (REJOIN_SECONDS, 5 s).
    sandbox.configure(slow_seconds=3)
    gw = make_gateway(max_image_mb=4)
    gw.gw.heavy = HeavyPhase(body_bytes=20 * MB, largest_body=4 * gw.gw.settings.max_image_bytes)
    image = "data:image/png;base64," + base64.b64encode(
        make_png(64, 64, 1, pad_to=1_500_000)).decode()
    for chunked in (False, True):
        body = json.dumps({"model": "gpt-image-2", "prompt": f"slow {chunked}",
                           "image": image}).encode()

        def content() -> Any:
            return iter([body]) if chunked else body  # (an iterator: no Content-Length)

        url = gw.url + "/v1/images/image2image"
        headers = {"content-type": "application/json"}
        paid = sandbox.paid()
        with leaving(url, body, chunked=chunked):  # the SDK's timeout, once it is paid
            until(lambda: sandbox.paid() > paid)
        resend = httpx.post(url, content=content(), headers=headers, timeout=30)
        assert resend.status_code == 200, (chunked, resend.text)
        assert resend.headers["x-clawrouter-shared"] == "true"
    assert sandbox.stats()["payments_count"] == 2  # one for each, not one per send


# --- the budget itself ------------------------------------------------------------------------

def test_shares_wait_in_arrival_order_and_one_bigger_than_all_is_served_alone() -> None:
    from clawrouter.inputs.budget import InputBudget

    async def scenario() -> list[str]:
        budget = InputBudget(100)
        order: list[str] = []

        async def share(name: str, size: int, hold_for: float) -> None:
            hold = budget.hold()
            await hold.take(size)
            order.append(f"{name}+{hold.size}")
            await asyncio.sleep(hold_for)
            hold.release()
            order.append(f"{name}-")

        first = asyncio.create_task(share("a", 60, 0.05))
        await asyncio.sleep(0)
        huge = asyncio.create_task(share("huge", 500, 0.05))  # clamped to the whole 100
        await asyncio.sleep(0)
        small = asyncio.create_task(share("small", 10, 0))  # fits now, but queues behind
        await asyncio.gather(first, huge, small)
        assert budget.held == 0 and budget.peak == 100
        return order

    assert asyncio.run(scenario()) == ["a+60", "a-", "huge+100", "huge-", "small+10", "small-"]


def test_a_cancelled_wait_gives_its_place_up() -> None:
    from clawrouter.inputs.budget import InputBudget

    async def scenario() -> None:
        budget = InputBudget(100)
        holder = budget.hold()
        await holder.take(90)
        blocked = asyncio.create_task(budget.hold().take(50))
        await asyncio.sleep(0)
        behind = budget.hold()
        waiting = asyncio.create_task(behind.take(10))
        await asyncio.sleep(0)
        assert not waiting.done()  # first come, first served: it queues behind the 50
        blocked.cancel()
        await asyncio.wait_for(waiting, 1)  # the cancelled head no longer blocks it
        assert budget.held == 100
        behind.release()
        holder.release()
        assert budget.held == 0

    asyncio.run(scenario())


def test_a_run_takes_its_share_once() -> None:
    from clawrouter.inputs.budget import InputBudget

    async def scenario() -> None:
        hold = InputBudget(100).hold()
        await hold.take(10)
        with pytest.raises(RuntimeError):
            await hold.take(10)  # waiting while holding could deadlock

    asyncio.run(scenario())


def test_a_client_that_leaves_stops_waiting_for_room() -> None:
    """A run waiting for its inputs' share gives up when its client leaves: its place in the
    queue goes to the next, and it never reads (nor pays) for nobody."""
    from clawrouter.inputs.budget import InputBudget
    from clawrouter.context import RequestContext
    from clawrouter.errors import ClientGone

    async def scenario() -> None:
        budget = InputBudget(100)
        holder = budget.hold()
        await holder.take(100)
        ctx = RequestContext("r", "http://localhost")
        waiting = asyncio.create_task(ctx.unless_gone(budget.hold().take(50)))
        await asyncio.sleep(0.01)
        ctx.leave()
        with pytest.raises(ClientGone):
            await asyncio.wait_for(waiting, 1)
        holder.release()
        assert budget.held == 0 and not budget._waiting  # nothing left queued or taken
        assert await RequestContext("s", "http://localhost").unless_gone(
            asyncio.sleep(0, "done")) == "done"

    asyncio.run(scenario())


def test_a_slow_multipart_edit_holds_no_copy_of_its_upload_once_accepted(
        make_gateway, sandbox) -> None:
    """Once the slow job is accepted its admission is given back (the resend may be read):
    so the upload must be gone too, or slow multipart edits would escape the bound."""
    import threading
    import time

    from clawrouter.validate import SourceImage

    sandbox.configure(slow_seconds=2)
    gw = make_gateway()
    png = make_png(64, 64, 3, pad_to=1_500_000)
    done: list[httpx.Response] = []
    worker = threading.Thread(target=lambda: done.append(httpx.post(
        gw.v1 + "/images/edits", timeout=30, files={"image": ("a.png", png, "image/png")},
        data={"prompt": "slow multipart", "model": "gpt-image-2"})))
    worker.start()
    deadline = time.monotonic() + 20
    while sandbox.stats()["polls"] == 0:  # accepted, and polled
        assert time.monotonic() < deadline
        time.sleep(0.05)
    gc.collect()
    held = [o for o in gc.get_objects() if isinstance(o, SourceImage)
            and isinstance(o.value, bytes) and len(o.value) > 1_000_000]
    assert held == [], "the upload outlived its admission"
    worker.join(30)
    assert done and done[0].status_code == 200, done and done[0].text
