"""`clawrouter status` (a running gateway's state) and `clawrouter doctor` (is this machine ready?).

`status` only asks a running gateway (it never starts one: that would answer a different
question). `doctor` checks what `serve` needs, one line each, with the fix for whatever fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import stat
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from clawrouter.catalog import format_dollars
from clawrouter.cli.client import (
    URL_HELP, BadGatewayUrl, GatewayError, advertised, connect, foreign, probe,
)
from clawrouter.cli.common import add_config, fail
from clawrouter.config import Settings


def register(commands: Any) -> None:
    s = commands.add_parser(
        "status", help="show a running gateway's health, spend today and balance",
        description="Ask the running gateway (CLAWROUTER_URL, else where `clawrouter serve` "
        "listens with your settings, http://127.0.0.1:8402 by default) "
        "for its wallet, network, upstream, spend today, budget left and balance. Exit codes: "
        "0 a gateway answered, 1 none answers (or it refused), 2 usage error.")
    s.add_argument("--json", action="store_true",
                   help="print one JSON document on stdout and nothing else: {url, health, "
                   "spend}, or {error} when no gateway answers or it refuses")
    s.add_argument("--url", help=URL_HELP)
    add_config(s)
    s.set_defaults(run=run_status)

    d = commands.add_parser(
        "doctor", help="check configuration, wallet, data directory, port and upstream",
        description="Check that the gateway can run here: the configuration loads, the wallet "
        "file exists with mode 0600, the data directory is writable, the port is free (or "
        "already serving clawrouter), the BlockRun upstream is reachable (if not: a warning "
        "where `serve` would use the built-in sandbox instead, else a failure), and the "
        "balance (when a running gateway reports it). Each failure or warning prints its "
        "fix. Exit codes: 0 no check failed (a warning is no failure), 1 a check failed, 2 "
        "usage error.")
    d.add_argument("--json", action="store_true",
                   help="print one JSON document ({ok, checks: [{name, status, detail, fix}]}; "
                   "status ok, warn, fail or skip) on stdout and nothing else")
    add_config(d)
    d.set_defaults(run=run_doctor)


# --- status ---------------------------------------------------------------------------------

def run_status(args: argparse.Namespace) -> int:
    try:
        url, health, spend = asyncio.run(_status(args.url))
    except BadGatewayUrl as exc:  # --url or CLAWROUTER_URL: not the configuration's fault
        return fail(args, str(exc), 2, "bad_gateway_url")
    except (ValueError, FileNotFoundError) as exc:
        return fail(args, f"invalid configuration: {exc}", 2, "invalid_configuration")
    except GatewayError as exc:
        return fail(args, exc.message, 1, exc.code, exc.to_json())
    if args.json:
        print(json.dumps({"url": url, "health": health, "spend": spend},
                         indent=2))
        return 0
    budget = spend.get("budget", {}).get("day", {})
    left = budget.get("remaining_usd")
    balance = health.get("balance_usd")
    sandbox = " (sandbox: no real payments)" if health.get("sandbox") else ""
    print(f"gateway   {url} · clawrouter {health.get('version')} · "
          f"{health.get('status')}{sandbox}")
    print(f"wallet    {health.get('wallet')} on {health.get('network')}")
    print(f"upstream  {health.get('upstream')}")
    usd = format_dollars
    print(f"balance   {usd(balance) + ' USDC' if balance is not None else 'unknown'}")
    today = spend.get("today", {})
    pending = today.get("pending", {})
    print(f"today     {usd(today.get('usd', 0))} in {today.get('payments', 0)} payment(s)"
          + (f" · {usd(pending['usd'])} pending in {pending['payments']}"
             if pending.get("payments") else ""))
    month = spend.get("budget", {}).get("month", {}).get("remaining_usd")
    held = spend.get("budget", {}).get("total", {}).get("held_usd")
    print(f"budget    {'no daily limit' if left is None else f'{usd(left)} left today'}"
          + ("" if month is None else f" · {usd(month)} left this month")
          + (f" · {usd(held)} held by unsettled payments" if held else ""))
    return 0


async def _status(url: str | None) -> tuple[str, dict[str, Any], dict[str, Any]]:
    async with await connect(url, start=False) as gateway:
        health, spend = await asyncio.gather(gateway.health(), gateway.spend())
    return gateway.url, health, spend


# --- doctor ---------------------------------------------------------------------------------

@dataclass
class Check:
    name: str
    #: "ok", "fail", "warn" (`serve` runs, but does what the user should know of: `detail`
    #: says what; not a failure) or "skip" (cannot be checked here; not a failure)
    status: str
    detail: str
    fix: str | None = None


def run_doctor(args: argparse.Namespace) -> int:
    checks = asyncio.run(doctor(args.config))
    ok = all(c.status != "fail" for c in checks)
    if args.json:
        print(json.dumps({"ok": ok, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        for c in checks:
            print(f"{c.status:<4}  {c.name:<9} {c.detail}")
            if c.status in ("fail", "warn") and c.fix:
                print(f"      {'':<9} fix: {c.fix}")
    return 0 if ok else 1


async def doctor(config: str | None = None) -> list[Check]:
    from clawrouter.config import load_settings

    try:
        settings = await asyncio.to_thread(load_settings, config)
    except (ValueError, FileNotFoundError) as exc:
        detail = " ".join(str(exc).split())[:300]
        return [Check("config", "fail", detail,
                      "fix the setting named above in the TOML file or the CLAWROUTER_* "
                      "environment (see config.example.toml)")]
    checks = [check_config(settings)]
    key = settings.wallet_key.get_secret_value() if settings.wallet_key else None
    checks.append(await asyncio.to_thread(check_wallet, settings.home, key,
                                          settings.wallet_key_source))
    checks.append(await asyncio.to_thread(check_data_dir, settings.home))
    port_check, health = await check_port(settings)
    checks.append(port_check)
    checks.append(await check_upstream(settings.upstream_url, settings.sandbox))
    checks.append(check_balance(health, settings.low_balance_usd))
    return checks


def check_config(settings: Settings) -> Check:
    """Loaded, and `serve` would start with it: exposed without an API key, it refuses."""
    from clawrouter.cli.serve import missing_api_key

    if (missing := missing_api_key(settings)) is not None:
        return Check("config", "fail", f"`serve` refuses to {missing[0]}", missing[1])
    read = settings._config_file  # --config, CLAWROUTER_CONFIG or the data directory's
    return Check("config", "ok", f"loaded (file {read})" if read else
                 f"loaded (file {settings.home / 'config.toml'}, not present: defaults)")


def check_wallet(home: Path, configured_key: str | None,
                 source: str = "BLOCKRUN_WALLET_KEY") -> Check:
    """A configured key (BLOCKRUN_WALLET_KEY, or `wallet_key` in the TOML file: `source`)
    wins over the file, as in `serve`."""
    from clawrouter.payment.wallet import WalletError, check_key, read_key_file

    if configured_key:
        try:
            check_key(configured_key, source)
        except WalletError as exc:
            return Check("wallet", "fail", str(exc), f"set {source} to 64 hex "
                         "characters (0x before them or not), or remove it to use the wallet file")
        return Check("wallet", "ok", f"key from {source} (the file is not used)")
    path = home / "wallet.key"
    if not path.exists() and not path.is_symlink():  # (the first run's: `serve` makes one)
        return Check("wallet", "warn", f"no wallet yet: `serve` will create {path} "
                     "(mode 0600) at its first start",
                     "back that file up before you fund it, or run `clawrouter wallet create` "
                     "now, or set BLOCKRUN_WALLET_KEY")
    if not path.is_file():
        return Check("wallet", "fail", f"{path} is not a file", f"remove or rename {path}")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        return Check("wallet", "fail", f"{path} has mode {mode:04o}: others can read the key",
                     f"chmod 600 {path}")
    try:
        text = read_key_file(path)
    except WalletError as exc:  # not ASCII (a UTF-16 file): the key may be fine
        return Check("wallet", "fail", str(exc), "rewrite the file as ASCII, as above")
    except OSError as exc:
        return Check("wallet", "fail", str(exc), f"make {path} readable by this user")
    try:
        check_key(text, str(path))
    except WalletError as exc:
        return Check("wallet", "fail", str(exc), f"restore the key file {path} from your "
                     "backup (never replace it if it holds funds)")
    return Check("wallet", "ok", f"{path} (mode 0600)")


def check_data_dir(home: Path) -> Check:
    existing = home
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        return Check("data dir", "fail", f"{existing} is not writable ({exc.strerror})",
                     f"make {existing} writable by you, or set CLAWROUTER_HOME elsewhere")
    note = "" if existing == home else " (will be created)"
    return Check("data dir", "ok", f"{home} writable{note}")


async def check_port(settings: Settings) -> tuple[Check, dict[str, Any] | None]:
    """Free, or already serving clawrouter (then its /health is returned for the balance):
    at this address, or where this data directory's `serve` says it listens (`--port`), which
    is where the commands go too."""
    host, port = settings.host, settings.port
    if await asyncio.to_thread(_can_bind, host, port):
        for url in await asyncio.to_thread(advertised, settings):
            try:
                health = await probe(url, settings)
            except GatewayError:
                continue
            if health is not None:
                return Check("port", "ok", f"{host}:{port} is free; this data directory's "
                             f"gateway serves at {url}"), health
        return Check("port", "ok", f"{host}:{port} is free"), None
    try:
        health = await probe(settings.url, settings)
    except GatewayError as exc:
        if exc.status == 401:  # ours, guarded by CLAWROUTER_API_KEY
            return Check("port", "ok", f"{host}:{port} is serving clawrouter (set "
                         "CLAWROUTER_API_KEY to see more)"), None
        health = None
    if health is not None and await asyncio.to_thread(foreign, settings.url, health, settings):
        return Check("port", "fail", f"{host}:{port} is serving the clawrouter gateway of "
                     f"another data directory (wallet {health.get('wallet')})",
                     "stop that gateway, or set CLAWROUTER_PORT (or `serve --port`) to a free "
                     "port"), None
    if health is not None:
        return Check("port", "ok", f"{host}:{port} is serving clawrouter "
                     f"{health.get('version', '')}".rstrip()), health
    return Check("port", "fail", f"{host}:{port} is taken by another program",
                 "stop that program, or set CLAWROUTER_PORT (or `serve --port`) to a free "
                 "port"), None


def _can_bind(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        if os.name != "nt":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError:
            return False
    return True


async def check_upstream(url: str, sandbox: bool | str) -> Check:
    """The upstream answers as BlockRun's API does (its model list), not merely answers: a
    base without `/api` answers every request with Not Found."""
    from clawrouter.launch import falls_back, models_answer

    if sandbox is True:
        return Check("upstream", "skip", "sandbox forced (`sandbox = true` in the settings): "
                     "no real images or payments")
    answer = await models_answer(url)
    if answer is not None and answer.blockrun:
        return Check("upstream", "ok", f"{url} answers")
    if answer is not None and answer.status < 500:
        said = f"{url} answers, but not as BlockRun's API (GET {url}/v1/models: " + (
            "not a model list)" if answer.status == 200 else f"HTTP {answer.status})")
        for base in _likely_bases(url):
            if (found := await models_answer(base)) is not None and found.blockrun:
                return Check("upstream", "fail", f"{said}; {base} does",
                             f"set BLOCKRUN_API_URL (or upstream_url) to {base}")
        return Check("upstream", "fail", said, "set BLOCKRUN_API_URL (or upstream_url) to "
                     "BlockRun's API base, like https://blockrun.ai/api")
    failed = "does not answer" if answer is None else f"fails (HTTP {answer.status})"
    fix = "check the internet connection and BLOCKRUN_API_URL"
    if falls_back(url, sandbox):  # `serve` runs all the same: not a failure, but said
        return Check("upstream", "warn", f"{url} {failed}: `serve` will use the built-in "
                     "sandbox instead (no real payments; placeholder images)",
                     f"for real images, {fix}")
    return Check("upstream", "fail", f"{url} {failed}", fix)


def _likely_bases(url: str) -> list[str]:
    """What `url` likely meant as BlockRun's API base: `/api` left off, or `/v1` added."""
    bases = [] if url.endswith("/api") else [url + "/api"]
    if url.endswith("/v1"):
        bases.insert(0, url.removesuffix("/v1"))
    return bases


def check_balance(health: dict[str, Any] | None, low: float) -> Check:
    balance = (health or {}).get("balance_usd")
    if balance is None:
        return Check("balance", "skip", "unknown (needs a running gateway that reports it)")
    shown = format_dollars(float(balance))
    if health and health.get("sandbox"):
        return Check("balance", "ok", f"{shown} (sandbox)")
    if float(balance) < low:
        chain = "Base Sepolia" if (health or {}).get("network") == "base-sepolia" else "Base"
        return Check("balance", "fail", f"{shown} USDC is below {format_dollars(low)}",
                     f"send USDC on {chain} to "
                     f"{health.get('wallet') if health else 'the wallet'}")
    return Check("balance", "ok", f"{shown} USDC")
