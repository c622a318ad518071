"""Read USDC state on chain over JSON-RPC: a wallet's balance, and whether an EIP-3009
authorization the gateway signed was used (and by which transaction).

Only reads, only public data: `eth_chainId`, `eth_getBlockByNumber`, `eth_call` and
`eth_getLogs`. Answers are checked strictly — a malformed word is an error, never a 0 or a
`false` — because the ledger acts on them. RPC URLs can carry provider API keys in their path or
query, so every message names the host only.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
from eth_hash.auto import keccak

from clawrouter.payment.networks import Network

#: USDC's function selectors and the topic of its `AuthorizationUsed` event, from their
#: signatures (tests pin the well-known values)
BALANCE_OF = "0x" + keccak(b"balanceOf(address)")[:4].hex()
AUTHORIZATION_STATE = "0x" + keccak(b"authorizationState(address,bytes32)")[:4].hex()
AUTHORIZATION_USED = "0x" + keccak(b"AuthorizationUsed(address,bytes32)").hex()

_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")
_NONCE = re.compile(r"0x[0-9a-fA-F]{64}")
_QUANTITY = re.compile(r"0x[0-9a-fA-F]{1,64}")
_MAX_BODY = 256 * 1024
T = TypeVar("T")


class ChainUnavailable(RuntimeError):
    """No RPC gave a usable answer; the message says why, per RPC host."""


@dataclass(frozen=True, slots=True)
class Block:
    number: int
    timestamp: int  # unix seconds, the chain's clock (what validBefore is checked against)


class Rpc:
    """One JSON-RPC endpoint; every request gets `timeout` seconds."""

    def __init__(self, url: str, session: aiohttp.ClientSession, timeout: float = 3.0) -> None:
        self.url = url
        self.session = session
        self.timeout = timeout

    @property
    def host(self) -> str:
        parts = urlsplit(self.url)
        return (parts.hostname + (f":{parts.port}" if parts.port else "")
                if parts.hostname else "?")

    async def request(self, method: str, params: list[Any]) -> Any:
        """The `result` of one call; ValueError for any error or malformed answer."""
        return await asyncio.wait_for(self._request(method, params), self.timeout)

    async def _request(self, method: str, params: list[Any]) -> Any:
        body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
        async with self.session.post(self.url, json=body, allow_redirects=False) as resp:
            if resp.status != 200:
                raise ValueError(f"HTTP {resp.status}")
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_any():  # to its end, however it arrives
                size += len(chunk)
                if size > _MAX_BODY:
                    raise ValueError("answer too large")
                chunks.append(chunk)
        try:
            answer = json.loads(b"".join(chunks))
        except (ValueError, RecursionError):  # nested deeper than the parser goes, too
            raise ValueError("answer is not JSON") from None
        if not isinstance(answer, dict):
            raise ValueError("answer is not a JSON-RPC response")
        if answer.get("error") is not None:
            error = answer["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise ValueError(f"RPC error: {str(message)[:120]}")
        if "result" not in answer:
            raise ValueError("answer has no result")
        return answer["result"]

    async def chain_id(self) -> int:
        return _quantity(await self.request("eth_chainId", []), "chain id")

    async def block(self, tag: str = "latest") -> Block:
        """The head block by tag: "latest", or "finalized" (what no reorg can undo)."""
        block = await self.request("eth_getBlockByNumber", [tag, False])
        if not isinstance(block, dict):
            raise ValueError(f"no {tag} block")
        return Block(_quantity(block.get("number"), "block number"),
                     _quantity(block.get("timestamp"), "block timestamp"))

    async def check_chain(self, network: Network) -> None:
        """ValueError unless this RPC serves `network`'s chain: the same USDC address on
        another chain would answer for another token."""
        chain_id = await self.chain_id()
        if chain_id != network.chain_id:
            raise ValueError(f"chain id {chain_id}, expected {network.chain_id} ({network.name})")

    async def usdc_balance(self, address: str, network: Network) -> int:
        """`balanceOf(address)` in micro-USDC at the latest block, from `network`'s chain only
        (the gateway refuses to sign for a wallet it believes short)."""
        await self.check_chain(network)
        return await self._call(network, BALANCE_OF + _word_address(address), "latest")

    async def authorization_used(self, network: Network, payer: str, nonce: str,
                                 block: int) -> bool:
        """USDC's `authorizationState(payer, nonce)` at `block`: true once the authorization
        was used (we never cancel one, so used means the transfer happened)."""
        state = await self._call(network, AUTHORIZATION_STATE + _word_address(payer)
                                 + _word_nonce(nonce), hex(block))
        if state not in (0, 1):
            raise ValueError(f"authorizationState answered {state}, not a bool")
        return state == 1

    async def authorization_transaction(self, network: Network, payer: str, nonce: str,
                                        from_block: int, to_block: int) -> str | None:
        """The hash of the transaction that used the authorization, from its
        `AuthorizationUsed` log between the two blocks (None when no log is there)."""
        logs = await self.request("eth_getLogs", [{
            "address": network.usdc, "fromBlock": hex(from_block), "toBlock": hex(to_block),
            "topics": [AUTHORIZATION_USED, "0x" + _word_address(payer), "0x" + _word_nonce(nonce)],
        }])
        if not isinstance(logs, list):
            raise ValueError("eth_getLogs answered no list")
        for log in logs:
            tx = log.get("transactionHash") if isinstance(log, dict) else None
            if isinstance(tx, str) and _NONCE.fullmatch(tx) and not log.get("removed"):
                return tx.lower()
        return None

    async def _call(self, network: Network, data: str, block: str) -> int:
        result = await self.request("eth_call", [{"to": network.usdc, "data": data}, block])
        # "0x" is what a chain without the USDC contract answers: a wrong RPC, not a 0.
        if not isinstance(result, str) or not _QUANTITY.fullmatch(result):
            raise ValueError(f"unexpected result {str(result)[:80]!r} (is this RPC on the "
                             "right chain?)")
        return int(result, 16)


async def every_answer(urls: Sequence[str], ask: Callable[[Rpc], Awaitable[T]], *,
                       session: aiohttp.ClientSession,
                       timeout: float = 3.0) -> tuple[list[T], list[str]]:
    """`ask` every RPC at once: the answers of those that answered (in `urls` order) and why
    the others did not; ChainUnavailable when none did."""
    if not urls:
        raise ChainUnavailable("no RPC URLs configured")
    rpcs = [Rpc(url, session, timeout) for url in urls]
    results = await asyncio.gather(*(ask(rpc) for rpc in rpcs), return_exceptions=True)
    answers: list[T] = []
    failures = []
    for rpc, result in zip(rpcs, results):
        if isinstance(result, _RPC_FAILURES):
            failures.append(_failure(rpc, result))
        elif isinstance(result, BaseException):
            raise result
        else:
            answers.append(result)
    if not answers:
        raise ChainUnavailable("; ".join(failures))
    return answers, failures


_RPC_FAILURES = (aiohttp.ClientError, OSError, ValueError, asyncio.TimeoutError)


def _failure(rpc: Rpc, exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"{rpc.host}: no answer within {rpc.timeout:g} s"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"{rpc.host}: cannot connect"
    return f"{rpc.host}: {str(exc) or type(exc).__name__}"


def askable(payer: object, nonce: object) -> bool:
    """Whether the chain can be asked about this (payer, nonce) at all."""
    return (isinstance(payer, str) and bool(_ADDRESS.fullmatch(payer))
            and isinstance(nonce, str) and bool(_NONCE.fullmatch(nonce)))


def check_address(address: str) -> None:
    if not isinstance(address, str) or not _ADDRESS.fullmatch(address):
        raise ValueError(f"not an address: {address!r}")


def _word_address(address: str) -> str:
    check_address(address)
    return address[2:].lower().rjust(64, "0")


def _word_nonce(nonce: str) -> str:
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        raise ValueError(f"not a 32-byte nonce: {nonce!r}")
    return nonce[2:].lower()


def _quantity(value: Any, what: str) -> int:
    if not isinstance(value, str) or not _QUANTITY.fullmatch(value):
        raise ValueError(f"unexpected {what} {str(value)[:80]!r}")
    return int(value, 16)
