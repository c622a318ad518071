"""`clawrouter wallet` and `clawrouter stats`: real files, exit codes, stdin.

Commands run by `clawrouter.cli.main` in this process (`cli(...)`), with their own environment
and stdin, unless the terminal matters: `cli.process(...)` is a real subprocess in a session
of its own (no controlling terminal), so a confirmation prompt can never wait on the
developer's terminal: without `--yes` the commands must refuse. Only commands that cannot ask
run in-process.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from eth_account import Account

from clawrouter.config import Settings
from clawrouter.payment.ledger import Ledger, REJECTED, SETTLED
from clawrouter.payment.networks import NETWORKS
from tests.servers import clawrouter_in_process, dead_port
from tests.test_balance import FakeRpc

REPO = Path(__file__).resolve().parents[1]
KEY = "0x" + "4c" * 32
OTHER_KEY = "0x" + "5d" * 32
ADDRESS = Account.from_key(KEY).address
OTHER_ADDRESS = Account.from_key(OTHER_KEY).address
TX = "0x" + "ab" * 32


class Cli:
    def __init__(self, tmp_path: Path) -> None:
        self.home = tmp_path / "user"
        self.claw = self.home / ".clawrouter"
        self.home.mkdir()
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("CLAWROUTER_", "BLOCKRUN_"))}
        self.env.update(HOME=str(self.home), CLAWROUTER_HOME=str(self.claw),
                        # offline by default: nothing listens on these ports
                        CLAWROUTER_RPC_URLS=json.dumps([f"http://127.0.0.1:{dead_port()}/"]),
                        CLAWROUTER_PORT=str(dead_port()))

    @property
    def ledger(self) -> Path:
        return Settings(home=self.claw).ledger_path

    @property
    def key_file(self) -> Path:
        return self.claw / "wallet.key"

    def __call__(self, *args: str, input: str | None = None,
                 **env: str) -> subprocess.CompletedProcess[str]:
        """The command in this process: for one that never asks on the terminal."""
        return clawrouter_in_process(*args, env={**self.env, **env}, input=input, cwd=REPO)

    def process(self, *args: str, input: str | None = None,
                **env: str) -> subprocess.CompletedProcess[str]:
        """The command as a real process without a controlling terminal."""
        return subprocess.run([sys.executable, "-m", "clawrouter", *args], input=input,
                              capture_output=True, text=True, cwd=REPO, timeout=30,
                              env={**self.env, **env}, start_new_session=True)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


def write_key(cli: Cli, key: str) -> None:
    cli.key_file.parent.mkdir(parents=True, exist_ok=True)
    cli.key_file.write_text(key + "\n")
    cli.key_file.chmod(0o600)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- create ---------------------------------------------------------------------------------
def test_create_writes_a_private_key_once_and_prints_only_the_address(cli):
    first = cli("wallet", "create")
    assert first.returncode == 0, first.stderr
    key = cli.key_file.read_text().strip()
    assert mode(cli.key_file) == 0o600
    assert first.stdout.strip() == Account.from_key(key).address
    assert key not in first.stdout + first.stderr and key[2:] not in first.stdout + first.stderr

    again = cli("wallet", "create")
    assert again.returncode == 1
    assert "already exists" in again.stderr and again.stdout == ""
    assert cli.key_file.read_text().strip() == key


# --- show -----------------------------------------------------------------------------------
def test_wallet_offline_says_the_balance_is_unavailable(cli):
    created = cli("wallet", "create")
    assert created.returncode == 0
    address = created.stdout.strip()
    shown = cli("wallet")
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert address in out and "unavailable (offline?)" in out
    assert "Base (base, chain id 8453)" in out
    assert "Send USDC on Base" in out and "ETH, SOL" in out and NETWORKS["base"].usdc in out

    as_json = cli("wallet", "--json")
    assert as_json.returncode == 0
    info = json.loads(as_json.stdout)
    assert info["address"] == address and info["network"] == "base"
    assert info["chain_id"] == 8453 and info["usdc_contract"] == NETWORKS["base"].usdc
    assert info["balance_usd"] is None and info["low"] is None
    assert info["key_source"] == "file"


def test_wallet_without_a_key_points_to_create(cli):
    shown = cli("wallet")
    assert shown.returncode == 1 and "wallet create" in shown.stderr
    assert not cli.key_file.exists()


def test_wallet_shows_the_balance_from_the_configured_rpc(cli, tmp_path):
    write_key(cli, KEY)
    config = tmp_path / "custom.toml"
    with FakeRpc(balance=12_345_678) as rpc:
        config.write_text(f'network = "base-sepolia"\nrpc_urls = ["{rpc.url}"]\n')
        del cli.env["CLAWROUTER_RPC_URLS"]  # the environment would win over the file
        shown = cli("wallet", "--config", str(config))
        assert shown.returncode == 0, shown.stderr
        assert "12.345678 USDC" in shown.stdout and "low" not in shown.stdout
        assert "chain id 84532, testnet" in shown.stdout
        assert "faucet" in shown.stdout and NETWORKS["base-sepolia"].usdc in shown.stdout

        rpc.balance = 250_000
        info = json.loads(cli("wallet", "--json", "--config", str(config)).stdout)
        assert info["balance_micro"] == 250_000 and info["balance_usd"] == 0.25
        assert info["low"] is True and info["network"] == "base-sepolia"
        assert rpc.requests[-1]["params"][0]["data"].endswith(ADDRESS[2:].lower())


def test_wallet_names_a_running_sandbox_gateway_and_its_balance(cli, make_gateway, sandbox):
    """`serve` offline runs on the sandbox's Base Sepolia: `wallet` (which shows the configured
    network, Base) says so, instead of contradicting the balance `status` shows."""
    write_key(cli, KEY)
    gw = make_gateway(home=cli.claw, wallet_key=KEY, rpc_urls=[sandbox.url + "/_sandbox/rpc"])
    gw.gw.sandbox = True  # as `serve` makes it when BlockRun does not answer
    deadline = time.monotonic() + 10
    while gw.http.get("/health").json().get("balance_usd") is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    shown = cli("wallet", CLAWROUTER_URL=gw.url)
    assert shown.returncode == 0, shown.stderr
    assert "Base (base, chain id 8453)" in shown.stdout
    assert (f"Note: the gateway running at {gw.url} pays in the sandbox (no real money) on "
            "base-sepolia, where this wallet holds 100.00 sandbox USDC") in shown.stdout
    info = json.loads(cli("wallet", "--json", CLAWROUTER_URL=gw.url).stdout)
    assert info["gateway"] == {"url": gw.url, "network": "base-sepolia", "sandbox": True,
                               "balance_usd": 100.0}
    assert "gateway" not in json.loads(cli("wallet", "--json").stdout)  # none running there


def test_environment_key_is_reported_as_the_one_in_use(cli):
    write_key(cli, OTHER_KEY)
    shown = cli("wallet", BLOCKRUN_WALLET_KEY=KEY)
    assert shown.returncode == 0
    assert ADDRESS in shown.stdout and "BLOCKRUN_WALLET_KEY" in shown.stdout
    assert "in use" in shown.stdout
    assert json.loads(cli("wallet", "--json", BLOCKRUN_WALLET_KEY=KEY).stdout)[
        "key_source"] == "env"
    imported = cli("wallet", "import", "--yes", "--force", input=KEY,
                   BLOCKRUN_WALLET_KEY=KEY)
    assert imported.returncode == 0 and "BLOCKRUN_WALLET_KEY is set" in imported.stderr


# --- import ---------------------------------------------------------------------------------
def test_import_from_stdin_with_yes(cli):
    done = cli("wallet", "import", "--yes", input=KEY + "\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ADDRESS and ADDRESS in done.stderr
    assert KEY[2:] not in done.stdout + done.stderr
    assert cli.key_file.read_text().strip() == KEY and mode(cli.key_file) == 0o600


def test_import_accepts_a_key_without_0x(cli):
    done = cli("wallet", "import", "--yes", input=KEY[2:])
    assert done.returncode == 0 and cli.key_file.read_text().strip() == KEY


@pytest.mark.parametrize("source, relative", [
    ("blockrun", ".blockrun/.session"),
    ("blockrun", ".blockrun/wallet.key"),  # the SDK's legacy location
    ("clawrouter", ".openclaw/blockrun/wallet.key"),
])
def test_import_from_another_blockrun_client(cli, source, relative):
    theirs = cli.home / relative
    theirs.parent.mkdir(parents=True)
    theirs.write_text(KEY + "\n")
    done = cli("wallet", "import", "--from", source, "--yes")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ADDRESS and str(theirs) in done.stderr
    assert cli.key_file.read_text().strip() == KEY and mode(cli.key_file) == 0o600
    assert theirs.read_text().strip() == KEY  # left where it was


def test_import_from_a_missing_client_wallet_says_where_it_looked(cli):
    done = cli("wallet", "import", "--from", "clawrouter", "--yes")
    assert done.returncode == 1 and ".openclaw/blockrun/wallet.key" in done.stderr


def test_import_without_yes_and_without_a_terminal_refuses(cli):
    done = cli.process("wallet", "import", input=KEY)
    assert done.returncode == 1 and "--yes" in done.stderr
    assert ADDRESS in done.stderr  # it said what it would have imported
    assert not cli.key_file.exists()


def test_import_never_overwrites_without_force_and_keeps_a_backup_with_it(cli):
    write_key(cli, KEY)
    refused = cli("wallet", "import", "--yes", input=OTHER_KEY)
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert cli.key_file.read_text().strip() == KEY

    forced = cli("wallet", "import", "--yes", "--force", input=OTHER_KEY)
    assert forced.returncode == 0, forced.stderr
    assert forced.stdout.strip() == OTHER_ADDRESS
    assert cli.key_file.read_text().strip() == OTHER_KEY and mode(cli.key_file) == 0o600
    (backup,) = cli.claw.glob("wallet.key.bak-*")
    assert backup.read_text().strip() == KEY and mode(backup) == 0o600
    assert sorted(p.name for p in cli.claw.iterdir()) == ["wallet.key", backup.name]


@pytest.mark.parametrize("bad", ["0x1234", "0x" + "zz" * 32, "0x" + "00" * 32])
def test_malformed_keys_exit_2_without_echoing_the_key(cli, bad):
    done = cli("wallet", "import", "--yes", input=bad)
    assert done.returncode == 2
    assert "malformed" in done.stderr or "zero" in done.stderr
    assert bad not in done.stdout + done.stderr
    assert not cli.key_file.exists()


def test_a_malformed_environment_key_exits_2_without_echoing_it(cli):
    bad = "0x" + "zz" * 32
    shown = cli("wallet", BLOCKRUN_WALLET_KEY=bad)
    assert shown.returncode == 2 and "BLOCKRUN_WALLET_KEY" in shown.stderr
    assert bad not in shown.stdout + shown.stderr



def test_a_malformed_key_in_the_config_file_is_blamed_on_the_file(cli):
    """`serve`, `doctor` and `wallet` name the setting and file the bad key is in, not an
    environment variable nobody set."""
    config = cli.claw / "config.toml"
    cli.claw.mkdir()
    config.write_text('wallet_key = "0x1234"\n')
    where = f"the wallet_key setting in {config}"
    served = cli.process("serve", "--no-sandbox", "--port", "0",
                 "--upstream", f"http://127.0.0.1:{dead_port()}/api")
    assert served.returncode == 2 and where in served.stderr, served.stderr
    doctor = cli("doctor", "--json")
    (wallet,) = [c for c in json.loads(doctor.stdout)["checks"] if c["name"] == "wallet"]
    assert wallet["status"] == "fail" and where in wallet["detail"] and where in wallet["fix"]
    shown = cli("wallet")
    assert shown.returncode == 2 and where in shown.stderr
    for done in (served, doctor, shown):
        assert "BLOCKRUN_WALLET_KEY" not in done.stdout + done.stderr
        assert "1234" not in done.stdout + done.stderr.replace(str(config), "")


def test_commands_name_a_data_file_they_cannot_use_in_one_line(cli):
    """A damaged ledger, a key file that is a folder, a data directory that is a file: one
    line saying which file and what to do, exit 2, never a traceback."""
    cli.claw.mkdir()
    cli.ledger.write_bytes(b"not a database at all " * 20)
    stats = cli("stats")
    assert f"{cli.ledger} is damaged or not a database" in stats.stderr
    assert "restore it from a backup" in stats.stderr
    cli.ledger.unlink()
    with contextlib.closing(sqlite3.connect(cli.ledger)) as newer:  # a later version's ledger
        newer.execute("PRAGMA user_version = 99")
    downgraded = cli("stats")
    assert f"{cli.ledger} was written by a newer clawrouter (schema 99" in downgraded.stderr
    assert "upgrade clawrouter" in downgraded.stderr
    cli.ledger.unlink()
    cli.key_file.mkdir()
    shown = cli("wallet")
    assert f"{cli.key_file}: it is a directory, not a file — move it away" in shown.stderr
    shutil.rmtree(cli.claw)
    cli.claw.write_text("")
    pruned = cli("images", "prune")
    assert f"{cli.claw} is a file, not a directory — move it away" in pruned.stderr
    created = cli("wallet", "create")  # not "wallet.key already exists"
    assert f"{cli.claw} is a file, not a directory — move it away" in created.stderr
    cli.claw.unlink()
    cli.claw.mkdir()
    cli.key_file.symlink_to(cli.claw / "gone")
    dangling = cli("wallet", "create")
    assert dangling.returncode == 1 and "broken link" in dangling.stderr
    for done in (stats, downgraded, shown, pruned, created):
        assert done.returncode == 2 and done.stderr.startswith("clawrouter: ")
        assert done.stderr.count("\n") == 1, done.stderr


# --- export ---------------------------------------------------------------------------------
def test_export_needs_confirmation_and_warns(cli):
    write_key(cli, KEY)
    refused = cli.process("wallet", "export")
    assert refused.returncode == 1 and "--yes" in refused.stderr
    assert KEY not in refused.stdout + refused.stderr

    shown = cli("wallet", "export", "--yes")
    assert shown.returncode == 0
    assert shown.stdout.strip() == KEY
    assert "WARNING" in shown.stderr and "spend" in shown.stderr
    assert KEY not in shown.stderr


def test_export_of_the_environment_key_says_so(cli):
    shown = cli("wallet", "export", "--yes", BLOCKRUN_WALLET_KEY=OTHER_KEY)
    assert shown.returncode == 0 and shown.stdout.strip() == OTHER_KEY
    assert "BLOCKRUN_WALLET_KEY" in shown.stderr


# --- stats ----------------------------------------------------------------------------------
def fill_ledger(path: Path) -> None:
    common = dict(route="/v1/images/generations", size="1024x1024", n=1,
                  payee="0xe9030014F5DAe217d0A152f02A043567b16c1aBf", network="base")
    with Ledger(path) as ledger:
        paid = ledger.commit(ledger.signed(request_id="req_a", model="google/nano-banana",
                                    amount=53_500, nonce="0x01", **common))
        ledger.commit(ledger.outcome(paid, SETTLED, transaction=TX, latency_ms=900))
        refused = ledger.commit(ledger.signed(request_id="req_b", model="openai/gpt-image-1",
                                       amount=42_000, nonce="0x02", **common))
        ledger.commit(ledger.outcome(refused, REJECTED))
        ledger.commit(ledger.signed(request_id="req_c", model="zai/cogview-4", amount=15_750,
                             nonce="0x03", **common))  # left signed: a crash mid-payment


def test_stats_json_reads_the_ledger_file(cli):
    fill_ledger(cli.ledger)
    done = cli("stats", "--json")
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["total"]["micro"] == 53_500 and summary["total"]["payments"] == 1
    assert summary["total"]["pending"] == {"usd": 0.01575, "micro": 15_750, "payments": 1}
    assert summary["today"]["payments"] == 1
    assert [p["status"] for p in summary["latest"]] == ["unknown", "rejected", "settled"]
    assert summary["latest"][2]["transaction"] == TX
    assert {m["model"] for m in summary["by_model"]} == {"google/nano-banana", "zai/cogview-4"}
    assert summary["budget"]["day"]["limit_usd"] == 5.0

    one = json.loads(cli("stats", "--json", "--latest", "1").stdout)
    assert [p["status"] for p in one["latest"]] == ["unknown"]
    too_many = cli("stats", "--latest", "1001")  # what /v1/spend refuses, refused offline too
    assert too_many.returncode == 2 and "must be 1000 or less" in too_many.stderr


def test_stats_points_to_the_other_networks_ledger(cli):
    """Sandbox payments are kept in the Base Sepolia ledger: stats on the default network
    says where they are instead of only 'No payments yet'."""
    sepolia = Settings(home=cli.claw, network="base-sepolia").ledger_path
    fill_ledger(sepolia)
    done = cli("stats")
    assert done.returncode == 0, done.stderr
    assert "No payments yet." in done.stdout
    assert f"in {sepolia}: CLAWROUTER_NETWORK=base-sepolia clawrouter stats" in done.stdout
    summary = json.loads(cli("stats", "--json").stdout)
    assert summary["other_ledgers"] == {"base-sepolia": str(sepolia)}
    assert "(the sandbox's and testnet ones)" in done.stdout

    fill_ledger(cli.ledger)  # real payments, seen from the testnet side: never "the sandbox's"
    from_testnet = cli("stats", CLAWROUTER_NETWORK="base-sepolia").stdout
    assert f"Payments on base (real USDC) are kept apart, in {cli.ledger}" in from_testnet


def test_stats_table_shows_every_section(cli):
    fill_ledger(cli.ledger)
    done = cli("stats")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for text in ("Today", "This month", "Total", "$0.0535", "$0.01575", "By model",
                 "google/nano-banana", "By day", "Latest payments", "settled", "rejected",
                 "unknown", TX, str(cli.ledger)):
        assert text in out, text


def test_stats_without_a_ledger_shows_zeros_and_creates_nothing(cli):
    done = cli("stats", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["total"]["payments"] == 0
    assert not cli.claw.exists()


def test_stats_says_when_a_silent_gateway_holds_the_ledger(cli):
    fill_ledger(cli.ledger)
    with Ledger(cli.ledger):  # as a running gateway would
        done = cli("stats")
    assert done.returncode == 1
    assert "did not answer" in done.stderr and str(cli.ledger) in done.stderr


def test_stats_json_from_a_running_gateway(cli, make_gateway):
    gateway = make_gateway()
    r = gateway.http.post("/v1/images/generations",
                          json={"model": "cogview", "prompt": "a lighthouse", "size": "512x512"})
    assert r.status_code == 200, r.text
    done = cli("stats", "--json", CLAWROUTER_HOME=str(gateway.gw.settings.home),
               CLAWROUTER_NETWORK="base-sepolia", CLAWROUTER_PORT=str(gateway.server.port))
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["wallet"] == gateway.gw.address  # only GET /v1/spend names the wallet
    assert summary["total"]["payments"] == 1 and summary["total"]["pending"]["payments"] == 0
    (payment,) = summary["latest"]
    assert payment["status"] == "settled" and payment["transaction"]
    assert payment["model"] == "zai/cogview-4"


def test_stats_sends_the_api_key_to_the_gateway(cli, make_gateway):
    gateway = make_gateway(api_key="s3cret")
    env = dict(CLAWROUTER_HOME=str(gateway.gw.settings.home), CLAWROUTER_NETWORK="base-sepolia",
               CLAWROUTER_PORT=str(gateway.server.port))
    done = cli("stats", "--json", CLAWROUTER_API_KEY="s3cret", **env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["wallet"] == gateway.gw.address
    refused = cli("stats", **env)
    assert refused.returncode == 1 and "CLAWROUTER_API_KEY" in refused.stderr


def test_stats_reads_the_ledger_when_another_program_has_the_port(cli):
    """No gateway of ours answers there (a web server took 8402, say): the ledger file is
    what stats reads, as it does when nothing answers."""
    from starlette.applications import Starlette

    from tests.servers import ServerThread

    fill_ledger(cli.ledger)
    server = ServerThread(Starlette()).start()  # 404 for everything
    try:
        done = cli("stats", "--json", CLAWROUTER_PORT=str(server.port))
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["total"]["micro"] == 53_500


def test_stats_asks_the_gateway_every_command_uses_and_says_which_network(cli, make_gateway):
    """After a request that ended without an answer, an agent is told to check stats before
    asking again: stats must read the gateway that request went to (CLAWROUTER_URL, a
    container's), never this directory's empty ledger instead, nor another directory's
    gateway as if it were this one's; and it names the network (and the sandbox)."""
    gateway = make_gateway(sandbox=True)
    r = gateway.http.post("/v1/images/generations",
                          json={"model": "cogview", "prompt": "a lighthouse", "size": "512x512"})
    assert r.status_code == 200, r.text
    named = cli("stats", "--json", CLAWROUTER_URL=gateway.url)  # cli's own home is elsewhere
    assert named.returncode == 0, named.stderr
    summary = json.loads(named.stdout)
    assert summary["total"]["payments"] == 1 and summary["network"] == "base-sepolia"
    assert summary["sandbox"] is True and "other_ledgers" not in summary
    table = cli("stats", CLAWROUTER_URL=gateway.url).stdout
    assert "Spending on base-sepolia (the sandbox: no real payments)" in table
    unnamed = cli("stats", CLAWROUTER_PORT=str(gateway.server.port))
    assert unnamed.returncode == 1 and "another data directory" in unnamed.stderr


def test_a_data_directory_without_permission_is_named_with_the_fix(tmp_path):
    """(Run as root here, so the refusal is made up: root may write anywhere.)"""
    from argparse import Namespace

    from clawrouter.cli.common import file_problem, settings_from

    home = tmp_path / "data"
    settings_from(Namespace(config=None), home=home)
    denied = PermissionError(13, "Permission denied", str(home / "wallet.key"))
    assert file_problem(denied) == (f"cannot use {home / 'wallet.key'}: Permission denied — "
                                    "make the data directory writable by you, or set "
                                    "CLAWROUTER_HOME to another data directory")
    elsewhere = PermissionError(13, "Permission denied", str(tmp_path / "out.png"))
    assert file_problem(elsewhere) == f"cannot use {tmp_path / 'out.png'}: Permission denied"
    assert file_problem(ConnectionResetError(104, "reset")) is None  # no file: a traceback


# --- confirmations on the terminal ----------------------------------------------------------
def on_a_terminal(cli: Cli, shell_command: str, answer: bytes) -> tuple[int, str]:
    """Run `shell_command` with a pseudo-terminal as its controlling terminal (as a user at a
    terminal does), answer its question when it asks, and return (exit code, terminal text)."""
    import pty
    import select

    pid, master = pty.fork()
    if pid == 0:  # the child: its terminal is the pty; the shell's pipes and redirects stay
        try:
            os.chdir(REPO)
            os.execvpe("sh", ["sh", "-c", shell_command], cli.env)
        finally:
            os._exit(127)
    seen = b""
    answered = False
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.5)
        if not ready:
            continue
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        seen += chunk
        if not answered and b"[y/N]" in seen:
            os.write(master, answer)
            answered = True
    os.close(master)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), seen.decode(errors="replace")


def test_import_from_a_pipe_asks_on_the_terminal(cli):
    """README: `echo 0x… | clawrouter wallet import` asks for confirmation on the terminal
    (stdin is the key) and imports on "y"."""
    python = f"{sys.executable} -m clawrouter"
    code, shown = on_a_terminal(cli, f"echo {KEY} | {python} wallet import", b"y\n")
    assert code == 0, shown
    assert f"Import wallet {ADDRESS}? [y/N]" in shown and KEY not in shown
    assert cli.key_file.read_text().strip() == KEY and mode(cli.key_file) == 0o600
    code, shown = on_a_terminal(cli, f"echo {OTHER_KEY} | {python} wallet import --force", b"n\n")
    assert code == 1 and "nothing was imported" in shown
    assert cli.key_file.read_text().strip() == KEY


def test_export_to_a_file_asks_on_the_terminal_and_writes_only_the_key(cli):
    """`clawrouter wallet export > backup` at a terminal: the question goes to the terminal,
    the file gets the key and nothing else."""
    write_key(cli, KEY)
    backup = cli.home / "backup.txt"
    code, shown = on_a_terminal(
        cli, f"{sys.executable} -m clawrouter wallet export > {backup}", b"y\n")
    assert code == 0, shown
    assert "Print the private key? [y/N]" in shown and KEY not in shown
    assert backup.read_text() == KEY + "\n"
