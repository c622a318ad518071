"""Two versions of the gateway, same load, same moment: did a change make it faster?

    .venv/bin/python bench/compare.py BASE [NEW] [--scenario gen-url|gen-datauri]
                                      [--concurrency 64] [--requests 2000] [--rounds 4]

BASE and NEW are git revisions (NEW defaults to the working tree). Each is checked out in a
temporary worktree and served as its own gateway in front of one sandbox (`sidebyside.py`:
interleaved rounds, medians). This machine's speed drifts by tens of percent over an hour, so
comparing two full `run.py` reports taken at different times can show a change that is only
the machine: compare side by side instead.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and os.environ.get("BENCH_TREE"):
    # One of the gateways: `clawrouter serve` from that tree, imported before anything of
    # this tree's bench (which may need a newer clawrouter) can import another one.
    sys.path.insert(0, os.environ["BENCH_TREE"])
    import clawrouter
    from clawrouter.cli import main as serve

    assert clawrouter.__file__.startswith(os.environ["BENCH_TREE"]), clawrouter.__file__
    sys.exit(serve(sys.argv[1:]))

import argparse  # noqa: E402
import asyncio  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

import procs  # noqa: E402
import record  # noqa: E402
import sidebyside  # noqa: E402


def checkout(rev: str, into: Path) -> str:
    subprocess.run(["git", "-C", str(BENCH.parent), "worktree", "add", "--detach", "-f",
                    str(into), rev], check=True, capture_output=True)
    return str(into)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("base", help="git revision to compare against")
    parser.add_argument("new", nargs="?", help="git revision (default: the working tree)")
    parser.add_argument("--scenario", choices=sorted(sidebyside.SCENARIOS), default="gen-url")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2000, help="per phase")
    parser.add_argument("--rounds", type=int, default=4)
    record.add_save_option(parser, "compare-c3032e1")
    args = parser.parse_args()
    procs.install_cleanup()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-compare-") as tmp:
            trees = {args.base: checkout(args.base, Path(tmp) / "base"),
                     args.new or "working tree": (checkout(args.new, Path(tmp) / "new")
                                                  if args.new else str(BENCH.parent))}
            sides = {label: sidebyside.gateway(Path(__file__), {"BENCH_TREE": tree})
                     for label, tree in trees.items()}
            with record.saved(args.save, "Two revisions side by side", "compare.py"):
                asyncio.run(sidebyside.run(sides, scenario=args.scenario,
                                           concurrency=args.concurrency, n=args.requests,
                                           rounds=args.rounds))
    finally:  # the worktrees' directories are gone now: forget them
        subprocess.run(["git", "-C", str(BENCH.parent), "worktree", "prune"],
                       capture_output=True)


if __name__ == "__main__":
    main()
