"""What a fresh machine or container relies on: the console script, packaged static files, and
the Dockerfile's promises (no Docker engine runs here, so its text is what we can check)."""

import re
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_console_script_and_python_version():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["scripts"]["clawrouter"] == "clawrouter.cli:main"
    assert project["requires-python"] == ">=3.11"
    out = subprocess.run([sys.executable, "-m", "clawrouter", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for command in ("serve", "sandbox", "generate", "edit", "models", "status", "doctor",
                    "mcp", "wallet", "stats", "images"):
        assert re.search(rf"^\s+{command}\b", out, re.M), command


def test_the_sandbox_command_takes_no_mainnet():
    """A sandbox on Base mainnet would receive a mainnet gateway's real authorizations, and
    its fake settlements would land in the real ledger (SECURITY.md: it never receives one)."""
    run = subprocess.run([sys.executable, "-m", "clawrouter", "sandbox", "--network", "base"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "invalid choice: 'base'" in run.stderr


def test_gallery_files_are_package_data():
    static = resources.files("clawrouter.static")
    for name in ("index.html", "gallery.css", "gallery.js"):
        assert static.joinpath(name).is_file(), name


def test_dockerfile_promises():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.12-slim$", text, re.M)
    assert re.search(r"^USER (?!root)\S+$", text, re.M)
    assert 'VOLUME ["/data"]' in text and "CLAWROUTER_HOME=/data" in text
    assert "CLAWROUTER_HOST=0.0.0.0" in text and "EXPOSE 8402" in text
    assert re.search(r"^HEALTHCHECK .*CMD \[", text, re.M | re.S)
    assert re.search(r'^ENTRYPOINT \["clawrouter", "serve"\]$', text, re.M)
    # a network not ready at boot must not turn a server into a sandbox for good
    assert "CLAWROUTER_SANDBOX=false" in text


def test_the_dockerfiles_grace_fits_in_dockers_wait_before_it_kills(monkeypatch, tmp_path):
    """`docker stop` sends SIGTERM, then SIGKILL 10 s later: the requests under way, the
    cut-off of the rest and the ledger's close must fit in that, with a second to spare."""
    from clawrouter import launch
    from clawrouter.config import load_settings

    text = (ROOT / "Dockerfile").read_text()
    grace = re.search(r"\bCLAWROUTER_SHUTDOWN_GRACE_SECONDS=(\S+)", text)[1]
    monkeypatch.setenv("CLAWROUTER_SHUTDOWN_GRACE_SECONDS", grace)
    monkeypatch.setenv("CLAWROUTER_HOME", str(tmp_path))  # (no config.toml of this machine's)
    monkeypatch.delenv("CLAWROUTER_CONFIG", raising=False)
    assert 0 < load_settings().shutdown_grace_seconds <= 10 - launch.CUT_SECONDS - 1


def test_the_version_is_one_and_the_license_travels_with_the_package():
    import tomllib

    import clawrouter

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["version"] == clawrouter.__version__
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    manifest = (ROOT / "MANIFEST.in").read_text()
    for needed in ("graft tests", "config.example.toml", "SECURITY.md", "scripts/test"):
        assert needed in manifest  # the sdist can run its own tests


def test_importing_the_gateway_keeps_a_safe_recursion_limit():
    """py_ecc raises it to 100,000 at import; deeply nested JSON then crashed the process."""
    code = ("import sys, clawrouter.api.app, clawrouter.cli, clawrouter.sandbox, "
            "clawrouter.payment.signer, clawrouter.cli.wallet; clawrouter.cli.wallet.address_of("
            "'0x' + '4c' * 32); print(sys.getrecursionlimit())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert int(out) <= 10_000


def test_commands_that_neither_sign_nor_verify_do_not_load_eth_account():
    """eth-account (py_ecc's pairing tables) is a third of a second of every start: `models`,
    `status`, `stats` and a `generate` that finds a gateway running never need it."""
    code = ("import sys, clawrouter.cli, clawrouter.cli.models, clawrouter.cli.status, "
            "clawrouter.cli.stats, clawrouter.cli.client; print('eth_account' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


def test_every_test_security_md_cites_exists() -> None:
    """SECURITY.md backs each claim with a test; a renamed or deleted test must not leave a
    claim pointing at nothing. `::name` continues the last file named before it."""
    text = (ROOT / "SECURITY.md").read_text()
    cited: list[tuple[str, str]] = []
    current = ""
    for match in re.finditer(r"`(tests/test_\w+\.py)?(?:::(test_\w+))?`", text):
        path, name = match.groups()
        if path:
            current = path
        if name:
            cited.append((current, name))
    assert len(cited) > 20
    missing = [f"{path}::{name}" for path, name in cited
               if not re.search(rf"^(async )?def {name}\(", (ROOT / path).read_text(), re.M)]
    assert not missing


def test_the_dockerfile_healthcheck_follows_the_configured_port(tmp_path):
    """`docker run -e CLAWROUTER_PORT=9000` must stay healthy: the check asks where `serve`
    listens by the same settings, not a hard-coded 8402. Run here against a stand-in server."""
    import json
    import os
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    text = (ROOT / "Dockerfile").read_text()
    command = json.loads(re.search(r"^HEALTHCHECK .*?CMD (\[[^\n]*\])$", text, re.M | re.S)[1])
    assert command[0] == "python"

    class Health(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAWROUTER_", "BLOCKRUN_"))}
    env.update(CLAWROUTER_HOME=str(tmp_path), CLAWROUTER_HOST="0.0.0.0")  # as in the image
    try:
        for port, healthy in ((server.server_address[1], True), (0, False)):
            run = subprocess.run([sys.executable, *command[1:]], capture_output=True, timeout=30,
                                 env={**env, "CLAWROUTER_PORT": str(port)})
            assert (run.returncode == 0) == healthy, run.stderr
    finally:
        server.shutdown()


def test_the_readme_module_map_names_every_module() -> None:
    """"How it is built" is where a newcomer learns the layout: a module added (or removed)
    without its line there leaves the map wrong."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"^```\nclawrouter/\n(.*?)^```$", text, re.M | re.S)[1]
    listed = set(re.findall(r"^  (\w+\.py|\w+/) ", block, re.M))
    package = ROOT / "clawrouter"
    modules = {p.name for p in package.glob("*.py") if p.stem not in ("__init__", "__main__")}
    subpackages = {f"{p.parent.name}/" for p in package.glob("*/__init__.py")}
    assert listed == modules | subpackages


def test_test_servers_ports_cannot_be_taken_by_another_worker(monkeypatch) -> None:
    """CI once failed on "address already in use": a port found free with `bind(0)` was taken
    by another xdist worker before the test's server bound it. Each worker now has its own
    ports, outside the range the kernel hands out."""
    from tests import servers

    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    handed = {}
    for worker in ("gw0", "gw1", "gw3"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        handed[worker] = {servers.free_port() for _ in range(5)}
        assert all(port < low for port in handed[worker]), handed
    assert not handed["gw0"] & handed["gw1"] and not handed["gw1"] & handed["gw3"]
