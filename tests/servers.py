"""Run real ASGI apps on loopback for tests: uvicorn in a background thread, ephemeral port."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, suppress
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx
import uvicorn

from clawrouter.launch import bind


_BLOCK = 1000  # ports per xdist worker
_handed = itertools.count(random.randrange(_BLOCK))  # (two runs at once start apart)


def _worker_ports() -> range:
    """This xdist worker's own block of ports, below the kernel's ephemeral range: a port
    asked of the kernel (`bind(0)`, any outgoing connection) never falls in it and no other
    worker uses it, so a port found free here stays free until our server binds it. Empty
    where the ephemeral range starts too low (then `free_port` asks the kernel)."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as ranges:
            ephemeral = int(ranges.read().split()[0])
    except (OSError, ValueError, IndexError):
        return range(0)
    start = 10_000 + worker * _BLOCK
    return range(start, start + _BLOCK) if start + _BLOCK <= ephemeral else range(0)


def free_port() -> int:
    """A loopback port free now, for a server to bind. Taken from this worker's own block
    (see `_worker_ports`): with `bind(0)`, another worker's server or client could take the
    port between this call and the bind, and the test failed with "address already in use".
    Addresses that must stay silent use `dead_port`."""
    ports = _worker_ports()
    for _ in ports:
        port = ports[next(_handed) % len(ports)]
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))  # no SO_REUSEADDR: skips ports in TIME_WAIT too
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_DEAD: list[socket.socket] = []


def dead_port() -> int:
    """A loopback port where connections are refused for the rest of the run: bound, never
    listened on, so no other test (or xdist worker) can start a server there."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    _DEAD.append(s)
    return s.getsockname()[1]


def clawrouter_command(*args: str, constants: dict[str, object] | None = None) -> list[str]:
    """`python -m clawrouter *args`, with module constants set first, as tests of in-process
    gateways monkeypatch them (`constants={"clawrouter.observe.LOG_FLUSH_SECONDS": 1.0}`):
    a test of a real process then waits out no hard-coded seconds that it does not test."""
    code = "".join(f"import {module}; {module}.{name} = {value!r}; "
                   for path, value in (constants or {}).items()
                   for module, _, name in [path.rpartition(".")])
    code += "import runpy; runpy.run_module('clawrouter', run_name='__main__', alter_sys=True)"
    return [sys.executable, "-c", code, *args]


def clawrouter_in_process(*args: str, env: dict[str, str], input: str | None = None,
                          cwd: str | os.PathLike[str] | None = None
                          ) -> subprocess.CompletedProcess[str]:
    """`clawrouter *args` run by `clawrouter.cli.main` in this process, with `env` as the whole
    environment, `input` as stdin (a pipe: not a terminal) and stdout/stderr captured, as
    `subprocess.run(..., capture_output=True, text=True)` reports it: a Python start (about
    0.6 s) saved for a test that is not about the process boundary. Not for commands that may
    ask on /dev/tty, start `serve`, or exit by signal: those need a real process."""
    from clawrouter.cli import common, main

    saved = dict(os.environ), os.getcwd(), sys.stdin, sys.stdout, sys.stderr, common._home
    out, err = io.StringIO(), io.StringIO()
    os.environ.clear()
    os.environ.update(env)
    sys.stdin, sys.stdout, sys.stderr = io.StringIO(input or ""), out, err
    common._home = None  # as in a new process
    try:
        if cwd is not None:
            os.chdir(cwd)
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors and --help
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        os.environ.clear()
        os.environ.update(saved[0])
        os.chdir(saved[1])
        sys.stdin, sys.stdout, sys.stderr, common._home = saved[2:]
    return subprocess.CompletedProcess(["clawrouter", *args], code, out.getvalue(),
                                       err.getvalue())


class ServerThread:
    """A uvicorn server on 127.0.0.1:<ephemeral> in its own thread and event loop."""

    def __init__(self, app: Any, port: int | None = None, host: str = "127.0.0.1",
                 **config: Any) -> None:
        self.host = host
        #: without a port given, the socket is bound here, as `serve` binds its own, and handed
        #: to uvicorn: no other server can take the port between its choice and the bind
        self.sockets: list[socket.socket] | None = None
        if port is None:
            self.sockets = bind(host, 0)  # (TCP by protocol: asyncio sets TCP_NODELAY on
            port = self.sockets[0].getsockname()[1]  # its connections only then)
        self.port = port
        self.config = uvicorn.Config(app, host=host, port=self.port,
                                     **{"log_level": "warning", "lifespan": "on", **config})
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.serve(sockets=self.sockets))
        finally:
            self.loop.close()

    def start(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        for sock in self.sockets or []:
            sock.close()


@contextmanager
def serving(app: Any, **config: Any) -> Iterator[ServerThread]:
    server = ServerThread(app, **config).start()
    try:
        yield server
    finally:
        server.stop()


def until(condition: Callable[[], bool], what: str = "the condition",
          seconds: float = 30) -> None:
    """Wait for `condition`, polled every 50 ms, up to `seconds` (generous: a loaded machine)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@contextmanager
def leaving(url: str, body: dict[str, Any] | bytes, *,
            headers: Mapping[str, str] | None = None,
            chunked: bool = False) -> Iterator[socket.socket]:
    """POST `body` (JSON) to `url`; the client hangs up, unanswered, when the block ends: once
    the test has seen the point it must leave at (its payment sent, its job polled). A client
    timeout of a fraction of a second stood for that point, and on a busy machine ran out
    before the payment was even signed: the test then saw nothing paid, or nothing to keep."""
    parts = urlsplit(url)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    # httpx's user agent: the test's other requests (httpx's) are the same client's
    fields = {"user-agent": f"python-httpx/{httpx.__version__}",
              **{name.lower(): value for name, value in (headers or {}).items()}}
    head = [f"POST {parts.path} HTTP/1.1", f"Host: {parts.netloc}",
            "Content-Type: application/json",
            "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(data)}",
            *(f"{name}: {value}" for name, value in fields.items())]
    if chunked:
        data = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        yield sock
        sock.setblocking(False)
        with suppress(BlockingIOError):  # (nothing to read: not answered)
            raise AssertionError(f"answered before its client left: {sock.recv(200)!r}")
