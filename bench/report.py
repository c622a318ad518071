"""Targets (PASS/FAIL), the markdown tables for the README, and the console summary."""

from __future__ import annotations

import math
from typing import Any

LABELS = {
    "gen-url": "generation, 200 KB URL result",
    "gen-datauri": "generation, 1.5 MB data-URI result",
    "edit-4mb": "edit, 4 MB input (data URI in JSON)",
}


def clean(value: Any) -> Any:
    """NaN/inf → None, recursively (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def _point(results: dict[str, Any], scenario: str, c: int) -> dict[str, Any] | None:
    for p in results["scenarios"].get(scenario, {}).get("points", []):
        if p["concurrency"] == c:
            return p
    return None


def cpu_budget(point: dict[str, Any], cores: int, ratio: float = 0.8) -> dict[str, Any] | None:
    """What a throughput ratio would cost in CPU, from one point's measured CPU per request.

    Client, gateway and sandbox share `cores`. At `ratio` × direct's req/s, and with every core
    100 % busy (an upper bound: real scheduling leaves some idle), each request may cost
    `cores / rate` of CPU in all; what the client and the sandbox spend in the gateway phase
    leaves the rest to the gateway. `ceiling` is the reverse: the best ratio the gateway's own
    measured CPU allows on these cores. Both ignore waiting, so they bound, never predict.
    """
    g, d = point.get("gateway"), point.get("direct")
    if not g or not d or not d.get("rps"):
        return None
    others = g["sandbox_cpu_ms_per_req"] + g["client_cpu_ms_per_req"]
    per_request_ms = 1000 * cores / (ratio * d["rps"])
    total = g["gw_cpu_ms_per_req"] + others
    floor = point.get("floor")
    return {"ratio": ratio, "others_ms": round(others, 3),
            "budget_ms": round(per_request_ms - others, 3),
            "gateway_ms": g["gw_cpu_ms_per_req"],
            "floor_ms": floor["gw_cpu_ms_per_req"] if floor else None,
            "ceiling": round(1000 * cores / total / d["rps"], 3) if total > 0 else None}


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target from issues 2–5 and 7 with what this run measured; pass None = not run."""
    out: list[dict[str, Any]] = []

    def add(name: str, target: str, measured: str | None, ok: bool | None) -> None:
        out.append({"name": name, "target": target, "measured": measured or "not run",
                    "pass": ok})

    sc = results["scenarios"]

    p = _point(results, "gen-url", 1)
    v = p and p.get("overhead_p50_ms")
    add("URL generation overhead, c=1", "p50 ≤ 2 ms",
        f"{v:+.2f} ms" if v is not None else None, v <= 2 if v is not None else None)

    p = _point(results, "gen-datauri", 1)
    v = p and p.get("overhead_ms_per_mb")
    add("data-URI generation overhead, c=1", "≤ 4 ms/MB",
        f"{v:+.2f} ms/MB ({p['overhead_p50_ms']:+.2f} ms for "
        f"{sc['gen-datauri']['data_uri_mb']:.2f} MB)" if v is not None else None,
        v <= 4 if v is not None else None)

    for name in ("gen-url", "gen-datauri", "edit-4mb"):
        p = _point(results, name, 64)
        v = p and p.get("rps_ratio")
        floor = p and p.get("floor_rps_ratio")
        budget = p and cpu_budget(p, results["machine"]["nproc"])
        add(f"{name} throughput, c=64", "≥ 0.8× direct req/s",
            f"{v:.2f}× ({p['gateway']['rps']:.1f} vs {p['direct']['rps']:.1f} req/s)"
            + (f"; floor.py {floor:.2f}×" if floor is not None else "")
            + (f"; the gateway's CPU allows ≤ {budget['ceiling']:.2f}×"
               if budget and budget["ceiling"] is not None and budget["ceiling"] < 1 else "")
            if v is not None else None, v >= 0.8 if v is not None else None)

    r = sc.get("rss")
    if r and "rss_after_mb" in r:
        add("gateway RSS after 1,000 URL generations (c=16)", "≤ 120 MB",
            f"{r['rss_after_mb']:.0f} MB (idle {r['idle_rss_mb']:.0f} MB, n={r['n']})",
            r["rss_after_mb"] <= 120 and r["n"] >= 1000)
    else:
        add("gateway RSS after 1,000 URL generations (c=16)", "≤ 120 MB", None, None)

    p = _point(results, "edit-4mb", 1)
    v = p and p.get("overhead_ms_per_mb")
    add("4 MB edit overhead, c=1", "≤ 4 ms/MB of input",
        f"{v:+.2f} ms/MB ({p['overhead_p50_ms']:+.2f} ms)" if v is not None else None,
        v <= 4 if v is not None else None)

    p = _point(results, "edit-4mb", 64)
    if p:
        g = p["gateway"]
        peak = max(run["gw_peak_rss_mb"] for run in g["runs"])
        add("64 concurrent 4 MB edits: peak gateway RSS", "≤ 600 MB",
            f"{peak:.0f} MB (highest of the repeats)",
            peak <= 600)
        errs = g["error_count"]
        add("64 concurrent 4 MB edits: errors", "0",
            f"{errs} of {g['n'] * p['repeats']}" + (f" {g['errors']}" if errs else ""),
            errs == 0)
        idle = sc["edit-4mb"]["gw_idle_rss_mb"]
        kept = [(run["gw_rss_settled_mb"] - idle) / max(run["gw_peak_rss_mb"] - idle, 1)
                for run in g["runs"]]
        add("memory returned 5 s after the 64-concurrent 4 MB edits",
            "≥ 75 % of the RSS above idle given back",
            f"idle {idle:.0f} → peak {g['gw_peak_rss_mb']:.0f} → 5 s after "
            f"{g['gw_rss_settled_mb']:.0f} MB (median; {100 * (1 - max(kept)):.0f} % given "
            "back in the worst repeat)",
            max(kept) <= 0.25)
    else:
        for name, target in (("64 concurrent 4 MB edits: peak gateway RSS", "≤ 600 MB"),
                             ("64 concurrent 4 MB edits: errors", "0"),
                             ("memory returned 5 s after the 64-concurrent 4 MB edits",
                              "≥ 75 % of the RSS above idle given back")):
            add(name, target, None, None)

    p = _point(results, "serve", 16)
    v = p and p["gateway"]["rps"]
    add("/images/<id> serving, 200 KB, c=16", "≥ 3,000 req/s",
        f"{v:,.0f} req/s (p50 {p['gateway']['p50_ms']:.2f} ms)" if v else None,
        v >= 3000 if v else None)

    pa = sc.get("preauth")
    if pa and "saved_p50_ms" in pa and pa["saved_p50_ms"] is not None:
        lat = pa["latency_ms"]
        saved = pa["saved_p50_ms"]
        add("pre-auth saves one round trip (upstream +50 ms)", f"p50 saving ≥ {0.8 * lat:.0f} ms",
            f"{saved:.1f} ms (p50 {pa['off']['p50_ms']:.1f} → {pa['on']['p50_ms']:.1f} ms)",
            saved >= 0.8 * lat)
        on, off = pa["on"]["round_trips_per_image"], pa["off"]["round_trips_per_image"]
        add("upstream round trips per paid image", "≈ 1 with pre-auth, 2 without",
            f"{on} with, {off} without",
            on is not None and off is not None and on <= 1.05 and 1.95 <= off <= 2.05)
    else:
        add("pre-auth saves one round trip (upstream +50 ms)", "p50 saving ≥ 40 ms", None, None)
        add("upstream round trips per paid image", "≈ 1 with pre-auth, 2 without", None, None)

    # issue 7: every target held with no errors, at every point of every scenario
    errors = 0
    counted = False
    for name, s in sc.items():
        for p in s.get("points", []):
            counted = True
            errors += p.get("gateway", {}).get("error_count", 0)
        for key in ("on", "off"):
            if key in s:
                counted = True
                errors += s[key].get("error_count", 0)
        if "phase" in s:
            errors += sum(s["phase"]["errors"].values())
    add("gateway errors, all scenarios", "0", f"{errors}" if counted else None,
        errors == 0 if counted else None)
    return out


def markdown(results: dict[str, Any], png: str = "latency.png") -> str:
    m = results["machine"]
    st = results["settings"]
    sc = results["scenarios"]
    lines = [
        "## Benchmark results",
        "",
        f"Produced by `{results['command']}` on {m['date']} — {m['nproc']} cores "
        f"({m['cpu']}), Python {m['python']}, clawrouter {m.get('git_commit') or '?'}, load average {m['loadavg_before']} and CPUs "
        f"{100 * m.get('cpu_busy_before', 0):.0f}% busy with other work before the run; "
        f"{results['duration_s']:.0f} s in all. Loopback only, the sandbox as upstream "
        f"(real x402: 402 challenge, EIP-3009 signature verified), upstream latency "
        f"{st['upstream_latency_ms']:g} ms"
        + (f", {st['upstream_verify_cpu_ms']:g} ms more CPU per payment in the sandbox "
           "(`--upstream-verify-cpu-ms`)" if st.get("upstream_verify_cpu_ms") else "")
        + ". Gateway pre-auth "
        f"{'on' if st['gateway_preauth'] else 'off'} in the comparisons "
        f"{'' if st['gateway_preauth'] else '(so both clients make two upstream round trips; '}"
        f"{'' if st['gateway_preauth'] else 'its saving is measured separately below)'}. "
        f"Each point: warm-ups per side (at least {st['warmup']} requests and "
        f"{st.get('warmup_s', 0):g} s), then phases interleaved "
        f"gateway, direct (, floor) × {st['repeats']}; medians of the repeats. Overhead = gateway p50 − "
        f"direct p50 in the same run.",
        "",
    ]
    rows = []
    for name in ("gen-url", "gen-datauri", "edit-4mb"):
        s = sc.get(name)
        if not s or "points" not in s:
            continue
        for p in s["points"]:
            g, d = p["gateway"], p["direct"]
            per = p.get("overhead_ms_per_mb")
            rows.append(
                f"| {LABELS[name]} | {p['concurrency']} | {_fmt(g['p50_ms'])} / "
                f"{_fmt(g['p99_ms'])} | {_fmt(d['p50_ms'])} / {_fmt(d['p99_ms'])} | "
                f"{_fmt(p['overhead_p50_ms'], 2)}"
                + (f" ({per:+.2f}/MB)" if per is not None and p["concurrency"] == 1 else "")
                + f" | {_fmt(g['rps'], 1)} | {_fmt(d['rps'], 1)} | {_fmt(p['rps_ratio'])}× | "
                f"{_fmt(g['gw_cpu_ms_per_req'])} | {_fmt(g['gw_peak_rss_mb'], 0)} | "
                f"{g['error_count']} / {d['error_count']} |")
    if rows:
        lines += [
            "### Gateway vs direct (latency in ms, p50 / p99)",
            "",
            "| scenario | c | gateway | direct | overhead p50 | gateway req/s | direct req/s "
            "| ratio | gateway CPU ms/req | gateway peak RSS MB | errors (gw / direct) |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *rows, "",
        ]
    rows = []
    for name in ("gen-url", "gen-datauri"):
        for p in sc.get(name, {}).get("points", []):
            if "floor" not in p:
                continue
            g, d, f = p["gateway"], p["direct"], p["floor"]
            rows.append(
                f"| {LABELS[name]} | {p['concurrency']} | {_fmt(f['p50_ms'])} / "
                f"{_fmt(f['p99_ms'])} | {_fmt(f['rps'], 1)} | {_fmt(p['floor_rps_ratio'])}× | "
                f"{_fmt(p['rps_ratio'])}× | {_fmt(f['gw_cpu_ms_per_req'])} | "
                f"{_fmt(g['gw_cpu_ms_per_req'])} | {_fmt(f['sandbox_cpu_ms_per_req'])} / "
                f"{_fmt(g['sandbox_cpu_ms_per_req'])} / {_fmt(d['sandbox_cpu_ms_per_req'])} | "
                f"{f['error_count']} |")
    if rows:
        lines += [
            "### The floor: `bench/floor.py` in the same run",
            "",
            "The least a Python gateway that pays and hands back its own URLs can do "
            "(Starlette + aiohttp, our signer, results kept in a dict; no validation, budget, "
            "ledger, durable store, coalescing, logs or metrics). Its distance from the gateway "
            "is the price of those features.",
            "",
            "| scenario | c | floor p50 / p99 ms | floor req/s | floor ÷ direct | gateway ÷ "
            "direct | floor CPU ms/req | gateway CPU ms/req | sandbox CPU ms/req (floor / "
            "gateway / direct) | floor errors |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows, "",
        ]
    rows = []
    for name in ("gen-url", "gen-datauri", "edit-4mb"):
        p = _point(results, name, 64)
        b = p and cpu_budget(p, results["machine"]["nproc"])
        if b:
            rows.append(
                f"| {LABELS[name]} | {_fmt(p['direct']['rps'], 1)} | "
                f"{_fmt(b['ratio'] * p['direct']['rps'], 1)} | {_fmt(b['others_ms'])} | "
                f"{_fmt(b['budget_ms'])} | {_fmt(b['gateway_ms'])} | {_fmt(b['floor_ms'])} | "
                f"{_fmt(b['ceiling'])}× | {_fmt(p['rps_ratio'])}× |")
    if rows:
        lines += [
            "### What 0.8× direct costs in CPU (c=64)",
            "",
            f"Client, gateway and sandbox share {results['machine']['nproc']} cores. At 0.8× "
            "direct's rate, with every core 100 % busy (an upper bound), a request may cost "
            "cores ÷ rate of CPU in all; the gateway gets what the sandbox and the client "
            "(measured in the gateway phase) leave. The ceiling is the reverse: the best ratio "
            "the gateway's measured CPU per request allows. `bench/report.py` `cpu_budget`.",
            "",
            "| scenario | direct req/s | 0.8× | sandbox + client CPU ms/req | gateway CPU "
            "budget ms/req | gateway CPU ms/req | floor.py CPU ms/req | ceiling | measured |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows, "",
        ]
    s = sc.get("serve")
    if s and "points" in s:
        lines += [
            f"### Serving a stored {s['image_bytes'] / 1000:.0f} KB image (`GET /images/<id>`)",
            "",
            "| c | gateway req/s | p50 / p99 ms | gateway CPU ms/req | sandbox media route "
            "req/s (reference) | p50 / p99 ms | errors |",
            "|---|---|---|---|---|---|---|",
        ]
        for p in s["points"]:
            g, d = p["gateway"], p["direct"]
            lines.append(f"| {p['concurrency']} | {_fmt(g['rps'], 0)} | {_fmt(g['p50_ms'])} / "
                         f"{_fmt(g['p99_ms'])} | {_fmt(g['gw_cpu_ms_per_req'], 3)} | "
                         f"{_fmt(d['rps'], 0)} | {_fmt(d['p50_ms'])} / {_fmt(d['p99_ms'])} | "
                         f"{g['error_count']} |")
        lines.append("")
    pa = sc.get("preauth")
    if pa and "on" in pa:
        lines += [
            f"### Pre-auth (sandbox adds {pa['latency_ms']:g} ms per answer; c=1, "
            f"{pa['n']} paid URL generations per phase)",
            "",
            "| pre-auth | p50 ms | p99 ms | upstream round trips per paid image | errors |",
            "|---|---|---|---|---|",
        ]
        for mode in ("off", "on"):
            r = pa[mode]
            lines.append(f"| {mode} | {_fmt(r['p50_ms'], 1)} | {_fmt(r['p99_ms'], 1)} | "
                         f"{_fmt(r['round_trips_per_image'])} | {r['error_count']} |")
        lines += ["", f"Saving: {_fmt(pa['saved_p50_ms'], 1)} ms p50 per image. (With a "
                  "learned price the gateway skips the unpaid probe; the image download from "
                  "the upstream is the other delayed answer in both cases.)", ""]
    mem = []
    r = sc.get("rss")
    if r and "rss_after_mb" in r:
        mem += [f"| idle, fresh gateway (rss scenario) | {r['idle_rss_mb']:.0f} |",
                f"| after {r['n']:,} URL generations at c=16 | {r['rss_after_mb']:.0f} |",
                f"| … {5} s later | {r['rss_settled_mb']:.0f} |",
                f"| peak during those requests (VmHWM) | {r['peak_rss_mb']:.0f} |"]
    p = _point(results, "edit-4mb", 64)
    if p:
        g = p["gateway"]
        mem += [f"| idle, fresh gateway (edit scenario) | {sc['edit-4mb']['gw_idle_rss_mb']:.0f} |",
                f"| before 64-concurrent 4 MB edits (after the c=1 and c=16 phases) | "
                f"{g['gw_rss_before_mb']:.0f} |",
                f"| peak during them (median of the repeats) | {g['gw_peak_rss_mb']:.0f} |",
                f"| 5 s after they end (median of the repeats) | {g['gw_rss_settled_mb']:.0f} |"]
    if mem:
        lines += ["### Gateway memory (RSS, MB)", "", "| when | MB |", "|---|---|", *mem, ""]
    lines += ["### Targets", "", "| target | goal | measured | result |", "|---|---|---|---|"]
    for t in results["targets"]:
        verdict = {True: "PASS", False: "**FAIL**", None: "not run"}[t["pass"]]
        lines.append(f"| {t['name']} | {t['target']} | {t['measured']} | {verdict} |")
    failed = {k: v["failed"] for k, v in sc.items() if "failed" in v}
    if failed:
        lines += ["", "Scenarios that could not run: "
                  + "; ".join(f"`{k}`: {v}" for k, v in failed.items())]
    lines += ["", f"![p50 latency against concurrency]({png})", ""]
    return "\n".join(lines)


def console(results: dict[str, Any]) -> str:
    width = max(len(t["name"]) for t in results["targets"])
    lines = ["", "targets:"]
    for t in results["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "----"}[t["pass"]]
        lines.append(f"  {verdict}  {t['name']:<{width}}  {t['target']:<24}  {t['measured']}")
    return "\n".join(lines)


if __name__ == "__main__":  # re-render the markdown of a results file (after editing this module)
    import argparse
    import json
    from pathlib import Path

    cli = argparse.ArgumentParser(description="Re-render a results file's markdown (and its "
                                  "targets) after editing this module.")
    cli.add_argument("results", nargs="?", type=Path,
                     default=Path(__file__).parent / "results/latest.json")
    src = cli.parse_args().results
    data = json.loads(src.read_text())
    data["targets"] = targets(data)
    png = "latency.png" if src.stem == "latest" else f"{src.stem}.png"  # beside the .md
    src.with_suffix(".md").write_text(markdown(data, png) + "\n")
    src.write_text(json.dumps(clean(data), indent=1) + "\n")
    print(console(data))
