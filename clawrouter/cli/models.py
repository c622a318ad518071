"""`clawrouter models`: the catalog as a table, straight from `catalog.MODELS` (no gateway needed).

The rows are shared with the MCP tool `list_image_models`, so terminal and agents see the same
prices: what BlockRun charges on Base (list price × 1.05) per image, plus a fee per request.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from clawrouter import catalog
from clawrouter.api.meta import model_card


def register(commands: Any) -> None:
    p = commands.add_parser(
        "models", help="list the image models, their aliases, sizes, prices and edit support",
        description="List the image models from the built-in catalog: id, aliases, sizes, "
        f"price per image on Base (list price × {catalog.BASE_MARKUP}; every request adds a "
        f"${catalog.FEE_USD} fee) and whether the model edits images. Needs no gateway.")
    p.add_argument("--json", action="store_true",
                   help="print the model cards as one JSON document (the GET /v1/models shape)")
    p.set_defaults(run=run_models)


def run_models(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps({"object": "list", "data": cards(),
                          "fee_per_request_usd": catalog.FEE_USD}, indent=2))
    else:
        print(table())
        print(f"\nPrices are per image on Base (list × {catalog.BASE_MARKUP}), plus "
              f"${catalog.FEE_USD} per request.")
        print(retired_names())
    return 0


def retired_names() -> str:
    """Every retired name the catalog knows, as the README and the agent skill list them:
    the renamed ones that still work, and the dropped ones that are refused."""
    lines = []
    for target in dict.fromkeys(r.target for r in catalog.RENAMED.values()):
        names = [name for name, r in catalog.RENAMED.items() if r.target == target]
        sizes = {old: new for name in names for old, new in catalog.RENAMED[name].sizes.items()}
        mapped = ", ".join(f"{old} → {new}" for old, new in sizes.items())
        lines.append(f"Retired names that still work: {', '.join(names)} → {target}"
                     + (f" (sizes {mapped})" if mapped else "") + ".")
    lines.append(f"Dropped by BlockRun, refused (400 model_dropped, naming what to use "
                 f"instead): {', '.join(catalog.DROPPED)}.")
    return "\n".join(lines)


def cards() -> list[dict[str, Any]]:
    return [model_card(m) for m in catalog.MODELS]


def price_range(model: catalog.ImageModel) -> str:
    prices = sorted({round(p * catalog.BASE_MARKUP, 6) for p in model.prices.values()})
    low, high = _usd(prices[0]), _usd(prices[-1])
    return low if low == high else f"{low}–{high}"


def edits(model: catalog.ImageModel) -> str:
    if not model.edits:
        return "no"
    return f"yes, ≤{model.max_images} images" + (", mask" if model.mask else "")


def rows() -> list[tuple[str, str, str, str, str]]:
    """(id, aliases, sizes, price per image, edits) for every live model."""
    return [(m.id, ", ".join(m.aliases) or "—", " ".join(m.sizes), price_range(m), edits(m))
            for m in catalog.MODELS]


def table() -> str:
    head = ("MODEL", "ALIASES", "SIZES", "PRICE/IMAGE", "EDITS")
    body = rows()
    widths = [max(len(r[i]) for r in (head, *body)) for i in range(len(head))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in (head, *body))


def markdown() -> str:
    """The same table in Markdown (for agents)."""
    lines = ["| Model | Aliases | Sizes | Price/image | Edits |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows()]
    return "\n".join(lines)


def _usd(value: float) -> str:
    return catalog.format_usd(catalog.to_micro(value))
