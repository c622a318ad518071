"""The USDC balance over JSON-RPC `eth_call`, against a real fake RPC server on loopback."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from clawrouter.payment.balance import (
    DEFAULT_RPC_URLS,
    MAINNET_RPC_URLS,
    BalanceMonitor,
    fetch_usdc_balance,
    rpc_urls_for,
    usdc_balance,
)
from clawrouter.payment.networks import NETWORKS
from clawrouter.payment.onchain import BALANCE_OF
from tests.servers import ServerThread, dead_port

ADDRESS = "0x1563915e194D8CfBA1943570603F7606A3115508"


class FakeRpc:
    """A JSON-RPC endpoint answering `eth_call` with `balance` (micro-USDC) as a uint256 word,
    and `eth_chainId` with `chain_id` (Base Sepolia's unless told)."""

    def __init__(self, balance: int = 0, chain_id: int = NETWORKS["base-sepolia"].chain_id
                 ) -> None:
        self.balance = balance
        self.chain_id = chain_id
        self.delay = 0.0
        self.status = 200
        self.answer: dict[str, Any] | None = None  # replaces the normal answer when set
        self.requests: list[dict[str, Any]] = []
        # (an answer still delayed when the test ends is cut short, not waited for)
        self.server = ServerThread(Starlette(routes=[Route("/", self._handle, methods=["POST"])]),
                                   timeout_graceful_shutdown=1)

    @property
    def url(self) -> str:
        return self.server.url + "/"

    async def _handle(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.status != 200:
            return Response("unavailable", status_code=self.status)
        if self.answer is not None:
            answer = self.answer
        elif body.get("method") == "eth_chainId":
            answer = {"result": hex(self.chain_id)}
        else:
            answer = {"result": f"0x{self.balance:064x}"}
        return JSONResponse({"jsonrpc": "2.0", "id": body.get("id"), **answer})

    @property
    def calls(self) -> list[dict[str, Any]]:
        """The `eth_call` requests (each balance lookup first checks the chain id)."""
        return [r for r in self.requests if r.get("method") == "eth_call"]

    def __enter__(self) -> FakeRpc:
        self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()


@pytest.fixture
def rpc():
    with FakeRpc() as server:
        yield server


@pytest.fixture(scope="module")
def slow_rpc():
    with FakeRpc(balance=999) as server:
        server.delay = 10.0  # far beyond the 0.2-0.3 s timeouts below
        yield server


def dead_url() -> str:
    return f"http://127.0.0.1:{dead_port()}/"


def test_balance_is_read_with_balance_of_on_the_usdc_contract(rpc):
    rpc.balance = 12_345_678
    assert asyncio.run(usdc_balance(ADDRESS, "base-sepolia", [rpc.url])) == 12_345_678
    chain, request = rpc.requests
    assert chain["method"] == "eth_chainId"
    assert request["jsonrpc"] == "2.0" and request["method"] == "eth_call"
    call, block = request["params"]
    assert block == "latest"
    assert call["to"] == NETWORKS["base-sepolia"].usdc
    assert call["data"][:10] == BALANCE_OF == "0x70a08231"
    assert call["data"][10:] == "0" * 24 + ADDRESS[2:].lower()
    assert len(call["data"]) == 2 + 8 + 64


def test_mainnet_uses_the_mainnet_contract(rpc):
    rpc.balance, rpc.chain_id = 0, NETWORKS["base"].chain_id
    assert asyncio.run(usdc_balance(ADDRESS, NETWORKS["base"], [rpc.url])) == 0
    assert rpc.calls[0]["params"][0]["to"] == NETWORKS["base"].usdc


def test_an_rpc_of_another_chain_is_not_believed():
    """Same USDC address, another chain: its balance is another token's (and a gateway that
    believed a 0 there would refuse to pay)."""
    with FakeRpc(balance=0, chain_id=1) as liar, FakeRpc(balance=5) as honest:
        assert asyncio.run(usdc_balance(ADDRESS, "base-sepolia", [liar.url])) is None
        assert liar.calls == []
        assert asyncio.run(usdc_balance(ADDRESS, "base-sepolia", [liar.url, honest.url])) == 5


def test_a_down_or_slow_rpc_falls_through_to_the_next(rpc, slow_rpc):
    rpc.balance = 7
    start = time.monotonic()
    got = asyncio.run(usdc_balance(ADDRESS, "base-sepolia", [dead_url(), slow_rpc.url, rpc.url],
                                   timeout=0.3))
    assert got == 7
    assert time.monotonic() - start < 5  # not the slow one's 10 s


def test_the_highest_balance_any_rpc_answers_is_the_one_believed(rpc):
    """The balance only refuses requests: an RPC behind the chain (here first, with the old
    balance) must not refuse a wallet that another shows funded."""
    with FakeRpc(balance=5_000_000) as current:
        rpc.balance = 0
        assert asyncio.run(usdc_balance(ADDRESS, "base-sepolia", [rpc.url, current.url],
                                        timeout=2)) == 5_000_000


@pytest.mark.parametrize("answer", [
    {"error": {"code": -32000, "message": "execution reverted"}},
    {"result": "0x"},  # no contract at that address: a wrong chain, not an empty wallet
    {"result": "not hex"},
])
def test_rpc_errors_and_odd_results_are_failures_not_zero(rpc, answer):
    rpc.answer = answer
    assert asyncio.run(usdc_balance(ADDRESS, "base", [rpc.url])) is None


def test_http_errors_fall_through(rpc):
    good = FakeRpc(balance=5)
    with good:
        rpc.status = 503
        assert asyncio.run(usdc_balance(ADDRESS, "base-sepolia", [rpc.url, good.url])) == 5


def test_all_down_is_none_within_the_timeout(slow_rpc):
    start = time.monotonic()
    got = asyncio.run(usdc_balance(ADDRESS, "base", [dead_url(), slow_rpc.url], timeout=0.3))
    assert got is None
    assert time.monotonic() - start < 5  # not the slow one's 10 s


def test_failure_reasons_name_hosts_not_urls(slow_rpc):
    secret_url = f"http://127.0.0.1:{dead_port()}/v2/SECRET-API-KEY"
    with pytest.raises(Exception) as err:
        asyncio.run(fetch_usdc_balance(ADDRESS, "base", [secret_url, slow_rpc.url],
                                       timeout=0.2))
    message = str(err.value)
    assert "cannot connect" in message and "no answer within 0.2 s" in message
    assert "SECRET" not in message


def test_no_rpc_urls_is_unavailable():
    assert asyncio.run(usdc_balance(ADDRESS, "base", [])) is None


def test_bad_address_is_refused():
    with pytest.raises(ValueError):
        asyncio.run(usdc_balance("0x1234", "base", ["http://127.0.0.1:1/"]))


def test_rpc_defaults_per_network():
    assert rpc_urls_for("base", MAINNET_RPC_URLS) == list(MAINNET_RPC_URLS)
    sepolia = rpc_urls_for(NETWORKS["base-sepolia"], list(MAINNET_RPC_URLS))
    assert sepolia == list(DEFAULT_RPC_URLS["base-sepolia"])
    assert sepolia[0] == "https://sepolia.base.org"
    assert rpc_urls_for("base-sepolia", ["http://x/"]) == ["http://x/"]


async def _wait(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_monitor_snapshot_goes_from_unknown_to_value_to_low(rpc):
    async def main() -> None:
        rpc.balance = 5_000_000
        monitor = BalanceMonitor(ADDRESS, "base-sepolia", [rpc.url], low_balance_usd=1.0,
                                 interval=0.05, retry_min=0.05, timeout=1.0)
        assert monitor.snapshot() == {"balance_usd": None, "low": None, "checked": None,
                                      "error": None}
        monitor.start()
        await _wait(lambda: monitor.snapshot()["balance_usd"] == 5.0)
        snap = monitor.snapshot()
        assert snap["low"] is False and snap["error"] is None
        assert abs(snap["checked"] - time.time()) < 5

        rpc.balance = 250_000
        await _wait(lambda: monitor.snapshot()["low"] is True)
        assert monitor.snapshot()["balance_usd"] == 0.25

        rpc.status = 502  # the RPC goes away: the last balance stays, with the error
        await _wait(lambda: monitor.snapshot()["error"] is not None)
        assert monitor.snapshot()["balance_usd"] == 0.25
        assert "HTTP 502" in monitor.snapshot()["error"]

        rpc.status, rpc.balance = 200, 3_000_000
        await _wait(lambda: monitor.snapshot()["error"] is None
                    and monitor.snapshot()["balance_usd"] == 3.0)
        task = monitor._task
        await monitor.aclose()
        assert task is not None and task.done()

    asyncio.run(main())


def test_monitor_backs_off_on_failure_and_rechecks_zero_sooner(rpc):
    async def main() -> None:
        monitor = BalanceMonitor(ADDRESS, "base", [dead_url()], interval=30, retry_min=1,
                                 retry_max=5)
        delays = []
        for _ in range(5):
            assert await monitor.refresh() is None
            delays.append(monitor.next_delay())
        assert delays == [1, 2, 4, 5, 5]
        assert monitor.snapshot()["balance_usd"] is None
        assert "cannot connect" in monitor.snapshot()["error"]

        monitor.rpc_urls = [rpc.url]
        rpc.balance, rpc.chain_id = 0, NETWORKS["base"].chain_id
        assert await monitor.refresh() == 0
        assert monitor.next_delay() == 1  # an empty wallet is probably being funded
        assert monitor.snapshot()["low"] is True
        rpc.balance = 2_000_000
        await monitor.refresh()
        assert monitor.next_delay() == 30
        await monitor.aclose()

    asyncio.run(main())


def test_monitor_refuses_a_bad_address():
    with pytest.raises(ValueError):
        BalanceMonitor("not-an-address", "base", [])


def test_monitor_without_rpc_urls_never_runs():
    async def main() -> None:
        monitor = BalanceMonitor(ADDRESS, "base", [])
        monitor.start()
        assert monitor._task is None
        assert monitor.snapshot() == {"balance_usd": None, "low": None, "checked": None,
                                      "error": "no RPC URLs configured"}
        await monitor.aclose()

    asyncio.run(main())


def test_short_of_refuses_only_on_a_known_balance_and_rereads_a_low_one_once(rpc):
    """What the request path asks before signing (the e2e side: test_payments_e2e)."""
    async def main() -> None:
        clock = [1000.0]
        monitor = BalanceMonitor(ADDRESS, "base-sepolia", [rpc.url], recheck=2.0, timeout=1.0,
                                 clock=lambda: clock[0])
        assert await monitor.short_of(50_000) is None  # not known yet: never a refusal
        assert rpc.calls == []  # …and no lookup on the request path for it

        rpc.balance = 80_000
        await monitor.refresh()
        assert await monitor.short_of(50_000) is None  # enough: the cached balance decides
        assert await monitor.short_of(80_000) is None
        assert len(rpc.calls) == 1
        assert await monitor.short_of(80_001) == 80_000  # fresh and low: refused, no lookup
        assert len(rpc.calls) == 1

        clock[0] += 2.5  # low but older than `recheck`: re-read once, shared by concurrent asks
        rpc.delay = 0.1
        answers = await asyncio.gather(*(monitor.short_of(100_000) for _ in range(5)))
        assert answers == [80_000] * 5 and len(rpc.calls) == 2

        clock[0] += 2.5
        rpc.balance = 5_000_000  # funded meanwhile: the re-read lets it pay at once
        assert await monitor.short_of(100_000) is None and len(rpc.calls) == 3

        rpc.balance = 0
        await monitor.refresh()
        clock[0] += 2.5
        rpc.status = 502  # the re-read fails: a stale low balance refuses nothing
        assert await monitor.short_of(100_000) is None
        assert monitor.snapshot()["balance_usd"] == 0.0  # still shown, with the error
        await monitor.aclose()

    asyncio.run(main())


def test_a_reread_waits_at_most_the_timeout_and_a_failed_one_is_not_retried_at_once(rpc):
    """RPCs that hang must not slow every payment down: a re-read gives each RPC's lookup
    half of `timeout`, a request waits for it `timeout` seconds at most, and after a failed
    one the next `recheck` seconds ask nothing."""
    async def main() -> None:
        clock = [1000.0]
        monitor = BalanceMonitor(ADDRESS, "base-sepolia", [rpc.url], recheck=2.0, timeout=0.3,
                                 clock=lambda: clock[0])
        rpc.balance = 10
        await monitor.refresh()
        clock[0] += 2.5
        rpc.delay = 10.0  # the lookup outlasts its share: the re-read fails, in time
        started = time.monotonic()
        assert await monitor.short_of(100_000) is None  # refuses nothing
        assert time.monotonic() - started < 5  # its timeout (0.3), not the RPC's 10 s
        await _wait(lambda: monitor._rereading is None)
        asked = len(rpc.requests)
        assert await monitor.short_of(100_000) is None and len(rpc.requests) == asked
        clock[0] += 2.5  # the failure is old: the next request re-reads again
        rpc.delay = 0
        assert await monitor.short_of(100_000) == 10 and len(rpc.requests) > asked
        await monitor.aclose()

    asyncio.run(main())


def answered_by_hand(monkeypatch: pytest.MonkeyPatch) -> list[asyncio.Future[int]]:
    """Replace the balance lookup by one the test answers: each lookup, when it starts, adds
    the future it waits on to the list returned."""
    import clawrouter.payment.balance as balance

    answers: list[asyncio.Future[int]] = []

    async def fetch(*args: Any, **kwargs: Any) -> int:
        answers.append(asyncio.get_running_loop().create_future())
        return await answers[-1]

    monkeypatch.setattr(balance, "fetch_usdc_balance", fetch)
    return answers


def test_an_old_answer_arriving_late_does_not_undo_a_newer_one(monkeypatch):
    """A background lookup that started before the wallet was funded, and answers after a
    newer lookup did, must not put the old balance back (it would refuse a funded wallet)."""
    async def main() -> None:
        answers = answered_by_hand(monkeypatch)
        clock = [1000.0]
        monitor = BalanceMonitor(ADDRESS, "base-sepolia", ["http://unused/"],
                                 clock=lambda: clock[0], session=object())  # type: ignore[arg-type]
        old = asyncio.ensure_future(monitor.refresh())
        await _wait(lambda: len(answers) == 1)
        clock[0] += 1
        new = asyncio.ensure_future(monitor.refresh())
        await _wait(lambda: len(answers) == 2)
        answers[1].set_result(5_000_000)  # funded: the newer lookup answers first
        assert await new == 5_000_000
        answers[0].set_result(0)
        assert await old == 0
        assert monitor.snapshot()["balance_usd"] == 5.0
        assert await monitor.short_of(100_000) is None

    asyncio.run(main())


def test_closing_stops_a_reread_whose_request_left(rpc):
    async def main() -> None:
        clock = [1000.0]
        monitor = BalanceMonitor(ADDRESS, "base-sepolia", [rpc.url], timeout=2.0,
                                 clock=lambda: clock[0])
        rpc.balance = 10
        await monitor.refresh()
        clock[0] += 2.5
        rpc.delay = 0.5
        request = asyncio.ensure_future(monitor.short_of(100_000))
        await _wait(lambda: monitor._rereading is not None)
        request.cancel()  # its client left: the shared re-read goes on, for the others
        running = monitor._rereading
        assert running is not None and not running.done()
        await monitor.aclose()
        assert running.cancelled() and monitor._rereading is None

    asyncio.run(main())


def test_an_rpc_that_hangs_does_not_keep_the_others_from_deciding(rpc):
    """All RPCs are asked at once: one that hangs is given half the request's wait, and the
    others' answer decides (it used to outlast the wait, which then refused nothing)."""
    async def main() -> None:
        with FakeRpc(balance=999) as hung:
            hung.delay = 30  # past the request's wait
            clock = [1000.0]
            # (each RPC's share, 2 s, is the answering one's to answer in on a busy machine)
            monitor = BalanceMonitor(ADDRESS, "base-sepolia", [hung.url, rpc.url],
                                     timeout=4.0, clock=lambda: clock[0])
            rpc.balance = 10
            await monitor.refresh()
            clock[0] += 2.5  # old enough to be re-read
            assert await monitor.short_of(100_000) == 10  # refused, on the answer there is
            await monitor.aclose()

    asyncio.run(main())


def test_a_reread_answering_after_a_newer_lookup_does_not_refuse(monkeypatch):
    """A request's re-read of a low balance answers last, after the background loop's newer
    lookup saw the wallet funded: the request is judged on the newer answer."""
    async def main() -> None:
        answers = answered_by_hand(monkeypatch)
        clock = [1000.0]
        monitor = BalanceMonitor(ADDRESS, "base-sepolia", ["http://unused/"], timeout=5,
                                 clock=lambda: clock[0], session=object())  # type: ignore[arg-type]
        first = asyncio.ensure_future(monitor.refresh())
        await _wait(lambda: len(answers) == 1)
        answers[0].set_result(10)
        await first  # a known low balance
        clock[0] += 3  # older than `recheck`: the request re-reads it
        request = asyncio.ensure_future(monitor.short_of(100_000))
        await _wait(lambda: len(answers) == 2)
        clock[0] += 1
        newer = asyncio.ensure_future(monitor.refresh())
        await _wait(lambda: len(answers) == 3)
        answers[2].set_result(5_000_000)  # funded
        await newer
        answers[1].set_result(10)  # the request's re-read answers last, with the old balance
        assert await request is None
        assert monitor.snapshot()["balance_usd"] == 5.0

    asyncio.run(main())
