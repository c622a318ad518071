"""Where the gateway's CPU per paid image goes: switch parts off, one variant at a time.

    .venv/bin/python bench/ablate.py [--concurrency 16] [--requests 3000] [variant …]

Each variant runs a fresh gateway (patched in its own process, see `serve`) in front of one
sandbox and measures CPU per paid 200 KB URL generation (pre-auth off, the gateway client of
bench/run.py). The patches break the gateway's promises — no durable ledger, no durable
store — so this is a measuring tool only; the numbers explain, they are not targets.

Variants:
  full      the gateway as shipped (ledger and store writes group committed by their threads)
  inline    the same writes made on the event loop, one by one: no thread, no batching
  bare      no ledger rows, no image file or row, no hash: the request path alone
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

import aiohttp  # noqa: E402

import clients  # noqa: E402
import loadgen  # noqa: E402
import procs  # noqa: E402
import scenarios  # noqa: E402

VARIANTS = ("full", "inline", "bare")


def serve(variant: str, argv: list[str]) -> None:
    """In the gateway's process: apply the variant's patches, then run `clawrouter serve`."""
    import itertools
    import secrets

    from clawrouter.cli import main
    from clawrouter.groupcommit import GroupCommit
    from clawrouter.payment.ledger import Ledger, Write
    from clawrouter.store import files, store

    async def write_now(self: GroupCommit, write):  # type: ignore[no-untyped-def]
        value, error = self._commit([write])[0]
        if error is not None:
            raise error
        return value

    async def call_now(self: object, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        return fn(*args, **kwargs)

    if variant == "inline":
        GroupCommit.write = write_now  # type: ignore[method-assign]
        GroupCommit.call = call_now  # type: ignore[method-assign]
    if variant == "bare":
        ids = itertools.count(1)

        def keep_in_memory(self: Ledger, writes: list[Write]):  # type: ignore[no-untyped-def]
            outcomes = [(next(ids), None) for _ in writes]  # payment ids; outcomes ignore it
            for write, (value, _) in zip(writes, outcomes):
                if write.durable is not None:
                    write.durable(value)
            return outcomes

        async def no_write(self: object, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            return None

        Ledger._commit = keep_in_memory  # type: ignore[method-assign]
        Ledger.outcome = lambda self, *a, **k: Write(lambda conn: None)  # type: ignore[method-assign]
        Ledger.write = write_now  # type: ignore[method-assign,assignment]
        store.ImageStore._write = no_write  # type: ignore[method-assign]
        files.content_id = lambda data: secrets.token_hex(16)
    main(argv)


async def measure(gw: procs.Server, sandbox: procs.Server, concurrency: int, n: int,
                  start_index: int) -> dict[str, float]:
    body = clients.Body.of({"model": scenarios.URL_MODEL, "size": "1024x1024", "n": 1})
    op = clients.gateway(gw.url, scenarios.GEN, body, f"ablate {gw.name} {os.getpid()}")
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


async def run(variants: list[str], concurrency: int, n: int, rounds: int) -> None:
    """Every variant's gateway runs side by side; rounds interleave them; medians reported."""
    sandbox = procs.start_sandbox()
    gateways = []
    try:
        async with aiohttp.ClientSession() as s, s.post(
                sandbox.url + "/_sandbox/config",
                json={"image_bytes": scenarios.URL_IMAGE_BYTES, "url_results": True}) as r:
            r.raise_for_status()
        gateways = [procs.start_gateway(sandbox.url + "/api", preauth=False, name=v,
                                        extra_env={"BENCH_ABLATE": v}, script=Path(__file__))
                    for v in variants]
        print(f"paid 200 KB URL generations, c={concurrency}, {n} per phase, pre-auth off, "
              f"medians of {rounds} interleaved rounds", flush=True)
        results: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        for round_ in range(rounds):
            for i, gw in enumerate(gateways):
                index = (round_ * len(gateways) + i) * 10 * n
                results[gw.name].append(await measure(gw, sandbox, concurrency, n, index))
        print(f"{'variant':8}  {'gateway CPU ms/req':>18}  {'sandbox CPU ms/req':>18}  "
              f"{'req/s':>7}  {'p50 ms':>7}  errors")
        for variant, runs in results.items():
            m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            per_round = ", ".join(f"{r['gw_cpu_ms']:.2f}" for r in runs)
            print(f"{variant:8}  {m['gw_cpu_ms']:18.2f}  {m['sandbox_cpu_ms']:18.2f}  "
                  f"{m['rps']:7.0f}  {m['p50_ms']:7.2f}  {sum(r['errors'] for r in runs)}"
                  f"   (gateway CPU per round: {per_round})")
    finally:
        for gw in gateways:
            gw.stop()
        sandbox.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", metavar="variant",
                        help=f"any of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000, help="per phase")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(sorted(unknown))}")
    asyncio.run(run(args.variants or list(VARIANTS), args.concurrency, args.requests,
                    args.rounds))


if __name__ == "__main__":
    if os.environ.get("BENCH_ABLATE"):  # we are the patched gateway
        serve(os.environ["BENCH_ABLATE"], sys.argv[1:])
    else:
        main()
