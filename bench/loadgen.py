"""A closed-loop load generator: `c` workers on keep-alive aiohttp pools, N requests in all.

Each worker takes the next request number, runs one client operation (which may be several
HTTP calls: the whole thing is one "request" and one latency sample), and repeats. Bounded by
the request count and a wall-clock deadline, so a stuck server cannot hang the run.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

Op = Callable[[aiohttp.ClientSession, int], Awaitable[int]]  # returns bytes the client got


class OpError(Exception):
    """A request that did not end with the image bytes (kind is what went wrong)."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(f"{kind}: {detail}" if detail else kind)
        self.kind = kind


def session(concurrency: int, timeout: float = 60.0) -> aiohttp.ClientSession:
    # keepalive_timeout 4 s: below uvicorn's 5 s, so a pool left idle while the other side's
    # phase runs never reuses a connection the server is closing (a client-side race that
    # would count as an error of the server under test).
    connector = aiohttp.TCPConnector(limit=max(concurrency, 1) * 2, limit_per_host=0,
                                     force_close=False, keepalive_timeout=4,
                                     ttl_dns_cache=None)
    return aiohttp.ClientSession(connector=connector,
                                 timeout=aiohttp.ClientTimeout(total=timeout),
                                 auto_decompress=False, skip_auto_headers=("User-Agent",))


@dataclass
class Phase:
    n: int
    concurrency: int
    wall_s: float
    latencies_ms: list[float]
    errors: Counter[str] = field(default_factory=Counter)
    received_bytes: int = 0
    samples: list[str] = field(default_factory=list)  # the first few error messages
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return len(self.latencies_ms)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def pct(self, q: float) -> float:
        return percentile(self.latencies_ms, q)

    @property
    def rps(self) -> float:
        return self.ok / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        lat = self.latencies_ms
        return {"n": self.n, "ok": self.ok, "errors": dict(self.errors),
                **({"error_samples": self.samples} if self.samples else {}),
                "concurrency": self.concurrency, "wall_s": round(self.wall_s, 3),
                "rps": round(self.rps, 1),
                "p50_ms": round(self.pct(50), 3), "p90_ms": round(self.pct(90), 3),
                "p99_ms": round(self.pct(99), 3),
                "mean_ms": round(statistics.fmean(lat), 3) if lat else None,
                "min_ms": round(min(lat), 3) if lat else None,
                "mean_bytes": round(self.received_bytes / self.ok) if self.ok else 0,
                **self.extra}


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default); NaN for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


async def run(op: Op, sess: aiohttp.ClientSession, n: int, concurrency: int, *,
              start_index: int = 0, deadline_s: float = 300.0) -> Phase:
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    received = 0
    samples: list[str] = []
    next_i = 0
    stop_at = time.monotonic() + deadline_s

    async def worker() -> None:
        nonlocal next_i, received
        while next_i < n and time.monotonic() < stop_at:
            i = start_index + next_i
            next_i += 1
            t0 = time.perf_counter()
            try:
                got = await op(sess, i)
            except (OpError, aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                errors[exc.kind if isinstance(exc, OpError) else type(exc).__name__] += 1
                if len(samples) < 5:
                    samples.append(f"{type(exc).__name__}: {exc}"[:300])
                continue
            latencies.append((time.perf_counter() - t0) * 1000)
            received += got

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    wall = time.perf_counter() - t0
    if next_i < n:
        errors["deadline"] += n - next_i
    return Phase(n, concurrency, wall, latencies, errors, received, samples)
