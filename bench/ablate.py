"""Where the gateway's CPU per paid image goes: switch parts off, one variant at a time.

    .venv/bin/python bench/ablate.py [--scenario gen-url|gen-datauri] [--concurrency 16]
                                     [--requests 2000] [--no-direct] [--fast-direct] [variant …]

Each variant runs a fresh server in front of one sandbox and measures CPU per paid generation
(a 200 KB URL result, or a 1.5 MB data URI) and the rate (pre-auth off, the gateway client of bench/run.py); the direct x402
client is measured in the same rounds, so each rate is also a ratio to direct's. The patched
gateways break the gateway's promises — no durable ledger, no durable store — so this is a
measuring tool only; the numbers explain, they are not targets.

Variants:
  full           the gateway as shipped (ledger and store writes group committed by their threads)
  inline         the same writes made on the event loop, one by one: no thread, no batching
  bare           no ledger rows, no image file or row, no hash: the request path alone
  floor          bench/floor.py: pays and hands back its own URLs, nothing else
  floor-durable  floor.py plus the two durability promises (payment row before the money
                 leaves, image file before its URL), group committed: the least a gateway that
                 keeps them can cost
  stdloop        the gateway as shipped, on asyncio's own event loop instead of uvloop
  random-ids     the gateway as shipped, with image ids drawn at random instead of hashed
                 (what content addressing costs)

Run without variants, it measures the first five; name the others to add them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

import record  # noqa: E402
import sidebyside  # noqa: E402

VARIANTS = ("full", "inline", "bare", "floor", "floor-durable")
EXTRA = ("stdloop", "random-ids")


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
    if variant == "stdloop":
        from clawrouter import launch

        launch.event_loop_factory = lambda: None
    if variant == "random-ids":
        files.content_id = lambda data: secrets.token_hex(16)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", metavar="variant",
                        help=f"any of {', '.join(VARIANTS + EXTRA)} (default: "
                             f"{', '.join(VARIANTS)})")
    parser.add_argument("--scenario", choices=sorted(sidebyside.SCENARIOS), default="gen-url")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=2000, help="per phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-direct", action="store_true",
                        help="do not measure the direct client (no ratios)")
    parser.add_argument("--fast-direct", action="store_true",
                        help="also measure a direct client that parses with the gateway's "
                             "parsers (pydantic-core, pybase64) instead of json and base64")
    record.add_save_option(parser, "ablate-url")
    args = parser.parse_args()
    unknown = set(args.variants) - set(VARIANTS + EXTRA)
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(sorted(unknown))}")
    sides = {v: (sidebyside.floor(durable=v == "floor-durable") if v.startswith("floor")
                 else sidebyside.gateway(Path(__file__), {"BENCH_ABLATE": v}))
             for v in args.variants or VARIANTS}
    with record.saved(args.save, "Where the gateway's CPU per paid image goes", "ablate.py"):
        asyncio.run(sidebyside.run(sides, scenario=args.scenario, concurrency=args.concurrency,
                                   n=args.requests, rounds=args.rounds,
                                   direct=not args.no_direct, fast_direct=args.fast_direct))


if __name__ == "__main__":
    if os.environ.get("BENCH_ABLATE"):  # we are the patched gateway
        serve(os.environ["BENCH_ABLATE"], sys.argv[1:])
    else:
        main()
