"""The paid exchange with real parts (the sandbox server, a ledger file, budgets, the signer);
only the timing of a client's departure is forced."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
from collections.abc import Iterator

import pytest
from eth_account import Account

from clawrouter.catalog import BY_ID
from clawrouter.context import RequestContext
from clawrouter.errors import ClientGone, PaymentRefused, UpstreamUnavailable
from clawrouter.payment.budget import Budget
from clawrouter.payment.ledger import Ledger
from clawrouter.payment.networks import NETWORKS
from clawrouter.payment.prices import PriceBook
from clawrouter.payment.signer import Signer
from clawrouter.upstream.client import BlockRunClient, TransportError, new_session
from clawrouter.upstream.exchange import Exchange, UpstreamCall
from tests.conftest import gateway_settings
from tests.servers import dead_port


def test_a_client_leaving_while_the_signature_is_recorded_is_never_charged(sandbox, tmp_path):
    settings = gateway_settings(tmp_path, sandbox.api)
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    ctx = RequestContext("req_leaving", "http://localhost")
    write = ledger.write

    async def write_then_leave(change):  # the client goes away during the durable write
        value = await write(change)
        ctx.gone.set()
        return value

    ledger.write = write_then_leave
    call = UpstreamCall("/v1/images/generations",
                        b'{"model":"zai/cogview-4","prompt":"x","size":"512x512","n":1}',
                        BY_ID["zai/cogview-4"], "512x512", 1)

    async def main():
        async with new_session(8) as session:
            exchange = Exchange(BlockRunClient(sandbox.api, session, timeout=10,
                                               connect_timeout=5),
                                Signer(Account.create().key.to_0x_hex()), settings,
                                NETWORKS["base-sepolia"], ledger,
                                Budget(ledger, per_request_usd=1, per_day_usd=1, total_usd=0),
                                PriceBook(3600))
            with pytest.raises(ClientGone):
                await exchange.run(call, ctx)

    asyncio.run(main())
    assert sandbox.stats()["payments_count"] == 0
    [row] = ledger.payments()
    assert row.status == "rejected" and "never sent" in row.note
    assert ledger.spent() == 0 and ledger.held() == []  # nothing can settle it: freed at once
    ledger.close()


@contextlib.contextmanager
def blackholed() -> Iterator[int]:
    """A port whose connections never complete: its listener's queue is full, so the SYNs of
    new ones go unanswered (as behind a firewall that drops them)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        fillers = [socket.socket() for _ in range(4)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
            yield port
        finally:
            for filler in fillers:
                filler.close()


@pytest.mark.parametrize("upstream", ["refused", "blackholed"])
def test_a_paid_request_that_cannot_connect_never_left_and_costs_nothing(sandbox, tmp_path,
                                                                         upstream):
    """With a learned price the paid request goes first (pre-auth). If no connection can be
    made (the upstream is down, the process is out of file descriptors, the connect times
    out), the authorization never left this machine: recorded as never sent, freed at once,
    and the client is told nothing was paid (so a retry, which may pay, is safe)."""
    settings = gateway_settings(tmp_path, sandbox.api)
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    prices = PriceBook(3600)
    call = UpstreamCall("/v1/images/generations",
                        b'{"model":"zai/cogview-4","prompt":"x","size":"512x512","n":1}',
                        BY_ID["zai/cogview-4"], "512x512", 1)

    async def main():
        async with new_session(8) as session:
            def exchange(api: str) -> Exchange:
                return Exchange(BlockRunClient(api, session, timeout=10, connect_timeout=1),
                                Signer(Account.create().key.to_0x_hex()), settings,
                                NETWORKS["base-sepolia"], ledger,
                                Budget(ledger, per_request_usd=1, per_day_usd=1, total_usd=0),
                                prices)
            await exchange(sandbox.api).run(call, RequestContext("req_1", "http://localhost"))
            with contextlib.ExitStack() as stack:
                port = (dead_port() if upstream == "refused" else
                        stack.enter_context(blackholed()))
                with pytest.raises(UpstreamUnavailable) as raised:
                    await exchange(f"http://127.0.0.1:{port}/api").run(
                        call, RequestContext("req_2", "http://localhost"))
            return raised.value

    error = asyncio.run(main())
    assert error.extra["payment"] == "none" and "Nothing was paid" in error.message
    assert error.response_headers().get("x-should-retry") != "false"
    paid, never = ledger.payments(latest=2)[::-1]
    assert sandbox.stats()["payments_count"] == 1  # (its outcome is the pipeline's to write)
    assert never.status == "rejected" and "never sent" in never.note
    assert ledger.spent() == paid.amount and ledger.held() == []  # nothing held for it
    ledger.close()


def test_a_resend_has_only_what_is_left_of_its_requests_time():
    """A paid request's time runs to its authorization's expiry (nothing settles after it):
    if the first attempt drops late and the resend hangs, the resend gets what is left, not
    all of it again."""
    import time

    async def main() -> float:
        attempts = 0

        async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal attempts
            attempts += 1
            await reader.readuntil(b"\r\n\r\n")
            if attempts == 1:
                await asyncio.sleep(1.5)  # drops late
                writer.close()
            else:
                await asyncio.sleep(30)  # the resend hangs

        server = await asyncio.start_server(upstream, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with new_session(8) as session:
            client = BlockRunClient(f"http://127.0.0.1:{port}/api", session, timeout=30,
                                    connect_timeout=2)
            started = time.monotonic()
            with pytest.raises(TransportError):
                await client.post("/v1/images/generations", b"{}", timeout=2.5)
            elapsed = time.monotonic() - started
        server.close()
        assert attempts == 2
        return elapsed

    assert asyncio.run(main()) < 4.0  # 2.5 s in all, not 2.5 for each attempt


def _queued_behind_a_hung_request(timeout: float, *,
                                  at_three_quarters: bool = False) -> tuple[TransportError, float]:
    """A paid-like POST (`timeout`) on a pool of one connection, which a hung request holds:
    what it failed with and how long it waited (started at x.75 s of the loop's clock if
    `at_three_quarters`)."""

    async def main() -> tuple[TransportError, float]:
        async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await asyncio.sleep(30)

        server = await asyncio.start_server(hang, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with new_session(1) as session:  # one connection, taken by the hung request
            client = BlockRunClient(f"http://127.0.0.1:{port}/api", session, timeout=20,
                                    connect_timeout=1)
            hung = asyncio.create_task(client.get(client.url("/hang")))
            loop = asyncio.get_running_loop()
            await asyncio.sleep(0.3 + ((0.75 - (loop.time() + 0.3)) % 1 if at_three_quarters
                                       else 0))
            started = loop.time()
            with pytest.raises(TransportError) as waited:
                await client.post("/v1/images/generations", b"{}", timeout=timeout)
            waited_for = loop.time() - started
            hung.cancel()
        server.close()
        return waited.value, waited_for

    return asyncio.run(main())


def test_a_request_that_never_gets_a_pooled_connection_was_never_sent():
    """Every pooled connection busy (a hung upstream, `upstream_max_connections` of them): a
    request whose time runs out while it waits for one was never sent. A paid one is then
    recorded as never sent, not as possibly paid, and the client gets a 503 that names the
    setting and asks it to come back, rather than "unreachable"."""
    from clawrouter.upstream.exchange import _unsent

    error, _ = _queued_behind_a_hung_request(1.5)
    assert error.kind == "busy" and "upstream_max_connections" in error.detail
    answer = _unsent(error, "nothing was sent")
    assert (answer.status, answer.code, answer.extra["payment"]) == (503, "upstream_busy", "none")
    assert answer.response_headers()["Retry-After"] == "5"


def test_a_long_wait_for_a_pooled_connection_runs_its_time_and_is_still_never_sent():
    """A paid request's time runs to its authorization's expiry: waiting its turn for a pooled
    connection, it waits nearly all of it, and still ends as busy, not as maybe sent. aiohttp
    rounds a timer over 5 s up to a whole second; started at .75 of a second, the wait's timer
    and the whole request's would come due in the same turn of the loop, and both firing ends
    in a plain timeout: a "timeout", which tells the user the request may have been paid."""
    from clawrouter.upstream.client import CONNECT_MARGIN

    error, waited_for = _queued_behind_a_hung_request(6, at_three_quarters=True)
    assert error.kind == "busy" and "upstream_max_connections" in error.detail
    assert waited_for >= 6 - CONNECT_MARGIN  # cut no sooner than the margin before its time


def test_a_sent_request_that_gets_no_answer_in_time_is_maybe_sent():
    """Sent on the pool's only connection and never answered: its time's end is a "timeout"
    (it may have been paid), never "busy" or "connect" (nothing paid): aiohttp's connect
    timeout is a TimeoutError too, and only that one means never sent."""

    async def main() -> TransportError:
        async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            await asyncio.sleep(30)

        server = await asyncio.start_server(hang, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with new_session(1) as session:
            client = BlockRunClient(f"http://127.0.0.1:{port}/api", session, timeout=20,
                                    connect_timeout=1)
            with pytest.raises(TransportError) as raised:
                await client.post("/v1/images/generations", b"{}", timeout=1.0)
        server.close()
        return raised.value

    error = asyncio.run(main())
    assert error.kind == "timeout" and "no answer" in error.detail


def test_a_name_that_never_resolves_is_never_sent_and_not_called_busy(monkeypatch):
    """No connection was made, and none was waited for (the pool is empty): "connect", not
    "busy" (which would tell the user to raise upstream_max_connections)."""
    import aiohttp

    async def never(self, *args, **kwargs):  # a DNS server that never answers
        await asyncio.sleep(30)

    monkeypatch.setattr(aiohttp.TCPConnector, "_resolve_host", never)

    async def main() -> TransportError:
        async with new_session(8) as session:
            client = BlockRunClient("http://blockrun.invalid/api", session, timeout=20,
                                    connect_timeout=1)
            with pytest.raises(TransportError) as failed:
                await client.post("/v1/images/generations", b"{}", timeout=1.0)
        return failed.value

    error = asyncio.run(main())
    assert error.kind == "connect" and "upstream_max_connections" not in error.detail


def test_a_request_whose_connection_dropped_counts_as_sent_even_if_the_resend_cannot_connect():
    """The first attempt may have arrived (a poll that completed and settled the job, say):
    a resend that then finds nobody listening must not make it look never sent."""

    async def main():
        async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            server.close()  # the resend finds nobody listening
            writer.close()

        server = await asyncio.start_server(drop, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with new_session(8) as session:
            client = BlockRunClient(f"http://127.0.0.1:{port}/api", session, timeout=5,
                                    connect_timeout=2)
            with pytest.raises(TransportError) as raised:
                await client.get(client.url("/v1/images/generations/job"))
        assert raised.value.kind == "dropped" and "cannot connect" in raised.value.detail

    asyncio.run(main())


@pytest.mark.parametrize("encoding", ["identity", "gzip", "chunked"])
def test_an_answer_over_the_cap_stops_being_read_and_is_never_resent(encoding):
    """An image API's answer is bounded: a huge one (or a small gzip that inflates past the
    cap) is a transport failure after sending, read no further and not resent."""
    big = b'{"data": "' + b"A" * (2 * 1024 * 1024) + b'"}'
    body = gzip.compress(big) if encoding == "gzip" else big
    sent = []

    async def main():
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            sent.append(1)
            head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            if encoding == "chunked":  # no length: the body is counted as it comes
                writer.write((head + "Transfer-Encoding: chunked\r\n\r\n").encode())
                for i in range(0, len(body), 65536):
                    piece = body[i:i + 65536]
                    writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                writer.write(b"0\r\n\r\n")
            else:
                if encoding == "gzip":
                    head += "Content-Encoding: gzip\r\n"
                writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server, new_session(8) as session:
            small = BlockRunClient(f"http://127.0.0.1:{port}/api", session, timeout=5,
                                   connect_timeout=2, max_answer_bytes=1024 * 1024)
            with pytest.raises(TransportError) as raised:
                await small.post("/v1/images/generations", b"{}")
            assert raised.value.kind == "too_large" and "cap" in raised.value.detail
            roomy = BlockRunClient(f"http://127.0.0.1:{port}/api", session, timeout=5,
                                   connect_timeout=2, max_answer_bytes=4 * 1024 * 1024)
            assert (await roomy.post("/v1/images/generations", b"{}")).body == big

    asyncio.run(main())
    assert len(sent) == 2  # one each: the refused answer was not resent


def test_a_learned_price_is_reused_only_for_the_same_quality_inputs_and_mask():

    model = BY_ID["openai/gpt-image-1"]
    base = UpstreamCall("/v1/images/image2image", b"{}", model, "1024x1024", 1)
    keys = {base.price_key,
            UpstreamCall(base.route, b"{}", model, "1024x1024", 1, ("high", 0, False)).price_key,
            UpstreamCall(base.route, b"{}", model, "1024x1024", 1, (None, 2, False)).price_key,
            UpstreamCall(base.route, b"{}", model, "1024x1024", 1, (None, 0, True)).price_key}
    assert len(keys) == 4


def test_a_per_request_cap_between_two_micro_usdc_rounds_down_for_the_check_and_the_budget(
        tmp_path):
    """$0.0000015 is 1.5 micro-USDC: the challenge check and the budget both round the cap down
    to 1, so a challenge for 2 is refused before signing (a cap never allows more than set)."""
    from clawrouter.payment.wire import b64_json, parse_challenge

    settings = gateway_settings(tmp_path, "http://127.0.0.1:9/api",
                                max_usd_per_request=0.0000015)
    network = NETWORKS["base-sepolia"]
    ledger = Ledger(tmp_path / "ledger.sqlite3")
    budget = Budget.from_settings(ledger, settings)
    exchange = Exchange(None, None, settings, network, ledger, budget, PriceBook(3600))
    entry = {"scheme": "exact", "network": network.caip2, "amount": "2", "asset": network.usdc,
             "payTo": settings.pay_to, "maxTimeoutSeconds": 300,
             "extra": {"name": network.domain_name, "version": network.domain_version}}
    challenge = parse_challenge({"payment-required": b64_json({"x402Version": 2,
                                                               "accepts": [entry]})}, b"")
    call = UpstreamCall("/v1/images/generations", b"{}", BY_ID["zai/cogview-4"], "512x512", 1)
    try:
        assert budget.limits["request"] == 1
        with pytest.raises(PaymentRefused) as refused:
            exchange._select(call, challenge)
        assert refused.value.extra["check"] == "amount"
        assert "per-request cap of $0.000001" in refused.value.message
    finally:
        ledger.close()
