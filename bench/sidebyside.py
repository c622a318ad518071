"""Gateways side by side in front of one sandbox: the same load, interleaved rounds, medians.

Shared by `ablate.py` (patched variants of this tree, floor.py) and `compare.py` (two git
revisions). Each side is a server process in front of the sandbox: `gateway(script, env)` is a
`clawrouter serve` started through `script` with its own environment (the script reads it and
decides what the process is). With `direct=True` the direct x402 client is measured in the same
rounds too, and each side's rate is also shown as a ratio to it. Rounds alternate which side
goes first, so a drift in the machine's speed falls on all of them.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from pathlib import Path

import aiohttp

import clients
import loadgen
import procs
import scenarios

#: what a scenario configures in the sandbox and asks for: (model, image bytes)
SCENARIOS = {
    "gen-url": (scenarios.URL_MODEL, scenarios.URL_IMAGE_BYTES),
    "gen-datauri": (scenarios.DATA_URI_MODEL, scenarios.DATA_URI_IMAGE_BYTES),
}
DIRECT = "direct"
FAST_DIRECT = "direct, fast parsers"

#: starts one side's server in front of the sandbox's API base (…/api); `name` names its files
Start = Callable[[str, str], procs.Server]


def gateway(script: Path, env: dict[str, str]) -> Start:
    """A `clawrouter serve` side, run through `script` with `env` added (pre-auth off)."""
    return lambda api, name: procs.start_gateway(api, preauth=False, name=name, extra_env=env,
                                                 script=script)


def floor(durable: bool = False) -> Start:
    """bench/floor.py as a side (`durable`: with its ledger rows and image files on disk)."""
    return lambda api, name: procs.start_floor(api, durable=durable, name=name)


async def measure(gw: procs.Server | None, sandbox: procs.Server, body: clients.Body,
                  concurrency: int, n: int, start_index: int,
                  fast: bool = False) -> dict[str, float]:
    """A warm-up, then `n` paid generations at `concurrency`: req/s, p50, CPU per request.
    Without a server (`gw` None) the direct client pays the sandbox itself (`fast`: with the
    gateway's parsers)."""
    tag = f"side by side {gw.name if gw else DIRECT} {fast} {os.getpid()}"
    op = (clients.gateway(gw.url, scenarios.GEN, body, tag) if gw is not None
          else clients.direct(sandbox.url + "/api", scenarios.GEN, body, tag, fast=fast))
    sess = loadgen.session(concurrency)
    cpu = gw.cpu_seconds if gw is not None else (lambda: 0.0)
    try:
        await loadgen.run(op, sess, max(200, n // 4), concurrency, start_index=start_index)
        gw_cpu, sb_cpu = cpu(), sandbox.cpu_seconds()
        phase = await loadgen.run(op, sess, n, concurrency, start_index=start_index + n)
        gw_cpu, sb_cpu = cpu() - gw_cpu, sandbox.cpu_seconds() - sb_cpu
    finally:
        await sess.close()
    s = phase.summary()
    return {"rps": s["rps"], "p50_ms": s["p50_ms"], "errors": phase.error_count,
            "gw_cpu_ms": 1000 * gw_cpu / n, "sandbox_cpu_ms": 1000 * sb_cpu / n}


async def run(sides: dict[str, Start], *, scenario: str = "gen-url", concurrency: int, n: int,
              rounds: int, direct: bool = False, fast_direct: bool = False) -> None:
    """Start one server per side (label → starter), measure, print medians. `direct` adds the
    direct client (ratios are to it); `fast_direct` also the direct client with fast parsers."""
    model, image_bytes = SCENARIOS[scenario]
    body = clients.Body.of({"model": model, "size": "1024x1024", "n": 1})
    sandbox = procs.start_sandbox()
    servers: dict[str, procs.Server | None] = {}
    try:
        async with aiohttp.ClientSession() as s, s.post(
                sandbox.url + "/_sandbox/config",
                json={"image_bytes": image_bytes, "url_results": True}) as r:
            r.raise_for_status()
        for i, (label, start) in enumerate(sides.items()):
            servers[label] = start(sandbox.url + "/api", f"side{i}")
        if direct:
            servers[DIRECT] = None
        if fast_direct:
            servers[FAST_DIRECT] = None
        print(f"{scenario}, c={concurrency}, {n} per phase, pre-auth off, medians of {rounds} "
              "interleaved rounds", flush=True)
        results: dict[str, list[dict[str, float]]] = {label: [] for label in servers}
        index = 0
        for round_ in range(rounds):
            order = list(servers.items())
            for label, gw in order if round_ % 2 == 0 else order[::-1]:
                results[label].append(await measure(gw, sandbox, body, concurrency, n, index,
                                                    fast=label == FAST_DIRECT))
                index += 10 * n
        _print(results)
    finally:
        for gw in servers.values():
            if gw is not None:
                gw.stop()
        sandbox.stop()


def _print(results: dict[str, list[dict[str, float]]]) -> None:
    medians = {label: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
               for label, runs in results.items()}
    direct_rps = medians[DIRECT]["rps"] if DIRECT in medians else None
    width = max(8, *(len(label) for label in results))
    print(f"{'side':{width}}  {'gateway CPU ms/req':>18}  {'sandbox CPU ms/req':>18}  "
          f"{'req/s':>7}" + ("  ÷ direct" if direct_rps else "") + f"  {'p50 ms':>7}  errors")
    for label, runs in results.items():
        m = medians[label]
        ratio = f"  {m['rps'] / direct_rps:7.2f}×" if direct_rps else ""
        per_round = ", ".join(f"{r['gw_cpu_ms']:.2f}" for r in runs)
        print(f"{label:{width}}  {m['gw_cpu_ms']:18.2f}  {m['sandbox_cpu_ms']:18.2f}  "
              f"{m['rps']:7.0f}{ratio}  {m['p50_ms']:7.2f}  {sum(r['errors'] for r in runs)}"
              + (f"   (gateway CPU per round: {per_round})"
                 if label not in (DIRECT, FAST_DIRECT) else ""))
