"""Benchmark the gateway against a direct x402 client, on loopback, in the same run.

    .venv/bin/python bench/run.py [--quick] [scenario …]

Scenarios: gen-url, gen-datauri, edit-4mb, serve, preauth, rss (default: all, in that order).
Writes bench/results/<name>.json, .md and .png (name: "latest" for a full run, "quick" for
--quick) and prints each target with PASS/FAIL. See bench/README.md for the method.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(BENCH.parent))

import procs  # noqa: E402
import record  # noqa: E402
import report  # noqa: E402
import scenarios  # noqa: E402


def log(message: str) -> None:
    print(message, flush=True)


def _cpu_busy(window: float = 3.0) -> float:
    """Fraction of all CPUs busy over `window` seconds (from /proc/stat)."""
    def read() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    t0, i0 = read()
    time.sleep(window)
    t1, i1 = read()
    return 1 - (i1 - i0) / max(t1 - t0, 1)


def wait_quiet(limit_s: float, busy_max: float = 0.15) -> float:
    """Wait (up to limit_s) until the machine is nearly idle; return the last busy fraction."""
    deadline = time.monotonic() + limit_s
    busy = _cpu_busy()
    while busy > busy_max and time.monotonic() < deadline:
        log(f"waiting for a quiet machine: CPUs {100 * busy:.0f}% busy")
        busy = _cpu_busy()
    return busy


async def main_async(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    plan = scenarios.QUICK if args.quick else scenarios.FULL
    if args.repeats:
        plan = scenarios.Plan(**{**plan.__dict__, "repeats": args.repeats})
    busy = wait_quiet(args.wait_quiet) if args.wait_quiet else _cpu_busy()
    results: dict[str, Any] = {
        "command": record.command_line("run.py", argv), "machine": record.machine(),
        "settings": {"quick": plan.quick, "repeats": plan.repeats, "warmup": plan.warmup,
                     "warmup_s": plan.warmup_s,
                     "points": {k: {str(c): n for c, n in v.items()}
                                for k, v in plan.points.items()},
                     "preauth_n": plan.preauth_n, "rss_n": plan.rss_n,
                     "gateway_preauth": args.gateway_preauth,
                     "gateway_env": dict(args.gateway_env),
                     "upstream_latency_ms": args.upstream_latency_ms,
                     "upstream_verify_cpu_ms": args.upstream_verify_cpu_ms,
                     "profiled": bool(args.profile)},
        "scenarios": {},
    }
    results["machine"]["cpu_busy_before"] = round(busy, 3)
    if busy > 0.25:
        log(f"warning: the CPUs were {100 * busy:.0f}% busy with other work before the run; "
            "numbers will be noisy (try --wait-quiet 300)")
    t0 = time.monotonic()
    sandbox = procs.start_sandbox(args.upstream_latency_ms)
    bench = scenarios.Bench(plan, sandbox, args.gateway_preauth, args.upstream_latency_ms,
                            gateway_env=dict(args.gateway_env),
                            tag=f"bench {os.getpid()} {int(time.time())}", log=log,
                            profile_dir=args.profile)
    await bench.configure(latency_ms=args.upstream_latency_ms,
                          verify_cpu_ms=args.upstream_verify_cpu_ms)
    log(f"sandbox {sandbox.url} (pid {sandbox.pid}); plan: "
        f"{'quick' if plan.quick else 'full'}, {plan.repeats} gateway/direct pair(s) per point")
    try:
        for name in args.scenarios:
            log(f"== {name}")
            results["scenarios"][name] = await scenarios.run_scenario(bench, name)
            log(f"   ({results['scenarios'][name]['duration_s']:.0f} s)")
    finally:
        bench.stop_gateways()
        sandbox.stop()
    results["duration_s"] = round(time.monotonic() - t0, 1)
    results["machine"]["loadavg_after"] = record.loadavg()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("scenarios", nargs="*", metavar="scenario",
                        help=f"any of {', '.join(scenarios.SCENARIOS)} (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="smaller N and one gateway/direct pair per point (~1 minute)")
    parser.add_argument("--repeats", type=int, help="gateway/direct pairs per point")
    parser.add_argument("--gateway-preauth", action="store_true",
                        help="leave the gateway's pre-auth on in the comparisons (default off: "
                             "both clients then make two upstream round trips)")
    parser.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE",
                        type=lambda kv: tuple(kv.split("=", 1)),
                        help="extra environment for the gateway (e.g. MALLOC_ARENA_MAX=2)")
    parser.add_argument("--upstream-latency-ms", type=float, default=0.0,
                        help="delay the sandbox adds to every answer (POST /_sandbox/config); "
                             "the preauth scenario always uses 50")
    parser.add_argument("--upstream-verify-cpu-ms", type=float, default=0.0, metavar="MS",
                        help="CPU the sandbox spends on each payment on top of its own "
                             "verification: an upstream that costs more per image (direct and "
                             "gateway pay it alike, once per image)")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="sample every gateway with py-spy (folded stacks in DIR) and print "
                             "where its CPU goes; slows the gateway, so do not quote those numbers")
    parser.add_argument("--wait-quiet", type=float, metavar="S", default=0,
                        help="first wait up to S seconds for the CPUs to be < 15%% busy")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--name", help="output file stem (default: latest, or quick)")
    argv = sys.argv[1:]
    args = parser.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in scenarios.SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {unknown}; choose from {list(scenarios.SCENARIOS)}")
    args.scenarios = args.scenarios or list(scenarios.SCENARIOS)
    name = args.name or ("profile" if args.profile else "quick" if args.quick else "latest")

    procs.install_cleanup()
    procs.LOG_DIR = args.out / "logs" / name
    shutil.rmtree(procs.LOG_DIR, ignore_errors=True)
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    try:
        results = asyncio.run(main_async(args, argv))
    except KeyboardInterrupt:
        procs.stop_all()
        log("interrupted; servers stopped, nothing written")
        return 130
    finally:
        procs.stop_all()

    results["targets"] = report.targets(results)
    results = report.clean(results)
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / f"{name}.png" if name != "latest" else args.out / "latency.png"
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(
        report.markdown(results, png.name) + "\n")  # the .png sits beside the .md
    try:
        import plot
        plot.plot(results, png)
    except Exception as exc:  # the numbers matter more than the picture
        log(f"plot skipped: {type(exc).__name__}: {exc}")
    log(report.console(results))
    if args.profile:
        import hotspots
        for folded in sorted(args.profile.glob("*.folded")):
            log(f"\n{folded.name}:\n" + hotspots.summary(folded))
    kept = sorted(procs.LOG_DIR.glob("*.log")) if procs.LOG_DIR.exists() else []
    if kept:
        log(f"\nserver warnings/errors kept in {_rel(procs.LOG_DIR)}: "
            + ", ".join(p.name for p in kept))
    log(f"\nwrote {_rel(args.out / f'{name}.json')}, {_rel(args.out / f'{name}.md')}, "
        f"{_rel(png)} ({results['duration_s']:.0f} s)")
    return 0


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(BENCH.parent))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
