"""Two versions of the gateway, same load, same moment: did a change make it faster?

    .venv/bin/python bench/compare.py BASE [NEW] [--scenario gen-url|gen-datauri]
                                      [--concurrency 64] [--requests 2000] [--rounds 4]

BASE and NEW are git revisions (NEW defaults to the working tree). Each is checked out in a
temporary worktree and served as its own gateway in front of one sandbox; rounds alternate
which goes first, and the medians are reported. This machine's speed drifts by tens of percent
over an hour, so comparing two full `run.py` reports taken at different times can show a change
that is only the machine: compare side by side instead.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

BENCH = Path(__file__).resolve().parent
TREE = os.environ.get("BENCH_TREE")  # set in the gateways: import clawrouter from that tree
sys.path[:0] = [TREE] if TREE else [str(BENCH), str(BENCH.parent)]

import aiohttp  # noqa: E402

import clients  # noqa: E402
import loadgen  # noqa: E402
import procs  # noqa: E402
import scenarios  # noqa: E402

SCENARIOS = {
    "gen-url": (scenarios.URL_MODEL, scenarios.URL_IMAGE_BYTES),
    "gen-datauri": (scenarios.DATA_URI_MODEL, scenarios.DATA_URI_IMAGE_BYTES),
}


def serve(tree: str, argv: list[str]) -> None:
    """In the gateway's process (`tree` is first on sys.path): run `clawrouter serve`."""
    import clawrouter
    from clawrouter.cli import main

    assert Path(clawrouter.__file__).is_relative_to(tree), clawrouter.__file__
    main(argv)


def checkout(rev: str, into: Path) -> Path:
    subprocess.run(["git", "-C", str(BENCH.parent), "worktree", "add", "--detach", "-f",
                    str(into), rev], check=True, capture_output=True)
    return into


async def run(trees: dict[str, str], scenario: str, concurrency: int, n: int,
              rounds: int) -> None:
    model, image_bytes = SCENARIOS[scenario]
    sandbox = procs.start_sandbox()
    gateways: dict[str, procs.Server] = {}
    try:
        async with aiohttp.ClientSession() as s, s.post(
                sandbox.url + "/_sandbox/config",
                json={"image_bytes": image_bytes, "url_results": True}) as r:
            r.raise_for_status()
        for i, (label, tree) in enumerate(trees.items()):
            gateways[label] = procs.start_gateway(
                sandbox.url + "/api", preauth=False, name=f"side{i}",
                extra_env={"BENCH_TREE": tree}, script=Path(__file__))
        body = clients.Body.of({"model": model, "size": "1024x1024", "n": 1})
        print(f"{scenario}, c={concurrency}, {n} per phase, pre-auth off, "
              f"{rounds} interleaved rounds", flush=True)
        results: dict[str, list[tuple[float, float, int]]] = {label: [] for label in trees}
        index = 0
        for round_ in range(-1, rounds):  # round -1 warms both up and is not counted
            order = list(gateways.items())
            for label, gw in (order if round_ % 2 else order[::-1]):
                op = clients.gateway(gw.url, scenarios.GEN, body, f"compare {label}")
                sess = loadgen.session(concurrency)
                try:
                    cpu = gw.cpu_seconds()
                    phase = await loadgen.run(op, sess, n if round_ >= 0 else n // 4,
                                              concurrency, start_index=index)
                    cpu = gw.cpu_seconds() - cpu
                finally:
                    await sess.close()
                index += 2 * n
                if round_ >= 0:
                    rps = phase.summary()["rps"]
                    results[label].append((rps, 1000 * cpu / n, phase.error_count))
                    print(f"  round {round_} {label:>12}: {rps:7.1f} req/s  "
                          f"{1000 * cpu / n:.2f} ms CPU/req", flush=True)
        for label, rows in results.items():
            print(f"{label:>12}: median {statistics.median(r[0] for r in rows):7.1f} req/s, "
                  f"{statistics.median(r[1] for r in rows):.2f} ms gateway CPU per request, "
                  f"{sum(r[2] for r in rows)} errors")
    finally:
        for gw in gateways.values():
            gw.stop()
        sandbox.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="git revision to compare against")
    parser.add_argument("new", nargs="?", help="git revision (default: the working tree)")
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), default="gen-url")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2000, help="per phase")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    procs.install_cleanup()
    with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
        trees = {args.base: str(checkout(args.base, Path(tmp) / "base"))}
        if args.new:
            trees[args.new] = str(checkout(args.new, Path(tmp) / "new"))
        else:
            trees["working tree"] = str(BENCH.parent)
        try:
            asyncio.run(run(trees, args.scenario, args.concurrency, args.requests,
                            args.rounds))
        finally:
            subprocess.run(["git", "-C", str(BENCH.parent), "worktree", "prune"],
                           capture_output=True)


if __name__ == "__main__":
    if TREE:  # we are one of the gateways
        serve(TREE, sys.argv[1:])
    else:
        main()
