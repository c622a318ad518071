"""Soak: a long mixed run against the sandbox, then the books are checked.

    .venv/bin/python bench/soak.py [--seconds 180] [--concurrency 12]

Mix (by weight): URL generations (then the image is fetched), data-URI generations, 256 KB
edits, serving stored images, slow 202 jobs, and invalid requests. Passes when:
- no 5xx from the gateway (the sandbox injects no faults here, so any 5xx is ours);
- RSS flat: at the end within 10 % of its level after the warm-up (the first third of the run,
  at least one 60 s coalescing window, during which remembered outcomes accumulate);
- no file descriptors leaked (open fds at the end ≤ after warm-up + 16);
- every payment in the ledger has a final status, and the ledger's settled total equals the
  sandbox's settled total, to the micro-USDC.
Writes bench/results/soak.json and soak.md.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.procs import install_cleanup, start_gateway, start_sandbox, status_kb  # noqa: E402
from bench.record import command_line, machine, produced_by  # noqa: E402
from clawrouter.payment.ledger import FINAL  # noqa: E402
from clawrouter.sandbox.images import make_png  # noqa: E402

RESULTS = Path(__file__).parent / "results"
EDIT_IMAGE = "data:image/png;base64," + base64.b64encode(
    make_png(256, 256, 7, pad_to=256_000)).decode()


def mix(i: int) -> tuple[str, str, dict | bytes, int]:
    """(name, path, body, expected status class) for the i-th operation."""
    r = random.random()
    tag = f"soak {i}"
    if r < 0.45:
        return "gen-url", "/v1/images/generations", {"model": "cogview", "size": "512x512",
                                                     "prompt": tag}, 2
    if r < 0.55:
        return "gen-datauri", "/v1/images/generations", {"model": "gpt-image-1",
                                                         "prompt": tag}, 2
    if r < 0.65:
        return "edit", "/v1/images/image2image", {"model": "gpt-image-1", "prompt": tag,
                                                  "image": EDIT_IMAGE}, 2
    if r < 0.70:
        return "slow-job", "/v1/images/generations", {"model": "gpt-image-2",
                                                      "prompt": tag}, 2
    if r < 0.85:
        return "serve", "", {}, 2
    bad = random.choice([
        {"model": "cogview", "size": "9x9", "prompt": tag},
        {"model": "flux", "prompt": tag},
        {"prompt": ""},
        b"{not json",
    ])
    return "invalid", "/v1/images/generations", bad, 4


async def worker(sess: aiohttp.ClientSession, base: str, deadline: float, counter: Counter,
                 statuses: Counter, served: list[str], errors: list[str]) -> None:
    i = 0
    while time.monotonic() < deadline:
        i += 1
        name, path, body, expect = mix(random.randrange(10**9))
        try:
            if name == "serve":
                if not served:
                    continue
                async with sess.get(random.choice(served)) as resp:
                    await resp.read()
                    status = resp.status
            else:
                kwargs = {"json": body} if isinstance(body, dict) else {
                    "data": body, "headers": {"content-type": "application/json"}}
                async with sess.post(base + path, **kwargs) as resp:
                    data = await resp.read()
                    status = resp.status
                if status == 200:
                    url = json.loads(data)["data"][0]["url"]
                    async with sess.get(url) as image:
                        await image.read()
                        if image.status != 200:
                            errors.append(f"{name}: image GET {image.status}")
                    served.append(url)
                    del served[:-200]
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            errors.append(f"{name}: {type(exc).__name__}")
            continue
        counter[name] += 1
        statuses[f"{name} {status}"] += 1
        if status >= 500 or status // 100 != expect:
            errors.append(f"{name}: HTTP {status}")


def ledger_totals(path: Path) -> dict[str, tuple[int, int]]:
    """status -> (payments, micro-USDC), read from the gateway's ledger file itself."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT status, COUNT(*), SUM(amount) FROM payments GROUP BY status")
        return {status: (count, total or 0) for status, count, total in rows}


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def soak(seconds: float, concurrency: int) -> dict:
    sandbox = start_sandbox()
    gateway = start_gateway(sandbox.url + "/api", preauth=True, name="soak",
                            extra_env={"CLAWROUTER_POLL_DELAY": "0.5",
                                       "CLAWROUTER_POLL_INTERVAL": "0.5"})
    counter: Counter = Counter()
    statuses: Counter = Counter()
    served: list[str] = []
    errors: list[str] = []
    samples: list[tuple[float, float, int]] = []
    start = time.monotonic()
    deadline = start + seconds
    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=concurrency * 2, keepalive_timeout=4)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as sess:
        tasks = [asyncio.create_task(worker(sess, gateway.url, deadline, counter, statuses,
                                            served, errors)) for _ in range(concurrency)]
        while time.monotonic() < deadline:
            await asyncio.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
            samples.append((time.monotonic() - start, status_kb(gateway.pid, "VmRSS") / 1024,
                            fds(gateway.pid)))
        await asyncio.gather(*tasks)
        await asyncio.sleep(2)  # let background store work settle
        async with sess.get(sandbox.url + "/_sandbox/stats") as resp:
            upstream = await resp.json()
    end_rss, end_fds = status_kb(gateway.pid, "VmRSS") / 1024, fds(gateway.pid)
    warm = next(s for s in samples if s[0] >= max(seconds / 3, min(60.0, seconds / 2)))
    by_status = ledger_totals(gateway.home / "ledger-base-sepolia.sqlite3")
    payments = sum(count for count, _ in by_status.values())
    not_final = sum(count for status, (count, _) in by_status.items() if status not in FINAL)
    ledger_settled = by_status.get("settled", (0, 0))[1]
    total_ops = sum(counter.values())
    result = {
        "seconds": seconds, "concurrency": concurrency, "operations": dict(counter),
        "statuses": dict(statuses), "ops_per_second": round(total_ops / seconds, 1),
        "gateway_5xx": sum(v for k, v in statuses.items() if int(k.rsplit(" ", 1)[1]) >= 500),
        "errors": errors[:20], "error_count": len(errors),
        "rss_mb": {"after_warmup": round(warm[1], 1), "end": round(end_rss, 1),
                   "peak_sampled": round(max(s[1] for s in samples), 1)},
        "fds": {"after_warmup": warm[2], "end": end_fds},
        "payments": payments, "not_final": not_final,
        "ledger_by_status": {k: {"count": c, "micro": m} for k, (c, m) in by_status.items()},
        "ledger_settled_micro": ledger_settled,
        "sandbox_settled_micro": upstream["settled_total_micro"],
        "samples": samples,
    }
    result["checks"] = {
        "no gateway 5xx": result["gateway_5xx"] == 0 and not errors,
        "RSS flat (< 10 % growth after warm-up)": end_rss <= warm[1] * 1.10,
        "no fd leak": end_fds <= warm[2] + 16,
        "every payment has a final status": not not_final,
        "ledger total = sandbox settled total": ledger_settled == upstream["settled_total_micro"],
    }
    return result


def report(result: dict) -> str:
    ops = ", ".join(f"{k} {v}" for k, v in sorted(result["operations"].items()))
    lines = [
        "## Soak",
        "",
        produced_by(result["command"], result["machine"]),
        "",
        f"{result['ops_per_second']} operations/s "
        f"({ops}); {result['payments']} payments.",
        "",
        "| check | measured | result |",
        "|---|---|---|",
    ]
    measured = {
        "no gateway 5xx": f"{result['gateway_5xx']} 5xx, {result['error_count']} errors",
        "RSS flat (< 10 % growth after warm-up)":
            f"{result['rss_mb']['after_warmup']} → {result['rss_mb']['end']} MB",
        "no fd leak": f"{result['fds']['after_warmup']} → {result['fds']['end']} open fds",
        "every payment has a final status": f"{result['not_final']} not final",
        "ledger total = sandbox settled total":
            f"{result['ledger_settled_micro']} = {result['sandbox_settled_micro']} micro-USDC",
    }
    for check, ok in result["checks"].items():
        lines.append(f"| {check} | {measured[check]} | {'PASS' if ok else '**FAIL**'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=180.0)
    parser.add_argument("--concurrency", type=int, default=12)
    args = parser.parse_args()
    install_cleanup()
    started = {"command": command_line("soak.py", sys.argv[1:]), "machine": machine()}
    result = {**started, **asyncio.run(soak(args.seconds, args.concurrency))}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(result, indent=2))
    text = report(result)
    (RESULTS / "soak.md").write_text(text)
    print(text)
    return 0 if all(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
