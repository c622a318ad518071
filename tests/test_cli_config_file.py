"""One settings file for every command: `--config FILE` on each command that reads settings, and
`CLAWROUTER_CONFIG=FILE` for all of them (an agent's MCP config sets it once). Real processes:
`clawrouter serve --config` on another port and data directory, then `status`, `generate` and
`mcp` find that gateway through the same file."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from clawrouter.cli import parser
from clawrouter.config import load_settings
from tests.servers import free_port

#: the commands that read no settings: the catalog, and the sandbox upstream alone
NO_SETTINGS = {"models", "sandbox"}


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No CLAWROUTER_*/BLOCKRUN_* from the developer's shell, and a home of our own: a command
    that missed the file would use (and never touch) tmp_path/user/.clawrouter."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAWROUTER_", "BLOCKRUN_"))}
    env.update(HOME=str(tmp_path / "user"), CLAWROUTER_OUT=str(tmp_path / "out"), **extra)
    return env


def clawrouter(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "clawrouter", *args], env=env,
                          capture_output=True, text=True, timeout=60, cwd=env["HOME"])


@pytest.fixture
def served(tmp_path: Path) -> Any:
    """`clawrouter serve --config my.toml`: a port and a data directory only the file names."""
    (tmp_path / "user").mkdir()
    port = free_port()
    config = tmp_path / "my.toml"
    config.write_text(f'port = {port}\nhome = "{tmp_path / "other-home"}"\nsandbox = true\n')
    env = environment(tmp_path)
    serve = subprocess.Popen([sys.executable, "-m", "clawrouter", "serve", "--config", str(config)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert serve.stdout is not None
        line = serve.stdout.readline()
        assert f"ready on http://localhost:{port}/v1" in line, line + serve.stderr.read()
        wallet = line.split(" — wallet ")[1].split()[0]
        yield config, f"http://127.0.0.1:{port}", env, wallet
    finally:
        serve.terminate()
        serve.wait(timeout=20)


def test_status_and_generate_find_the_gateway_serve_runs_with_the_file(
        served: Any, tmp_path: Path) -> None:
    config, url, env, _ = served
    # without the file: the default port, where nobody is, or a gateway of another data
    # directory (a developer's own `serve`): either way not this one, and said so
    lost = clawrouter(env, "status")
    assert lost.returncode == 1 and "http://127.0.0.1:8402" in lost.stderr, lost.stderr
    assert url not in lost.stdout + lost.stderr
    named = {"--config": (env, ["--config", str(config)]),
             "CLAWROUTER_CONFIG": ({**env, "CLAWROUTER_CONFIG": str(config)}, [])}
    for how, (environ, flag) in named.items():
        status = clawrouter(environ, "status", "--json", *flag)
        assert status.returncode == 0, (how, status.stderr)
        assert json.loads(status.stdout)["url"] == url, how
    # (CLAWROUTER_CONFIG reaches `generate` as it reaches `status`: through load_settings)
    made = clawrouter(env, "generate", "a red kite", "--json", "--config", str(config))
    assert made.returncode == 0, made.stderr
    out = json.loads(made.stdout)
    assert out["in_process"] is False  # the serve's gateway, not one of its own
    assert out["images"][0]["url"].startswith(f"{url}/images/")
    assert not (tmp_path / "user" / ".clawrouter").exists()  # the default home stayed unused


def test_mcp_finds_the_gateway_through_the_file(served: Any) -> None:
    config, url, env, wallet = served
    for environ, flag in ((env, ["--config", str(config)]),
                          ({**env, "CLAWROUTER_CONFIG": str(config)}, [])):
        made, status = mcp_calls(environ, flag, ("generate_image", {"prompt": "a lighthouse"}),
                                 ("wallet_status", {}))
        assert not made.is_error, made.content
        assert made.structured_content["images"][0]["url"].startswith(f"{url}/images/")
        assert not status.is_error and wallet in json.dumps(status.structured_content)


def mcp_calls(env: dict[str, str], flag: list[str], *calls: tuple[str, dict[str, Any]]) -> Any:
    """`clawrouter mcp [--config FILE]` through the MCP SDK's own stdio client."""
    params = StdioServerParameters(command=sys.executable,
                                   args=["-m", "clawrouter", "mcp", *flag], env=env)

    async def main() -> Any:
        with anyio.fail_after(60):
            async with stdio_client(params) as (read, write):
                async with ClientSession(read, write) as session:
                    await session.initialize()
                    return [await session.call_tool(tool, arguments)
                            for tool, arguments in calls]

    return anyio.run(main)


def test_doctor_names_the_file_it_read(tmp_path: Path) -> None:
    (tmp_path / "user").mkdir()
    config = tmp_path / "elsewhere.toml"
    config.write_text(f'home = "{tmp_path / "h"}"\nsandbox = true\n')
    env = environment(tmp_path, CLAWROUTER_CONFIG=str(config))
    checks = json.loads(clawrouter(env, "doctor", "--json").stdout)["checks"]
    assert checks[0] == {"name": "config", "status": "ok", "detail": f"loaded (file {config})",
                         "fix": None}
    data_dir = next(c for c in checks if c["name"] == "data dir")
    assert str(tmp_path / "h") in data_dir["detail"]


def test_a_missing_file_is_refused_not_replaced_by_the_defaults(
        tmp_path: Path) -> None:
    (tmp_path / "user").mkdir()
    missing = tmp_path / "nope.toml"
    by_variable = clawrouter(environment(tmp_path, CLAWROUTER_CONFIG=str(missing)), "status")
    assert by_variable.returncode == 2
    assert f"config file not found: {missing} (named by CLAWROUTER_CONFIG" in by_variable.stderr
    by_flag = clawrouter(environment(tmp_path), "generate", "x", "--config", str(missing))
    assert by_flag.returncode == 2 and f"config file not found: {missing}" in by_flag.stderr
    assert not (tmp_path / "user" / ".clawrouter").exists()  # never fell back to defaults


def test_every_command_that_reads_settings_takes_config() -> None:
    """A command added without `--config` would read another file than `serve --config`."""
    def commands(p: Any, path: tuple[str, ...] = ()) -> Any:
        if p.get_default("run") is not None:  # it runs something (`wallet` alone shows it)
            yield path, p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from commands(sub, (*path, name))

    found = {path: p for path, p in commands(parser())}
    assert {("generate",), ("images", "ls"), ("mcp",), ("wallet",), ("status",)} <= set(found)
    for path, p in found.items():
        if path[0] in NO_SETTINGS:
            continue
        options = {o for a in p._actions for o in a.option_strings}
        assert "--config" in options, path
        help_text = " ".join(a.help or "" for a in p._actions if "--config" in a.option_strings)
        assert "CLAWROUTER_CONFIG" in help_text, path


def test_load_settings_reads_the_file_clawrouter_config_names(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in [n for n in os.environ if n.startswith(("CLAWROUTER_", "BLOCKRUN_"))]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("CLAWROUTER_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "config.toml").write_text("port = 9001\n")
    (tmp_path / "named.toml").write_text("port = 9002\n")
    (tmp_path / "flag.toml").write_text("port = 9003\n")
    assert load_settings().port == 9001
    monkeypatch.setenv("CLAWROUTER_CONFIG", str(tmp_path / "named.toml"))
    assert load_settings().port == 9002
    assert load_settings(tmp_path / "flag.toml").port == 9003  # --config wins
    monkeypatch.setenv("CLAWROUTER_CONFIG", "")  # empty is unset, as for every variable
    assert load_settings().port == 9001


def test_main_gives_config_to_the_whole_command_and_then_forgets_it(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`--config` reaches what reads settings on its own (the gateway `generate` finds or
    starts), and a caller embedding `main` gets its environment back."""
    from clawrouter.cli import main

    monkeypatch.delenv("CLAWROUTER_CONFIG", raising=False)
    config = tmp_path / "c.toml"
    config.write_text("port = 9004\n")
    seen: list[int] = []
    monkeypatch.setattr("clawrouter.cli.status.run_status",
                        lambda args: seen.append(load_settings().port) or 0)
    assert main(["status", "--config", str(config)]) == 0
    assert seen == [9004] and "CLAWROUTER_CONFIG" not in os.environ
