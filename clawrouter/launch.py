"""Start the gateway (and, when chosen, the in-process sandbox upstream) on uvicorn.

Shared by `clawrouter serve` and by the CLI and MCP server when they run a gateway of their own.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import uvicorn

from clawrouter.api.connection import protocol_class
from clawrouter.config import DEFAULT_UPSTREAM, Settings

if TYPE_CHECKING:
    from clawrouter.api.stopping import Draining

SANDBOX_NETWORK = "base-sepolia"  # the sandbox never receives a mainnet authorization
#: how long the in-process sandbox's slow-model jobs run (BlockRun-like); a module constant so
#: that tests of real processes waiting on a job only incidentally can shorten it
SANDBOX_SLOW_SECONDS = 3.0
#: the most a macOS process may set its soft RLIMIT_NOFILE to (OPEN_MAX) when the hard one is
#: "unlimited", which setrlimit refuses there
OPEN_MAX = 10240
#: how often (s) the gateway counts its open file descriptors; it warns at most once a minute
FD_CHECK_SECONDS = 5
FD_WARN_SECONDS = 60.0
FD_WARN_SHARE = 0.95  # of the limit in use: nearly out
T = TypeVar("T")
log = logging.getLogger("clawrouter.launch")


class AddressInUse(RuntimeError):
    """The gateway's address cannot be listened on (another program has the port, or the
    host is not this machine's): said in one line, before a key or ledger is touched."""


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when it is installed (uvicorn[standard] brings it, except on Windows).

    `uvicorn.run` picks it by itself, but we run uvicorn's `Server.serve` inside our own loop.
    Measured on a 200 KB generation at c=1: 11 % less gateway CPU per request and a 0.25 ms
    lower p50 (bench/results/ablate-loop.md: `bench/ablate.py --concurrency 1 full stdloop`).
    """
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run`, on the fastest event loop available."""
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        return runner.run(main)


#: the most of a model list read to tell whether it is one (BlockRun's is some 100 KB)
MODELS_READ_LIMIT = 4 * 1024 * 1024


@dataclass(frozen=True)
class ModelsAnswer:
    """What an upstream answered to `GET <base>/v1/models` (BlockRun's free model list)."""

    status: int
    blockrun: bool  # 200 with a JSON model list (`{"data": [...]}`), as BlockRun answers


async def upstream_reachable(url: str, timeout: float = 3.0) -> bool:
    """A free GET of the model list; any HTTP answer below 500 means the upstream is there
    (enough to choose the sandbox or not; `doctor` asks `models_answer` for more)."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.get(url + "/v1/models") as resp:
                return resp.status < 500
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return False


async def models_answer(url: str, timeout: float = 3.0) -> ModelsAnswer | None:
    """How `url` answers `GET /v1/models`, None when nothing does. Any answer is not enough
    to call it BlockRun: a base without its `/api` gets a 404 there, as every request would."""
    body = b""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.get(url + "/v1/models") as resp:
                if resp.status != 200:
                    return ModelsAnswer(resp.status, False)
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MODELS_READ_LIMIT:
                        return ModelsAnswer(200, False)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return None
    try:
        listing = json.loads(body)
    except ValueError:  # (UnicodeDecodeError included)
        listing = None
    return ModelsAnswer(200, isinstance(listing, dict)
                        and isinstance(listing.get("data"), list))


@dataclass
class Running:
    settings: Settings  # as in effect (the sandbox replaces upstream and network)
    app: Any
    port: int
    sandbox: bool
    servers: list[Server] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def wait(self) -> None:
        try:
            await asyncio.gather(*self.tasks)
        finally:
            self.stop()

    def stop(self) -> None:
        for server in self.servers:
            server.should_exit = True


def falls_back(url: str, sandbox: bool | str) -> bool:
    """Whether `serve` uses the built-in sandbox when `url` does not answer (nothing, or an
    HTTP error of 500 and up): only with `sandbox` left "auto" and BlockRun's own address (one
    configured, or `sandbox = false`, is just down). `doctor` says so by the same rule."""
    return sandbox == "auto" and url == DEFAULT_UPSTREAM


async def start_gateway(settings: Settings, *, advertise: bool = False,
                        grace: float | None = None) -> Running:
    """Listen as `settings` say; use the sandbox when told to, or when BlockRun does not
    answer and no other upstream was configured. `advertise`: write the gateway's URL into
    the ledger's lock file, for commands that find the ledger busy to use this gateway.
    `grace`: how long stopping waits for requests under way (`Server`; default: the
    `shutdown_grace_seconds` setting)."""
    from clawrouter.api.app import create_app

    raise_fd_limit()
    no_core_dumps()
    use_sandbox = settings.sandbox is True or (
        falls_back(settings.upstream_url, settings.sandbox)
        and not await upstream_reachable(settings.upstream_url))
    servers: list[Server] = []
    tasks: list[asyncio.Task[None]] = []
    try:
        if use_sandbox:
            from clawrouter.payment.balance import MAINNET_RPC_URLS
            from clawrouter.sandbox import SandboxConfig, create_sandbox_app

            sandbox_app = create_sandbox_app(SandboxConfig(
                network=SANDBOX_NETWORK, pay_to=settings.pay_to,
                slow_seconds=SANDBOX_SLOW_SECONDS))
            port = await _serve(sandbox_app, bind("127.0.0.1", 0), servers, tasks,
                                settings.header_timeout)
            update: dict[str, Any] = {"upstream_url": f"http://127.0.0.1:{port}/api",
                                      "network": SANDBOX_NETWORK}
            if tuple(settings.rpc_urls) == MAINNET_RPC_URLS:
                # balances and reconciliation read the sandbox's stand-in chain, not a real one
                update["rpc_urls"] = [f"http://127.0.0.1:{port}/_sandbox/rpc"]
            settings = settings.model_copy(update=update)
        listening = bind(settings.host, settings.port)  # before the wallet and ledger
        try:
            app = create_app(settings, sandbox=bool(use_sandbox))
        except BaseException:
            for sock in listening:
                sock.close()
            raise
        port = await _serve(app, listening, servers, tasks, settings.header_timeout,
                            draining=app.state.gw.draining,
                            grace=settings.shutdown_grace_seconds if grace is None else grace,
                            watch=True)
        for server in servers[:-1]:  # the sandbox stops after the gateway, which uses it
            server.users.append(tasks[-1])
        if advertise:
            app.state.gw.ledger.advertise(settings.model_copy(update={"port": port}).url)
    except BaseException:
        # The gateway could not start (its ledger is in use, its port is taken): stop the
        # sandbox already serving, so the caller reports one clear error and no traceback.
        running = Running(settings, None, 0, bool(use_sandbox), servers, tasks)
        running.stop()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    return Running(settings, app, port, bool(use_sandbox), servers, tasks)


def server_options(header_timeout: float) -> dict[str, Any]:
    """How our servers speak HTTP (the tests serve the gateway with these too)."""
    # proxy_headers=False: no proxy sits in front of a local gateway, so X-Forwarded-* from a
    # local client must not change the scheme or client address we see (one layer less, too).
    # http, ws: see api/connection.py (envelopes and bounds before a request reaches the app).
    return dict(access_log=False, timeout_keep_alive=30, proxy_headers=False,
                http=protocol_class(header_timeout, connection_cap()), ws="none")


#: file descriptors kept back from client connections for the rest of the process: the
#: upstream pool (and the in-process sandbox's side of it), image files, the ledger
RESERVED_DESCRIPTORS = 768


def connection_cap() -> int | None:
    """How many connections a server keeps open at once: the soft descriptor limit less
    `RESERVED_DESCRIPTORS` (at most half of it); None where there is no limit."""
    limit = fd_limit()
    return None if limit is None else limit - min(RESERVED_DESCRIPTORS, limit // 2)


def bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address `host` names (all interfaces for ""), as asyncio's
    `create_server` (what uvicorn used) binds them, or `AddressInUse`: uvicorn would log a
    traceback and exit the process on its own."""
    try:
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (OSError, UnicodeError) as exc:
        raise AddressInUse(f"cannot listen on {host}:{port}: {exc}") from None
    sockets: list[socket.socket] = []
    lacking: OSError | None = None
    try:
        for family, kind, proto, _, address in dict.fromkeys(found):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError as exc:  # a family this machine lacks (IPv6 off): the others are
                lacking = exc       # enough, as asyncio's binding has it
                continue
            sockets.append(sock)
            if os.name == "posix":  # elsewhere (Windows) it would share a port in use
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # `::` means IPv6 only, as asyncio binds it
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:  # one port for all of them
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            try:
                sock.bind(address)
            except OSError as exc:  # an address this machine lacks (`::1` with IPv6 off)
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise
                sockets.remove(sock)
                sock.close()
                lacking = exc
    except OSError as exc:
        for sock in sockets:
            sock.close()
        if port and exc.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", None)):
            raise AddressInUse(f"{host}:{port} is taken by another program: pick another "
                               "port with --port.") from None
        raise AddressInUse(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    if not sockets:
        raise AddressInUse(f"cannot listen on {host}:{port}: {lacking}")
    return sockets


def raise_fd_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard one (POSIX; a refusal changes nothing).

    Every connection, even an idle one, holds a descriptor: at macOS's default soft limit of
    256 (1024 on many Linux desktops) a few hundred idle sockets left the gateway serving
    nobody.
    """
    try:
        import resource
    except ImportError:  # Windows
        return
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return
    unlimited = resource.RLIM_INFINITY
    # an unlimited hard limit: macOS refuses it as a soft one, but takes OPEN_MAX
    for target in (hard, OPEN_MAX) if hard == unlimited else (hard,):
        if soft == unlimited or (target != unlimited and target <= soft):
            return  # never lowered
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            continue
        log.debug("raised the open file limit (RLIMIT_NOFILE) from %d to %s", soft,
                  "unlimited" if target == unlimited else target)
        return


def no_core_dumps() -> None:
    """Set the soft RLIMIT_CORE to 0 (POSIX; a refusal is logged at debug level).

    A core dump of this process holds the wallet key and the payment headers in flight, and
    is written where anyone with the file (a bug report, a crash collector) can read it.
    The hard limit is left alone: code that could raise the soft one again could read the key
    anyway, and a hard 0 could never be undone by anything this process starts.
    PR_SET_DUMPABLE would stop the kernel's crash helpers too, but it also makes
    /proc/<pid>/fd and maps root's, so the user could no longer see the gateway's descriptors
    or profile it (py-spy): a gateway is the user's own process, and stays inspectable.
    """
    try:
        import resource
    except ImportError:  # Windows: no core files
        return
    try:
        resource.setrlimit(resource.RLIMIT_CORE,
                           (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    except (OSError, ValueError) as exc:
        log.debug("could not turn core dumps off (RLIMIT_CORE): %s", exc)


def fd_limit() -> int | None:
    """The soft RLIMIT_NOFILE, or None where there is none to speak of (Windows, unlimited)."""
    try:
        import resource
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return None
    return None if soft == resource.RLIM_INFINITY else soft


class DescriptorWatch:
    """Warn (at most once a minute) when the process is nearly or quite out of file
    descriptors: nothing else says so, since uvloop (libuv) accepts and closes at once the
    connections it has no descriptor for, and clients just see the gateway hang up.

    Called from uvicorn's main loop (`callback_notify`), where an exception would stop the
    server, so it never raises.
    """

    def __init__(self, count: Callable[[], int] = lambda: len(os.listdir("/dev/fd"))) -> None:
        self._count = count  # open descriptors (/dev/fd: Linux, where it is /proc/self/fd; macOS)
        self._warned = -math.inf

    async def __call__(self) -> None:
        try:
            self.check()
        except Exception:
            log.debug("could not count open file descriptors", exc_info=True)

    def check(self) -> None:
        limit = fd_limit()
        if limit is None:
            return
        try:
            used = self._count()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                return  # no /dev/fd here: nothing to count
            used = limit  # not even one left to list them with
        if used < limit * FD_WARN_SHARE:
            return
        now = time.monotonic()
        if now - self._warned < FD_WARN_SECONDS:
            return
        self._warned = now
        log.warning("out of file descriptors: %d of the %d this process may open "
                    "(RLIMIT_NOFILE) are in use; with none left, new connections are closed "
                    "unanswered. Raise the limit (`ulimit -n` before starting, LimitNOFILE= "
                    "under systemd) or find the client holding many connections open.",
                    used, limit)


#: how long requests cut off get to end (they stop at their next await) before the teardown
CUT_SECONDS = 5.0


class Server(uvicorn.Server):
    """uvicorn's server, stopping in bounded time. On the first signal (Ctrl-C, SIGTERM) or
    `should_exit`, it stops listening, closes idle connections, has the app sign no new
    payment (`Draining`) and waits up to `grace` seconds for the requests under way, and the
    work of streams whose clients left; then it cuts off what is left (a second signal: at
    once), and only then closes the app (its lifespan: the ledger last). Once it has shut down
    it has the queued log lines written: after a signal uvicorn raises it again, and the
    process ends without `atexit`."""

    def __init__(self, config: uvicorn.Config, *, draining: Draining,
                 grace: float = 0.0) -> None:
        """`grace`: seconds for the requests under way (`shutdown_grace_seconds`)."""
        super().__init__(config)
        self.draining = draining
        self.grace = grace
        #: the tasks of servers that use this one (the sandbox's: the gateway's), which it
        #: outlives: stopping waits for them first
        self.users: list[asyncio.Task[None]] = []

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.should_exit:  # a second signal of either kind, not only Ctrl-C: stop now
            self.force_exit = True
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        from clawrouter.observe import flush_logs

        await asyncio.gather(*self.users, return_exceptions=True)
        self._stop_taking(sockets)
        if not await self._drained(self.grace):
            await self._cut(quiet=self.grace == 0)
        await self.lifespan.shutdown()  # the app's clients, store and ledger, closed in peace
        await asyncio.to_thread(flush_logs)

    def _stop_taking(self, sockets: list[socket.socket] | None) -> None:
        """No new connection, request or payment (uvicorn's first steps, and `Draining`)."""
        self.draining.begin()
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle ones close now, the others once answered

    def _busy(self) -> bool:
        state = self.server_state
        return bool(state.connections or state.tasks or self.draining.runs)

    async def _drained(self, grace: float) -> bool:
        """Wait for the requests under way to end, up to `grace` s (or a second signal)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + grace
        if self._busy() and grace > 0 and not self.force_exit:  # (info: a command's own
            # gateway stops so too, and its user has no use for the line)
            log.info("stopping: waiting up to %g s for the requests under way (no new "
                     "payment is signed); a second Ctrl-C or SIGTERM stops them now", grace)
        while self._busy() and not self.force_exit and loop.time() < until:
            await asyncio.sleep(0.1)
        return not self._busy()

    async def _cut(self, *, quiet: bool) -> None:
        """Cancel what is still under way; a payment it signed stays in the ledger (`Draining`).
        An answer already begun that no `error` event can end is cut short (its connection
        aborted), so the request ends quietly rather than as uvicorn's error. `quiet`: no
        client is waiting (the sandbox's, once the gateway stopped), so nothing is said."""
        state = self.server_state
        if not quiet and (state.tasks or self.draining.runs):
            log.warning("stopping now: cut off the requests still under way; any payment "
                        "they signed stays in the ledger for the next start to settle with "
                        "the chain (`clawrouter stats`)")
        self._cut_short_answers()
        tasks = {*state.tasks, *self.draining.runs}
        self.draining.cut()
        for task in state.tasks:
            task.cancel()
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=CUT_SECONDS)
            if late:
                log.warning("%d cut-off requests did not end within %g s", len(late),
                            CUT_SECONDS)
        for connection in list(state.connections):
            connection.transport.close()

    def _cut_short_answers(self) -> None:
        """Abort the connections of answers begun that are not event streams (an image being
        sent): nothing can end them honestly, and their requests then end without a word."""
        from clawrouter.api.stopping import EVENT_STREAM

        for connection in list(self.server_state.connections):
            cycle = getattr(connection, "cycle", None)
            if (cycle is not None and cycle.response_started and not cycle.response_complete
                    and not cycle.scope.get("state", {}).get(EVENT_STREAM)):
                connection.transport.abort()


async def _serve(app: Any, sockets: list[socket.socket], servers: list[Server],
                 tasks: list[asyncio.Task[None]], header_timeout: float, *,
                 draining: Draining | None = None, grace: float = 0.0,
                 watch: bool = False) -> int:
    """Start one uvicorn server on `sockets` as a task; return its port once it listens.
    `draining`: the gateway's (`create_app`); without one (the sandbox, serving only the
    gateway, which it outlives) requests under way are cut off at once when it stops.
    `watch`: count its process's file descriptors on uvicorn's own clock (`DescriptorWatch`)."""
    from clawrouter.api.stopping import CutOff, Draining

    # log_config=None: keep the host process's logging (JSON lines; or stdout as MCP's wire).
    host, port = sockets[0].getsockname()[:2]
    notify: dict[str, Any] = (dict(callback_notify=DescriptorWatch(),
                                   timeout_notify=FD_CHECK_SECONDS) if watch else {})
    grace = grace if draining is not None else 0.0
    if draining is None:
        draining = Draining()
        app = CutOff(app, draining=draining)
    server = Server(uvicorn.Config(app, host=host, port=port, log_config=None,
                                   lifespan="on", **server_options(header_timeout), **notify),
                    draining=draining, grace=grace)
    task = asyncio.create_task(server.serve(sockets=sockets))
    servers.append(server)
    tasks.append(task)
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise RuntimeError(f"the server on {host}:{port} stopped while starting")
        await asyncio.sleep(0.01)
    return server.servers[0].sockets[0].getsockname()[1]
