"""What the commands check before they are believed: misspelled CLAWROUTER_* variables,
`doctor`'s verdicts, `wallet import` beside a running gateway, the `sandbox` command's address
and flags, and `images prune` beside a gateway. Commands run by `clawrouter.cli.main` in this
process unless the process itself (a server that keeps running) is what is tested."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from clawrouter import config
from clawrouter.config import Settings
from clawrouter.payment.ledgerlock import in_use, lock_path
from clawrouter.payment.networks import NETWORKS
from tests.servers import clawrouter_command, clawrouter_in_process, dead_port, serving

KEY = "0x" + "4c" * 32
OTHER_KEY = "0x" + "5d" * 32
ADDRESS = Account.from_key(KEY).address
OTHER_ADDRESS = Account.from_key(OTHER_KEY).address


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each command here is a new process as far as the once-per-process warning goes."""
    monkeypatch.setattr(config, "_warned", set())


def run(home: Path, *args: str, input: str | None = None,
        **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("CLAWROUTER_", "BLOCKRUN_"))}
    environ.update(CLAWROUTER_HOME=str(home), CLAWROUTER_PORT=str(dead_port()),
                   CLAWROUTER_RPC_URLS=json.dumps([f"http://127.0.0.1:{dead_port()}/"]),
                   CLAWROUTER_WALLET_LOCKS=os.environ["CLAWROUTER_WALLET_LOCKS"])
    environ.update(env)
    return clawrouter_in_process(*args, env=environ, input=input)


def write_key(home: Path, key: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "wallet.key"
    path.write_text(key + "\n")
    path.chmod(0o600)
    return path


def checks(done: subprocess.CompletedProcess[str]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in json.loads(done.stdout)["checks"]}


# --- misspelled variables -------------------------------------------------------------------

def test_a_misspelled_budget_variable_is_warned_about_and_json_stays_clean(tmp_path: Path
                                                                           ) -> None:
    """CLAWROUTER_MAX_USD_PER_DAYS=1 left the $5 daily limit on without a word (the same typo
    in config.toml is an error)."""
    done = run(tmp_path, "stats", "--json", CLAWROUTER_MAX_USD_PER_DAYS="1",
               CLAWROUTER_PAYMENT_CHAIN="base")  # the OpenClaw plugin's: not an error
    assert done.returncode == 0, done.stderr
    json.loads(done.stdout)  # stdout is still one JSON document
    lines = done.stderr.splitlines()
    assert ("clawrouter: warning: CLAWROUTER_MAX_USD_PER_DAYS is ignored: no such clawrouter "
            "setting (did you mean CLAWROUTER_MAX_USD_PER_DAY?)") in lines
    assert ("clawrouter: warning: CLAWROUTER_PAYMENT_CHAIN is ignored: no such clawrouter "
            "setting") in lines
    assert len(lines) == 2


def test_variables_we_read_are_not_warned_about(tmp_path: Path) -> None:
    done = run(tmp_path, "stats", "--json", CLAWROUTER_URL=f"http://127.0.0.1:{dead_port()}",
               CLAWROUTER_OUT=str(tmp_path / "out"), CLAWROUTER_MAX_USD_PER_DAY="2",
               clawrouter_log_level="info")  # (read in any case)
    assert done.returncode == 0 and done.stderr == ""
    # BlockRun's URL under our prefix: pointed at the name that is read
    assert config.unknown_variables({"CLAWROUTER_API_URL": "x"}) == {
        "CLAWROUTER_API_URL": "BLOCKRUN_API_URL"}


def test_every_clawrouter_variable_the_code_names_is_known() -> None:
    """A variable read outside the settings (CLAWROUTER_WALLET_LOCKS, say) must not be
    warned about as a typo: every name the package spells out is a setting or listed."""
    import re

    root = Path(config.__file__).parent
    named = {name for path in root.rglob("*.py")
             for name in re.findall(r"\bCLAWROUTER_[A-Z][A-Z_]*[A-Z]\b", path.read_text())}
    assert "CLAWROUTER_WALLET_LOCKS" in named
    examples = {"CLAWROUTER_MAX_USD_PER_DAYS", "CLAWROUTER_PAYMENT_CHAIN"}  # config.py's
    assert config.unknown_variables(dict.fromkeys(named - examples, "")) == {}


def test_the_warning_is_said_once_per_process(capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    """A command may load its settings more than once (its gateway, its MCP tools)."""
    monkeypatch.setenv("CLAWROUTER_HOME", str(tmp_path))
    monkeypatch.setenv("CLAWROUTER_PORTS", "8403")
    config.load_settings()
    config.load_settings()
    assert capsys.readouterr().err.count("CLAWROUTER_PORTS") == 1


# --- doctor ---------------------------------------------------------------------------------

def test_doctor_fails_an_exposed_gateway_without_an_api_key(tmp_path: Path) -> None:
    """`serve` refuses to start so: doctor said nothing about it."""
    write_key(tmp_path, KEY)
    done = run(tmp_path, "doctor", "--json", CLAWROUTER_HOST="0.0.0.0",
               BLOCKRUN_API_URL=f"http://127.0.0.1:{dead_port()}/api")
    assert done.returncode == 1
    found = checks(done)["config"]
    assert found["status"] == "fail"
    assert found["detail"] == "`serve` refuses to listen on 0.0.0.0 without an API key"
    assert found["fix"].startswith("set CLAWROUTER_API_KEY")
    keyed = run(tmp_path, "doctor", "--json", CLAWROUTER_HOST="0.0.0.0",
                CLAWROUTER_API_KEY="sekrit", BLOCKRUN_API_URL=f"http://127.0.0.1:{dead_port()}/api")
    assert checks(keyed)["config"]["status"] == "ok"


@pytest.mark.parametrize("suffix", ["", "/api/v1"])
def test_doctor_fails_an_upstream_without_blockruns_api_and_names_the_base(
        tmp_path: Path, sandbox: Any, suffix: str) -> None:
    """BLOCKRUN_API_URL without `/api` answers Not Found to every request, yet doctor said it
    "answers" (any status below 500 passed)."""
    url = sandbox.url + suffix
    done = run(tmp_path, "doctor", "--json", BLOCKRUN_API_URL=url)
    upstream = checks(done)["upstream"]
    assert done.returncode == 1 and upstream["status"] == "fail"
    assert "not as BlockRun's API" in upstream["detail"] and "HTTP 404" in upstream["detail"]
    assert upstream["fix"] == f"set BLOCKRUN_API_URL (or upstream_url) to {sandbox.api}"
    right = run(tmp_path, "doctor", "--json", BLOCKRUN_API_URL=sandbox.api)
    assert checks(right)["upstream"] == {"name": "upstream", "status": "ok",
                                         "detail": f"{sandbox.api} answers", "fix": None}


def test_doctor_fails_an_upstream_that_is_not_blockrun_at_all(tmp_path: Path,
                                                            gateway: Any) -> None:
    """Something answering (here our own gateway's health page) is not an upstream."""
    done = run(tmp_path, "doctor", "--json", BLOCKRUN_API_URL=gateway.url + "/health")
    upstream = checks(done)["upstream"]
    assert upstream["status"] == "fail" and "not as BlockRun's API" in upstream["detail"]
    assert "like https://blockrun.ai/api" in upstream["fix"]


def test_doctor_fails_an_upstream_whose_model_list_is_a_web_page(tmp_path: Path) -> None:
    """A captive portal or a website answers 200 too: only a JSON model list is BlockRun's."""
    from starlette.applications import Starlette
    from starlette.responses import HTMLResponse
    from starlette.routing import Route

    async def page(request: Any) -> HTMLResponse:
        return HTMLResponse("<html>Sign in to the Wi-Fi</html>")

    with serving(Starlette(routes=[Route("/api/v1/models", page)])) as portal:
        done = run(tmp_path, "doctor", "--json", BLOCKRUN_API_URL=portal.url + "/api")
    upstream = checks(done)["upstream"]
    assert upstream["status"] == "fail" and upstream["detail"].endswith("not a model list)")


def test_doctor_names_the_sandbox_fallback_only_where_serve_takes_it(tmp_path: Path) -> None:
    """`serve` falls back to the sandbox only from BlockRun's own address: one configured
    that does not answer is just down."""
    done = run(tmp_path, "doctor", "--json",
               BLOCKRUN_API_URL=f"http://127.0.0.1:{dead_port()}/api")
    upstream = checks(done)["upstream"]
    assert upstream["status"] == "fail" and upstream["detail"].endswith("does not answer")


# --- wallet ---------------------------------------------------------------------------------

def test_import_force_says_a_running_gateway_keeps_the_old_key(tmp_path: Path,
                                                               make_gateway: Any) -> None:
    home = tmp_path / "home"
    write_key(home, KEY)
    gateway = make_gateway(home=home, wallet_key=None)  # pays from wallet.key
    done = run(home, "wallet", "import", "--yes", "--force", input=OTHER_KEY,
               CLAWROUTER_PORT=str(gateway.server.port))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == OTHER_ADDRESS
    assert (f"note: the gateway running at {gateway.url} keeps paying from the replaced "
            f"wallet {ADDRESS} until it is restarted") in done.stderr
    assert OTHER_KEY not in done.stderr + done.stdout and KEY not in done.stderr


def test_import_force_names_a_gateway_it_cannot_ask(tmp_path: Path, make_gateway: Any) -> None:
    """One that holds the data directory's ledger but does not answer where the settings
    say (an MCP server's, or one wanting an API key): still said."""
    home = tmp_path / "home"
    write_key(home, KEY)
    make_gateway(home=home, wallet_key=None)
    done = run(home, "wallet", "import", "--yes", "--force", input=OTHER_KEY)
    assert done.returncode == 0, done.stderr
    assert f"note: a clawrouter process (pid {os.getpid()}" in done.stderr
    assert f"keeps paying from the replaced wallet {ADDRESS}" in done.stderr


def test_import_force_without_a_gateway_says_nothing_of_one(tmp_path: Path) -> None:
    write_key(tmp_path, KEY)
    done = run(tmp_path, "wallet", "import", "--yes", "--force", input=OTHER_KEY)
    assert done.returncode == 0, done.stderr
    assert "note:" not in done.stderr and "restarted" not in done.stderr


def test_a_key_without_0x_is_taken_everywhere(tmp_path: Path) -> None:
    """`wallet import` took a key without `0x` (as BlockRun's SDKs do); BLOCKRUN_WALLET_KEY,
    `wallet_key` and a wallet.key written by hand refused it."""
    bare = KEY.removeprefix("0x")
    shown = run(tmp_path, "wallet", "--json", BLOCKRUN_WALLET_KEY=bare)
    assert shown.returncode == 0, shown.stderr
    info = json.loads(shown.stdout)
    assert info["address"] == ADDRESS and info["key_source"] == "env"
    assert bare not in shown.stdout + shown.stderr
    (tmp_path / "config.toml").write_text(f'wallet_key = "{bare}"\n')
    filed = run(tmp_path, "wallet", "--json")
    assert filed.returncode == 0, filed.stderr
    assert json.loads(filed.stdout)["key_source"] == "setting"
    assert json.loads(filed.stdout)["address"] == ADDRESS
    (tmp_path / "config.toml").unlink()
    write_key(tmp_path, bare)  # by hand, as an exported key
    by_hand = run(tmp_path, "wallet", "--json")
    assert by_hand.returncode == 0, by_hand.stderr
    assert json.loads(by_hand.stdout)["address"] == ADDRESS
    imported = run(tmp_path / "other", "wallet", "import", "--yes", input=bare)
    assert imported.returncode == 0 and imported.stdout.strip() == ADDRESS
    assert (tmp_path / "other" / "wallet.key").read_text() == KEY + "\n"


# --- sandbox --------------------------------------------------------------------------------

def _sandbox_line(*args: str) -> str:
    """The first line a `clawrouter sandbox` process prints; then it is stopped."""
    proc = subprocess.Popen(clawrouter_command("sandbox", *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        return proc.stdout.readline().strip()
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_sandbox_prints_the_port_it_bound_and_brackets_ipv6() -> None:
    line = _sandbox_line("--port", "0")
    assert line.startswith("clawrouter sandbox on http://127.0.0.1:")
    port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
    assert port != 0
    if not socket.has_ipv6:
        return
    try:
        socket.socket(socket.AF_INET6).bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    assert _sandbox_line("--host", "::1", "--port", "0").startswith(
        "clawrouter sandbox on http://[::1]:")


@pytest.mark.parametrize("flag, value", [("--latency-ms", "nan"), ("--latency-ms", "inf"),
                                         ("--slow-seconds", "-1")])
def test_sandbox_refuses_durations_that_are_no_durations(flag: str, value: str) -> None:
    """--latency-ms nan made every answer a 500. (A process: one that took the flag would
    serve until stopped.)"""
    done = subprocess.run(clawrouter_command("sandbox", "--port", "0", flag, value),
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and f"argument {flag}: must be a finite number" in done.stderr


# --- images prune ---------------------------------------------------------------------------

def test_prune_on_a_missing_home_creates_nothing(tmp_path: Path) -> None:
    home = tmp_path / "nowhere"
    done = run(home, "images", "prune")
    assert done.returncode == 0 and "nothing to prune" in done.stdout
    assert json.loads(run(home, "images", "prune", "--json").stdout) == {"removed": []}
    assert not home.exists()


def test_prune_holds_every_ledger_lock_while_it_prunes(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked once and then pruned without the lock, a gateway starting in between was
    pruned under (its index would serve deleted files)."""
    from clawrouter.store import ImageStore

    (tmp_path / "images").mkdir()
    held: list[bool] = []
    pruned = ImageStore.prune

    async def prune(self: ImageStore) -> list[str]:
        settings = Settings(home=tmp_path)
        held.extend(in_use(lock_path(settings.ledger_path_for(name))) for name in NETWORKS)
        return await pruned(self)

    monkeypatch.setattr(ImageStore, "prune", prune)
    done = run(tmp_path, "images", "prune", "--json")
    assert done.returncode == 0, done.stderr
    assert held == [True] * len(NETWORKS)
    assert not any(in_use(lock_path(Settings(home=tmp_path).ledger_path_for(name)))
                   for name in NETWORKS)  # and lets go after


# --- --json help ----------------------------------------------------------------------------

def test_status_json_help_names_every_key_it_prints(tmp_path: Path) -> None:
    done = run(tmp_path, "status", "--help")
    assert "{url, health, spend}" in " ".join(done.stdout.split())
