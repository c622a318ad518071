"""How `generate`/`edit`/`mcp` reach a gateway, and what they save: a gateway the user named is
the only one used, a wallet key made on the way is announced, each run is a new request, usage
and set-up errors exit 2 before anything starts, saved images follow the umask, and a failed
save names where the paid image still is."""

from __future__ import annotations

import builtins
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.servers import clawrouter_in_process, dead_port
from tests.test_cli_tools import PNG_MAGIC, as_json, cli_env, run

BAD_URLS = ("localhost:18402", "127.0.0.1:8402", "ftp://127.0.0.1:8402", "http://[::1",
            "http://")


# --- 1. a gateway the user named is the only one used ----------------------------------------

def test_a_named_gateway_that_does_not_answer_is_never_replaced(tmp_path: Path) -> None:
    """`--url`/CLAWROUTER_URL name the gateway (a container's, paying from its own wallet):
    when it does not answer, starting one here would pay from this machine's wallet (or make
    one). The command fails naming the URL, and starts, creates and pays nothing."""
    dead = f"http://127.0.0.1:{dead_port()}"
    for args, env, named_by in ((("--url", dead), {}, "--url"),
                                ((), {"CLAWROUTER_URL": dead}, "CLAWROUTER_URL")):
        proc = run(tmp_path, "generate", "a red kite", "--json", *args,
                   CLAWROUTER_SANDBOX="true", **env)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        error = as_json(proc)["error"]
        assert (error["code"], error["type"], error["status"]) == (
            "no_gateway", "connection_error", None)
        assert f"No clawrouter gateway answers at {dead} (named by {named_by})" in proc.stderr
        assert "Nothing was started" in error["message"] and "started one" not in proc.stderr
        status = run(tmp_path, "status", *args, **env)
        assert status.returncode == 1 and f"named by {named_by}" in status.stderr
    assert not (tmp_path / "cli-home").exists()  # no wallet made, no ledger, no gateway
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.parametrize("bad", BAD_URLS)
def test_a_gateway_url_in_the_wrong_form_is_a_usage_error(tmp_path: Path, bad: str) -> None:
    """`--url localhost:18402` could never answer (no scheme): it read as "no gateway" and a
    gateway was started here; `http://[::1` was an httpx.InvalidURL traceback. Both are one
    line saying the form expected, exit 2, before anything starts."""
    for args, env in ((("--url", bad), {}), ((), {"CLAWROUTER_URL": bad})):
        proc = run(tmp_path, "generate", "x", *args, CLAWROUTER_SANDBOX="true", **env)
        assert proc.returncode == 2, proc.stderr
        assert "http://HOST:PORT" in proc.stderr and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        mcp = run(tmp_path, "mcp", *args, **env)  # refused before it serves a single call
        assert mcp.returncode == 2 and "http://HOST:PORT" in mcp.stderr, mcp.stderr
        status = run(tmp_path, "status", *args, **env)  # the URL's fault, not the settings'
        assert status.returncode == 2 and "http://HOST:PORT" in status.stderr, status.stderr
        assert "invalid configuration" not in status.stderr
    for command in (("stats",), ("wallet",)):  # they look for a gateway too: no traceback
        done = run(tmp_path, *command, CLAWROUTER_URL=bad, BLOCKRUN_WALLET_KEY="0x" + "4c" * 32)
        assert done.returncode == 2 and "http://HOST:PORT" in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "cli-home").exists()


def test_the_mcp_tools_never_replace_a_named_gateway(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The same rule for `clawrouter mcp` (it uses the same `connect`), and its tool error says
    which gateway did not answer and that nothing was started or paid."""
    from tests.test_mcp import health_refusal

    monkeypatch.setenv("CLAWROUTER_HOME", str(tmp_path / "client-home"))
    monkeypatch.setenv("CLAWROUTER_SANDBOX", "true")
    dead = f"http://127.0.0.1:{dead_port()}"

    message = health_refusal(dead)
    assert f"No clawrouter gateway answers at {dead} (named by --url)" in message, message
    assert "Nothing was started, sent or paid" in message
    assert not (tmp_path / "client-home").exists()


# --- 2. a wallet key made on the way is announced ----------------------------------------------

def test_a_wallet_key_made_by_generate_is_announced_once_on_stderr(tmp_path: Path) -> None:
    """`serve` says "back it up before funding" when it makes a key; `generate` on an empty
    home made one silently. Said once, on stderr (stdout is the result), never the key."""
    first = run(tmp_path, "generate", "a red kite", "--json", CLAWROUTER_SANDBOX="true")
    assert first.returncode == 0, first.stderr
    key_file = tmp_path / "cli-home" / "wallet.key"
    assert (f"clawrouter: created a new wallet key in {key_file} (mode 0600): back it up "
            "before funding the wallet") in first.stderr
    assert "wallet key" not in first.stdout
    key = key_file.read_text().strip().removeprefix("0x")
    assert key not in first.stdout + first.stderr
    again = run(tmp_path, "generate", "a red kite", "--json", CLAWROUTER_SANDBOX="true")
    assert again.returncode == 0 and "created a new wallet key" not in again.stderr


def test_a_wallet_key_made_for_an_mcp_call_is_announced_on_stderr_not_stdout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """For `mcp`, stdout is the protocol: the warning goes to the log (stderr, the agent
    host's log), once, for the call whose gateway made the key."""
    from clawrouter.agents.mcp_server import Connection

    monkeypatch.setenv("CLAWROUTER_HOME", str(tmp_path / "client-home"))
    monkeypatch.setenv("CLAWROUTER_SANDBOX", "true")
    monkeypatch.setenv("CLAWROUTER_PORT", str(dead_port()))
    monkeypatch.delenv("CLAWROUTER_URL", raising=False)

    async def calls() -> None:
        connection = Connection()
        try:
            for _ in range(2):  # a gateway per call: the second finds the key
                await connection.run(lambda gateway: gateway.health())
        finally:
            await connection.aclose()

    with caplog.at_level("WARNING", logger="clawrouter.agents.mcp_server"):
        anyio.run(calls)
    said = [r.getMessage() for r in caplog.records if "created a new wallet key" in r.getMessage()]
    assert len(said) == 1 and "back it up before funding" in said[0]
    assert "wallet key" not in capsys.readouterr().out


# --- 3. each run is a new request ------------------------------------------------------------

def test_the_same_generate_run_twice_makes_two_images(tmp_path: Path, gateway: Any,
                                                      sandbox: Any) -> None:
    """As two SDK calls do: the second run is not answered with the first run's image ("paid
    by an identical request moments ago"). Its first try is marked as the SDK marks one."""
    made = [run(tmp_path, "generate", "a red kite", "--json", url=gateway.url) for _ in (1, 2)]
    for proc in made:
        assert proc.returncode == 0, proc.stderr
        assert as_json(proc)["shared"] is False
    assert sandbox.paid() == 2


def test_a_run_killed_while_paying_then_run_again_gets_that_paid_image(tmp_path: Path,
                                                                      gateway: Any,
                                                                      sandbox: Any) -> None:
    """A first try still takes a result paid for and never received: the user (or an agent's
    harness) that killed `generate` mid-request and runs it again gets the image that run
    paid for, not a second payment."""
    sandbox.faults({"kind": "delay", "phase": "paid", "seconds": 1.5})
    environ = cli_env(tmp_path, CLAWROUTER_URL=gateway.url)
    killed = subprocess.Popen([sys.executable, "-m", "clawrouter", "generate", "a red kite",
                               "--json"], env=environ, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while sandbox.stats()["payments_count"] == 0 and sandbox.paid() == 0:
        assert time.monotonic() < deadline and killed.poll() is None
        time.sleep(0.05)
    killed.send_signal(signal.SIGTERM)
    killed.communicate(timeout=20)
    assert killed.returncode == 130
    again = clawrouter_in_process("generate", "a red kite", "--json", env=environ)
    assert again.returncode == 0, again.stderr
    assert as_json(again)["shared"] is True
    assert sandbox.stats()["payments_count"] == 1


# --- 4. usage and set-up errors exit 2, before anything starts -------------------------------

@pytest.mark.parametrize("args", [("x", "-n", "0"), ("x", "-n", "11"), ("",), (" \n",)])
def test_a_count_or_prompt_out_of_range_is_refused_before_anything_starts(
        tmp_path: Path, args: tuple[str, ...]) -> None:
    proc = run(tmp_path, "generate", *args, CLAWROUTER_SANDBOX="true")
    assert proc.returncode == 2, proc.stderr
    assert "usage:" in proc.stderr and "started one" not in proc.stderr
    assert not (tmp_path / "cli-home").exists()  # no gateway, no wallet


def test_an_unreadable_settings_file_is_a_configuration_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It said "could not save the image: [Errno 13] … secret.toml" and exited 1, where every
    other command says "cannot use …" and exits 2 (this runs as root: the refusal is faked)."""
    secret = tmp_path / "secret.toml"
    secret.write_text('port = 1\n')
    real_open = builtins.open

    def refusing(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file) == str(secret):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing)
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: refusing(self, *a, **k))
    for command in (("generate", "x"), ("edit", "a.png", "x")):
        proc = run(tmp_path, *command, "--config", str(secret), CLAWROUTER_SANDBOX="true")
        assert proc.returncode == 2, proc.stderr
        assert f"cannot use {secret}: Permission denied" in proc.stderr
        assert "could not save" not in proc.stderr


def test_a_bad_wallet_key_exits_2_as_it_does_from_serve(tmp_path: Path) -> None:
    proc = run(tmp_path, "generate", "x", "--json", CLAWROUTER_SANDBOX="true",
               BLOCKRUN_WALLET_KEY="0x12")
    assert proc.returncode == 2, proc.stderr
    assert "BLOCKRUN_WALLET_KEY is malformed" in proc.stderr
    assert "malformed" in as_json(proc)["error"]["message"]
    assert "0x12" not in proc.stdout + proc.stderr


# --- 5. saved images follow the umask ------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_saved_images_get_the_mode_the_umask_gives(tmp_path: Path, umask: int,
                                                   mode: int) -> None:
    """An image the user asked to save is theirs to view and share: the mode any new file
    gets. The store's own copy in the data directory stays private."""
    before = os.umask(umask)
    try:
        proc = run(tmp_path, "generate", "x", "--json", CLAWROUTER_SANDBOX="true")
    finally:
        os.umask(before)
    assert proc.returncode == 0, proc.stderr
    saved = Path(as_json(proc)["images"][0]["path"])
    assert saved.stat().st_mode & 0o777 == mode
    stored = tmp_path / "cli-home" / "images" / saved.name
    assert stored.stat().st_mode & 0o777 == 0o600
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]  # no temp left


# --- 6. a failed save names where the paid image is; --out is a directory -----------------

def test_a_save_that_fails_after_paying_names_the_stored_copy_not_a_dead_url(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process gateway stops with the command: its URL is dead by the time the user
    reads the message. The stored copy in the data directory is named instead."""
    from clawrouter.cli import client

    def full(directory: Path, name: str, data: bytes) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(client, "_write", full)
    proc = run(tmp_path, "generate", "x", "--json", CLAWROUTER_SANDBOX="true")
    assert proc.returncode == 1, proc.stderr
    error = as_json(proc)["error"]
    assert error["code"] == "save_failed" and "127.0.0.1" not in error["message"]
    stored = next((tmp_path / "cli-home" / "images").glob("*.png"))
    assert f"the gateway stored it as {stored}" in error["message"]
    assert stored.read_bytes().startswith(PNG_MAGIC)
    assert "clawrouter images ls" in error["message"]


def test_a_save_that_fails_on_a_running_gateway_names_its_url(
        tmp_path: Path, gateway: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from clawrouter.cli import client

    def full(directory: Path, name: str, data: bytes) -> Path:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(client, "_write", full)
    proc = run(tmp_path, "generate", "x", "--json", url=gateway.url)
    assert proc.returncode == 1
    assert f"could not save {gateway.url}/images/" in as_json(proc)["error"]["message"]


def test_an_out_named_like_an_image_file_is_refused_not_made_a_directory(tmp_path: Path) -> None:
    """`--out x.png` made a directory called x.png. It is refused before anything starts
    (exit 2, CLAWROUTER_OUT so too: a usage error, nothing sent); a directory of that name
    that exists is used."""
    proc = run(tmp_path, "generate", "x", "--out", str(tmp_path / "x.png"),
               CLAWROUTER_SANDBOX="true")
    assert proc.returncode == 2 and "looks like a file name" in proc.stderr, proc.stderr
    env = run(tmp_path, "generate", "x", "--json", CLAWROUTER_SANDBOX="true",
              CLAWROUTER_OUT=str(tmp_path / "y.JPG"))
    assert env.returncode == 2 and as_json(env)["error"]["code"] == "bad_output_dir"
    assert "Nothing was sent or paid" in env.stderr
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.JPG").exists()
    assert not (tmp_path / "cli-home").exists()  # nothing started, no wallet made
    (tmp_path / "meant.png").mkdir()
    ok = run(tmp_path, "generate", "x", "--json", "--out", str(tmp_path / "meant.png"),
             CLAWROUTER_SANDBOX="true")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["images"][0]["path"].startswith(str(tmp_path / "meant.png"))
