"""Networks we pay on, with the USDC contract and EIP-712 domain of each.

We sign with the domain from this table, never the one a 402 challenge suggests: a wrong
domain name still yields a valid-looking signature (x402.md §4, the domain-name trap).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Network:
    name: str  # x402 v1 name
    caip2: str  # x402 v2 network id
    chain_id: int
    usdc: str  # the asset we accept, and the EIP-712 verifyingContract
    domain_name: str
    domain_version: str
    testnet: bool
    explorer: str
    block_seconds: int = 2  # Base and Base Sepolia make a block every 2 s

    @property
    def domain(self) -> dict[str, object]:
        return {
            "name": self.domain_name,
            "version": self.domain_version,
            "chainId": self.chain_id,
            "verifyingContract": self.usdc,
        }


NETWORKS: dict[str, Network] = {
    n.name: n
    for n in (
        Network("base", "eip155:8453", 8453, "0x833589fCD6eDb6E08f4c7C32D4f71b54bdA02913",
                "USD Coin", "2", False, "https://basescan.org/tx/"),
        Network("base-sepolia", "eip155:84532", 84532,
                "0x036CbD53842c5426634e7929541eC2318f3dCF7e", "USDC", "2", True,
                "https://sepolia.basescan.org/tx/"),
    )
}


def lookup(value: str) -> Network | None:
    """Find a network by v1 name or CAIP-2 id."""
    value = value.strip().lower()
    for network in NETWORKS.values():
        if value in (network.name, network.caip2):
            return network
    return None
