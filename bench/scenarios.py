"""The scenarios: what is sent, to which servers, at which concurrency, and what is recorded.

Method (shared/reference/performance.md): for each point, warm-ups per side (at least 20 and
at least 2 s: a fresh gateway needs a few hundred requests to reach its steady state), then N
requests per phase, phases interleaved gateway, direct, gateway, direct (…), and the median of the
repeats reported. Each scenario gets a fresh gateway process (fresh home), so memory figures
are not polluted by an earlier scenario; one sandbox serves the whole run.
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

import clients
import loadgen
from clawrouter.sandbox.images import make_png
from clients import Body
from loadgen import Op
from procs import RssSampler, Server, start_gateway, start_floor

GEN = "/v1/images/generations"
EDIT = "/v1/images/image2image"
URL_MODEL = "xai/grok-imagine-image"
DATA_URI_MODEL = "openai/gpt-image-1"
URL_IMAGE_BYTES = 200_000
DATA_URI_IMAGE_BYTES = 1_100_000  # base64 → a ~1.47 MB data URI
EDIT_INPUT_BYTES = 4_000_000
SETTLE_S = 5.0  # "RSS 5 s after the load ends"
MB = 1_000_000


@dataclass(frozen=True)
class Plan:
    quick: bool
    repeats: int  # gateway/direct pairs per point
    warmup: int  # warm-up requests per side and point, at least…
    warmup_s: float  # …and for at least this long
    points: dict[str, dict[int, int]]  # scenario → {concurrency: requests per phase}
    preauth_n: int
    rss_n: int
    phase_deadline_s: float


FULL = Plan(
    quick=False, repeats=3, warmup=20, warmup_s=2.0,
    points={
        "gen-url": {1: 200, 16: 640, 64: 1280},
        "gen-datauri": {1: 60, 16: 160, 64: 320},
        "edit-4mb": {1: 24, 16: 64, 64: 192},
        "serve": {16: 6000, 64: 6000},
    },
    preauth_n=50, rss_n=1000, phase_deadline_s=120)

QUICK = Plan(
    quick=True, repeats=1, warmup=20, warmup_s=1.0,
    points={
        "gen-url": {1: 60, 16: 160, 64: 320},
        "gen-datauri": {1: 20, 16: 48, 64: 128},
        "edit-4mb": {1: 8, 16: 32, 64: 64},
        "serve": {16: 2000, 64: 2000},
    },
    preauth_n=20, rss_n=1000, phase_deadline_s=60)


@dataclass
class Bench:
    plan: Plan
    sandbox: Server
    gateway_preauth: bool
    upstream_latency_ms: float
    tag: str
    log: Callable[[str], None]
    profile_dir: Path | None = None
    gateway_env: dict[str, str] = field(default_factory=dict)
    scenario: str = ""
    _index: int = 0
    gateways: list[Server] = field(default_factory=list)

    @property
    def api(self) -> str:
        return self.sandbox.url + "/api"

    def indices(self, n: int) -> int:
        """A fresh block of request numbers (so every prompt in the run is unique)."""
        start = self._index
        self._index += n
        return start

    async def control(self, method: str, path: str, body: Any = None) -> Any:
        async with aiohttp.ClientSession() as s, s.request(
                method, self.sandbox.url + path, json=body) as resp:
            data = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"sandbox {path}: {resp.status} {data}")
            return data

    async def configure(self, **changes: Any) -> None:
        await self.control("POST", "/_sandbox/config", changes)

    def gateway(self, *, preauth: bool | None = None, name: str = "gateway") -> Server:
        gw = start_gateway(self.api, preauth=self.gateway_preauth if preauth is None else preauth,
                           name=name, extra_env=self.gateway_env)
        gw.label = f"{self.scenario}-{name}"
        self.gateways.append(gw)
        if self.profile_dir is not None:
            gw.profile(self.profile_dir / f"{self.scenario}-{name}.folded")
        return gw

    def floor(self) -> Server:
        """bench/floor.py in front of the sandbox (see its docstring)."""
        floor = start_floor(self.api)
        floor.label = f"{self.scenario}-floor"
        self.gateways.append(floor)
        return floor

    def stop_gateways(self) -> None:
        for gw in self.gateways:
            gw.stop()
        self.gateways.clear()

    # --- measuring ---------------------------------------------------------------------
    async def phase(self, op: Op, sess: aiohttp.ClientSession, n: int, c: int,
                    gw: Server) -> loadgen.Phase:
        """One measured phase, with the gateway's CPU and memory around it."""
        sb = self.sandbox
        gw_cpu, sb_cpu, me = gw.cpu_seconds(), sb.cpu_seconds(), _own_cpu()
        rss_before = gw.rss_mb()
        hwm_reset = gw.reset_peak()
        with RssSampler(gw.pid) as sampler:
            phase = await loadgen.run(op, sess, n, c, start_index=self.indices(n),
                                      deadline_s=self.plan.phase_deadline_s)
        peak = max(sampler.peak_mb, gw.hwm_mb() if hwm_reset else 0.0)
        phase.extra.update(
            gw_cpu_ms_per_req=round((gw.cpu_seconds() - gw_cpu) * 1000 / n, 3),
            sandbox_cpu_ms_per_req=round((sb.cpu_seconds() - sb_cpu) * 1000 / n, 3),
            client_cpu_ms_per_req=round((_own_cpu() - me) * 1000 / n, 3),
            gw_rss_before_mb=round(rss_before, 1), gw_rss_after_mb=round(gw.rss_mb(), 1),
            gw_peak_rss_mb=round(peak, 1))
        return phase

    async def point(self, gw: Server, c: int, n: int, ops: dict[str, Op], *,
                    settle: bool = False, floor: Server | None = None) -> dict[str, Any]:
        """Warm up every side, then G, D(, F), G, D…; medians of the repeats.

        The `gw_*` figures of each phase are those of the server in front: the gateway, or
        bench/floor.py for the `floor` side."""
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in ops}
        sessions = {side: loadgen.session(c) for side in ops}
        try:
            for side, op in ops.items():
                started = time.monotonic()
                while time.monotonic() - started < self.plan.warmup_s:
                    warm = await loadgen.run(op, sessions[side], self.plan.warmup,
                                             min(c, self.plan.warmup),
                                             start_index=self.indices(self.plan.warmup),
                                             deadline_s=self.plan.phase_deadline_s)
                    if warm.error_count:
                        self.log(f"    warm-up {side}: errors {dict(warm.errors)}")
            for _ in range(self.plan.repeats):
                for side, op in ops.items():
                    front = floor if side == "floor" and floor is not None else gw
                    phase = await self.phase(op, sessions[side], n, c, front)
                    if settle and side == "gateway":
                        await asyncio.sleep(SETTLE_S)
                        phase.extra["gw_rss_settled_mb"] = round(gw.rss_mb(), 1)
                    summary = phase.summary()
                    runs[side].append(summary)
                    self.log(f"    c={c:<3} {side:8} p50 {summary['p50_ms']:9.2f} ms  "
                             f"p99 {summary['p99_ms']:9.2f} ms  {summary['rps']:8.1f} req/s  "
                             f"gw cpu {summary['gw_cpu_ms_per_req']:6.2f} ms/req  "
                             f"gw rss {summary['gw_rss_after_mb']:.0f} MB"
                             + (f"  errors {summary['errors']}: {summary['error_samples'][0]}"
                                if summary["errors"] else ""))
        finally:
            for s in sessions.values():
                await s.close()
        out: dict[str, Any] = {"concurrency": c, "n": n, "repeats": self.plan.repeats}
        for side, summaries in runs.items():
            out[side] = {**median_of(summaries), "runs": summaries}
        if "gateway" in out and "direct" in out:
            g, d = out["gateway"], out["direct"]
            out["overhead_p50_ms"] = _sub(g["p50_ms"], d["p50_ms"])
            out["overhead_p99_ms"] = _sub(g["p99_ms"], d["p99_ms"])
            out["rps_ratio"] = round(g["rps"] / d["rps"], 3) if d["rps"] else None
        if "floor" in out and "direct" in out:
            f, d = out["floor"], out["direct"]
            out["floor_overhead_p50_ms"] = _sub(f["p50_ms"], d["p50_ms"])
            out["floor_rps_ratio"] = round(f["rps"] / d["rps"], 3) if d["rps"] else None
        return out


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def median_of(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric field across repeats; errors are summed."""
    out: dict[str, Any] = {}
    for key, value in summaries[0].items():
        if key == "errors":
            total: Counter[str] = Counter()
            for s in summaries:
                total.update(s["errors"])
            out[key] = dict(total)
        elif key == "error_samples":
            continue
        elif isinstance(value, (int, float)) or value is None:
            values = [s[key] for s in summaries
                      if isinstance(s[key], (int, float)) and not math.isnan(s[key])]
            out[key] = round(statistics.median(values), 3) if values else None
    out["error_count"] = sum(out["errors"].values())
    return out


def per_mb(point: dict[str, Any], mb: float) -> None:
    if point.get("overhead_p50_ms") is not None:
        point["overhead_ms_per_mb"] = round(point["overhead_p50_ms"] / mb, 3)


# --- scenarios -----------------------------------------------------------------------------
async def gen_url(b: Bench) -> dict[str, Any]:
    await b.configure(image_bytes=URL_IMAGE_BYTES, url_results=True)
    gw = b.gateway()
    body = Body.of({"model": URL_MODEL, "size": "1024x1024", "n": 1})
    floor = b.floor()
    ops = {"gateway": clients.gateway(gw.url, GEN, body, b.tag),
           "direct": clients.direct(b.api, GEN, body, b.tag),
           "floor": clients.gateway(floor.url, GEN, body, b.tag)}
    idle = gw.rss_mb()
    points = [await b.point(gw, c, n, ops, floor=floor)
              for c, n in b.plan.points["gen-url"].items()]
    b.stop_gateways()
    return {"model": URL_MODEL, "result": "url", "image_bytes": URL_IMAGE_BYTES,
            "gw_idle_rss_mb": round(idle, 1), "points": points}


async def gen_datauri(b: Bench) -> dict[str, Any]:
    await b.configure(image_bytes=DATA_URI_IMAGE_BYTES, url_results=True)
    gw = b.gateway()
    idle = gw.rss_mb()
    body = Body.of({"model": DATA_URI_MODEL, "size": "1024x1024", "n": 1})
    floor = b.floor()
    ops = {"gateway": clients.gateway(gw.url, GEN, body, b.tag),
           "direct": clients.direct(b.api, GEN, body, b.tag),
           "floor": clients.gateway(floor.url, GEN, body, b.tag)}
    points = [await b.point(gw, c, n, ops, floor=floor)
              for c, n in b.plan.points["gen-datauri"].items()]
    b.stop_gateways()
    png = points[0]["direct"].get("mean_bytes") or DATA_URI_IMAGE_BYTES
    uri_mb = (4 * math.ceil(png / 3) + len("data:image/png;base64,")) / MB
    for p in points:
        per_mb(p, uri_mb)
    return {"model": DATA_URI_MODEL, "result": "data URI", "image_bytes": png,
            "data_uri_mb": round(uri_mb, 3), "gw_idle_rss_mb": round(idle, 1), "points": points}


async def edit_4mb(b: Bench) -> dict[str, Any]:
    await b.configure(image_bytes=None, url_results=True)
    png = make_png(1024, 1024, seed=4, pad_to=EDIT_INPUT_BYTES)
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    body = Body.of({"model": DATA_URI_MODEL, "image": uri, "size": "1024x1024", "n": 1})
    gw = b.gateway()
    idle = gw.rss_mb()
    ops = {"gateway": clients.gateway(gw.url, EDIT, body, b.tag),
           "direct": clients.direct(b.api, EDIT, body, b.tag)}
    input_mb = len(png) / MB
    points = []
    for c, n in b.plan.points["edit-4mb"].items():
        point = await b.point(gw, c, n, ops, settle=(c == max(b.plan.points["edit-4mb"])))
        per_mb(point, input_mb)
        points.append(point)
    b.stop_gateways()
    return {"model": DATA_URI_MODEL, "input_bytes": len(png), "input_mb": round(input_mb, 3),
            "gw_idle_rss_mb": round(idle, 1),
            "body_bytes": body.size, "points": points}


async def serve(b: Bench) -> dict[str, Any]:
    """GET /images/<id> of one stored 200 KB image; the sandbox's media route as reference."""
    await b.configure(image_bytes=URL_IMAGE_BYTES, url_results=True)
    gw = b.gateway()
    body = Body.of({"model": URL_MODEL, "size": "1024x1024", "n": 1})
    async with aiohttp.ClientSession() as s:
        async with s.post(gw.url + GEN, data=body.build(b.tag, b.indices(1)),
                          headers=clients.JSON) as resp:
            if resp.status != 200:
                raise RuntimeError(f"gateway generation failed: {resp.status} "
                                   f"{(await resp.text())[:300]}")
            gw_image = (await resp.json())["data"][0]["url"]
        paid = clients.direct_paid(b.api, GEN, body, b.tag)
        sb_image = (await paid(s, b.indices(1)))["data"][0]["url"]
        async with s.get(gw_image) as resp:
            size = len(await resp.read())
    ops = {"gateway": clients.getter(gw_image), "direct": clients.getter(sb_image)}
    points = [await b.point(gw, c, n, ops) for c, n in b.plan.points["serve"].items()]
    b.stop_gateways()
    return {"image_bytes": size, "direct_is": "the sandbox's Starlette media route (in memory)",
            "points": points}


async def preauth(b: Bench) -> dict[str, Any]:
    latency = 50.0
    await b.configure(image_bytes=URL_IMAGE_BYTES, url_results=True, latency_ms=latency)
    try:
        gws = {"on": b.gateway(preauth=True, name="gateway-preauth"),
               "off": b.gateway(preauth=False, name="gateway-nopreauth")}
        body = Body.of({"model": URL_MODEL, "size": "1024x1024", "n": 1})
        ops = {mode: clients.gateway(gw.url, GEN, body, b.tag) for mode, gw in gws.items()}
        runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
        async with loadgen.session(1) as sess:
            for mode, op in ops.items():
                await loadgen.run(op, sess, b.plan.warmup, 1,
                                  start_index=b.indices(b.plan.warmup))
            for _ in range(b.plan.repeats):
                for mode, op in ops.items():
                    await b.control("POST", "/_sandbox/reset")
                    phase = await b.phase(op, sess, b.plan.preauth_n, 1, gws[mode])
                    stats = await b.control("GET", "/_sandbox/stats")
                    paid = stats["settled_count"]
                    phase.extra.update(round_trips=stats["round_trips"], paid_images=paid,
                                       round_trips_per_image=round(stats["round_trips"] / paid, 3)
                                       if paid else None)
                    s = phase.summary()
                    runs[mode].append(s)
                    b.log(f"    preauth {mode:3} p50 {s['p50_ms']:8.2f} ms  p99 "
                          f"{s['p99_ms']:8.2f} ms  round trips/image "
                          f"{s['round_trips_per_image']}"
                          + (f"  errors {s['errors']}" if s["errors"] else ""))
    finally:
        await b.configure(latency_ms=b.upstream_latency_ms)
        b.stop_gateways()
    out: dict[str, Any] = {"latency_ms": latency, "n": b.plan.preauth_n,
                           "concurrency": 1, "model": URL_MODEL}
    for mode, summaries in runs.items():
        out[mode] = {**median_of(summaries), "runs": summaries}
    out["saved_p50_ms"] = _sub(out["off"]["p50_ms"], out["on"]["p50_ms"])
    return out


async def rss(b: Bench) -> dict[str, Any]:
    await b.configure(image_bytes=URL_IMAGE_BYTES, url_results=True)
    gw = b.gateway()
    body = Body.of({"model": URL_MODEL, "size": "1024x1024", "n": 1})
    op = clients.gateway(gw.url, GEN, body, b.tag)
    await asyncio.sleep(0.5)
    idle = gw.rss_mb()
    async with loadgen.session(16) as sess:
        phase = await b.phase(op, sess, b.plan.rss_n, 16, gw)
    after = gw.rss_mb()
    await asyncio.sleep(SETTLE_S)
    settled = gw.rss_mb()
    hwm = gw.hwm_mb()
    b.stop_gateways()
    s = phase.summary()
    b.log(f"    rss: idle {idle:.0f} MB, after {b.plan.rss_n} requests {after:.0f} MB, "
          f"{SETTLE_S:.0f} s later {settled:.0f} MB, peak {hwm:.0f} MB"
          + (f"  errors {s['errors']}" if s["errors"] else ""))
    return {"n": b.plan.rss_n, "concurrency": 16, "model": URL_MODEL,
            "image_bytes": URL_IMAGE_BYTES, "idle_rss_mb": round(idle, 1),
            "rss_after_mb": round(after, 1), "rss_settled_mb": round(settled, 1),
            "peak_rss_mb": round(hwm, 1), "phase": s}


SCENARIOS = {
    "gen-url": gen_url,
    "gen-datauri": gen_datauri,
    "edit-4mb": edit_4mb,
    "serve": serve,
    "preauth": preauth,
    "rss": rss,
}


async def run_scenario(b: Bench, name: str) -> dict[str, Any]:
    t0 = time.monotonic()
    b.scenario = name
    try:
        result = await SCENARIOS[name](b)
    except Exception as exc:  # one broken scenario must not lose the others' numbers
        b.stop_gateways()
        b.log(f"    FAILED: {type(exc).__name__}: {exc}")
        result = {"failed": f"{type(exc).__name__}: {exc}"}
    result["duration_s"] = round(time.monotonic() - t0, 1)
    return result
