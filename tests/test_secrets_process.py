"""The key and the payments in flight stay in the gateway's process: no core file holds them,
no plain-http hop to another machine carries them on mainnet, no viewer `generate --open`
starts inherits them, and a key file that is not text is a clear error, never its bytes.

Real processes (`clawrouter serve`, `generate`, `wallet`) with private homes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from clawrouter.config import load_settings
from clawrouter.payment.wallet import WalletError, load_wallet
from tests.servers import dead_port, free_port

KEY = "0x" + "4c" * 32
API_KEY = "a-bearer-key-for-this-gateway"
REPO = Path(__file__).resolve().parents[1]


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAWROUTER_", "BLOCKRUN_"))}
    env.update(HOME=str(tmp_path), CLAWROUTER_HOME=str(tmp_path / "home"),
               CLAWROUTER_RPC_URLS=f'["http://127.0.0.1:{dead_port()}/"]', **extra)
    return env


def clawrouter(tmp_path: Path, *args: str, input: str | None = None,
               **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clawrouter", *args], cwd=REPO, timeout=60,
                          env=environment(tmp_path, **env), capture_output=True, text=True,
                          input=input, start_new_session=True)


def _core_limit(pid: int) -> tuple[str, str]:
    line = next(line for line in Path(f"/proc/{pid}/limits").read_text().splitlines()
                if line.startswith("Max core file size"))
    soft, hard = line.split()[4:6]
    return soft, hard


def _cores_on() -> None:
    """In the child: core dumps on, as far as the hard limit allows (`ulimit -c unlimited`),
    whatever an in-process gateway of this worker set."""
    import resource
    hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))


@pytest.mark.skipif(not Path("/proc/self/limits").exists(), reason="reads /proc (Linux)")
def test_a_serving_gateway_never_writes_a_core_file(tmp_path: Path) -> None:
    """A core dump holds the wallet key and the live payment headers (the audit found both in
    one): `serve` (and every gateway the CLI and MCP start, through `start_gateway`) turns core
    dumps off, however it was started."""
    if _core_limit(os.getpid())[1] == "0":
        pytest.skip("core dumps are off for this whole process tree (hard limit 0)")
    out = tmp_path / "serve.out"
    with out.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "clawrouter", "serve", "--sandbox",
                                 "--port", str(free_port())], cwd=REPO, stdout=sink,
                                stderr=subprocess.DEVNULL, preexec_fn=_cores_on,
                                env=environment(tmp_path, BLOCKRUN_WALLET_KEY=KEY))
    try:
        deadline = time.monotonic() + 30
        while "ready" not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "ready" in out.read_text()
        soft, hard = _core_limit(proc.pid)
        assert soft == "0" and hard != "0"  # off, and the user may still turn them on
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.parametrize("url", ["http://blockrun.example/api", "http://10.0.0.8:8080/api",
                                 "http://[2001:db8::1]/api"])
def test_plain_http_to_another_machine_is_refused_on_mainnet(tmp_path: Path, url: str) -> None:
    """Every paid request carries a header anyone could settle: on Base mainnet it never
    crosses a network unencrypted. The setting is named, and how to fix it."""
    with pytest.raises(ValueError, match=r"upstream_url.*plain http.*https://") as refused:
        load_settings(None, home=tmp_path, upstream_url=url)
    assert "base-sepolia" in str(refused.value)
    done = clawrouter(tmp_path, "serve", "--port", str(dead_port()), BLOCKRUN_API_URL=url)
    assert done.returncode == 2 and "upstream_url" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("url, network", [
    ("https://blockrun.example/api", "base"), ("http://127.0.0.1:8403/api", "base"),
    ("http://localhost:8403/api", "base"), ("http://[::1]:8403/api", "base"),
    ("http://blockrun.example/api", "base-sepolia")])
def test_https_loopback_and_the_testnet_may_be_plain_http(tmp_path: Path, url: str,
                                                          network: str) -> None:
    """The sandbox, tests and a local proxy never leave this machine; the testnet's money is
    not real."""
    assert load_settings(None, home=tmp_path, upstream_url=url,
                         network=network).upstream_url == url


@pytest.mark.skipif(sys.platform in ("darwin", "win32"), reason="xdg-open is the opener here")
def test_generate_open_hands_the_viewer_no_secrets(tmp_path: Path, gateway: Any) -> None:
    """`--open` starts the desktop's viewer: it gets the user's environment (DISPLAY, PATH),
    not the wallet key or the gateway's API key, nor any other of our settings."""
    bin_dir, seen = tmp_path / "bin", tmp_path / "viewer-env"
    bin_dir.mkdir()
    opener = bin_dir / "xdg-open"
    opener.write_text(f"#!/bin/sh\nenv > '{seen}.tmp' && mv '{seen}.tmp' '{seen}'\n")
    opener.chmod(0o755)
    done = clawrouter(tmp_path, "generate", "a red kite", "--model", "cogview", "--open",
                      PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", KEEP_ME="visible",
                      CLAWROUTER_URL=gateway.url, CLAWROUTER_OUT=str(tmp_path / "out"),
                      BLOCKRUN_WALLET_KEY=KEY, CLAWROUTER_API_KEY=API_KEY)
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 15
    while not seen.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    viewer_env = seen.read_text()
    assert "KEEP_ME=visible" in viewer_env
    assert KEY[2:] not in viewer_env and API_KEY not in viewer_env
    assert not [line for line in viewer_env.splitlines()
                if line.upper().startswith(("CLAWROUTER_", "BLOCKRUN_"))]


def _utf16_key_file(home: Path) -> Path:
    """The key as PowerShell 5 writes it (`"0x…" > wallet.key`): UTF-16 with a BOM."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "wallet.key"
    path.write_bytes((KEY + "\r\n").encode("utf-16"))
    path.chmod(0o600)
    return path


def test_a_key_file_that_is_not_text_is_a_clear_error(tmp_path: Path) -> None:
    path = _utf16_key_file(tmp_path / "home")
    with pytest.raises(WalletError, match="not ASCII text .*UTF-16") as refused:
        load_wallet(tmp_path / "home", None)
    assert str(path) in str(refused.value) and "Set-Content -Encoding ascii" in str(refused.value)
    assert "4c4c" not in str(refused.value)


@pytest.mark.parametrize("command", [("wallet",), ("wallet", "--json"),
                                     ("wallet", "export", "--yes"),
                                     ("serve", "--sandbox", "--port", "0")])
def test_commands_name_a_key_file_that_is_not_text_without_a_traceback(tmp_path: Path,
                                                                       command: tuple) -> None:
    """It was a UnicodeDecodeError traceback: now one line saying what is wrong and how to
    rewrite the file, never what the file holds."""
    _utf16_key_file(tmp_path / "home")
    done = clawrouter(tmp_path, *command)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "not ASCII text" in done.stderr and "Traceback" not in done.stderr
    assert "4c4c" not in done.stdout + done.stderr


def test_doctor_names_a_key_file_that_is_not_text_and_how_to_rewrite_it(tmp_path: Path) -> None:
    _utf16_key_file(tmp_path / "home")
    done = clawrouter(tmp_path, "doctor")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "not ASCII text" in done.stdout and "rewrite the file as ASCII" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr and "4c4c" not in done.stdout


def test_import_force_keeps_a_key_file_that_is_not_text_as_it_was(tmp_path: Path) -> None:
    """Replacing it keeps a byte-for-byte backup: it may be the only copy of a funded key."""
    path = _utf16_key_file(tmp_path / "home")
    old = path.read_bytes()
    new_key = "0x" + "5d" * 32
    done = clawrouter(tmp_path, "wallet", "import", "--yes", "--force", input=new_key)
    assert done.returncode == 0, done.stderr
    assert "unreadable key" in done.stderr and "Traceback" not in done.stderr
    (backup,) = path.parent.glob("wallet.key.bak-*")
    assert backup.read_bytes() == old and (backup.stat().st_mode & 0o777) == 0o600
    assert path.read_text().strip() == new_key
