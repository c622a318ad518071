"""Draw p50 latency against concurrency, gateway (solid) vs direct (dashed), one colour per
scenario, from a results file.

    .venv/bin/python bench/plot.py [bench/results/latest.json] [bench/results/latency.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

SERIES = [
    ("gen-url", "generation, 200 KB URL", "tab:blue"),
    ("gen-datauri", "generation, 1.5 MB data URI", "tab:orange"),
    ("edit-4mb", "edit, 4 MB input", "tab:green"),
    ("serve", "GET /images/<id>, 200 KB", "tab:purple"),
]


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for key, label, colour in SERIES:
        points = results["scenarios"].get(key, {}).get("points")
        if not points:
            continue
        cs = [p["concurrency"] for p in points]
        for side, style, marker in (("gateway", "-", "o"), ("direct", "--", "s")):
            ys = [p[side]["p50_ms"] for p in points]
            if all(y is None for y in ys):
                continue
            name = "sandbox media" if key == "serve" and side == "direct" else side
            ax.plot(cs, ys, style, marker=marker, color=colour, label=f"{label}: {name}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted({p["concurrency"] for k, _, _ in SERIES
                    for p in results["scenarios"].get(k, {}).get("points", [])})
    if ticks:
        ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("p50 latency, ms (client gets the image bytes)")
    m = results["machine"]
    ax.set_title(f"clawrouter gateway vs direct x402 client — {m['nproc']} cores, loopback, "
                 f"{m['date'][:10]}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main() -> int:
    here = Path(__file__).resolve().parent / "results"
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    cli.add_argument("results", nargs="?", type=Path, default=here / "latest.json")
    cli.add_argument("png", nargs="?", type=Path, default=here / "latency.png")
    args = cli.parse_args()
    src, out = args.results, args.png
    plot(json.loads(src.read_text()), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
