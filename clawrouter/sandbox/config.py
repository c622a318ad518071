"""How a sandbox behaves: the network it takes payments on, timings and result shapes.

The defaults mimic BlockRun except the network: the sandbox defaults to Base Sepolia so nothing
it receives can ever be a mainnet authorization.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from clawrouter.config import BLOCKRUN_PAYEE
from clawrouter.payment.networks import NETWORKS, Network

#: fields `POST /_sandbox/config` may change while the server runs (benchmark phases)
RUNTIME_FIELDS = ("latency_ms", "slow_seconds", "url_results", "image_bytes",
                  "max_timeout_seconds", "max_accepted_timeout_seconds", "accept_v1",
                  "finality_seconds", "marked", "verify_cpu_ms")


@dataclass
class SandboxConfig:
    network: str = "base-sepolia"  # a key of NETWORKS
    pay_to: str = BLOCKRUN_PAYEE
    #: how long a 202 job stays in progress after its POST
    slow_seconds: float = 3.0
    #: added before every answer (except the control API), standing in for the internet
    latency_ms: float = 0
    #: CPU each payment's verification spends on top of ours (benchmarks: an upstream that
    #: costs more per image than this sandbox, as BlockRun's servers do; it blocks the loop)
    verify_cpu_ms: float = 0
    #: non-data-URI models answer with a URL into the sandbox's own media store
    url_results: bool = True
    #: pad every PNG to about this many bytes (benchmarks: 200 KB URL, 1.5 MB data-URI results)
    image_bytes: int | None = None
    #: advertised in every challenge
    max_timeout_seconds: int = 300
    #: largest `maxTimeoutSeconds` a payment may echo in `accepted`; BlockRun tolerates clients
    #: that raise it (its Go SDK does for video jobs). Equal to max_timeout_seconds = strict.
    max_accepted_timeout_seconds: int = 600
    #: take x402 v1 payloads (`X-PAYMENT`, no `accepted`); BlockRun speaks v2 only
    accept_v1: bool = False
    #: put `x-blockrun-sandbox: true` on every answer (false: look like BlockRun itself)
    marked: bool = True
    #: what every wallet holds on the sandbox chain before it pays (shown, not enforced)
    faucet_usd: float = 100.0
    #: how far the chain's finalized head trails its latest block (Base's: about 20 minutes;
    #: short here so that payments with a lost outcome are reconciled while you watch)
    finality_seconds: float = 4.0
    #: the clock every check and job timer reads (tests may freeze it)
    clock: Callable[[], float] = field(default=time.time, repr=False)

    def __post_init__(self) -> None:
        if self.network not in NETWORKS:
            raise ValueError(f"unknown network {self.network!r}; use one of {sorted(NETWORKS)}")

    @property
    def chain(self) -> Network:
        return NETWORKS[self.network]

    def public(self) -> dict[str, Any]:
        """The settings as JSON (for `GET /_sandbox/config`)."""
        return {"network": self.network, "pay_to": self.pay_to,
                **{name: getattr(self, name) for name in RUNTIME_FIELDS}}

    def update(self, changes: dict[str, Any]) -> None:
        """Apply runtime changes; unknown fields or wrong types raise ValueError."""
        unknown = set(changes) - set(RUNTIME_FIELDS)
        if unknown:
            raise ValueError(f"cannot change {sorted(unknown)} at runtime; "
                             f"allowed: {list(RUNTIME_FIELDS)}")
        for name, value in changes.items():
            if name in ("url_results", "accept_v1", "marked"):
                if not isinstance(value, bool):
                    raise ValueError(f"{name} must be a boolean")
            elif name == "image_bytes":
                if value is not None and (not _is_number(value) or value < 0):
                    raise ValueError("image_bytes must be null or a number >= 0")
                value = None if value is None else int(value)
            elif not _is_number(value) or value < 0:
                raise ValueError(f"{name} must be a number >= 0")
            elif name in ("max_timeout_seconds", "max_accepted_timeout_seconds"):
                value = int(value)
            setattr(self, name, value)


def _is_number(value: Any) -> bool:
    """A finite number (JSON lets `Infinity` through, which would hang a sleep or a burn)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))
