"""The command line's edges: what an interruption says and when (with a gateway of the
command's own, and while the commands still load), the gateway's warnings in a command, and
`--json` failures of every command that takes `--json`."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from clawrouter.cli import generate, models
from tests.servers import clawrouter_in_process, dead_port

CONSOLE_SCRIPT = Path(sys.executable).parent / "clawrouter"


class Terminal(io.StringIO):
    """A captured stderr that says it is a terminal, so the spinner draws on it."""

    def isatty(self) -> bool:
        return True


class StoppingGateway:
    """A gateway started by the command, whose stop waits (as the real one does for the
    paid request under way there) until the test releases it."""

    in_process = True

    def __init__(self) -> None:
        self.posted = 0
        self.stopping = asyncio.Event()
        self.release = asyncio.Event()

    async def aclose(self) -> None:
        self.stopping.set()
        await self.release.wait()


def test_an_interrupt_is_said_at_once_though_the_commands_gateway_stops_later(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C during a slow model's request on a gateway the command started: the spinner
    stopped and the line about the payment came only once that gateway had stopped, seconds
    later. Now both come at once, and the wait that follows is said as such."""
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.setattr(generate, "output_dir", lambda out: None)

    async def paid_and_waiting(gateway: Any) -> Any:
        gateway.posted = 1
        await asyncio.Event().wait()  # a slow model's job

    async def scenario() -> None:
        gateway = StoppingGateway()

        async def connect(url: str | None, **kwargs: Any) -> StoppingGateway:
            return gateway

        monkeypatch.setattr(generate, "connect", connect)
        request = generate._Request()
        task = asyncio.create_task(generate._request(None, None, "generating with x",
                                                     paid_and_waiting, request))
        while "generating with x…" not in terminal.getvalue():  # the spinner draws
            await asyncio.sleep(0.01)
        task.cancel()  # what asyncio.run does on Ctrl-C (and our SIGTERM handler's exit)
        await asyncio.wait_for(gateway.stopping.wait(), 30)
        said = terminal.getvalue()
        await asyncio.sleep(0.35)  # three of the spinner's frames, were it still drawing
        assert terminal.getvalue() == said
        gateway.release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert request.told is not None and "may already have paid" in request.told

    asyncio.run(scenario())
    last = terminal.getvalue().split("\r\033[K")[-2:]
    # the spinner's line was cleared, then the two lines, and nothing drawn after them
    assert last[0].startswith("clawrouter: interrupted. The gateway may already have paid")
    assert last[0].endswith("waiting for the gateway this command started to finish that "
                            "request and stop (at most 10 s)\n")
    assert last[1] == ""  # (the spinner's final clear, once the gateway had stopped)


def test_gateway_warnings_in_a_command_read_as_its_lines() -> None:
    """A command running its own gateway has not set logging up (`serve` has): its warnings
    ("reconcile: no RPC answered ...") came out bare. They are the command's `clawrouter:`
    lines, on the stderr of the command running when they come (none bound for later)."""
    warn = logging.getLogger("tests.cli_polish.gateway")  # (no handler of a test's own)

    def run_models(args: Any) -> int:
        warn.warning("reconcile: %s", "no RPC answered (refused); payments stay pending")
        return 0

    saved, original = logging.root.handlers[:], logging.lastResort
    logging.root.handlers.clear()  # as in a process that has not set logging up
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(models, "run_models", run_models)
            first = clawrouter_in_process("models", env=dict(os.environ))
            second = clawrouter_in_process("models", env=dict(os.environ))
        after = logging.lastResort
    finally:
        logging.root.handlers[:] = saved
    line = "clawrouter: reconcile: no RPC answered (refused); payments stay pending\n"
    assert first.returncode == second.returncode == 0
    assert first.stderr == second.stderr == line  # each its own, once
    assert after is original  # Python's own again, once the command is over


def test_ctrl_c_while_the_commands_load_exits_130_without_a_traceback(tmp_path: Path) -> None:
    """The console script imported every command (over half a second) before `main` ran:
    Ctrl-C then printed a traceback. Tried at several moments of the loading, on `mcp` (which
    runs until stdin closes, so every try interrupts it). Python's own start, before the
    script's first line, is not ours (a Ctrl-C there may print a traceback, or be lost and
    the command run on): the tries begin after it, counted in imports from there, not in
    seconds from the start, which on a busy machine could still be Python's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAWROUTER_", "BLOCKRUN_"))}
    env["CLAWROUTER_HOME"] = str(tmp_path / "home")
    env["PYTHONPROFILEIMPORTTIME"] = "1"  # Python says on stderr each import as it ends
    for nth in (1, 150, 300, 450):  # (the commands are some 750 imports)
        proc = subprocess.Popen([str(CONSOLE_SCRIPT), "mcp"], env=env, text=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, preexec_fn=ctrl_c_as_in_a_terminal)
        interrupt_after_imports(proc, "clawrouter.cli", nth)
        out, err = proc.communicate(timeout=30)
        err = "".join(line for line in err.splitlines(True)
                      if not line.startswith("import time:"))
        assert "Traceback" not in err, (nth, err)
        assert proc.returncode in (130, -signal.SIGINT), (nth, proc.returncode, err)


def ctrl_c_as_in_a_terminal() -> None:
    """(In the child, before it runs:) SIGINT's default action, as a command run in a terminal
    has. The suite itself may run with SIGINT ignored (started in the background: `nohup
    scripts/test &`, or by a runner without job control), and a process started with it
    ignored keeps ignoring it, by design: Ctrl-C would then test nothing, and exit 0."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt_after_imports(proc: subprocess.Popen[str], module: str, nth: int) -> None:
    """SIGINT to `proc` once it has ended `nth` more imports after `module`'s, as
    `PYTHONPROFILEIMPORTTIME` reports them on its stderr (read to that point; the rest is
    left for `communicate`). `clawrouter.cli`'s ends just before the console script calls
    its `main`."""
    assert proc.stderr is not None
    after = None
    while after != nth:
        line = proc.stderr.readline()
        assert line, f"the process ended before the import {nth} after {module}'s"
        if not line.startswith("import time:"):
            continue
        if after is not None:
            after += 1
        elif line.rsplit("|", 1)[-1].strip() == module:
            after = 0
    proc.send_signal(signal.SIGINT)


def test_a_process_started_ignoring_ctrl_c_still_ignores_it_while_loading(
        tmp_path: Path) -> None:
    """`clawrouter serve &` in a script starts with SIGINT ignored: noting Ctrl-C during the
    imports must not turn that into an exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAWROUTER_", "BLOCKRUN_"))}
    env["CLAWROUTER_HOME"] = str(tmp_path / "home")
    proc = subprocess.Popen([str(CONSOLE_SCRIPT), "mcp"], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        for _ in range(3):  # while it loads, and after
            time.sleep(0.2)
            proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        assert proc.poll() is None, proc.communicate()
    finally:
        proc.stdin.close()  # the end of an MCP session: it exits by itself
        proc.wait(timeout=30)
    assert proc.returncode == 0


def cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`clawrouter ARGS` in this process, with a private data directory and no gateway where
    its settings look."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("CLAWROUTER_", "BLOCKRUN_"))}
    environ.update({"CLAWROUTER_HOME": str(tmp_path / "home"),
                    "CLAWROUTER_OUT": str(tmp_path / "out"),
                    "CLAWROUTER_PORT": str(dead_port())} | env)
    return clawrouter_in_process(*args, env=environ)


def error_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The one JSON document of a failed `--json` command, checked against its stderr line."""
    error = json.loads(proc.stdout)["error"]  # the whole of stdout is one document
    assert proc.stderr == f"clawrouter: {error['message']}\n"
    # one shape, the gateway's envelope's (and the HTTP status: none answered here)
    assert {"message", "type", "param", "code", "status"} <= set(error), error
    assert isinstance(error["type"], str) and error["type"], error
    return error


#: every command that takes --json and reads the settings
JSON_COMMANDS = [("stats",), ("wallet",), ("images", "ls"), ("images", "prune"), ("status",),
                 ("generate", "x"), ("edit", "a.png", "x")]


@pytest.mark.parametrize("command", JSON_COMMANDS, ids=" ".join)
def test_every_json_command_fails_with_one_json_error(command: tuple[str, ...],
                                                     tmp_path: Path) -> None:
    """`generate` and `status` printed their errors as JSON, `stats`, `wallet` and `images`
    printed nothing on stdout: a script reading it had nothing to read."""
    proc = cli(tmp_path, *command, "--json", CLAWROUTER_MAX_USD_PER_DAY="lots")
    assert proc.returncode == 2, proc.stderr  # (exit codes unchanged)
    error = error_of(proc)
    assert (error["code"], error["type"]) == ("invalid_configuration", "invalid_request_error")
    assert error["message"].startswith("invalid configuration: ")


def test_json_errors_name_what_went_wrong(tmp_path: Path) -> None:
    """Each failure `main` reports, and those of `status`, carries a code a script can test."""
    no_wallet = cli(tmp_path, "wallet", "--json")
    assert no_wallet.returncode == 1 and error_of(no_wallet)["code"] == "no_wallet"
    assert error_of(no_wallet)["type"] == "cli_error"
    (tmp_path / "home").mkdir(exist_ok=True)
    (tmp_path / "home" / "wallet.key").write_text("not a key\n")
    (tmp_path / "home" / "wallet.key").chmod(0o600)
    bad_key = cli(tmp_path, "wallet", "--json")
    assert bad_key.returncode == 2 and error_of(bad_key)["code"] == "wallet_error"
    assert "not a key" not in bad_key.stdout + bad_key.stderr
    bad_url = cli(tmp_path, "status", "--json", "--url", "localhost:1")
    assert bad_url.returncode == 2 and error_of(bad_url)["code"] == "bad_gateway_url"
    assert error_of(bad_url)["type"] == "invalid_request_error"
    from clawrouter.payment.ledger import Ledger

    (tmp_path / "home" / "images").mkdir()
    with Ledger(tmp_path / "home" / "ledger-base-sepolia.sqlite3"):  # as a gateway holds it
        busy = cli(tmp_path, "images", "prune", "--json")
    assert busy.returncode == 1 and error_of(busy)["code"] == "ledger_busy"
    assert "Stop it to prune now" in busy.stderr
    (tmp_path / "file").write_text("")
    no_home = cli(tmp_path, "images", "prune", "--json", CLAWROUTER_HOME=str(tmp_path / "file"))
    assert no_home.returncode == 2 and error_of(no_home)["code"] == "file_problem"


def test_without_json_a_failure_is_only_its_line(tmp_path: Path) -> None:
    proc = cli(tmp_path, "stats", CLAWROUTER_MAX_USD_PER_DAY="lots")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("clawrouter: invalid configuration: ")
