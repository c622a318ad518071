"""Where the gateway's CPU per paid image goes: switch parts off, one variant at a time.

    .venv/bin/python bench/ablate.py [--concurrency 16] [--requests 3000] [variant …]

Each variant runs a fresh gateway (patched in its own process, see `serve`) in front of one
sandbox and measures CPU per paid 200 KB URL generation (pre-auth off, the gateway client of
bench/run.py). The patches break the gateway's promises — no durable ledger, no durable
store — so this is a measuring tool only; the numbers explain, they are not targets.

Variants:
  full      the gateway as shipped
  inline    the store's file write, hash and row run on the event loop (no worker thread)
  inline+   … and the ledger's writes too: every step on the loop, nothing handed off
  bare      no ledger rows, no image file or row, no hash: the request path alone
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

import aiohttp  # noqa: E402

import clients  # noqa: E402
import loadgen  # noqa: E402
import procs  # noqa: E402
import scenarios  # noqa: E402

VARIANTS = ("full", "inline", "inline+", "bare")


def serve(variant: str, argv: list[str]) -> None:
    """In the gateway's process: apply the variant's patches, then run `clawrouter serve`."""
    import itertools
    import secrets

    from clawrouter.cli import main
    from clawrouter.payment.ledger import Ledger
    from clawrouter.store import db, files, store

    async def inline(self: object, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        return fn(*args, **kwargs)

    async def to_thread(fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        return fn(*args, **kwargs)

    if variant in ("inline", "inline+"):
        store.asyncio.to_thread = to_thread  # type: ignore[attr-defined]
        store.ImageStore._run_db = inline  # type: ignore[method-assign]
    if variant == "inline+":
        Ledger.call = inline  # type: ignore[method-assign]
    if variant == "bare":
        ids = itertools.count(1)

        def record_signed(self: Ledger, **kw):  # type: ignore[no-untyped-def]
            payment_id = next(ids)
            with self.lock:
                self._add(self._clock(), kw["amount"])
                if kw.get("reservation") is not None:
                    kw["reservation"].paid(payment_id)
            return payment_id

        Ledger.record_signed = record_signed  # type: ignore[method-assign]
        Ledger.finish = lambda self, *a, **k: None  # type: ignore[method-assign]
        Ledger.call = inline  # type: ignore[method-assign]
        files.write_atomic = lambda directory, name, data: directory / name
        files.content_id = lambda data: secrets.token_hex(16)
        db.MetadataDB.insert_image = lambda self, *a, **k: None  # type: ignore[method-assign]
    main(argv)


async def measure(variant: str, sandbox: procs.Server, concurrency: int,
                  n: int) -> dict[str, float]:
    api = sandbox.url + "/api"
    home = Path(tempfile.mkdtemp(prefix="bench-ablate-home-"))
    env = procs.base_env(home)
    env.update(BLOCKRUN_API_URL=api, CLAWROUTER_PREAUTH="false",
               BENCH_ABLATE=variant)
    port = procs.free_port()
    gw = procs.Server("gateway", ["serve", "--host", "127.0.0.1", "--port", str(port),
                                  "--upstream", api, "--no-sandbox"], env, port, home,
                      script=Path(__file__))
    gw._tmp.append(home)
    gw.start()
    try:
        body = clients.Body.of({"model": scenarios.URL_MODEL, "size": "1024x1024", "n": 1})
        op = clients.gateway(gw.url, scenarios.GEN, body, f"ablate {variant} {os.getpid()}")
        sess = loadgen.session(concurrency)
        try:
            await loadgen.run(op, sess, max(200, n // 4), concurrency, start_index=10**7)
            gw_cpu, sb_cpu = gw.cpu_seconds(), sandbox.cpu_seconds()
            phase = await loadgen.run(op, sess, n, concurrency, start_index=0)
            gw_cpu, sb_cpu = gw.cpu_seconds() - gw_cpu, sandbox.cpu_seconds() - sb_cpu
        finally:
            await sess.close()
        s = phase.summary()
        return {"rps": s["rps"], "p50_ms": s["p50_ms"], "errors": s["errors"],
                "gw_cpu_ms": 1000 * gw_cpu / n, "sandbox_cpu_ms": 1000 * sb_cpu / n}
    finally:
        gw.stop()
        shutil.rmtree(home, ignore_errors=True)


async def run(variants: list[str], concurrency: int, n: int) -> None:
    sandbox = procs.start_sandbox()
    try:
        async with aiohttp.ClientSession() as s, s.post(
                sandbox.url + "/_sandbox/config",
                json={"image_bytes": scenarios.URL_IMAGE_BYTES, "url_results": True}) as r:
            r.raise_for_status()
        print(f"paid 200 KB URL generations, c={concurrency}, {n} per variant, pre-auth off")
        print(f"{'variant':8}  {'gateway CPU ms/req':>18}  {'sandbox CPU ms/req':>18}  "
              f"{'req/s':>7}  {'p50 ms':>7}  errors")
        for variant in variants:
            m = await measure(variant, sandbox, concurrency, n)
            print(f"{variant:8}  {m['gw_cpu_ms']:18.2f}  {m['sandbox_cpu_ms']:18.2f}  "
                  f"{m['rps']:7.0f}  {m['p50_ms']:7.2f}  {m['errors'] or 0}", flush=True)
    finally:
        sandbox.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", metavar="variant",
                        help=f"any of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(sorted(unknown))}")
    asyncio.run(run(args.variants or list(VARIANTS), args.concurrency, args.requests))


if __name__ == "__main__":
    if os.environ.get("BENCH_ABLATE"):  # we are the patched gateway
        serve(os.environ["BENCH_ABLATE"], sys.argv[1:])
    else:
        main()
