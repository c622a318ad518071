"""How the CLI and MCP report outcomes at the edges: a usage error under `--json` is a JSON
error too; an interrupt while a command's own gateway stops, after the images were saved,
still shows them; `doctor` warns (not fails) offline where `serve` would use the built-in
sandbox, exactly where it would, and on a fresh data directory whose wallet `serve` will
make; a failure the gateway replays to an identical request says so to a script and to an
agent."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

import anyio
import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.servers import dead_port, free_port, serving
from tests.test_cli_polish import cli, ctrl_c_as_in_a_terminal

KEY = "0x" + "4c" * 32


# --- 1. a usage error under --json is one JSON error on stdout ------------------------------

@pytest.mark.parametrize("line, param", [
    (("generate", "--json", "--size"), "--size"),              # an option without its value
    (("generate", "x", "--json", "-n", "abc"), "-n"),          # a value of the wrong kind
    (("generate", "x", "--json", "--bogus"), None),            # an unknown option
    (("generate", "--json"), None),                            # the prompt left out
    (("--json", "status", "--frob"), None),                    # --json before the command
    (("--json", "generate", "x", "--size"), "--size"),         # ... and the command's error
    (("images", "--js"), None),                                # an abbreviation argparse takes
    (("wallet", "--json", "export", "--x"), None),             # a subcommand's subcommand
])
def test_a_usage_error_under_json_prints_one_json_error(
        tmp_path: Path, line: tuple[str, ...], param: str | None) -> None:
    """argparse printed its usage on stderr and nothing on stdout: a script passing --json
    had no document to parse. Now stdout holds the one error document every --json failure
    prints, with a code to test; the exit code (2) and stderr's usage lines are unchanged."""
    proc = cli(tmp_path, *line)
    assert proc.returncode == 2, proc
    error = json.loads(proc.stdout)["error"]  # the whole of stdout is one document
    assert error["code"] == "usage_error" and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["status"] is None
    assert error["message"] and error["message"] in proc.stderr
    assert proc.stderr.startswith("usage: clawrouter") and "error: " in proc.stderr
    assert not (tmp_path / "home").exists()  # refused before anything started


def test_without_json_a_usage_error_is_argparses_alone(tmp_path: Path) -> None:
    for line in (("generate", "x", "-n", "abc"), ("generate", "--bogus", "x"),
                 ("generate", "--", "--json", "-n")):  # after `--`: the prompt's words
        proc = cli(tmp_path, *line)
        assert proc.returncode == 2 and proc.stdout == "", proc
        assert proc.stderr.startswith("usage: clawrouter")


def test_help_and_version_under_json_are_unchanged(tmp_path: Path) -> None:
    version = cli(tmp_path, "--version", "--json")
    assert version.returncode == 0 and version.stdout.startswith("clawrouter ")
    shown = cli(tmp_path, "generate", "--json", "--help")
    assert shown.returncode == 0 and shown.stdout.startswith("usage: clawrouter generate")


# --- 2. an interrupt while the command's own gateway stops hides no paid result -------------

#: `clawrouter` with the stop of a gateway the command started held until an interrupt (as a
#: real stop waits up to 10 s for work under way there), announced on stderr as it begins
SLOW_STOP = """
import asyncio, sys
from clawrouter.cli import client
closing = client.Gateway.aclose
async def aclose(self):
    if not self.in_process:
        return await closing(self)
    print("test: the gateway is stopping", file=sys.stderr, flush=True)
    try:
        await asyncio.sleep(120)
    finally:
        await closing(self)
client.Gateway.aclose = aclose
import runpy; runpy.run_module("clawrouter", run_name="__main__", alter_sys=True)
"""


def lines_of(pipe: IO[str]) -> queue.Queue[str]:
    """Each line of `pipe` as it comes ("" at its end), read by a thread of its own."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in pipe:
            lines.put(line)
        lines.put("")

    threading.Thread(target=read, daemon=True).start()
    return lines


def drained(lines: queue.Queue[str]) -> str:
    """The rest of a pipe `lines_of` reads, to its end."""
    text = ""
    while (line := lines.get(timeout=30)) != "":
        text += line
    return text


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_ctrl_c_while_the_commands_gateway_stops_still_shows_the_saved_images(
        tmp_path: Path, as_json: bool) -> None:
    """`generate` with no gateway running starts its own; the image was paid for and saved,
    then Ctrl-C came while that gateway stopped: the command said "interrupted ... may
    already have paid" and exit 130, and never printed where the image is (with --json, an
    error document instead of the result). Now the result is printed (and flushed) before
    the stop begins, and an interrupt during the stop exits 0: nothing is lost."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("CLAWROUTER_", "BLOCKRUN_"))}
    environ.update(CLAWROUTER_HOME=str(tmp_path / "home"), CLAWROUTER_OUT=str(tmp_path / "out"),
                   CLAWROUTER_PORT=str(dead_port()), CLAWROUTER_SANDBOX="true",
                   CLAWROUTER_WALLET_LOCKS=os.environ["CLAWROUTER_WALLET_LOCKS"])
    proc = subprocess.Popen([sys.executable, "-c", SLOW_STOP, "generate", "a red kite",
                             *(["--json"] if as_json else [])], env=environ, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=ctrl_c_as_in_a_terminal)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        out, err = lines_of(proc.stdout), lines_of(proc.stderr)
        said: list[str] = []
        while "test: the gateway is stopping\n" not in said:
            said.append(err.get(timeout=60))
            assert said[-1], said  # (the command ended without stopping its gateway)
        first = out.get(timeout=30)  # printed before the stop began: there already
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        proc.kill()
    rest, errors = drained(out), drained(err)
    assert proc.returncode == 0, (first, rest, said, errors)
    if as_json:
        result = json.loads(first + rest)  # one document: the result, no error after it
        (image,) = result["images"]
        assert result["in_process"] is True and result["sandbox"] is True
        saved = Path(image["path"])
    else:
        saved = Path(first.strip())
        assert "1 image(s) · google/nano-banana · cost $0.0535" in rest
    assert saved.parent == tmp_path / "out" and saved.read_bytes().startswith(b"\x89PNG")
    assert "interrupted after the images were saved and shown: nothing is lost" in errors
    assert "may already have paid" not in errors


# --- 3. doctor offline: a warning where `serve` falls back to the sandbox -------------------

def upstream_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, default: str,
                   **env: str) -> tuple[int, dict[str, Any]]:
    """`doctor --json`'s exit code and upstream check, BlockRun's own address being `default`
    (here a local one, so the test is the same online and off); all else passes."""
    from clawrouter import launch

    monkeypatch.setattr(launch, "DEFAULT_UPSTREAM", default)
    done = cli(tmp_path, "doctor", "--json", CLAWROUTER_PORT=str(free_port()),
               BLOCKRUN_WALLET_KEY=KEY, **env)
    report = json.loads(done.stdout)
    (upstream,) = [c for c in report["checks"] if c["name"] == "upstream"]
    assert report["ok"] is (done.returncode == 0)
    return done.returncode, upstream


def failing_upstream() -> Starlette:
    async def models(request: Any) -> JSONResponse:
        return JSONResponse({"error": "down for maintenance"}, status_code=503)

    return Starlette(routes=[Route("/api/v1/models", models)])


def test_doctor_warns_offline_where_serve_would_use_the_sandbox(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline with the default settings, `serve` runs on the built-in sandbox (the README's
    first command), yet doctor failed its upstream check and exited 1. It warns instead,
    saying what `serve` will do; it still fails where `serve` would not fall back."""
    dead = f"http://127.0.0.1:{dead_port()}/api"
    code, upstream = upstream_check(tmp_path, monkeypatch, dead, BLOCKRUN_API_URL=dead)
    assert code == 0 and upstream["status"] == "warn", upstream
    assert upstream["detail"] == (f"{dead} does not answer: `serve` will use the built-in "
                                  "sandbox instead (no real payments; placeholder images)")
    assert upstream["fix"].startswith("for real images, check the internet connection")
    with serving(failing_upstream()) as down:  # an HTTP error of 500 up: the same fallback
        api = down.url + "/api"
        code, upstream = upstream_check(tmp_path, monkeypatch, api, BLOCKRUN_API_URL=api)
    assert code == 0 and upstream["status"] == "warn"
    assert upstream["detail"].startswith(f"{api} fails (HTTP 503): `serve` will use")
    # sandbox = false: `serve` pays that upstream or fails; another address: just down
    for env in ({"CLAWROUTER_SANDBOX": "false"}, {"BLOCKRUN_API_URL": dead + "/other"}):
        code, upstream = upstream_check(tmp_path, monkeypatch, dead,
                                        **({"BLOCKRUN_API_URL": dead} | env))
        assert code == 1 and upstream["status"] == "fail", (env, upstream)
        assert "sandbox" not in upstream["detail"]
    text = cli(tmp_path, "doctor", CLAWROUTER_PORT=str(free_port()), BLOCKRUN_WALLET_KEY=KEY,
               BLOCKRUN_API_URL=dead)  # (still BlockRun's own address here)
    assert text.returncode == 0 and f"warn  upstream  {dead} does not answer" in text.stdout
    assert "fix: for real images, check the internet connection" in text.stdout


@pytest.mark.parametrize("sandbox, default, answer", [
    ("auto", True, "none"), ("auto", True, "503"), ("auto", False, "none"),
    (False, True, "none")])
def test_doctor_warns_exactly_where_serve_starts_the_sandbox(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sandbox: Any, default: bool,
        answer: str) -> None:
    """doctor's verdict follows `start_gateway`'s own choice, case by case."""
    from clawrouter import launch
    from clawrouter.cli import status
    from tests.conftest import gateway_settings

    with serving(failing_upstream()) as down:
        url = down.url + "/api" if answer == "503" else f"http://127.0.0.1:{dead_port()}/api"
        monkeypatch.setattr(launch, "DEFAULT_UPSTREAM", url if default else "https://x")
        check = asyncio.run(status.check_upstream(url, sandbox))

        async def serve_chooses() -> bool:
            running = await launch.start_gateway(gateway_settings(
                tmp_path / "home", url, sandbox=sandbox, port=0))
            running.stop()
            await asyncio.gather(*running.tasks)
            return running.sandbox

        assert (check.status == "warn") is asyncio.run(serve_chooses()), check
    assert check.status in ("warn", "fail")


# --- 4. a replayed failure says so: `shared` for scripts, plainly for agents ----------------

def test_a_replayed_failure_is_marked_shared_and_the_agent_told_it_paid_nothing(
        tmp_path: Path, gateway: Any, sandbox: Any) -> None:
    """An identical request gets an earlier one's paid failure replayed (`x-clawrouter-shared:
    true`): the CLI's GatewayError dropped the header, so `--json` could not say so, and an
    agent read only the message's prefix. Now the error carries `shared`, `--json` shows it,
    and the MCP tool error says plainly that this call paid nothing."""
    from mcp.server.mcpserver.exceptions import ToolError

    from clawrouter.agents.mcp_server import REPLAYED_NOTE, Connection
    from clawrouter.coalesce import REPLAYED

    sandbox.faults({"kind": "respond", "phase": "paid", "status": 500,
                    "body": {"error": "provider down"}, "times": 1})
    first, replay = (cli(tmp_path, "generate", "fails after paying", "--model", "cogview",
                         "--json", CLAWROUTER_URL=gateway.url) for _ in (1, 2))
    assert first.returncode == 1 and replay.returncode == 1, (first, replay)
    first_error, replayed = (json.loads(p.stdout)["error"] for p in (first, replay))
    assert "shared" not in first_error and "provider down" in first_error["message"]
    assert replayed["shared"] is True and replayed["message"].startswith(REPLAYED)

    async def calls() -> list[str]:
        connection = Connection(gateway.url)
        said = []
        try:
            for _ in (1, 2):
                try:
                    await connection.run(lambda gw: gw.generate(
                        "fails after paying, asked by an agent", model="cogview",
                        out=tmp_path / "out"))
                except ToolError as exc:
                    said.append(str(exc))
        finally:
            await connection.aclose()
        return said

    sandbox.faults({"kind": "respond", "phase": "paid", "status": 500,
                    "body": {"error": "provider down again"}, "times": 1})
    agent_first, agent_replay = anyio.run(calls)
    assert REPLAYED_NOTE not in agent_first and "provider down again" in agent_first
    assert agent_replay.startswith(f"clawrouter: {REPLAYED}") and agent_replay.endswith(
        REPLAYED_NOTE)
    assert "this call paid nothing" in agent_replay
    assert sandbox.stats()["payments_count"] == 2  # one per distinct request, none replayed


def test_doctor_on_a_fresh_data_directory_warns_that_serve_will_make_the_wallet(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's first run has no wallet yet, and `serve` makes one: doctor said "fail"
    and exited 1 for it. It warns instead, naming the file to back up; a wallet path that is
    not a file (a broken link, a directory) still fails, as `serve` does."""
    from clawrouter import launch

    monkeypatch.setattr(launch, "DEFAULT_UPSTREAM", "https://blockrun.invalid/api")
    done = cli(tmp_path, "doctor", "--json", CLAWROUTER_PORT=str(free_port()),
               BLOCKRUN_API_URL="https://blockrun.invalid/api")
    report = json.loads(done.stdout)
    (wallet,) = [c for c in report["checks"] if c["name"] == "wallet"]
    key = tmp_path / "home" / "wallet.key"
    assert wallet["status"] == "warn" and str(key) in wallet["detail"], wallet
    assert "back that file up" in wallet["fix"]
    assert done.returncode == 0 and report["ok"] is True, report
    assert not key.exists()  # doctor only looks
    key.parent.mkdir(parents=True)
    for make in (lambda: key.symlink_to(tmp_path / "gone"), key.mkdir):  # `serve` reads neither
        make()
        report = json.loads(cli(tmp_path, "doctor", "--json", CLAWROUTER_PORT=str(free_port()),
                                BLOCKRUN_API_URL="https://blockrun.invalid/api").stdout)
        (wallet,) = [c for c in report["checks"] if c["name"] == "wallet"]
        assert wallet["status"] == "fail" and report["ok"] is False, wallet
        key.unlink() if key.is_symlink() else key.rmdir()


def test_a_signal_while_the_result_is_printed_waits_until_it_is_printed_whole() -> None:
    """SIGTERM raises KeyboardInterrupt wherever it lands: in the middle of the printed result,
    a script got half a JSON document, then an error one, and would ask (and pay) again. While
    the result is printed, SIGINT and SIGTERM wait; they reach their own handlers after."""
    from clawrouter.cli.generate import _signals_held, _terminate_as_interrupt

    seen: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        with _terminate_as_interrupt(), pytest.raises(KeyboardInterrupt):
            with _signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(100):  # bytecode enough for a handler to run
                    sum(range(100))
                printed = "whole"
        assert printed == "whole" and seen == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)
