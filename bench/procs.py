"""Server processes for the benchmark, and what /proc says about them.

Every server is a separate `python -m clawrouter …` process in its own session, with a fresh
temporary CLAWROUTER_HOME and a throwaway key. All of them are killed when the runner exits,
however it exits: normal end, exception, Ctrl-C, SIGTERM (atexit + signal handlers), and even
SIGKILL of the runner (PR_SET_PDEATHSIG in the child).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from eth_account import Account

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")

_live: list[Server] = []
#: where non-empty server logs (warnings and errors) are kept when a server stops
LOG_DIR: Path | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: get SIGKILL if the runner dies, whatever the way."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Server:
    name: str
    args: list[str]
    env: dict[str, str]
    port: int
    home: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    _tmp: list[Path] = field(default_factory=list)
    _spy: subprocess.Popen[bytes] | None = None
    label: str = ""  # file name for the kept log
    script: Path | None = None  # run this file instead of `-m clawrouter`

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30.0) -> Server:
        logdir = Path(tempfile.mkdtemp(prefix=f"bench-{self.name}-log-"))
        self._tmp.append(logdir)
        self.log = logdir / "server.log"
        with open(self.log, "wb") as out:
            program = [str(self.script)] if self.script else ["-m", "clawrouter"]
            self.proc = subprocess.Popen(
                [PYTHON, *program, *self.args], cwd=REPO, env=self.env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent)
        _live.append(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n"
                                   + self.log.read_text(errors="replace")[-3000:])
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.name} did not answer /health within {timeout:.0f} s")

    def profile(self, out: Path, rate: int = 250) -> None:
        """Sample this server with py-spy (folded stacks to `out`) until it stops."""
        spy = Path(PYTHON).with_name("py-spy")
        if not spy.exists():
            raise RuntimeError("--profile needs py-spy: .venv/bin/pip install py-spy")
        out.parent.mkdir(parents=True, exist_ok=True)
        self._spy = subprocess.Popen(
            [str(spy), "record", "--pid", str(self.pid), "--rate", str(rate), "--format",
             "raw", "--output", str(out), "--nonblocking"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent)
        time.sleep(0.5)  # let it attach before the load starts

    def terminate(self) -> None:
        """Ask the server (and py-spy) to stop; `stop` waits and cleans up."""
        if self._spy is not None and self._spy.poll() is None:
            os.kill(self._spy.pid, signal.SIGINT)  # py-spy writes its output on SIGINT
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def stop(self, grace: float = 3.0) -> None:
        self.terminate()
        if self._spy is not None:
            try:
                self._spy.wait(15)
            except subprocess.TimeoutExpired:
                self._spy.kill()
        if self.proc is not None:
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:  # uvicorn waits for open connections
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        if self in _live:
            _live.remove(self)
        self._keep_log()
        for path in self._tmp:
            shutil.rmtree(path, ignore_errors=True)
        self._tmp.clear()

    def _keep_log(self) -> None:
        if LOG_DIR is None or self.log is None or not self.log.exists():
            return
        lines = self.log.read_text(errors="replace").splitlines()
        if any(line.strip() and "ready on" not in line and " sandbox on " not in line
               for line in lines):
            LOG_DIR.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self.log, LOG_DIR / f"{self.label or self.name}.log")

    # --- /proc ---------------------------------------------------------------------------
    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def rss_mb(self) -> float:
        return status_kb(self.pid, "VmRSS") / 1024

    def hwm_mb(self) -> float:
        return status_kb(self.pid, "VmHWM") / 1024

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (fields 14 and 15 of /proc/<pid>/stat)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class RssSampler:
    """Samples a process's VmRSS every `interval` s in a thread; `peak_mb` is the largest seen."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_kb = max(self.peak_kb, status_kb(self.pid, "VmRSS"))
            except (OSError, KeyError):
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak_kb / 1024


def base_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CLAWROUTER_", "BLOCKRUN_"))}
    env.update({
        "CLAWROUTER_HOME": str(home),
        "BLOCKRUN_WALLET_KEY": Account.create().key.hex(),
        "CLAWROUTER_NETWORK": "base-sepolia",
        "CLAWROUTER_MAX_USD_PER_DAY": "0",
        "CLAWROUTER_MAX_USD_PER_REQUEST": "10",
        "CLAWROUTER_LOG_LEVEL": "warning",
        "PYTHONUNBUFFERED": "1",
    })
    if not env["BLOCKRUN_WALLET_KEY"].startswith("0x"):
        env["BLOCKRUN_WALLET_KEY"] = "0x" + env["BLOCKRUN_WALLET_KEY"]
    return env


def start_sandbox(latency_ms: float = 0.0) -> Server:
    home = Path(tempfile.mkdtemp(prefix="bench-sandbox-home-"))
    port = free_port()
    server = Server("sandbox", ["sandbox", "--host", "127.0.0.1", "--port", str(port),
                                "--network", "base-sepolia", "--slow-seconds", "1",
                                "--latency-ms", str(latency_ms)],
                    base_env(home), port, home)
    server._tmp.append(home)
    return server.start()


def start_gateway(upstream: str, *, preauth: bool, name: str = "gateway",
                  extra_env: dict[str, str] | None = None, script: Path | None = None) -> Server:
    home = Path(tempfile.mkdtemp(prefix=f"bench-{name}-home-"))
    port = free_port()
    env = base_env(home)
    env["BLOCKRUN_API_URL"] = upstream
    env["CLAWROUTER_PREAUTH"] = "true" if preauth else "false"
    env.update(extra_env or {})
    server = Server(name, ["serve", "--host", "127.0.0.1", "--port", str(port),
                           "--upstream", upstream, "--no-sandbox"], env, port, home,
                    script=script)
    server._tmp.append(home)
    return server.start()


def start_floor(upstream: str, *, durable: bool = False, name: str = "floor") -> Server:
    """bench/floor.py: the least a Python gateway handing back its own URLs can do
    (`durable`: plus its payments and images on disk, in a fresh temporary directory)."""
    home = Path(tempfile.mkdtemp(prefix=f"bench-{name}-home-"))
    env = base_env(home)
    env["BENCH_FLOOR_KEY"] = env["BLOCKRUN_WALLET_KEY"]
    port = free_port()
    args = ["--port", str(port), "--upstream", upstream]
    server = Server(name, args + (["--durable", str(home)] if durable else []), env, port, home,
                    script=REPO / "bench" / "floor.py")
    server._tmp.append(home)
    return server.start()


def stop_all() -> None:
    servers = list(_live)
    for server in servers:  # all at once, so shutdowns overlap
        server.terminate()
    for server in servers:
        server.stop(grace=2.0)


def _on_signal(signum: int, frame: object) -> None:
    stop_all()
    raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)


def install_cleanup() -> None:
    atexit.register(stop_all)
    # Ctrl-C must work even when started from a shell that ignores SIGINT (background jobs).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
