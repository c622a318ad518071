"""`clawrouter wallet`: show the wallet the gateway pays with, and create, import or export its key.

The key in use follows the settings (`load_settings`): `BLOCKRUN_WALLET_KEY` (or `wallet_key`)
when set, else `$CLAWROUTER_HOME/wallet.key`. Key files are written with mode 0600 and never
overwritten: `import --force` first keeps the old key as `wallet.key.bak-<time>`. A private key
is printed by `wallet export` only, after confirmation; error messages never contain it.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from clawrouter.catalog import MICRO, format_usd
from clawrouter.cli.common import CONFIG_HELP, CommandError, settings_from
from clawrouter.config import Settings
from clawrouter.payment.networks import NETWORKS, Network
from clawrouter.payment.wallet import (
    WalletError, check_key, create_key_file, draft_path, read_key_file, write_private,
)
from clawrouter.store.files import fsync_dir

KEY_FILE = "wallet.key"
ENV_KEY = "BLOCKRUN_WALLET_KEY"
CIRCLE_FAUCET = "https://faucet.circle.com"


def _blockrun_files() -> list[Path]:
    """BlockRun's SDK wallet, then its legacy location (blockrun-api.md §10)."""
    return [Path.home() / ".blockrun" / ".session", Path.home() / ".blockrun" / "wallet.key"]


def _clawrouter_files() -> list[Path]:
    """The wallet of ClawRouter, the OpenClaw plugin."""
    return [Path.home() / ".openclaw" / "blockrun" / "wallet.key"]


IMPORT_SOURCES: dict[str, Callable[[], list[Path]]] = {
    "blockrun": _blockrun_files, "clawrouter": _clawrouter_files}


def register(commands: Any) -> None:
    p = commands.add_parser(
        "wallet", help="show the wallet, its USDC balance and how to fund it",
        description="Show the wallet the gateway pays with: address, network, USDC balance and "
                    "how to fund it. Subcommands create, import or export its key.")
    _config_option(p, argparse_default=None)
    p.add_argument("--json", action="store_true", help="print the wallet as JSON")
    p.set_defaults(run=run_show)
    actions = p.add_subparsers(dest="wallet_action", metavar="ACTION")

    c = actions.add_parser("create", help="create a new wallet key (refuses to replace one)",
                           description=f"Create $CLAWROUTER_HOME/{KEY_FILE} (mode 0600) and "
                                       "print the new wallet's address. Refuses if it exists.")
    _config_option(c)
    c.set_defaults(run=run_create)

    i = actions.add_parser(
        "import", help="import a key from stdin, BlockRun's SDK or ClawRouter",
        description=f"Import a private key into $CLAWROUTER_HOME/{KEY_FILE}: from standard "
                    "input (echo 0x... | clawrouter wallet import), or with --from from "
                    "BlockRun's SDK (~/.blockrun/.session, legacy ~/.blockrun/wallet.key) or "
                    "ClawRouter (~/.openclaw/blockrun/wallet.key). Shows the address and asks "
                    "for confirmation first.")
    _config_option(i)
    i.add_argument("--from", dest="source", choices=sorted(IMPORT_SOURCES),
                   help="import the wallet of another BlockRun client instead of stdin")
    i.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    i.add_argument("--force", action="store_true",
                   help=f"replace an existing {KEY_FILE} (the old one is kept as "
                        f"{KEY_FILE}.bak-<time>)")
    i.set_defaults(run=run_import)

    e = actions.add_parser("export", help="print the private key (asks first)",
                           description="Print the private key of the wallet in use, after "
                                       "confirmation. Anyone holding it can spend the funds.")
    _config_option(e)
    e.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    e.set_defaults(run=run_export)


def _config_option(parser: argparse.ArgumentParser,
                   argparse_default: Any = argparse.SUPPRESS) -> None:
    # SUPPRESS on subcommands, so `wallet --config X create` keeps X instead of the
    # subcommand's own default overwriting it.
    parser.add_argument("--config", default=argparse_default,
                        metavar="FILE", help=CONFIG_HELP)


# --- the key in use -----------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyInUse:
    key: str
    source: str  # "env" (BLOCKRUN_WALLET_KEY), "setting" (wallet_key) or "file"
    path: Path  # the key file (ignored while an environment key is set)

    def __repr__(self) -> str:  # keep the key out of tracebacks
        return f"KeyInUse(source={self.source!r}, path={self.path!r})"

    @property
    def address(self) -> str:
        return address_of(self.key)

    def describe(self) -> str:
        if self.source == "env":
            return f"environment variable {ENV_KEY} (in use; takes precedence over {self.path})"
        if self.source == "setting":
            return f"the wallet_key setting (in use; takes precedence over {self.path})"
        return str(self.path)


def key_in_use(settings: Settings) -> KeyInUse | None:
    """The key the gateway would pay with, or None when it would create a new one."""
    path = settings.home / KEY_FILE
    if settings.wallet_key is not None:
        source = settings.wallet_key_source
        key = check_key(settings.wallet_key.get_secret_value(), source)
        return KeyInUse(key, "env" if source == ENV_KEY else "setting", path)
    if path.exists():
        return KeyInUse(check_key(read_key_file(path), str(path)), "file", path)
    return None


def address_of(key: str) -> str:
    from clawrouter.payment.eth import Account

    return Account.from_key(key).address


def _override_note(settings: Settings, path: Path) -> str | None:
    """A note for create/import when the file is not the key in use."""
    if settings.wallet_key is None:
        return None
    name = settings.wallet_key_source
    return (f"note: {name} is set, so the gateway pays with that key, not with {path}, "
            f"until it is unset.")


# --- wallet (show) ------------------------------------------------------------------------------
def run_show(args: argparse.Namespace) -> int:
    from clawrouter.payment.balance import rpc_urls_for, usdc_balance

    settings = settings_from(args)
    found = key_in_use(settings)
    if found is None:
        raise CommandError(1, f"no wallet yet ({settings.home / KEY_FILE} does not exist): create "
                       "one with `clawrouter wallet create`, import one with `clawrouter "
                       f"wallet import`, or set {ENV_KEY}", name="no_wallet")
    address = found.address
    network = NETWORKS[settings.network]
    micro = asyncio.run(usdc_balance(address, network,
                                     rpc_urls_for(network, settings.rpc_urls)))
    usd = None if micro is None else micro / MICRO
    low = None if usd is None else usd < settings.low_balance_usd
    info = {
        "address": address,
        "network": network.name,
        "chain_id": network.chain_id,
        "caip2": network.caip2,
        "testnet": network.testnet,
        "usdc_contract": network.usdc,
        "key_source": found.source,
        "key_file": str(found.path) if found.source == "file" else None,
        "balance_micro": micro,
        "balance_usd": usd,
        "low": low,
        "low_balance_usd": settings.low_balance_usd,
        "fund": funding_instructions(address, network),
    }
    running = _running_elsewhere(settings, address, network)
    if running is not None:
        info["gateway"] = running
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    if micro is None:
        balance = "unavailable (offline?)"
    else:
        balance = f"{format_usd(micro)[1:]} USDC"
        if low:
            balance += f"  (low: below {format_usd(round(settings.low_balance_usd * MICRO))})"
    rows = [("Address", address),
            ("Network", f"{network_title(network)} ({network.name}, chain id "
                        f"{network.chain_id}{', testnet' if network.testnet else ''})"),
            ("Key", found.describe()),
            ("Balance", balance)]
    for label, value in rows:
        print(f"{label:<9}{value}")
    if running is not None:
        there = running["balance_usd"]
        print(f"\nNote: the gateway running at {running['url']} pays "
              + ("in the sandbox (no real money)" if running["sandbox"] else "from this key")
              + f" on {running['network']}"
              + ("" if there is None else f", where this wallet holds "
                 f"{format_usd(round(there * MICRO))[1:]} "
                 + ("sandbox USDC" if running["sandbox"] else "USDC"))
              + ": what it spends does not show in the balance above.")
    print()
    print("How to fund it")
    for line in funding_instructions(address, network).split("\n"):
        print(f"  {line}")
    return 0


def _running_elsewhere(settings: Settings, address: str, network: Network
                       ) -> dict[str, Any] | None:
    """This data directory's running gateway, if it pays on another network or in the sandbox
    (`serve` offline): the numbers above would contradict the ones `status` shows."""
    from clawrouter.cli.client import GatewayError, connect

    async def ask() -> dict[str, Any] | None:
        try:
            async with await connect(start=False, settings=settings) as gateway:
                return {"url": gateway.url, **await gateway.health()}
        except GatewayError:
            return None

    health = asyncio.run(ask())
    if (health is None or health.get("wallet") != address
            or (health.get("network") == network.name and not health.get("sandbox"))):
        return None
    return {"url": health["url"], "network": health.get("network"),
            "sandbox": bool(health.get("sandbox")), "balance_usd": health.get("balance_usd")}


def network_title(network: Network) -> str:
    return network.name.replace("-", " ").title()


def funding_instructions(address: str, network: Network) -> str:
    """What to send where. Sending the wrong asset or chain is how ClawRouter users lost funds
    (ClawRouter #96: SOL sent instead of USDC), so name asset, chain and contract."""
    chain = network_title(network)
    lines = [f"Send USDC on {chain} (chain id {network.chain_id}) to {address}.",
             "Only USDC on this network pays for images: ETH, SOL, or USDC on any other chain "
             "(Ethereum, Solana, ...) sent to this address cannot be used and may be lost.",
             f"USDC contract on {chain}: {network.usdc}",
             f"Check the balance: {network.explorer.replace('/tx/', '/address/')}{address}"]
    if network.testnet:
        lines.insert(1, f"This is a testnet: test USDC is free from the Circle faucet "
                        f"{CIRCLE_FAUCET} (choose {chain}) and is worth nothing.")
    return "\n".join(lines)


# --- wallet create ------------------------------------------------------------------------------
def run_create(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    path = settings.home / KEY_FILE
    refusal = (f"{path} already exists; it was not changed (a key file is never "
               "overwritten). `clawrouter wallet` shows its address.")
    if path.is_symlink() and not path.exists():
        raise CommandError(1, f"{path} is a link to nothing (a broken link?); it was not "
                              "changed: move it away, then run this again.")
    if path.exists():
        raise CommandError(1, refusal)
    try:
        key = create_key_file(path)
    except FileExistsError:
        if path.exists():  # another process created it meanwhile
            raise CommandError(1, refusal) from None
        raise  # the data directory (or a folder above it) is a file: `main` names it
    print(address_of(key))
    print(f"created {path} (mode 0600); back it up: it is the only copy of this wallet's key.",
          file=sys.stderr)
    if note := _override_note(settings, path):
        print(note, file=sys.stderr)
    return 0


# --- wallet import ------------------------------------------------------------------------------
def run_import(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    raw, origin = _read_import(args.source)
    key = check_key(raw, origin)
    address = address_of(key)
    path = settings.home / KEY_FILE
    old_address = None
    if path.exists():
        try:
            old_key = check_key(read_key_file(path), str(path))
            old_address = address_of(old_key)
        except WalletError:
            old_key, old_address = None, "unreadable key"
        if old_key is not None and old_key.lower() == key.lower():
            print(address)
            print(f"{path} already holds this wallet; nothing to do.", file=sys.stderr)
            return 0
        if not args.force:
            raise CommandError(1, f"{path} already exists (wallet {old_address}); it was not "
                           "changed. Re-run with --force to replace it (the old key is kept "
                           f"as {KEY_FILE}.bak-<time>).")
    print(f"Importing wallet {address}", file=sys.stderr)
    print(f"  from {origin}", file=sys.stderr)
    print(f"  into {path}" + (f", replacing wallet {old_address} (kept as a backup)"
                              if old_address else ""), file=sys.stderr)
    if not args.yes:
        answer = confirm(f"Import wallet {address}?")
        if answer is None:
            raise CommandError(1, "no terminal to confirm on; nothing was imported. Re-run with "
                           "--yes to import without asking.")
        if not answer:
            raise CommandError(1, "nothing was imported.")
    running = None
    if old_address is not None:
        running = _still_paying(settings, old_address)  # asked while the old key is in place
        backup = backup_key_file(path)
        print(f"kept the old key as {backup}", file=sys.stderr)
        replace_key_file(path, key)
    else:
        try:
            write_private(path, key + "\n")
        except FileExistsError:
            raise CommandError(1, f"{path} appeared meanwhile; it was not changed.") from None
    print(address)
    print(f"imported into {path} (mode 0600)", file=sys.stderr)
    if note := _override_note(settings, path):
        print(note, file=sys.stderr)
    if running is not None:
        print(running, file=sys.stderr)
    return 0


def _still_paying(settings: Settings, old_address: str) -> str | None:
    """A note when this data directory's gateway is running (found as `status` finds it): it
    read its key when it started, so it keeps paying from the replaced wallet until restarted.
    None when no gateway runs, or the one running pays from another key (BLOCKRUN_WALLET_KEY)."""
    from clawrouter.cli.client import GatewayError, connect, holders

    async def ask() -> tuple[str, dict[str, Any]] | None:
        try:
            async with await connect(start=False, settings=settings) as gateway:
                return gateway.url, await gateway.health()
        except GatewayError:
            return None

    restart = (f"keeps paying from the replaced wallet {old_address} until it is restarted "
               "(it reads the key once, when it starts)")
    answered = asyncio.run(ask())
    if answered is not None:
        url, health = answered
        theirs = str(health.get("wallet", ""))
        return (f"note: the gateway running at {url} {restart}."
                if theirs.lower() == old_address.lower() else None)
    busy = holders(settings)  # one that does not answer us (an API key), or an MCP server's
    return (f"note: a clawrouter process ({busy[0]}) is using {settings.home}: a gateway it "
            f"runs {restart}." if busy else None)


def _read_import(source: str | None) -> tuple[str, str]:
    """The key text to import and where it came from (never echoed)."""
    if source is None:
        if sys.stdin is None:
            raise CommandError(2, "no key given: pipe it on standard input or use --from")
        if sys.stdin.isatty():
            raw = getpass.getpass("Private key to import (0x..., not shown): ")
        else:
            raw = sys.stdin.read(4096)
        if not raw.strip():
            raise CommandError(2, "no key on standard input: echo 0x... | clawrouter wallet "
                               "import, or --from blockrun|clawrouter for another client's")
        return raw, "standard input"
    candidates = IMPORT_SOURCES[source]()
    for path in candidates:
        if path.is_file():
            return read_key_file(path), str(path)
    raise CommandError(1, f"no {source} wallet found (looked for "
                   f"{', '.join(str(p) for p in candidates)})")


def confirm(question: str) -> bool | None:
    """Ask on the controlling terminal (stdin may be the key, stdout the exported key's file);
    None when there is none."""
    try:
        tty = open("/dev/tty", "rb+", buffering=0)  # (a terminal cannot be opened "r+": seeks)
    except OSError:
        if sys.stdin is not None and sys.stdin.isatty():  # e.g. Windows
            print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
            return sys.stdin.readline().strip().lower() in ("y", "yes")
        return None
    with tty:
        tty.write(f"{question} [y/N] ".encode())
        answer = tty.readline().decode(errors="replace")
    return answer.strip().lower() in ("y", "yes")


def backup_key_file(path: Path) -> Path:
    """Copy the key file to `<name>.bak-<time>` (0600, a name not yet taken), byte for byte:
    one that is not ASCII text (`read_key_file`) may still be the only copy of a key."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = path.read_bytes()
    for suffix in ("", *(f"-{i}" for i in range(1, 100))):
        backup = path.with_name(f"{path.name}.bak-{stamp}{suffix}")
        try:
            write_private(backup, text)
            return backup
        except FileExistsError:
            continue
    raise CommandError(1, f"cannot find a free backup name next to {path}; nothing was changed")


def replace_key_file(path: Path, key: str) -> None:
    """Swap in a new key atomically (the old one must already be backed up)."""
    tmp = draft_path(path)
    write_private(tmp, key + "\n")
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


# --- wallet export ------------------------------------------------------------------------------
def run_export(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    found = key_in_use(settings)
    if found is None:
        raise CommandError(1, f"no wallet yet ({settings.home / KEY_FILE} does not exist); nothing "
                       "to export")
    address = found.address
    print(f"WARNING: this prints the private key of wallet {address}. Anyone who has it can "
          "spend all of this wallet's funds: never paste it into a chat, a website, an issue "
          "or a repository.", file=sys.stderr)
    if found.source != "file":
        print(f"This is the key from {found.describe()}.", file=sys.stderr)
    if not args.yes:
        answer = confirm("Print the private key?")
        if answer is None:
            raise CommandError(1, "no terminal to confirm on; the key was not printed. Re-run with "
                           "--yes to print it.")
        if not answer:
            raise CommandError(1, "the key was not printed.")
    print(found.key)
    return 0
