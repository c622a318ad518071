"""A stand-in for the chain the sandbox's payments settle on, readable over JSON-RPC.

The gateway reads USDC state with a handful of JSON-RPC calls (its balance, and whether an
authorization it signed was used); `POST /_sandbox/rpc` answers the same calls from what this
sandbox settled, so wallet balances and ledger reconciliation work offline end to end. Blocks
follow the sandbox clock, one every `block_seconds` of the network; the "finalized" (and "safe")
head trails the latest by the sandbox's `finality_seconds`. Every address starts with `faucet`
micro-USDC (the balance is shown, not enforced: benchmarks pay without limit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from clawrouter.payment.networks import Network
from clawrouter.payment.onchain import AUTHORIZATION_STATE, AUTHORIZATION_USED, BALANCE_OF

#: settlements remembered in detail; a real chain forgets nothing, a long benchmark must
MAX_TRANSFERS = 100_000


@dataclass(frozen=True, slots=True)
class Transfer:
    transaction: str
    block: int


class Chain:
    """Settled authorizations and what they spent, per payer."""

    def __init__(self, network: Network, clock: Callable[[], float], faucet: int,
                 finality: Callable[[], float] = lambda: 0.0, *,
                 state_blocks: int | None = None) -> None:
        self.network = network
        self.clock = clock
        self.faucet = faucet
        self.finality = finality  # seconds the finalized head trails the latest
        #: how many recent blocks' state `eth_call` can read (None: all, an archive node);
        #: a pruned full node keeps 128 (go-ethereum), fewer than Base's finality spans
        self.state_blocks = state_blocks
        self._transfers: dict[tuple[str, str], Transfer] = {}
        self._spent: dict[str, int] = {}

    def block(self, lag: float = 0.0) -> int:
        return max(0, int(self.clock() - lag)) // self.network.block_seconds

    def transfer(self, payer: str, nonce: str, amount: int, transaction: str) -> None:
        if len(self._transfers) >= MAX_TRANSFERS:
            del self._transfers[next(iter(self._transfers))]
        self._transfers[(payer.lower(), nonce.lower())] = Transfer(transaction, self.block())
        self._spent[payer.lower()] = self._spent.get(payer.lower(), 0) + amount

    def clear(self) -> None:
        self._transfers.clear()
        self._spent.clear()

    # --- JSON-RPC -------------------------------------------------------------------------------
    def answer(self, method: str, params: list[Any]) -> Any:
        """The `result` for one call; ValueError becomes a JSON-RPC error."""
        if method == "eth_chainId":
            return hex(self.network.chain_id)
        if method == "eth_blockNumber":
            return hex(self.block())
        if method == "eth_getBlockByNumber":
            number = self._block_param(params[0] if params else "latest")
            return {"number": hex(number),
                    "timestamp": hex(number * self.network.block_seconds)}
        if method == "eth_call":
            block = self._block_param(params[1] if len(params) > 1 else "latest")
            if self.state_blocks is not None and block < self.block() - self.state_blocks:
                raise ValueError(f"missing trie node (state of block {block} is pruned)")
            return self._call(params[0], block)
        if method == "eth_getLogs":
            return self._logs(params[0])
        raise ValueError(f"the sandbox chain does not implement {method}")

    def _block_param(self, tag: Any) -> int:
        latest = self.block()
        if tag in ("latest", "pending"):
            return latest
        if tag in ("safe", "finalized"):
            return self.block(self.finality())
        number = _int(tag)
        if number > latest:
            raise ValueError(f"block {number} is in the future")
        return number

    def _call(self, tx: dict[str, Any], block: int) -> str:
        if str(tx.get("to", "")).lower() != self.network.usdc.lower():
            return "0x"  # no contract there
        data = str(tx.get("data", "")).lower()
        if data.startswith(BALANCE_OF):
            payer = "0x" + data[len(BALANCE_OF):][24:64]
            return _word(max(0, self.faucet - self._spent.get(payer, 0)))
        if data.startswith(AUTHORIZATION_STATE):
            args = data[len(AUTHORIZATION_STATE):]
            transfer = self._transfers.get(("0x" + args[24:64], "0x" + args[64:128]))
            return _word(int(transfer is not None and transfer.block <= block))
        raise ValueError("execution reverted: unknown function")

    def _logs(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        topics = query.get("topics") or []
        if (str(query.get("address", "")).lower() != self.network.usdc.lower()
                or len(topics) != 3 or topics[0] != AUTHORIZATION_USED):
            raise ValueError("the sandbox chain only answers AuthorizationUsed(payer, nonce)")
        low, high = _int(query.get("fromBlock", "0x0")), self._block_param(
            query.get("toBlock", "latest"))
        transfer = self._transfers.get(("0x" + topics[1][-40:].lower(), topics[2].lower()))
        if transfer is None or not low <= transfer.block <= high:
            return []
        return [{"address": self.network.usdc, "topics": topics, "data": "0x",
                 "blockNumber": hex(transfer.block), "transactionHash": transfer.transaction,
                 "logIndex": "0x0", "removed": False}]


async def rpc(request: Request) -> Response:
    """`POST /_sandbox/rpc`: one JSON-RPC 2.0 call (no batches; the gateway sends none)."""
    chain: Chain = request.app.state.sandbox.chain
    try:
        call = await request.json()
    except ValueError:
        call = None
    if not isinstance(call, dict) or not isinstance(call.get("params", []), list):
        return JSONResponse({"jsonrpc": "2.0", "id": None, "error": {
            "code": -32600, "message": "send one JSON-RPC call object with a params list"}})
    try:
        answer: dict[str, Any] = {"result": chain.answer(str(call.get("method")),
                                                         call.get("params", []))}
    except (ValueError, TypeError, IndexError, AttributeError) as exc:
        answer = {"error": {"code": -32000, "message": str(exc)}}
    return JSONResponse({"jsonrpc": "2.0", "id": call.get("id"), **answer})


def _int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.startswith("0x"):
        return int(value, 16)
    raise ValueError(f"not a block number: {value!r}")


def _word(value: int) -> str:
    return "0x" + format(value, "064x")
