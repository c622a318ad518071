"""`clawrouter images ls|prune`: look at and clean the local image store."""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from clawrouter.catalog import format_usd
from clawrouter.cli.common import CommandError, add_config, at_least, settings_from
from clawrouter.config import Settings
from clawrouter.payment.ledgerlock import LedgerBusy, exclusive_lock, lock_path
from clawrouter.payment.networks import NETWORKS
from clawrouter.plaintext import one_line
from clawrouter.store import ImageStore


def register(commands: Any) -> None:
    p = commands.add_parser("images", help="list or prune stored images",
                            description="The images the gateway saved under "
                                        "$CLAWROUTER_HOME/images.")
    sub = p.add_subparsers(dest="images_command", metavar="ACTION", required=True)
    ls = sub.add_parser("ls", help="list stored images, newest first",
                        description="List the stored images, newest first: name, size, "
                                    "model, cost, prompt and path.")
    ls.add_argument("--limit", type=at_least(1), default=20,
                    help="how many to list (default 20)")
    ls.add_argument("--offset", type=at_least(0), default=0, help="skip this many first")
    ls.add_argument("--json", action="store_true", help="print JSON for scripts")
    add_config(ls)
    ls.set_defaults(run=run_ls)
    prune = sub.add_parser("prune", help="delete images idle past image_ttl_days, or beyond "
                           "image_max_gb, now",
                           description="Apply CLAWROUTER_IMAGE_TTL_DAYS and "
                                       "CLAWROUTER_IMAGE_MAX_GB now (the gateway also does it "
                                       "in the background).")
    prune.add_argument("--json", action="store_true", help="print JSON for scripts")
    add_config(prune)
    prune.set_defaults(run=run_prune)


def run_ls(args: argparse.Namespace) -> int:
    # Read as it is, never reconciled: a gateway may be writing the store meanwhile.
    rows = asyncio.run(ImageStore.rows(settings_from(args).images_dir, args.limit, args.offset))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"No images past the first {args.offset}." if args.offset else
              "No images stored yet.")
        return 0
    print("\n".join(listing(rows)))
    return 0


def listing(rows: list[dict[str, Any]]) -> list[str]:
    """Two lines per image: time, name, model, size, cost and prompt in columns as wide as
    this page's widest (costs and names differ in length: $0.021, $0.04725; .png, .jpeg),
    then its path."""
    cells = [(time.strftime("%Y-%m-%d %H:%M", time.localtime(row["created"])), row["name"],
              row.get("model") or "-", row.get("size") or "-",
              format_usd(row.get("cost_micro") or 0),
              one_line(row.get("prompt") or "", 51))  # a prompt may hold terminal escapes
             for row in rows]
    name, model, size, cost = (max(len(c[i]) for c in cells) for i in (1, 2, 3, 4))
    lines = []
    for (when, n, m, sz, usd, prompt), row in zip(cells, rows):
        lines.append(f"{when}  {n:<{name}}  {m:<{model}}  {sz:>{size}}  {usd:>{cost}}  "
                     f"{prompt}".rstrip())
        lines.append(f"{'':18}{row['path']}")
    return lines


def run_prune(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    # no store to open (opening would create one); a file in the way is `main`'s to name
    if not settings.images_dir.exists() and not settings.home.is_file():
        return report_pruned(args, [], f"No images stored in {settings.images_dir}: nothing "
                                        "to prune.")
    with ledgers_held(settings) as busy:
        if busy is not None:  # its index and cache would keep serving deleted files
            who = f" ({busy.holder})" if busy.holder else ""
            raise CommandError(1, f"a gateway{who} is using {settings.home}: it applies "
                               "CLAWROUTER_IMAGE_TTL_DAYS and CLAWROUTER_IMAGE_MAX_GB itself, "
                               "in the background. Stop it to prune now.", name="ledger_busy")

        async def prune() -> list[str]:
            async with ImageStore.from_settings(settings) as store:
                return await store.prune()

        removed = asyncio.run(prune())
    return report_pruned(args, removed, f"Removed {len(removed)} image(s).")


def report_pruned(args: argparse.Namespace, removed: list[str], summary: str) -> int:
    if args.json:
        print(json.dumps({"removed": removed}))
    else:
        print(summary)
        for name in removed:
            print(f"  {name}")
    return 0


@contextmanager
def ledgers_held(settings: Settings) -> Iterator[LedgerBusy | None]:
    """Hold the lock of every ledger of this data directory (one per network) while pruning,
    or give the `LedgerBusy` of one a gateway holds: a gateway is one per ledger, and each
    shares the image store, so none can start (and index, cache or serve the files being
    deleted) until the prune is done; one starting meanwhile waits or says the ledger is busy."""
    instance = f"prune-{secrets.token_hex(8)}"
    busy: LedgerBusy | None = None
    with ExitStack() as held:
        for network in NETWORKS:
            try:
                lock = exclusive_lock(lock_path(settings.ledger_path_for(network)), instance)
            except LedgerBusy as exc:
                busy = exc
                break
            held.enter_context(lock)
        yield busy
