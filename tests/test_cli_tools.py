"""The terminal tools as a user runs them: `clawrouter generate/edit/models/status/doctor/mcp`
against a real gateway on the sandbox upstream; `--json` to assert. A command runs by
`clawrouter.cli.main` in this process (`run`: its own environment, working folder, stdout and
stderr) unless the test is about processes: signals, pipes, one process waiting for another."""

from __future__ import annotations

import base64
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route

from clawrouter import catalog
from clawrouter.sandbox.images import make_png
from tests.servers import (clawrouter_command, clawrouter_in_process, dead_port, free_port,
                           serving)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MY_COMMANDS = ("generate", "edit", "models", "status", "doctor", "mcp")


def run(tmp_path: Path, *args: str, url: str | None = None, cwd: Path | None = None,
        **env: str) -> subprocess.CompletedProcess[str]:
    """Run `clawrouter ARGS` (in this process) with a private home and output directory, on
    the gateway at `url`; without one, nothing answers where its settings look (a dead
    CLAWROUTER_PORT), so a command that may start its own gateway does."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("CLAWROUTER_", "BLOCKRUN_"))}
    environ.update(CLAWROUTER_HOME=str(tmp_path / "cli-home"), CLAWROUTER_OUT=str(tmp_path / "out"))
    environ.update({"CLAWROUTER_URL": url} if url else {"CLAWROUTER_PORT": str(dead_port())})
    environ.update(env)
    return clawrouter_in_process(*args, env=environ, cwd=cwd)


def as_json(proc: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(proc.stdout)  # the whole of stdout is one document


# --- generate / edit -----------------------------------------------------------------------

def test_generate_json_saves_pngs_and_reports_cost(tmp_path: Path, gateway: Any,
                                                   sandbox: Any) -> None:
    proc = run(tmp_path, "generate", "a red kite", "--model", "banana", "-n", "2", "--json",
               url=gateway.url)
    assert proc.returncode == 0, proc.stderr
    out = as_json(proc)
    assert out["model"] == "google/nano-banana"
    assert out["cost_usd"] == "0.106"  # 2 × 0.05 × 1.05 + 0.001
    # its upstream is the sandbox (marked so) and it pays on Base Sepolia: no real money
    assert len(out["images"]) == 2 and out["in_process"] is False and out["sandbox"] is True
    for image in out["images"]:
        path = Path(image["path"])
        assert path.parent == tmp_path / "out" and path.read_bytes().startswith(PNG_MAGIC)
        assert image["url"] == f"{gateway.url}/images/{path.name}"
    assert sandbox.paid() == 1


def test_generate_prints_paths_urls_and_cost(tmp_path: Path, gateway: Any) -> None:
    proc = run(tmp_path, "generate", "a red kite", "--out", str(tmp_path / "mine"),
               url=gateway.url)
    assert proc.returncode == 0, proc.stderr
    saved = list((tmp_path / "mine").glob("*.png"))
    assert len(saved) == 1
    assert str(saved[0]) in proc.stdout and f"/images/{saved[0].name}" in proc.stdout
    assert "$0.0535" in proc.stdout and "google/nano-banana" in proc.stdout


def test_an_unusable_output_directory_is_said_to_have_cost_nothing(tmp_path: Path, gateway: Any,
                                                                     sandbox: Any) -> None:
    """`--out` is checked before paying: its failure must not read as a paid image lost
    ('could not save the image') nor as a bad configuration."""
    (tmp_path / "afile").write_text("")
    for out in (str(tmp_path / "afile" / "sub"), "/proc/clawrouter-out"):
        proc = run(tmp_path, "generate", "a red kite", "--out", out, url=gateway.url)
        assert proc.returncode == 2, proc.stderr  # the usage's fault: nothing was sent
        assert "Nothing was sent or paid" in proc.stderr and "could not save" not in proc.stderr
        assert "invalid configuration" not in proc.stderr
    assert sandbox.round_trips() == 0


def test_edit_sends_a_relative_local_path_as_absolute(tmp_path: Path, gateway: Any) -> None:
    (tmp_path / "photo.png").write_bytes(make_png(64, 64, seed=3))
    proc = run(tmp_path, "edit", "photo.png", "add a rainbow", "--json", url=gateway.url,
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = as_json(proc)
    assert out["model"] == catalog.DEFAULT_EDIT_MODEL and out["cost_usd"] == "0.022"
    assert Path(out["images"][0]["path"]).read_bytes().startswith(PNG_MAGIC)


def test_edit_sources_are_made_absolute_only_when_the_gateway_reads_them_as_paths(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`clawrouter edit` and the MCP `edit_image` tool send every input form the gateway takes:
    only a local path (or a file URL, as its path) is made absolute, since the gateway's working
    folder differs from ours; URLs in any case, data URIs and base64 go as given."""
    from clawrouter.cli.client import source_arg

    monkeypatch.chdir(tmp_path)
    here = tmp_path.resolve()
    raw = base64.b64encode(make_png(8, 8, seed=1)).decode()
    for given in ("HTTPS://example.com/a.png", "Http://example.com/a.png",
                  "DATA:image/png;base64," + raw, raw, "file://otherhost/x.png"):
        assert source_arg(given) == given
    assert source_arg("file:///tmp/x%20y.png") == str(Path("/tmp/x y.png").resolve())
    assert source_arg("file://localhost/tmp/x.png") == str(Path("/tmp/x.png").resolve())
    assert source_arg("./x.png") == str(here / "x.png")
    assert source_arg("x.png") == str(here / "x.png")
    assert source_arg("sub/x.png") == str(here / "sub" / "x.png")
    for malformed in ("file:///tmp/a%00b.png", "a\x00b.png"):  # the gateway says why not
        assert source_arg(malformed) == malformed


def this_machines_address() -> str:
    """A non-loopback address of this machine (no packet is sent), for a 'remote' gateway."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
            address = probe.getsockname()[0]
        except OSError:
            address = "127.0.0.1"
    if address.startswith("127."):
        pytest.skip("this machine has no non-loopback IPv4 address to serve a gateway on")
    return address


def test_edit_sends_local_files_to_a_gateway_on_another_address_as_data(
        tmp_path: Path, make_gateway: Any, sandbox: Any) -> None:
    """A gateway that is not on loopback (another machine, as far as the CLI can tell) would
    look for the path on its own disk, and refuses local paths anyway: the CLI reads the file
    itself, under this machine's file policy, and sends the bytes."""
    gateway = make_gateway(host=this_machines_address(), api_key="k")
    (tmp_path / "photo.png").write_bytes(make_png(64, 64, seed=3))
    proc = run(tmp_path, "edit", "photo.png", "add a rainbow", "--json", url=gateway.url,
               cwd=tmp_path, CLAWROUTER_API_KEY="k")
    assert proc.returncode == 0, proc.stderr
    assert Path(as_json(proc)["images"][0]["path"]).read_bytes().startswith(PNG_MAGIC)
    assert sandbox.paid() == 1
    # The policy is this machine's: the data directory (the wallet key) is never read.
    home = tmp_path / "cli-home"
    home.mkdir()
    (home / "wallet.png").write_bytes(make_png(64, 64, seed=4))
    trips = sandbox.round_trips()
    refused = run(tmp_path, "edit", str(home / "wallet.png"), "x", "--json", url=gateway.url,
                  CLAWROUTER_API_KEY="k")
    assert refused.returncode == 1
    error = as_json(refused)["error"]
    assert error["code"] == "path_refused" and error["param"] == "image"
    assert "data directory" in error["message"] and sandbox.round_trips() == trips


def test_a_refused_request_exits_1_with_the_gateways_message(tmp_path: Path, gateway: Any,
                                                              sandbox: Any) -> None:
    proc = run(tmp_path, "edit", "/etc/passwd", "x", "--json", url=gateway.url)
    assert proc.returncode == 1
    assert "outside the allowed folders" in as_json(proc)["error"]["message"]
    assert "outside the allowed folders" in proc.stderr
    proc = run(tmp_path, "generate", "x", "--model", "dall-e-2", url=gateway.url)
    assert proc.returncode == 1 and "Unknown image model" in proc.stderr and proc.stdout == ""
    assert sandbox.paid() == 0


def test_a_result_the_gateway_would_not_fetch_is_not_fetched_by_the_cli_either(
        tmp_path: Path, gateway: Any, sandbox: Any) -> None:
    """The gateway hands back, unfetched, a result URL into the local network; `generate`
    must not fetch it for the user (it says where the paid image is instead)."""
    hits: list[str] = []

    async def internal(request: Any) -> Any:
        hits.append(request.url.path)
        return Response(make_png(8, 8, seed=1), media_type="image/png")

    with serving(Starlette(routes=[Route("/latest/meta-data", internal)])) as lan:
        remote = lan.url.replace("127.0.0.1", "localhost") + "/latest/meta-data"
        sandbox.faults({"kind": "respond", "phase": "paid", "status": 200, "settle": True,
                        "body": {"created": 1, "data": [{"url": remote}]}})
        proc = run(tmp_path, "generate", "x", "--json", url=gateway.url)
    assert proc.returncode == 1, proc.stdout
    error = as_json(proc)["error"]
    assert error["code"] == "download_failed" and remote in error["message"]
    assert hits == [] and not list((tmp_path / "out").glob("*"))


def test_generate_runs_the_gateway_in_process_when_none_answers(tmp_path: Path) -> None:
    proc = run(tmp_path, "generate", "a quiet harbour", "--json", CLAWROUTER_SANDBOX="true")
    assert proc.returncode == 0, proc.stderr
    out = as_json(proc)
    assert out["in_process"] is True and out["sandbox"] is True
    assert Path(out["images"][0]["path"]).read_bytes().startswith(PNG_MAGIC)
    assert "started one in this process" in proc.stderr
    plain = run(tmp_path, "generate", "a quiet harbour", CLAWROUTER_SANDBOX="true")
    assert "in the sandbox (no real payment" in plain.stdout, plain.stdout


def test_an_api_key_from_the_config_file_reaches_the_in_process_gateway(tmp_path: Path) -> None:
    home = tmp_path / "cli-home"
    home.mkdir()
    (home / "config.toml").write_text('api_key = "from-the-file"\n')
    proc = run(tmp_path, "generate", "a quiet harbour", "--json", CLAWROUTER_SANDBOX="true")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_public_url_in_the_config_does_not_stop_local_files_on_this_machine(
        tmp_path: Path, make_gateway: Any, sandbox: Any) -> None:
    """`public_url` is for the proxy in front of `serve`: the gateway a command starts for
    itself is reached by nothing else, and a `serve` that takes no paths (it serves others)
    gets the file's bytes from the command instead."""
    (tmp_path / "photo.png").write_bytes(make_png(64, 64, seed=3))
    env = {"CLAWROUTER_PUBLIC_URL": "https://gw.example.com", "CLAWROUTER_API_KEY": "k"}
    proc = run(tmp_path, "edit", "photo.png", "add a rainbow", "--json", cwd=tmp_path,
               CLAWROUTER_SANDBOX="true", **env)
    assert proc.returncode == 0, proc.stderr
    assert as_json(proc)["in_process"] is True
    served = make_gateway(public_url="https://gw.example.com", api_key="k")
    proc = run(tmp_path, "edit", "photo.png", "add a rainbow", "--json", cwd=tmp_path,
               url=served.url, **env)
    assert proc.returncode == 0, proc.stderr
    assert as_json(proc)["in_process"] is False and sandbox.paid() == 1


def test_an_upstream_error_named_like_the_path_refusal_is_never_resent(
        tmp_path: Path, gateway: Any, sandbox: Any) -> None:
    """The edit's resend (files as bytes) follows only the gateway's own refusal, made before
    any payment: an upstream's answer after payment may carry any code, that one too, and
    must not be paid again."""
    (tmp_path / "photo.png").write_bytes(make_png(64, 64, seed=3))
    sandbox.faults({"kind": "respond", "phase": "paid", "status": 400,
                    "body": {"error": {"message": "no", "code": "local_files_disabled"}}})
    proc = run(tmp_path, "edit", "photo.png", "add a rainbow", "--json", url=gateway.url,
               cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert sandbox.stats()["payments_count"] == 1
    assert as_json(proc)["error"]["payment"] not in (None, "none")  # a script must know


def test_a_gateway_that_wants_a_key_says_so_and_shows_nothing_without_it(
        tmp_path: Path, make_gateway: Any) -> None:
    """Its /health answers anyone, but with the wallet only for the key's holders; the CLI
    reads that answer as "set the key", not as "not a clawrouter gateway"."""
    gateway = make_gateway(api_key="local-secret")
    proc = run(tmp_path, "status", url=gateway.url)
    assert proc.returncode != 0
    assert "wants an API key: set CLAWROUTER_API_KEY" in proc.stdout + proc.stderr
    assert gateway.gw.address not in proc.stdout + proc.stderr
    with_key = httpx.get(gateway.url + "/health", headers={"authorization": "Bearer local-secret"})
    assert with_key.json()["wallet"] == gateway.gw.address


def test_a_proxy_in_the_environment_never_sees_the_gateway_traffic(tmp_path: Path,
                                                                    make_gateway: Any) -> None:
    """HTTP_PROXY is for the internet; the gateway is local, and its API key must not leave."""
    gateway = make_gateway(api_key="local-secret")
    seen: list[bytes] = []
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        proxy.settimeout(0.2)
        address = f"http://127.0.0.1:{proxy.getsockname()[1]}"
        env = {"HTTP_PROXY": address, "HTTPS_PROXY": address, "ALL_PROXY": address,
               "http_proxy": address, "CLAWROUTER_API_KEY": "local-secret"}
        proc = run(tmp_path, "status", "--json", url=gateway.url, **env)
        try:
            conn, _ = proxy.accept()
            seen.append(conn.recv(65536))
            conn.close()
        except (TimeoutError, OSError):
            pass
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert seen == []


def test_a_terminated_paid_request_says_a_payment_may_be_under_way(tmp_path: Path,
                                                                      gateway: Any,
                                                                      sandbox: Any) -> None:
    """An agent's shell timeout sends SIGTERM: the command must not die silently while the
    gateway may have paid, or the agent retries into a second payment."""
    # the command is stopped as soon as the payment arrives, seconds before its answer (which
    # the gateway waits for before this test's end lets it stop)
    sandbox.faults({"kind": "delay", "phase": "paid", "seconds": 1.5})
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("CLAWROUTER_", "BLOCKRUN_"))}
    environ.update(CLAWROUTER_HOME=str(tmp_path / "cli-home"),
                   CLAWROUTER_OUT=str(tmp_path / "out"), CLAWROUTER_URL=gateway.url)
    proc = subprocess.Popen([sys.executable, "-m", "clawrouter", "generate", "x", "--json"],
                            env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 20
    while sandbox.stats()["payments_count"] == 0 and sandbox.paid() == 0:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.terminate()
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, (out, err)
    assert "clawrouter stats" in err and "may already have paid" in err
    assert as_json(subprocess.CompletedProcess([], 0, out))["error"]["code"] == "interrupted"


def cli_env(tmp_path: Path, **env: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("CLAWROUTER_", "BLOCKRUN_"))}
    environ.update(CLAWROUTER_HOME=str(tmp_path / "cli-home"), CLAWROUTER_OUT=str(tmp_path / "out"),
                   **env)
    return environ


def wait_for_ledger_holder(tmp_path: Path, proc: subprocess.Popen[Any]) -> None:
    """Until `proc`'s own gateway holds the sandbox ledger (its pid in the lock file)."""
    lock = tmp_path / "cli-home" / "ledger-base-sepolia.sqlite3.lock"
    deadline = time.monotonic() + 30
    while not (lock.exists() and lock.read_text().split("\n")[0] == str(proc.pid)):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)


def first_line(proc: subprocess.Popen[str], timeout: float = 30) -> str:
    """`proc`'s first line on stderr, or "" if it writes none within `timeout` (a command
    that waits silently would otherwise keep the test waiting for its whole LEDGER_WAIT)."""
    assert proc.stderr is not None
    ready, _, _ = select.select([proc.stderr], [], [], timeout)
    return proc.stderr.readline() if ready else ""


def test_a_second_command_waits_for_the_one_running_its_own_gateway(tmp_path: Path) -> None:
    """The ledger is one process's at a time. Agents run tool calls in parallel: the second
    command waits for the first (saying so, and whose turn it is) instead of failing."""
    environ = cli_env(tmp_path, CLAWROUTER_SANDBOX="true", CLAWROUTER_PORT=str(dead_port()))
    # The first is paused (SIGSTOP) while it holds the ledger until the second says it waits,
    # so its slow job need not outlast the second's start: 1 s, polled every 0.2 s.
    first = subprocess.Popen(clawrouter_command(
        "generate", "slow one", "--model", "gpt-image-2", "--json",
        constants={"clawrouter.launch.SANDBOX_SLOW_SECONDS": 1.0}),
        env=environ | {"CLAWROUTER_POLL_DELAY": "0.2", "CLAWROUTER_POLL_INTERVAL": "0.2"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second: subprocess.Popen[str] | None = None
    try:
        wait_for_ledger_holder(tmp_path, first)
        first.send_signal(signal.SIGSTOP)
        second = subprocess.Popen([sys.executable, "-m", "clawrouter", "generate", "x",
                                   "--json"], env=environ, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        waiting = first_line(second)
        first.send_signal(signal.SIGCONT)
        first_out, first_err = first.communicate(timeout=60)
        second_out, second_err = second.communicate(timeout=60)
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.kill()
                proc.wait(timeout=20)
    assert first.returncode == 0, first_err
    assert second.returncode == 0, waiting + second_err
    assert (f"another clawrouter process (pid {first.pid}) is using this wallet's ledger; "
            "waiting for it to finish") in waiting
    images = [as_json(subprocess.CompletedProcess([], 0, out))["images"][0]["path"]
              for out in (first_out, second_out)]
    assert all(Path(path).read_bytes().startswith(PNG_MAGIC) for path in images)
    stats = as_json(run(tmp_path, "stats", "--json", CLAWROUTER_SANDBOX="true",
                        CLAWROUTER_NETWORK="base-sepolia"))
    assert stats["total"]["payments"] == 2 and stats["total"]["pending"]["payments"] == 0


def test_commands_find_the_gateway_where_serve_listens_with_the_same_settings(
        tmp_path: Path, make_gateway: Any) -> None:
    """`clawrouter serve` with a port and an API key in config.toml: the other commands look
    there too, with that key (they used to look only at 8402, start a gateway of their own
    and fail on the busy ledger, or stop at 'set CLAWROUTER_API_KEY')."""
    # The same data directory, paying with a key of its own (not the directory's wallet.key):
    # it is recognised as the directory's by the instance id in its ledger's lock file.
    gateway = make_gateway(api_key="from-the-file", home=tmp_path / "cli-home")
    port = gateway.url.rsplit(":", 1)[1]
    environ = cli_env(tmp_path)
    (tmp_path / "cli-home" / "config.toml").write_text(
        f'port = {port}\napi_key = "from-the-file"\n')

    def clawrouter(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return clawrouter_in_process(*args, env=environ | env)

    status = clawrouter("status", "--json")
    assert status.returncode == 0, status.stderr
    assert as_json(status)["url"] == gateway.url
    made = clawrouter("generate", "x", "--json")
    assert made.returncode == 0, made.stderr
    out = as_json(made)
    assert out["in_process"] is False and out["images"][0]["url"].startswith(gateway.url)
    doctor = as_json(clawrouter("doctor", "--json"))
    port_check = next(c for c in doctor["checks"] if c["name"] == "port")
    assert "serving clawrouter" in port_check["detail"] and "API_KEY" not in port_check["detail"]
    # The key is the configured gateway's: a gateway named some other way never receives it.
    elsewhere = clawrouter("status", "--json", CLAWROUTER_URL=gateway.url)
    assert elsewhere.returncode == 1 and as_json(elsewhere)["error"]["status"] == 401


def test_commands_use_the_gateway_holding_the_ledger_wherever_it_listens(
        tmp_path: Path) -> None:
    """`clawrouter serve --port P` (a flag the other commands cannot know): they find its
    address in the ledger's lock file and use it, rather than wait for it to stop."""
    environ = cli_env(tmp_path, CLAWROUTER_PORT=str(dead_port()))
    port = free_port()
    serve = subprocess.Popen([sys.executable, "-m", "clawrouter", "serve", "--sandbox",
                              "--port", str(port)], env=environ, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert serve.stdout is not None and "ready" in serve.stdout.readline()
        made = clawrouter_in_process("generate", "x", "--json", env=environ)
        stats = clawrouter_in_process("stats",  # the sandbox's
                                      env=environ | {"CLAWROUTER_NETWORK": "base-sepolia"})
    finally:
        serve.terminate()
        serve.wait(timeout=20)
    assert made.returncode == 0, made.stderr
    out = as_json(made)
    assert out["in_process"] is False and out["sandbox"] is True
    assert out["images"][0]["url"].startswith(f"http://127.0.0.1:{port}/images/")
    assert "waiting" not in made.stderr
    assert stats.returncode == 0, stats.stderr
    assert f"from the gateway at http://127.0.0.1:{port}" in stats.stdout


def test_a_holder_that_says_where_it_listens_only_later_is_still_found(
        tmp_path: Path, make_gateway: Any, sandbox: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve` holds the ledger before it listens, and writes its address after: a command
    that found the ledger busy reads the lock file again while it waits."""
    import asyncio
    import threading

    from clawrouter.cli.client import connect
    from tests.conftest import gateway_settings

    monkeypatch.delenv("CLAWROUTER_URL", raising=False)
    monkeypatch.delenv("CLAWROUTER_API_KEY", raising=False)
    settings = gateway_settings(tmp_path / "held", sandbox.api, port=dead_port())
    holding = make_gateway(home=settings.home)  # holds the ledger, not yet saying where
    threading.Timer(1.0, holding.gw.ledger.advertise, (holding.url,)).start()
    began = time.monotonic()

    async def found() -> str:
        async with await connect(settings=settings, wait=20) as gateway:
            return gateway.url

    assert asyncio.run(found()) == holding.url
    assert time.monotonic() - began < 10


def test_a_serve_elsewhere_is_found_when_another_program_has_the_configured_port(
        tmp_path: Path, make_gateway: Any, sandbox: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve --port 9000` because a web server took 8402: the commands use the serve the
    ledger's lock file names instead of stopping at the web server."""
    import asyncio

    from starlette.applications import Starlette

    from clawrouter.cli.client import connect
    from tests.conftest import gateway_settings
    from tests.servers import ServerThread

    monkeypatch.delenv("CLAWROUTER_URL", raising=False)
    monkeypatch.delenv("CLAWROUTER_API_KEY", raising=False)
    other = ServerThread(Starlette()).start()  # answers 404 to everything
    try:
        settings = gateway_settings(tmp_path / "held", sandbox.api, port=other.port)
        holding = make_gateway(home=settings.home)
        holding.gw.ledger.advertise(holding.url)

        async def found() -> str:
            async with await connect(settings=settings, start=False) as gateway:
                return gateway.url

        assert asyncio.run(found()) == holding.url
    finally:
        other.stop()


def test_a_gateway_of_another_data_directory_is_named_not_used(
        tmp_path: Path, make_gateway: Any, sandbox: Any) -> None:
    """Another CLAWROUTER_HOME's `serve` (or a container's) at the port these settings give
    would pay from a wallet this data directory does not name: the commands stop, say how to
    choose, and pay nothing. Named by CLAWROUTER_URL, or paying from this directory's wallet,
    it is used."""
    from clawrouter.cli.wallet import address_of

    other = make_gateway()
    home = doctor_home(tmp_path)  # this directory's own wallet.key
    environ = cli_env(tmp_path, CLAWROUTER_PORT=other.url.rsplit(":", 1)[1])

    def clawrouter(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return clawrouter_in_process(*args, env=environ | env)

    paid = sandbox.paid()
    made = clawrouter("generate", "x", "--json")
    assert made.returncode == 1, made.stderr
    error = as_json(made)["error"]
    assert error["code"] == "other_data_directory"
    assert f"pays from wallet {other.gw.address}" in error["message"]
    assert f"({home}) has wallet {address_of('0x' + '11' * 32)}" in error["message"]
    assert f"set CLAWROUTER_URL={other.url}" in error["message"]
    status = clawrouter("status")
    assert status.returncode == 1 and "belongs to another data directory" in status.stderr
    doctor = as_json(clawrouter("doctor", "--json", BLOCKRUN_API_URL=sandbox.api))
    port = next(c for c in doctor["checks"] if c["name"] == "port")
    assert port["status"] == "fail" and other.gw.address in port["detail"]
    fresh = clawrouter("generate", "x", "--json", CLAWROUTER_HOME=str(tmp_path / "fresh"))
    assert fresh.returncode == 1 and "has no wallet yet" in as_json(fresh)["error"]["message"]
    assert not (tmp_path / "fresh").exists()  # no wallet created, no gateway started
    assert sandbox.paid() == paid and not list(home.glob("ledger*"))

    named = clawrouter("generate", "x", "--json", CLAWROUTER_URL=other.url)
    assert named.returncode == 0, named.stderr
    same_wallet = clawrouter("generate", "y", "--json", BLOCKRUN_WALLET_KEY=(
        other.gw.settings.wallet_key.get_secret_value()))
    assert same_wallet.returncode == 0, same_wallet.stderr
    assert as_json(same_wallet)["images"][0]["url"].startswith(other.url)
    assert sandbox.paid() == paid + 2


def test_interrupted_while_waiting_for_the_ledger_says_nothing_was_paid(tmp_path: Path) -> None:
    from clawrouter.payment.ledger import Ledger

    environ = cli_env(tmp_path, CLAWROUTER_SANDBOX="true", CLAWROUTER_PORT=str(dead_port()))
    # The sandbox ledger held here for the whole test, as a command running its own gateway
    # holds it (a real one would have to outlast the second's start).
    with Ledger(tmp_path / "cli-home" / "ledger-base-sepolia.sqlite3"):
        second = subprocess.Popen([sys.executable, "-m", "clawrouter", "generate", "x",
                                   "--json"], env=environ, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            line = first_line(second)  # the note that it waits
            assert "waiting for it to finish" in line
            second.terminate()
            out, err = second.communicate(timeout=20)
        finally:
            second.kill()
            second.wait(timeout=20)
    assert second.returncode == 130
    assert "nothing was paid" in err and "may already have paid" not in err
    assert as_json(subprocess.CompletedProcess([], 0, out))["error"]["code"] == "interrupted"


def test_usage_and_configuration_errors_exit_2(tmp_path: Path) -> None:
    assert run(tmp_path, "generate").returncode == 2
    assert run(tmp_path, "generate", "x", "-n", "many").returncode == 2
    proc = run(tmp_path, "generate", "x", CLAWROUTER_MAX_USD_PER_DAY="lots")
    assert proc.returncode == 2 and "invalid configuration" in proc.stderr


# --- models / status / doctor --------------------------------------------------------------

def test_models_json_is_the_catalog(tmp_path: Path) -> None:
    proc = run(tmp_path, "models", "--json")
    assert proc.returncode == 0
    cards = as_json(proc)["data"]
    assert [c["id"] for c in cards] == [m.id for m in catalog.MODELS]
    banana = cards[0]
    assert banana["aliases"] == ["nano-banana", "banana"] and banana["edits"] is True
    assert banana["prices"] == {"1024x1024": 0.0525}


def test_models_table_lists_ids_aliases_sizes_prices_and_edits(tmp_path: Path) -> None:
    proc = run(tmp_path, "models")
    assert proc.returncode == 0
    rows = [line for line in proc.stdout.splitlines() if line and "/" in line.split()[0]]
    lines = {line.split()[0]: line for line in rows}
    assert set(lines) == {m.id for m in catalog.MODELS}
    gpt1 = lines["openai/gpt-image-1"]
    assert "gpt-image" in gpt1 and "1536x1024" in gpt1 and "$0.021–$0.042" in gpt1
    assert "mask" in gpt1 and lines["zai/cogview-4"].rstrip().endswith("no")


def test_status_json_reports_health_spend_and_budget(tmp_path: Path, make_gateway: Any) -> None:
    gateway = make_gateway(max_usd_per_day=3.0)
    gateway.http.post("/v1/images/generations", json={"prompt": "x"}).raise_for_status()
    proc = run(tmp_path, "status", "--json", url=gateway.url + "/v1")
    assert proc.returncode == 0, proc.stderr
    out = as_json(proc)
    assert out["url"] == gateway.url
    assert out["health"]["wallet"] == gateway.gw.address
    assert out["spend"]["today"]["usd"] == pytest.approx(0.0535)
    assert out["spend"]["budget"]["day"]["remaining_usd"] == pytest.approx(3.0 - 0.0535)
    text = run(tmp_path, "status", url=gateway.url)
    assert text.returncode == 0 and gateway.gw.address in text.stdout and "$0.0535" in text.stdout
    assert "$2.9465 left today" in text.stdout


def test_status_without_a_gateway_exits_1(tmp_path: Path) -> None:
    proc = run(tmp_path, "status")
    assert proc.returncode == 1 and "No clawrouter gateway answers" in proc.stderr
    assert not (tmp_path / "cli-home").exists()  # status never starts a gateway


def doctor_home(tmp_path: Path, mode: int = 0o600) -> Path:
    home = tmp_path / "cli-home"
    home.mkdir()
    key = home / "wallet.key"
    key.write_text("0x" + "11" * 32 + "\n")
    key.chmod(mode)
    return home


def test_doctor_json_all_ok_next_to_a_running_gateway(tmp_path: Path, make_gateway: Any,
                                                      sandbox: Any) -> None:
    gateway = make_gateway(home=doctor_home(tmp_path), wallet_key=None)  # its wallet.key
    proc = run(tmp_path, "doctor", "--json", CLAWROUTER_PORT=str(gateway.server.port),
               BLOCKRUN_API_URL=sandbox.api)
    assert proc.returncode == 0, proc.stdout
    out = as_json(proc)
    status = {c["name"]: c["status"] for c in out["checks"]}
    assert out["ok"] is True
    assert status == {"config": "ok", "wallet": "ok", "data dir": "ok", "port": "ok",
                      "upstream": "ok", "balance": "skip"}
    port = next(c for c in out["checks"] if c["name"] == "port")
    assert "serving clawrouter" in port["detail"]


def test_doctor_finds_the_gateway_serving_on_another_port(tmp_path: Path, make_gateway: Any,
                                                         sandbox: Any) -> None:
    """`serve --port 18435`: the commands find it by the ledger's lock file, and so does
    doctor (it said the default port was free and the balance unknown)."""
    gateway = make_gateway(home=doctor_home(tmp_path), wallet_key=None)
    gateway.gw.ledger.advertise(gateway.url)
    proc = run(tmp_path, "doctor", "--json", CLAWROUTER_PORT=str(free_port()),
               BLOCKRUN_API_URL=sandbox.api)
    assert proc.returncode == 0, proc.stdout
    port = next(c for c in as_json(proc)["checks"] if c["name"] == "port")
    assert port["status"] == "ok"
    assert port["detail"].endswith(f"is free; this data directory's gateway serves at "
                                   f"{gateway.url}")


def test_doctor_names_each_failure_with_a_fix(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # the taken port never answers: its probe waits this long, not 2 s, before saying so
    monkeypatch.setattr("clawrouter.cli.client.PROBE_TIMEOUT", httpx.Timeout(0.3))
    home = doctor_home(tmp_path, mode=0o644)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = run(tmp_path, "doctor", "--json", CLAWROUTER_PORT=str(taken.getsockname()[1]),
                   BLOCKRUN_API_URL=f"http://127.0.0.1:{dead_port()}/api")
    assert proc.returncode == 1
    checks = {c["name"]: c for c in as_json(proc)["checks"]}
    assert checks["wallet"]["status"] == "fail"
    assert checks["wallet"]["fix"] == f"chmod 600 {home / 'wallet.key'}"
    assert checks["port"]["status"] == "fail" and "CLAWROUTER_PORT" in checks["port"]["fix"]
    assert checks["upstream"]["status"] == "fail" and checks["upstream"]["fix"]
    text = run(tmp_path, "doctor", BLOCKRUN_API_URL=f"http://127.0.0.1:{dead_port()}/api")
    assert text.returncode == 1 and "fix: chmod 600" in text.stdout


def test_doctor_reports_a_bad_configuration(tmp_path: Path) -> None:
    proc = run(tmp_path, "doctor", "--json", CLAWROUTER_PORT="not-a-port")
    assert proc.returncode == 1
    config = as_json(proc)["checks"][0]
    assert config["name"] == "config" and config["status"] == "fail" and config["fix"]


# --- help ----------------------------------------------------------------------------------

def _subparsers() -> dict[str, Any]:
    import argparse

    from clawrouter.cli import parser

    action = next(a for a in parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("command", MY_COMMANDS)
def test_help_is_complete(tmp_path: Path, command: str) -> None:
    proc = run(tmp_path, command, "--help")
    assert proc.returncode == 0 and proc.stderr == ""
    help_text = " ".join(proc.stdout.split())
    for action in _subparsers()[command]._actions:
        assert action.help, f"{command}: {action.dest} has no help"
        for option in action.option_strings:
            assert option in help_text, f"{command} --help does not mention {option}"
        if not action.option_strings and action.dest != "help":
            assert (action.metavar or action.dest) in help_text


def test_every_other_command_has_a_complete_help() -> None:
    """serve, sandbox, wallet …, stats, images …: a description, and help for every option."""
    import argparse

    def walk(name: str, parser: argparse.ArgumentParser) -> None:
        assert parser.description, f"{name} has no description"
        assert parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, subparser in action.choices.items():
                    walk(f"{name} {sub}", subparser)
            else:
                assert action.help, f"{name}: {action.dest} has no help"

    for command, parser in _subparsers().items():
        if command not in MY_COMMANDS:
            walk(command, parser)


def test_only_the_gateways_own_image_urls_keep_their_file_names() -> None:
    """A name chosen by whoever answered could overwrite another saved image: such results are
    saved under their content hash."""
    from clawrouter.store.links import image_name as _own_image_name

    image = "5f0c8e2a9b1d4c7e8a3f6b2d1e9c0a47.png"
    assert _own_image_name(f"http://localhost:8402/images/{image}") == image
    for other in (f"https://cdn.example/x/{image}", f"http://h/images/../{image}",
                  f"http://h/images/{image}/more", "data:image/png;base64,AAAA", image,
                  "http://h/images/not-an-id.png"):
        assert _own_image_name(other) is None, other


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path: Path) -> None:
    """`clawrouter models | head -1`: the pipe closes under the command, which stops quietly
    (as a program killed by SIGPIPE would) instead of printing a BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line is written
    try:
        done = subprocess.run([sys.executable, "-m", "clawrouter", "models"], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=60,
                              env={**os.environ, "CLAWROUTER_HOME": str(tmp_path)})
    finally:
        os.close(write)
    assert done.stderr == "" and done.returncode == 141


def test_stats_says_whose_time_zone_its_days_and_times_are_in(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """Days are summed by the gateway, in its zone; payment times are printed here, in ours:
    a header naming one zone for both would misdate one of them."""
    import time as clock

    from clawrouter.cli.stats import render
    from clawrouter.payment.ledger import Ledger

    ledger = Ledger(tmp_path / "ledger.sqlite3")
    summary = ledger.summary()
    ledger.close()
    monkeypatch.setenv("TZ", "UTC")
    clock.tzset()
    try:
        assert "(days and times in UTC)" in render({**summary, "timezone": "UTC"}, "x")
        assert "(days in the gateway's JST, times in UTC)" in render(
            {**summary, "timezone": "JST"}, "x")
    finally:
        monkeypatch.undo()
        clock.tzset()


def test_balances_read_as_dollars_on_the_right_chain() -> None:
    """`doctor` and the MCP wallet tool show money as the rest of the CLI does ($0.000003,
    never 3e-06), and a testnet wallet is told to get USDC on Base Sepolia, not Base."""
    from clawrouter.agents.mcp_server import describe_wallet
    from clawrouter.cli.status import check_balance

    low = check_balance({"balance_usd": 3e-6, "network": "base-sepolia", "wallet": "0xabc",
                         "sandbox": False}, 0.5)
    assert low.detail == "$0.000003 USDC is below $0.50" and "Base Sepolia" in low.fix
    assert "on Base to" in check_balance({"balance_usd": 0.1, "network": "base",
                                          "wallet": "0xabc", "sandbox": False}, 0.5).fix
    text = describe_wallet({"sandbox": False, "balance_usd": 4.88275, "address": "0xabc",
                            "network": "base", "budget_left_today_usd": 4.88275,
                            "daily_limit_usd": 5.0, "spent_today_usd": 0.0,
                            "payments_today": 0, "pending_today_usd": 0.0,
                            "budget_left_month_usd": None, "budget_left_total_usd": None})
    assert "$4.88275 of $5.00" in text and "Spent today: $0.00 (0 payments)" in text


def test_a_gateway_that_starts_too_slowly_is_stopped_once_it_has_started(
        tmp_path: Path, monkeypatch: Any) -> None:
    """`start` gives up after its timeout, but the gateway's thread goes on starting (a slow
    disk, a loaded machine): once started it must stop, not hold the wallet's ledger with
    nobody to stop it."""
    import asyncio
    import time

    from clawrouter import launch
    from clawrouter.cli import client as cli_client
    from clawrouter.config import Settings
    from clawrouter.payment.ledger import in_use, lock_path

    home = tmp_path / "home"
    monkeypatch.setenv("CLAWROUTER_HOME", str(home))
    monkeypatch.setenv("CLAWROUTER_SANDBOX", "true")
    monkeypatch.setenv("CLAWROUTER_PORT", str(dead_port()))  # nothing answers: it starts one
    monkeypatch.delenv("CLAWROUTER_URL", raising=False)
    real = launch.start_gateway

    async def slow(settings: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(1.5)
        return await real(settings, **kwargs)

    monkeypatch.setattr(launch, "start_gateway", slow)
    monkeypatch.setattr(cli_client.LocalGateway.start, "__defaults__", (0.5,))
    lock = lock_path(Settings(home=home).ledger_path_for("base-sepolia"))

    async def main() -> None:
        with pytest.raises(cli_client.GatewayError):
            await cli_client.connect(wait=0)

    asyncio.run(main())
    deadline = time.monotonic() + 15
    while not lock.exists() or in_use(lock):  # it starts (and takes the ledger), then stops
        assert time.monotonic() < deadline, "the late gateway still holds the ledger"
        time.sleep(0.1)
