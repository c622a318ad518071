"""`clawrouter stats`: what the gateway has spent, as a terminal table (or `--json`).

The numbers come from the running gateway's `GET /v1/spend`, found as every command finds it
(`CLAWROUTER_URL`, else the address the settings give, if that gateway is this data
directory's: `client.connect`); otherwise from the configured network's ledger file
(`Settings.ledger_path`). A running gateway holds the ledger's lock, so if the lock is taken
but nobody answers, we say so instead of guessing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from clawrouter.catalog import format_dollars, format_usd
from clawrouter.cli.client import GatewayError, NoGateway, connect
from clawrouter.cli.common import CommandError, add_config, at_least, settings_from
from clawrouter.config import Settings
from clawrouter.payment.budget import Budget
from clawrouter.payment.networks import NETWORKS
from clawrouter.payment.reconcile import chain_network
from clawrouter.payment.ledger import FILENAME, Ledger, LedgerBusy


#: as many as GET /v1/spend lists: the same answer whether or not a gateway runs
LATEST_MAX = 1000


def register(commands: Any) -> None:
    p = commands.add_parser(
        "stats", help="show what the gateway has spent",
        description="Spending: today, this month and in total (settled and pending), by model, "
                    "by day, and the latest payments with their status and transaction. Read "
                    "from the running gateway, else from the ledger file.")
    add_config(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON only")
    p.add_argument("--latest", type=at_least(0, LATEST_MAX), default=20, metavar="N",
                   help=f"how many of the latest payments to list (default 20, at most "
                        f"{LATEST_MAX})")
    p.set_defaults(run=run_stats)


def run_stats(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    summary, source = spend_summary(settings, args.latest)
    others = other_ledgers(settings, summary.get("network") or settings.network)
    if others:
        summary["other_ledgers"] = {name: str(path) for name, path in others.items()}
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    pointers = [f"Payments on {name} ({_kind(name)}) are kept apart, in {path}: "
                f"CLAWROUTER_NETWORK={name} clawrouter stats" for name, path in others.items()]
    if pointers and _no_payments(summary):  # what was asked for is empty: say where to look
        print("\n".join(pointers) + "\n")
        pointers = []
    print(render(summary, source))
    for pointer in pointers:
        print(f"\n{pointer}")
    return 0


def _kind(network: str) -> str:
    return "the sandbox's and testnet ones" if NETWORKS[network].testnet else "real USDC"


def _no_payments(summary: dict[str, Any]) -> bool:
    """Nothing in this ledger at all (a rejected payment shows only among the latest)."""
    total = summary["total"]
    return not (total["payments"] or total["pending"]["payments"] or summary.get("latest"))


def other_ledgers(settings: Settings, shown: str) -> dict[str, Path]:
    """The ledger files of the networks other than the one `shown`, by network name."""
    paths = {name: settings.ledger_path_for(name) for name in NETWORKS if name != shown}
    return {name: path for name, path in paths.items() if path.exists()}


def spend_summary(settings: Settings, latest: int) -> tuple[dict[str, Any], str]:
    """The summary and where it came from (the gateway's URL or the ledger's path)."""
    found = asyncio.run(_from_gateway(settings, latest))
    return found if found is not None else _from_ledger(settings, latest)


async def _from_gateway(settings: Settings, latest: int) -> tuple[dict[str, Any], str] | None:
    try:
        gateway = await connect(start=False, settings=settings)
    except NoGateway:
        return None
    except GatewayError as exc:  # another data directory's, another program, a key wanted
        if exc.code == "not_clawrouter":  # no gateway of ours answers: its ledger will do
            return None
        raise CommandError(1, exc.message, name=exc.code) from None
    async with gateway:
        try:
            summary = await gateway.spend(latest)
            health = await gateway.health()
        except GatewayError as exc:
            raise CommandError(1, exc.message, name=exc.code) from None
    summary["latest"] = summary["latest"][:latest]
    summary["sandbox"] = bool(health.get("sandbox"))
    return summary, f"the gateway at {gateway.url}"


def _from_ledger(settings: Settings, latest: int) -> tuple[dict[str, Any], str]:
    path = settings.ledger_path
    if not path.exists():  # report zeros without creating a ledger in the user's home
        with tempfile.TemporaryDirectory() as tmp:
            return _read(Ledger(Path(tmp) / FILENAME), settings, latest), f"{path} (no ledger yet)"
    try:
        ledger = Ledger(path, chain_network=chain_network(settings))
    except LedgerBusy:
        raise CommandError(1, f"a gateway is using the ledger {path} but did not answer at "
                       f"{settings.url}. Point stats at it with CLAWROUTER_URL (or the same "
                       "--config, CLAWROUTER_HOST and CLAWROUTER_PORT), or stop it to read "
                       "the ledger directly.", name="ledger_busy") from None
    return _read(ledger, settings, latest), str(path)


def _read(ledger: Ledger, settings: Settings, latest: int) -> dict[str, Any]:
    with ledger:
        summary = ledger.summary(latest=latest)
        summary["budget"] = Budget.from_settings(ledger, settings).remaining()
    summary["network"] = settings.network
    return summary


# --- the table ----------------------------------------------------------------------------------
def render(summary: dict[str, Any], source: str) -> str:
    network = summary.get("network")
    on = (f" on {network}" if network else "") + (
        " (the sandbox: no real payments)" if summary.get("sandbox") else "")
    # Days are the gateway's (they are summed there); payment times are shown here, in ours.
    theirs = summary.get("timezone") or "local time"
    ours = datetime.now().astimezone().tzname()
    zones = (f"days and times in {theirs}" if theirs in (ours, "local time")
             else f"days in the gateway's {theirs}, times in {ours}")
    out = [f"Spending{on} ({zones}), from {source}", ""]
    windows = [(label, summary[key]) for label, key in
               (("Today", "today"), ("This month", "month"), ("Total", "total"))]
    out += _table(["", "Settled", "Payments", "Pending", "Pending payments"],
                  [[label, *_money(w)] for label, w in windows], "lrrrr")
    if summary["total"]["pending"]["payments"]:
        out += ["", "Pending: signed payments whose outcome is not confirmed (signed, unknown or "
                    "failed after payment). They may have cost money and count against the "
                    "budgets until the chain tells (a running gateway asks it every "
                    "reconcile_interval seconds; at the latest once each authorization "
                    "has expired and the chain has finalized that, about 20 minutes later "
                    "on Base)."]
    if budget := summary.get("budget"):
        out += ["", "Budget   " + _budget(budget)]
        if held := (budget.get("total") or {}).get("held_usd"):
            out += [f"Held: {format_dollars(held)} of unsettled payments (the "
                    "upstream refused them, or their slow job's client left) still count "
                    "against the budgets until nothing can settle them "
                    "(the chain sees each authorization expire unused, or, with no RPC, it "
                    "expires): a refusal does not unsign."]
    if summary.get("by_model"):
        out += ["", "By model"]
        out += _table(["Model", "Settled", "Payments", "Pending", "Pending payments"],
                      [[m["model"], *_money(m)] for m in summary["by_model"]], "lrrrr")
    if summary.get("by_day"):
        out += ["", "By day (last 30 days)"]
        out += _table(["Day", "Settled", "Payments", "Pending", "Pending payments"],
                      [[d["day"], *_money(d)] for d in summary["by_day"]], "lrrrr")
    payments = summary.get("latest") or []
    if payments:
        out += ["", "Latest payments (newest first)"]
        out += _table(["Time", "Model", "Size", "n", "Amount", "Status", "Transaction"],
                      [[datetime.fromtimestamp(p["time"]).strftime("%Y-%m-%d %H:%M:%S"),
                        p["model"], p["size"], str(p["n"]), format_usd(p["amount"]),
                        p["status"], p.get("transaction") or "-"] for p in payments],
                      "lllrrll")
    else:
        out += ["", "No payments yet."]
    return "\n".join(out)


def _money(window: dict[str, Any]) -> list[str]:
    pending = window["pending"]
    return [format_usd(window["micro"]), str(window["payments"]), format_usd(pending["micro"]),
            str(pending["payments"])]


def _budget(budget: dict[str, Any]) -> str:
    def usd(value: float | None) -> str:
        return "no limit" if value is None else format_dollars(value)

    parts = [f"per request {usd(budget['request']['limit_usd'])}"]
    for window, label in (("day", "today"), ("month", "this month"), ("total", "in total")):
        w = budget.get(window)
        if w is None:  # a gateway from before monthly budgets
            continue
        if w["limit_usd"] is None:
            parts.append(f"{label}: no limit")
        else:
            parts.append(f"{label}: {usd(w['remaining_usd'])} left of {usd(w['limit_usd'])}")
    return " · ".join(parts)


def _table(headers: list[str], rows: list[list[str]], align: str) -> list[str]:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).rjust(w) if a == "r" else str(c).ljust(w)
                         for c, w, a in zip(cells, widths, align)).rstrip()

    return [line(headers), *(line(r) for r in rows)]
