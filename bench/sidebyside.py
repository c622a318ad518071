"""Gateways side by side in front of one sandbox: the same load, interleaved rounds, medians.

Shared by `ablate.py` (patched variants of this tree) and `compare.py` (two git revisions).
Each side is a `clawrouter serve` process started through `script` with its own environment
(the script reads it and decides what the process is). Rounds alternate which side goes first,
so a drift in the machine's speed falls on both.
"""

from __future__ import annotations

import os
import statistics
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


async def measure(gw: procs.Server, sandbox: procs.Server, body: clients.Body,
                  concurrency: int, n: int, start_index: int) -> dict[str, float]:
    """A warm-up, then `n` paid generations at `concurrency`: req/s, p50, CPU per request."""
    op = clients.gateway(gw.url, scenarios.GEN, body, f"side by side {gw.name} {os.getpid()}")
    sess = loadgen.session(concurrency)
    try:
        await loadgen.run(op, sess, max(200, n // 4), concurrency, start_index=start_index)
        gw_cpu, sb_cpu = gw.cpu_seconds(), sandbox.cpu_seconds()
        phase = await loadgen.run(op, sess, n, concurrency, start_index=start_index + n)
        gw_cpu, sb_cpu = gw.cpu_seconds() - gw_cpu, sandbox.cpu_seconds() - sb_cpu
    finally:
        await sess.close()
    s = phase.summary()
    return {"rps": s["rps"], "p50_ms": s["p50_ms"], "errors": phase.error_count,
            "gw_cpu_ms": 1000 * gw_cpu / n, "sandbox_cpu_ms": 1000 * sb_cpu / n}


async def run(sides: dict[str, dict[str, str]], script: Path, *, scenario: str = "gen-url",
              concurrency: int, n: int, rounds: int) -> None:
    """Start one gateway per side (label → extra environment), measure, print medians."""
    model, image_bytes = SCENARIOS[scenario]
    body = clients.Body.of({"model": model, "size": "1024x1024", "n": 1})
    sandbox = procs.start_sandbox()
    gateways: dict[str, procs.Server] = {}
    try:
        async with aiohttp.ClientSession() as s, s.post(
                sandbox.url + "/_sandbox/config",
                json={"image_bytes": image_bytes, "url_results": True}) as r:
            r.raise_for_status()
        for i, (label, env) in enumerate(sides.items()):
            gateways[label] = procs.start_gateway(sandbox.url + "/api", preauth=False,
                                                  name=f"side{i}", extra_env=env, script=script)
        print(f"{scenario}, c={concurrency}, {n} per phase, pre-auth off, medians of {rounds} "
              "interleaved rounds", flush=True)
        results: dict[str, list[dict[str, float]]] = {label: [] for label in sides}
        index = 0
        for round_ in range(rounds):
            order = list(gateways.items())
            for label, gw in order if round_ % 2 == 0 else order[::-1]:
                results[label].append(await measure(gw, sandbox, body, concurrency, n, index))
                index += 10 * n
        width = max(8, *(len(label) for label in sides))
        print(f"{'side':{width}}  {'gateway CPU ms/req':>18}  {'sandbox CPU ms/req':>18}  "
              f"{'req/s':>7}  {'p50 ms':>7}  errors")
        for label, runs in results.items():
            m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            per_round = ", ".join(f"{r['gw_cpu_ms']:.2f}" for r in runs)
            print(f"{label:{width}}  {m['gw_cpu_ms']:18.2f}  {m['sandbox_cpu_ms']:18.2f}  "
                  f"{m['rps']:7.0f}  {m['p50_ms']:7.2f}  {sum(r['errors'] for r in runs)}"
                  f"   (gateway CPU per round: {per_round})")
    finally:
        for gw in gateways.values():
            gw.stop()
        sandbox.stop()
