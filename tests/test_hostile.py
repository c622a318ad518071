"""Hostile clients against a real gateway process: huge, deep and slow requests.

The gateway runs as `python -m clawrouter serve` (its own process, so its memory can be read
from /proc and a crash shows up as an exit code), paying the sandbox upstream on loopback, with
`max_image_mb` = 1 so the body limit is 4 MB. Every refusal must be a clear 4xx envelope, nothing
refused may reach the sandbox, the gateway must keep serving others, and its memory must stay
bounded.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from eth_account import Account

from tests.conftest import Sandbox
from tests.servers import free_port
from tests.test_fuzz import assert_envelope
from tests.test_inputs import PNG

REPO = Path(__file__).resolve().parent.parent
MAX_IMAGE_MB = 1
BODY_LIMIT = 4 * MAX_IMAGE_MB * 1024 * 1024
JSON_ROUTES = ("/v1/images/generations", "/v1/images/image2image", "/v1/images/edits",
               "/images/generations", "/images/image2image", "/images/edits")
RSS_HEADROOM_KB = 50 * 1024


class GatewayProcess:
    """`clawrouter serve --no-sandbox` in a child process, pointed at the sandbox upstream."""

    def __init__(self, home: Path, upstream: str, *, prefix: tuple[str, ...] = (),
                 **settings: str) -> None:
        """`prefix`: a command that runs the gateway (`prlimit --nofile=…`)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = home.parent / f"{home.name}.log"
        env = {**os.environ, "CLAWROUTER_HOME": str(home), "BLOCKRUN_API_URL": upstream,
               "CLAWROUTER_NETWORK": "base-sepolia", "CLAWROUTER_MAX_USD_PER_DAY": "0",
               "CLAWROUTER_MAX_IMAGE_MB": str(MAX_IMAGE_MB), "CLAWROUTER_LOG_LEVEL": "warning",
               "BLOCKRUN_WALLET_KEY": Account.create().key.to_0x_hex(),
               **{f"CLAWROUTER_{name.upper()}": value for name, value in settings.items()}}
        with open(self.log, "wb") as log:  # a file, not a pipe: a full pipe would block it
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "clawrouter", "serve", "--port", str(self.port),
                 "--no-sandbox"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while b"ready" not in self.log.read_bytes():
            assert self.proc.poll() is None, f"gateway exited: {self.output()}"
            assert time.monotonic() < deadline, f"gateway did not start: {self.output()}"
            time.sleep(0.05)

    def output(self) -> str:
        return self.log.read_bytes().decode(errors="replace")[-2000:]

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines()
                        if line.startswith("VmRSS:")))

    def assert_alive(self) -> None:
        code = self.proc.poll()
        assert code is None, f"the gateway died (exit {code}): {self.output()}"
        response = httpx.get(self.url + "/health", timeout=10)
        assert response.status_code == 200, response.text

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def gateway_process(tmp_path: Path, sandbox: Sandbox) -> Iterator[GatewayProcess]:
    """A process of this test's own: for a test that measures its memory from a baseline."""
    process = GatewayProcess(tmp_path / "home", sandbox.api)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def hostile_processes(tmp_path_factory: pytest.TempPathFactory,
                      sandbox_server: Sandbox) -> Iterator[Callable[[], GatewayProcess]]:
    """The running `hostile_gateway`, started again if it died (its death is reported)."""
    started: list[GatewayProcess] = []

    def running() -> GatewayProcess:
        if not started or started[-1].proc.poll() is not None:
            home = tmp_path_factory.mktemp("hostile") / "home"
            started.append(GatewayProcess(home, sandbox_server.api))
        return started[-1]

    yield running
    for process in started:
        process.stop()


@pytest.fixture
def hostile_gateway(hostile_processes: Callable[[], GatewayProcess]) -> Iterator[GatewayProcess]:
    """One process for the tests that only send it requests and read the answers (each start
    costs 1-2 s of CPU); `sandbox` still resets the upstream for each. A death fails the
    test it happened in, and the next test gets a new process. Not `shared_gateway`: tests
    there measure its memory, which the big bodies sent here would move."""
    process = hostile_processes()
    yield process
    if process.proc.poll() is not None:
        pytest.fail(f"the gateway died (exit {process.proc.poll()}): {process.output()}")


def nothing_reached(sandbox: Sandbox) -> None:
    stats = sandbox.stats()
    assert stats["requests"] == {} and stats["payments_count"] == 0, stats["requests"]


def assert_refused(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert_envelope(response.status_code, response.headers.get("content-type", ""),
                    response.content, f"{response.request.method} {response.request.url}")
    assert response.status_code == status, response.text[:300]
    if code is not None:
        assert response.json()["error"]["code"] == code, response.text[:300]


# --- raw HTTP -------------------------------------------------------------------------------

def read_response(sock: socket.socket, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Read one HTTP/1.1 response with a Content-Length from a raw socket."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in
               (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def request_head(path: str, **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --- oversized bodies -----------------------------------------------------------------------

def test_a_declared_oversized_body_is_refused_before_it_is_sent(
        hostile_gateway: GatewayProcess, sandbox: Sandbox) -> None:
    for path in (*JSON_ROUTES, "/v1/images/variations"):
        with socket.create_connection(("127.0.0.1", hostile_gateway.port)) as sock:
            sock.sendall(request_head(path, Content_Type="application/json",
                                      Content_Length=str(10**12)))
            started = time.monotonic()
            status, headers, body = read_response(sock)  # not one byte of the body sent
            assert time.monotonic() - started < 5
        assert_envelope(status, headers.get("content-type", ""), body, path)
        assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    hostile_gateway.assert_alive()
    nothing_reached(sandbox)


def test_a_streamed_oversized_body_is_cut_off_at_the_limit(
        hostile_gateway: GatewayProcess, sandbox: Sandbox) -> None:
    """Chunked, no length given: the limits must be enforced while reading."""
    part = (b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + PNG)
    streams = [("/v1/images/generations", "application/json", b'{"prompt": "', 413,
                "body_too_large"),
               ("/v1/images/image2image", "application/json", b'{"prompt": "a", "image": "', 413,
                "body_too_large"),
               ("/v1/images/edits", "multipart/form-data; boundary=b", part, 413,
                "body_too_large")]
    for path, content_type, prefix, status, code in streams:
        with socket.create_connection(("127.0.0.1", hostile_gateway.port)) as sock:
            sock.sendall(request_head(path, Content_Type=content_type,
                                      Transfer_Encoding="chunked"))
            chunk = b"x" * 65536
            sent = 0
            try:  # send up to 3× the limit; the gateway may answer and hang up before that
                sock.sendall(b"%x\r\n%s\r\n" % (len(prefix), prefix))
                while sent < 3 * BODY_LIMIT:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass
            status_seen, headers, body = read_response(sock)
        assert_envelope(status_seen, headers.get("content-type", ""), body, path)
        assert status_seen == status, body
        if code:
            assert json.loads(body)["error"]["code"] == code, body
    hostile_gateway.assert_alive()
    nothing_reached(sandbox)


def test_oversized_uploads_and_inline_images_are_refused(
        hostile_gateway: GatewayProcess, sandbox: Sandbox) -> None:
    big = PNG + b"\0" * (MAX_IMAGE_MB * 1024 * 1024)  # one byte per MB over the image cap
    with httpx.Client(base_url=hostile_gateway.url, timeout=30) as client:
        # A multipart body over the body limit.
        response = client.post("/v1/images/edits", data={"prompt": "a cat"},
                               files={"image": ("a.png", big * 5, "image/png")})
        assert_refused(response, 413, "body_too_large")
        # Under the body limit, but each image is over the per-image cap.
        response = client.post("/v1/images/edits", data={"prompt": "a cat"},
                               files={"image": ("a.png", big, "image/png")})
        assert_refused(response, 400, "image_too_large")
        inline = "data:image/png;base64," + base64.b64encode(big).decode()
        for path in ("/v1/images/image2image", "/v1/images/edits"):
            response = client.post(path, json={"prompt": "a cat", "image": inline})
            assert_refused(response, 400, "image_too_large")
    hostile_gateway.assert_alive()
    nothing_reached(sandbox)


# --- deep JSON, huge numbers, giant prompts -------------------------------------------------

@pytest.mark.parametrize("bomb", ["arrays", "objects", "inside"])
def test_deeply_nested_json_is_refused_without_crashing(
        hostile_gateway: GatewayProcess, sandbox: Sandbox, bomb: str) -> None:
    depth = 100_000  # 200 KB: far under the body limit
    body = {"arrays": "[" * depth + "]" * depth,
            "objects": '{"a":' * depth + "1" + "}" * depth,
            "inside": '{"prompt": "a cat", "x": ' + "[" * depth + "]" * depth + "}"}[bomb]
    with httpx.Client(base_url=hostile_gateway.url, timeout=30) as client:
        for path in JSON_ROUTES:
            try:
                response = client.post(path, content=body,
                                       headers={"content-type": "application/json"})
            except httpx.HTTPError as exc:
                hostile_gateway.assert_alive()
                raise AssertionError(f"POST {path} with {depth}-deep JSON: {exc!r}") from exc
            assert_refused(response, 400)
    hostile_gateway.assert_alive()
    nothing_reached(sandbox)


def test_huge_numbers_and_giant_prompts_are_refused(hostile_gateway: GatewayProcess,
                                                    sandbox: Sandbox) -> None:
    json_type = {"content-type": "application/json"}
    near_limit = BODY_LIMIT - 1024
    cases: list[tuple[str, bytes, int, str | None]] = [
        ("n = 10**100", b'{"prompt": "a cat", "n": 1' + b"0" * 100 + b"}", 400, "invalid_n"),
        ("n of 4,000 digits", b'{"prompt": "a cat", "n": ' + b"9" * 4000 + b"}", 400,
         "invalid_n"),
        ("n of 100,000 digits", b'{"prompt": "a cat", "n": ' + b"9" * 100_000 + b"}", 400, None),
        ("n = -1", b'{"prompt": "a cat", "n": -1}', 400, "invalid_n"),
        ("n = 11", b'{"prompt": "a cat", "n": 11}', 400, "invalid_n"),
        ("n = 1e308", b'{"prompt": "a cat", "n": 1e308}', 400, None),
        ("1 MB prompt", json.dumps({"prompt": "x" * 1_000_000}).encode(), 400,
         "prompt_too_long"),
        ("prompt just under the body limit", json.dumps({"prompt": "x" * near_limit}).encode(),
         400, "prompt_too_long"),
        ("4 MB of escaped prompt", json.dumps({"prompt": "\u2603" * (near_limit // 6)}).encode(),
         400, "prompt_too_long"),
        ("100,000 source images", json.dumps({"prompt": "a cat", "model": "openai/gpt-image-1",
                                              "image": ["x"] * 100_000}).encode(), 400,
         "too_many_fields"),  # refused as it is parsed: an image request has a few dozen
        ("100,000 extra fields", json.dumps({"prompt": "a cat", "n": 0,
                                             **{f"k{i}": i for i in range(100_000)}}).encode(),
         400, "too_many_fields"),
    ]
    with httpx.Client(base_url=hostile_gateway.url, timeout=30) as client:
        for label, body, status, code in cases:
            for path in ("/v1/images/generations", "/v1/images/image2image",
                         "/v1/images/edits"):
                if label.startswith("100,000 source") and path.endswith("generations"):
                    continue
                started = time.monotonic()
                response = client.post(path, content=body, headers=json_type)
                assert time.monotonic() - started < 10, f"{label} on {path} took too long"
                assert_refused(response, status, code)
        # The same prompt through multipart.
        response = client.post("/v1/images/edits", data={"prompt": "x" * 1_000_000, "n": "1"},
                               files={"image": ("a.png", PNG, "image/png")})
        assert_refused(response, 400, "prompt_too_long")
        response = client.post("/v1/images/edits", data={"prompt": "a", "n": "9" * 5000},
                               files={"image": ("a.png", PNG, "image/png")})
        assert_refused(response, 400)
    hostile_gateway.assert_alive()
    nothing_reached(sandbox)


# --- slow clients ---------------------------------------------------------------------------

SLOW_CONNECTIONS = 100


async def _trickle(port: int, prefix: bytes, drip: bytes, stop: asyncio.Event,
                   opened: list[int]) -> None:
    """Send `prefix` at once, then `drip` one byte every 50 ms until told to stop."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    opened.append(1)
    try:
        writer.write(prefix)
        for byte in drip:
            if stop.is_set():
                break
            writer.write(bytes([byte]))
            await writer.drain()
            try:
                await asyncio.wait_for(stop.wait(), 0.05)
            except TimeoutError:
                pass
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


def test_the_gateway_process_runs_on_uvloop(hostile_gateway: GatewayProcess) -> None:
    """`clawrouter serve` runs uvicorn inside its own event loop, so it must choose uvloop
    itself (`uvicorn.run` would; `Server.serve` does not): about a third less CPU per request."""
    maps = Path(f"/proc/{hostile_gateway.proc.pid}/maps").read_text()
    assert "uvloop" in maps


def idle_connections(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_limits(pid: int) -> tuple[int, int]:
    line = next(line for line in Path(f"/proc/{pid}/limits").read_text().splitlines()
                if line.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


needs_prlimit = pytest.mark.skipif(shutil.which("prlimit") is None, reason="no prlimit")


@needs_prlimit
def test_idle_sockets_past_a_low_soft_fd_limit_do_not_stop_the_gateway(
        tmp_path: Path, sandbox: Sandbox) -> None:
    """macOS starts programs with a soft limit of 256 descriptors: the gateway raises it to the
    hard one, so 300 idle connections (each holding one) leave it serving others. At 256 it
    accepted and closed every new connection, /health included, without a word."""
    process = GatewayProcess(tmp_path / "home", sandbox.api,
                             prefix=("prlimit", "--nofile=256:4096"))
    idle: list[socket.socket] = []
    try:
        assert fd_limits(process.proc.pid) == (4096, 4096)
        idle = idle_connections(process.port, 300)
        process.assert_alive()  # accepted after the 300 before it: they are all held
        assert open_fds(process.proc.pid) > 300
    finally:
        for sock in idle:
            sock.close()
        process.stop()


@needs_prlimit
def test_past_its_connection_cap_the_gateway_closes_the_longest_idle_and_says_so(
        tmp_path: Path, sandbox: Sandbox) -> None:
    """With a hard limit of 256 nothing can be raised, so connections are capped at half of
    it: past the cap, each new connection closes the one that has waited longest with no
    request (idle sockets cannot take every descriptor and leave the gateway serving nobody),
    and the gateway says so once."""
    process = GatewayProcess(tmp_path / "home", sandbox.api,
                             prefix=("prlimit", "--nofile=256:256"))
    idle: list[socket.socket] = []
    try:
        idle = idle_connections(process.port, 300)
        with httpx.Client(base_url=process.url, timeout=10) as client:
            for _ in range(3):  # each one a new connection past the cap, answered
                assert client.get("/health", headers={"connection": "close"}).status_code == 200
            made = client.post("/v1/images/generations", json={"prompt": "crowded",
                                                               "model": "cogview"})
            assert made.status_code == 200, made.text
        idle[0].settimeout(10)
        assert idle[0].recv(1) == b""  # the oldest idle ones were closed to make room
        assert open_fds(process.proc.pid) < 200  # the cap (128) and the rest of the process
        process.assert_alive()
    finally:
        for sock in idle:
            sock.close()
        process.stop()
    warnings = [json.loads(line) for line in process.log.read_text().splitlines()
                if "connections open at once" in line]
    assert len(warnings) == 1, warnings  # once a minute at most
    assert "ulimit -n" in warnings[0]["message"]


@needs_prlimit
def test_past_its_connection_cap_with_every_connection_busy_a_new_one_gets_a_503(
        tmp_path: Path, sandbox: Sandbox) -> None:
    """Connections whose requests are in the app (here, each waiting for its body) are not
    closed to make room: the new connection is told, in the envelope, to come back."""
    process = GatewayProcess(tmp_path / "home", sandbox.api,
                             prefix=("prlimit", "--nofile=256:256"))
    busy: list[socket.socket] = []
    try:
        head = request_head("/v1/images/generations", Content_Type="application/json",
                            Content_Length="100")
        for _ in range(128):  # the cap: half of 256
            sock = socket.create_connection(("127.0.0.1", process.port), timeout=10)
            sock.sendall(head)  # and no body: the app waits for it
            busy.append(sock)
        # their heads are read (one still unread is not busy: the probe would close it)
        deadline = time.monotonic() + 30
        while unread(process.port, [sock.getsockname()[1] for sock in busy]):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", process.port), timeout=10) as probe:
            status, headers, body = read_response(probe, timeout=10)
        assert status == 503 and headers.get("retry-after") == "1", (status, body)
        assert json.loads(body)["error"]["code"] == "server_busy"
        for sock in busy:
            sock.close()
        deadline = time.monotonic() + 10
        while open_fds(process.proc.pid) > 100:  # the closes reach it
            assert time.monotonic() < deadline
            time.sleep(0.05)
        process.assert_alive()  # and serves again
    finally:
        for sock in busy:
            sock.close()
        process.stop()


def test_a_process_nearly_out_of_descriptors_is_warned_of_once_a_minute(monkeypatch, caplog):
    """Connections are capped, but other descriptors (files, the upstream pool) may still run
    out: the gateway's periodic check says so, once a minute at most."""
    import logging

    from clawrouter import launch

    monkeypatch.setattr(launch, "fd_limit", lambda: 100)
    caplog.set_level(logging.WARNING, logger="clawrouter.launch")
    used = [99]
    watch = launch.DescriptorWatch(count=lambda: used[0])
    for _ in range(3):
        watch.check()
    (warned,) = [r for r in caplog.records if "out of file descriptors" in r.getMessage()]
    assert "100" in warned.getMessage() and "ulimit -n" in warned.getMessage()
    used[0] = 50
    watch._warned = float("-inf")
    watch.check()  # half used: nothing to say
    assert len([r for r in caplog.records if "out of file" in r.getMessage()]) == 1


def test_slow_clients_do_not_starve_others_or_grow_memory(
        gateway_process: GatewayProcess, sandbox: Sandbox) -> None:
    port = gateway_process.port
    # Warm up (imports, pools, first paid image) before the baseline is taken.
    with httpx.Client(base_url=gateway_process.url, timeout=30) as client:
        warm = client.post("/v1/images/generations", json={"prompt": "warm-up"})
        assert warm.status_code == 200, warm.text
        for _ in range(5):
            assert client.get("/health").status_code == 200
    baseline = gateway_process.rss_kb()
    head = request_head("/v1/images/generations", Content_Type="application/json",
                        Content_Length=str(BODY_LIMIT - 1))
    body = b'{"prompt": "' + b"x" * 4096

    async def attack() -> tuple[list[float], int, int]:
        stop = asyncio.Event()
        opened: list[int] = []
        half = SLOW_CONNECTIONS // 2
        slow = [asyncio.create_task(_trickle(port, b"", head, stop, opened))  # the headers
                for _ in range(half)]
        slow += [asyncio.create_task(_trickle(port, head, body, stop, opened))  # the body
                 for _ in range(SLOW_CONNECTIONS - half)]
        await asyncio.sleep(1.5)
        latencies = []
        async with httpx.AsyncClient(base_url=gateway_process.url, timeout=10) as client:
            for request in (client.get("/health"), client.get("/v1/models"),
                            client.post("/v1/images/generations", json={"prompt": "a cat"})):
                started = time.monotonic()
                response = await request
                latencies.append(time.monotonic() - started)
                assert response.status_code == 200, response.text
        await asyncio.sleep(1.0)  # still trickling
        during = gateway_process.rss_kb()
        stop.set()
        await asyncio.gather(*slow)
        return latencies, len(opened), during

    latencies, opened, during = asyncio.run(attack())
    assert opened == SLOW_CONNECTIONS
    assert max(latencies) < 3, latencies
    assert during - baseline < RSS_HEADROOM_KB, (baseline, during)
    gateway_process.assert_alive()
    stats = sandbox.stats()
    assert stats["payments_count"] == 2  # the warm-up and the one real request, nothing else


def test_memory_stays_bounded_under_repeated_large_bodies(
        gateway_process: GatewayProcess, sandbox: Sandbox) -> None:
    """Bodies just under the limit, 16 at once, in rounds: the peak is bounded by what is in
    flight, and a second round costs no more than the first (nothing is kept)."""
    body = json.dumps({"prompt": "x" * (BODY_LIMIT - 1024)}).encode()
    baseline = gateway_process.rss_kb()
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, gateway_process.rss_kb())
            time.sleep(0.02)

    async def flood() -> list[int]:
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=gateway_process.url, timeout=60,
                                     limits=limits) as client:
            responses = await asyncio.gather(*(
                client.post("/v1/images/generations", content=body,
                            headers={"content-type": "application/json"})
                for _ in range(48)))
        return [r.status_code for r in responses]

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    after = []
    try:
        for _ in range(3):
            assert set(asyncio.run(flood())) == {400}
            time.sleep(0.5)  # the gateway trims its heap right after big requests end
            after.append(gateway_process.rss_kb())
    finally:
        done.set()
        sampler.join()
    # 16 bodies of 4 MB in flight, each read, decoded and parsed: a few copies each at most.
    assert peak - baseline < 16 * BODY_LIMIT // 1024 * 3, (baseline, peak)
    # Freed memory goes back to the OS (clawrouter/memory.py): later rounds must not add to
    # what the first one left.
    assert after[-1] - after[0] < RSS_HEADROOM_KB // 2, (baseline, peak, after)
    gateway_process.assert_alive()
    nothing_reached(sandbox)


def test_big_requests_give_their_memory_back_at_once(make_gateway, monkeypatch) -> None:
    """After a request with a big body the heap is trimmed within moments (not at the next
    5 s tick), so bursts of edits do not leave the process at its peak."""
    from clawrouter.api import app
    from clawrouter.memory import Trimmer

    # No tick here: any trim is the big request's (however long a loaded machine takes),
    # and none comes between the checks below.
    monkeypatch.setattr(app, "Trimmer", lambda: Trimmer(interval=3600))
    gw = make_gateway()
    trimmer = gw.gw.trimmer
    before = trimmer.trims
    big = json.dumps({"prompt": "x" * (2 * 1024 * 1024)}).encode()
    r = gw.http.post("/v1/images/generations", content=big,
                     headers={"content-type": "application/json"})
    assert r.status_code == 400
    deadline = time.monotonic() + 30
    while trimmer.trims == before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert trimmer.trims > before
    small = gw.http.post("/v1/images/generations", json={"prompt": ""})
    assert small.status_code == 400
    time.sleep(0.5)
    assert trimmer.trims == before + 1  # small requests do not trim


def test_big_bodies_beyond_the_admission_budget_wait_unread(make_gateway, sandbox) -> None:
    """With one place for big requests, a second big body is not read (it stays in the
    client's socket) until the first request ends; small requests never wait."""
    from clawrouter.api.heavy import HeavyPhase

    gw = make_gateway()
    gw.gw.heavy = HeavyPhase(body_bytes=1)  # room for one big body at a time
    big = json.dumps({"prompt": "x" * (2 * 1024 * 1024)}).encode()
    head = request_head("/v1/images/generations", Content_Type="application/json",
                        Content_Length=str(len(big)))
    port = int(gw.url.rsplit(":", 1)[1])

    async def scenario() -> tuple[bool, int, int]:
        # The first big request is admitted, then stalls half-way through its body.
        reader1, writer1 = await asyncio.open_connection("127.0.0.1", port)
        writer1.write(head + big[: len(big) // 2])
        await writer1.drain()
        await asyncio.sleep(0.3)
        async with httpx.AsyncClient(base_url=gw.url, timeout=30) as client:
            second = asyncio.ensure_future(client.post(
                "/v1/images/generations", content=big,
                headers={"content-type": "application/json"}))
            small = await client.post("/v1/images/generations", json={"prompt": ""})
            await asyncio.sleep(0.5)
            waited = not second.done()
            writer1.write(big[len(big) // 2:])
            await writer1.drain()
            first_status = int((await reader1.readline()).split()[1])
            writer1.close()
            return waited and small.status_code == 400, first_status, (await second).status_code

    small_ok_and_waited, first, second = asyncio.run(scenario())
    assert small_ok_and_waited
    assert (first, second) == (400, 400)
    nothing_reached(sandbox)


def test_a_streamed_big_request_keeps_its_place_until_its_stream_ends(make_gateway,
                                                                      sandbox) -> None:
    """A `stream: true` request's work (its decoded image, the upstream body) runs while the
    stream is sent, after the handler returned: its place among the big requests is given back
    when the stream ends, or big streams would escape the bound."""
    from clawrouter.api.heavy import HeavyPhase
    from clawrouter.sandbox.images import make_png

    gw = make_gateway()
    gw.gw.heavy = HeavyPhase(body_bytes=1)  # room for one big body at a time
    image = base64.b64encode(make_png(64, 64, 1, pad_to=1_500_000)).decode()
    answer, held_while_working = _held_while_paying(gw, sandbox, lambda: httpx.post(
        gw.v1 + "/images/image2image", timeout=30, json={
            "model": "gpt-image-1", "prompt": "x", "image": "data:image/png;base64," + image,
            "stream": True}))
    assert answer.status_code == 200 and "image_edit.completed" in answer.text
    assert held_while_working
    assert not gw.gw.heavy._admission.held > 0  # given back when the stream ended


def _held_while_paying(gw, sandbox: Sandbox,
                       post: Callable[[], httpx.Response]) -> tuple[httpx.Response, bool]:
    """Send `post` from a thread, its paid request held 1 s upstream: its answer, and whether
    it held a place among the big requests while the upstream worked."""
    sandbox.faults({"kind": "delay", "phase": "paid", "seconds": 1.0, "times": 1})
    answer = {}
    thread = threading.Thread(target=lambda: answer.update(r=post()))
    thread.start()
    deadline = time.monotonic() + 5
    while sandbox.paid() == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    held = gw.gw.heavy._admission.held > 0
    thread.join()
    return answer["r"], held


def test_a_chunked_form_is_admitted_as_a_big_request(make_gateway, sandbox) -> None:
    """A multipart upload with no Content-Length declares nothing to judge it by: once more
    than 1 MB of it has arrived it takes a place among the big requests (as the largest body
    allowed), or many at once would escape the bound on memory."""
    from clawrouter.api.heavy import HeavyPhase
    from clawrouter.sandbox.images import make_png

    gw = make_gateway()
    gw.gw.heavy = HeavyPhase(body_bytes=1)  # room for one big body at a time
    body = (b"--B\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n"
            b"--B\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + make_png(64, 64, 2, pad_to=1_500_000)
            + b"\r\n--B--\r\n")
    answer, held_while_working = _held_while_paying(gw, sandbox, lambda: httpx.post(
        gw.v1 + "/images/edits", timeout=30, content=iter([body[:100_000], body[100_000:]]),
        headers={"content-type": "multipart/form-data; boundary=B"}))
    assert answer.status_code == 200, answer.text
    assert held_while_working
    assert not gw.gw.heavy._admission.held > 0


def test_forwarded_headers_from_a_local_client_change_nothing(
        hostile_gateway: GatewayProcess, sandbox: Sandbox) -> None:
    """No proxy sits in front of a local gateway: X-Forwarded-* must neither turn the URLs we
    hand out into https:// ones nor make one program look like two callers (which would get a
    repeated request paid twice instead of answered from the first)."""
    def ask(forwarded_for: str) -> httpx.Response:
        return httpx.post(hostile_gateway.url + "/v1/images/generations", timeout=30,
                          json={"prompt": "a lighthouse"},
                          headers={"x-forwarded-proto": "https", "x-forwarded-for": forwarded_for,
                                   "x-forwarded-host": "evil.example", "user-agent": "same/1.0"})

    first, second = ask("203.0.113.9"), ask("203.0.113.10")
    assert first.status_code == second.status_code == 200, (first.text, second.text)
    url = first.json()["data"][0]["url"]
    assert url.startswith(hostile_gateway.url + "/images/"), url  # http, the host we used
    assert second.json()["data"][0]["url"] == url
    assert sandbox.stats()["payments_count"] == 1


# --- the connection, before a request reaches the app -----------------------------------------

HEADER_TIMEOUT = 1.0


# One gateway process for each kind of connection test (a crash still fails the next test).
@pytest.fixture(scope="module")
def shared_gateway(tmp_path_factory: pytest.TempPathFactory,
                   sandbox_server: Sandbox) -> Iterator[GatewayProcess]:
    process = GatewayProcess(tmp_path_factory.mktemp("shared") / "home", sandbox_server.api)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def impatient_gateway(tmp_path_factory: pytest.TempPathFactory,
                      sandbox_server: Sandbox) -> Iterator[GatewayProcess]:
    process = GatewayProcess(tmp_path_factory.mktemp("impatient") / "home", sandbox_server.api,
                             header_timeout=str(HEADER_TIMEOUT))
    yield process
    process.stop()


def exchange(port: int, data: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes,
                                                                     bool]:
    """Send raw bytes, read one response; also say whether the gateway then closed."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before it read everything: the answer is already waiting
        status, headers, body = read_response(sock, timeout)
        try:
            closed = sock.recv(1) == b""
        except ConnectionResetError:
            closed = True
        return status, headers, body, closed


def assert_connection_refusal(answer: tuple[int, dict[str, str], bytes, bool], status: int,
                              code: str) -> None:
    got, headers, body, closed = answer
    assert_envelope(got, headers.get("content-type", ""), body, f"raw request → {got}")
    assert (got, json.loads(body)["error"]["code"]) == (status, code), body
    assert headers["x-request-id"].startswith("req_") and closed


@pytest.mark.parametrize("data", [
    b"GARBAGE\r\n\r\n",
    b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n",
    b"GET /health\x00 HTTP/1.1\r\n\r\n",
])
def test_a_request_that_cannot_be_parsed_gets_the_envelope(
        shared_gateway: GatewayProcess, sandbox: Sandbox, data: bytes) -> None:
    """uvicorn's own answer is `Invalid HTTP request received.` in plain text."""
    assert_connection_refusal(exchange(shared_gateway.port, data), 400, "malformed_http")
    shared_gateway.assert_alive()
    nothing_reached(sandbox)


@pytest.mark.parametrize("data", [
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: evil.example\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET /health HTTP/1.1\r\n\r\n",
])
def test_a_request_without_exactly_one_host_is_a_400(shared_gateway: GatewayProcess,
                                                     data: bytes) -> None:
    """The Host header decides which names this gateway answers to (DNS rebinding) and the
    URLs it hands out: two (the guard would read one, the URLs the other) or none is a 400."""
    def ask(raw: bytes) -> tuple[int, dict[str, str], bytes]:
        with socket.create_connection(("127.0.0.1", shared_gateway.port)) as sock:
            sock.sendall(raw)
            return read_response(sock)

    status, headers, body = ask(data)
    assert_envelope(status, headers.get("content-type", ""), body, "raw request")
    assert (status, json.loads(body)["error"]["code"]) == (400, "malformed_http")
    assert ask(b"GET /health HTTP/1.0\r\n\r\n")[0] == 200  # HTTP/1.0 may leave it out


@pytest.mark.parametrize("headers", [
    [("Cookie", "a" * 100_000)],  # one huge header
    [(f"X-Pad-{i}", "b" * 100) for i in range(800)],  # many small ones
], ids=["one-huge", "many-small"])
def test_request_heads_over_64_kb_are_refused_and_memory_stays_flat(
        shared_gateway: GatewayProcess, sandbox: Sandbox,
        headers: list[tuple[str, str]]) -> None:
    baseline = shared_gateway.rss_kb()
    head = request_head("/v1/images/generations", Content_Type="application/json",
                        Content_Length="2")
    oversized = head[:-2] + "".join(f"{k}: {v}\r\n" for k, v in headers).encode() + b"\r\n{}"
    assert_connection_refusal(exchange(shared_gateway.port, oversized), 431,
                              "headers_too_large")
    # Without the bound, uvicorn kept reading a head as long as the client sent one.
    endless = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: " + b"z" * 64 * 1024 * 1024
    assert_connection_refusal(exchange(shared_gateway.port, endless), 431, "headers_too_large")
    assert shared_gateway.rss_kb() - baseline < RSS_HEADROOM_KB
    # A large but allowed head (a browser's localhost cookies) is served.
    ok = httpx.get(shared_gateway.url + "/health", headers={"Cookie": "c" * 60_000}, timeout=10)
    assert ok.status_code == 200, ok.text
    nothing_reached(sandbox)


def test_a_head_that_never_ends_is_a_408_and_a_silent_connection_is_closed(
        impatient_gateway: GatewayProcess, sandbox: Sandbox) -> None:
    port = impatient_gateway.port
    started = time.monotonic()
    answer = exchange(port, b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Sl")
    assert HEADER_TIMEOUT * 0.9 < time.monotonic() - started < HEADER_TIMEOUT + 5
    assert_connection_refusal(answer, 408, "request_timeout")
    with socket.create_connection(("127.0.0.1", port)) as silent:
        silent.settimeout(HEADER_TIMEOUT + 5)
        assert silent.recv(1) == b""  # closed, without a word: nothing was asked
    impatient_gateway.assert_alive()
    nothing_reached(sandbox)


def test_a_stalled_pipelined_head_does_not_cut_the_answer_in_progress(
        impatient_gateway: GatewayProcess, sandbox: Sandbox) -> None:
    """The paid answer to the first request arrives whole; the 408 for the stalled second one
    comes after it, never inside it."""
    sandbox.configure(latency_ms=800)  # the generation takes longer than the header deadline
    body = b'{"prompt": "a slow lighthouse"}'
    first = request_head("/v1/images/generations", Content_Type="application/json",
                         Content_Length=str(len(body))) + body
    with socket.create_connection(("127.0.0.1", impatient_gateway.port)) as sock:
        sock.sendall(first + b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Sta")
        started = time.monotonic()
        status, _, answer = read_response(sock, timeout=30)
        assert status == 200 and json.loads(answer)["data"][0]["url"], answer[:300]
        assert time.monotonic() - started > HEADER_TIMEOUT  # the deadline passed meanwhile
        status, headers, body = read_response(sock, timeout=HEADER_TIMEOUT + 5)
        assert status == 408 and json.loads(body)["error"]["code"] == "request_timeout"
    assert sandbox.stats()["payments_count"] == 1


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/images/image2image"])
def test_a_client_that_leaves_mid_body_is_no_error_of_ours(shared_gateway: GatewayProcess,
                                                           sandbox: Sandbox, path: str) -> None:
    """A body cut short by its client is the client's doing: not a 500 in the metrics, nor an
    'unhandled error' in the log."""
    with socket.create_connection(("127.0.0.1", shared_gateway.port)) as sock:
        sock.sendall(request_head(path, Content_Type="application/json", Content_Length="100")
                     + b'{"prompt":')
        deadline = time.monotonic() + 30
        while unread(shared_gateway.port, [sock.getsockname()[1]]):  # the app is reading it
            assert time.monotonic() < deadline
            time.sleep(0.05)
    deadline = time.monotonic() + 30
    while 'status="499"' not in (metrics := httpx.get(shared_gateway.url + "/metrics").text):
        assert time.monotonic() < deadline, metrics
        time.sleep(0.05)
    assert 'status="5' not in metrics
    assert "unhandled error" not in shared_gateway.output()
    assert "Exception in ASGI application" not in shared_gateway.output()
    nothing_reached(sandbox)


def asked_for_a_big_answer(gateway: GatewayProcess, sandbox: Sandbox,
                           prompt: str) -> socket.socket:
    """A raw connection that asked for 12 MB of `b64_json` (more than the kernel buffers)
    with a tiny receive window: what it reads is up to the caller. (Each test its own
    `prompt`: an identical request within a minute would share the first one's answer.)"""
    sandbox.configure(image_bytes=9_000_000)
    body = json.dumps({"prompt": prompt, "response_format": "b64_json"}).encode()
    sock = socket.create_connection(("127.0.0.1", gateway.port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(request_head("/v1/images/generations", Content_Type="application/json",
                              Content_Length=str(len(body))) + body)
    return sock


def dropped(gateway: GatewayProcess) -> int:
    """How many answers the gateway has dropped for being read too slowly (its log says)."""
    return gateway.log.read_bytes().count(b"its client read its answer slower than")


def unread(server_port: int, client_ports: list[int]) -> int:
    """How many of the loopback connections from `client_ports` to a server have bytes its
    process has not read yet (or are not there: /proc/net/tcp's receive queue of its end)."""
    queued = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, _, queues = line.split()[1:5]
        if int(local.split(":")[1], 16) == server_port:
            queued[int(remote.split(":")[1], 16)] = int(queues.split(":")[1], 16)
    return sum(queued.get(port, 1) > 0 for port in client_ports)


def server_side_state(server_port: int, client_port: int) -> str | None:
    """The TCP state (/proc/net/tcp's hex code: 01 established) of a server's end of a
    loopback connection from `client_port`."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        if (int(local.split(":")[1], 16), int(remote.split(":")[1], 16)) == (server_port,
                                                                              client_port):
            return state
    return None


def test_a_trickled_body_is_a_408_and_gives_its_place_back(impatient_gateway: GatewayProcess,
                                                           sandbox: Sandbox) -> None:
    """Once the app waits for a body, it must keep arriving (16 KB a second over each header
    window): one byte at a time cannot hold a big request's place, or a connection, for ever.
    """
    head = request_head("/v1/images/generations", Content_Type="application/json",
                        Content_Length="2000000")
    with socket.create_connection(("127.0.0.1", impatient_gateway.port)) as sock:
        sock.sendall(head + b'{"prompt": "')
        deadline = time.monotonic() + HEADER_TIMEOUT * 6
        answer = b""
        sock.settimeout(0.2)
        while not answer and time.monotonic() < deadline:
            try:
                sock.sendall(b"x")
                answer = sock.recv(65536)
            except socket.timeout:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer, answer[:200]
    deadline = time.monotonic() + 5  # counted as what the client was told, not as a 499
    while 'route="generations",status="408"' not in httpx.get(
            impatient_gateway.url + "/metrics").text:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    impatient_gateway.assert_alive()
    nothing_reached(sandbox)


def test_an_answer_read_a_trickle_at_a_time_is_dropped_too(impatient_gateway: GatewayProcess,
                                                           sandbox: Sandbox) -> None:
    """Reading a few KB a window would keep 12 MB in memory for hours: an answer must drain
    at 16 KB a second while the gateway's buffer for it is full."""
    before = dropped(impatient_gateway)
    with asked_for_a_big_answer(impatient_gateway, sandbox, "trickled") as sock:
        sock.settimeout(1)
        deadline = time.monotonic() + 30
        while dropped(impatient_gateway) == before:
            assert time.monotonic() < deadline, impatient_gateway.output()
            try:
                sock.recv(8192)
            except (socket.timeout, ConnectionResetError):
                pass
            time.sleep(HEADER_TIMEOUT * 0.5)
    impatient_gateway.assert_alive()


def test_an_answer_its_client_never_reads_is_dropped_not_kept(impatient_gateway: GatewayProcess,
                                                            sandbox: Sandbox) -> None:
    """A client that stops reading a big `b64_json` answer cannot keep it in the gateway's
    memory: once its bytes have not moved for a header window, the connection is dropped."""
    before = dropped(impatient_gateway)
    with asked_for_a_big_answer(impatient_gateway, sandbox, "unread") as sock:
        deadline = time.monotonic() + 30  # it takes about one header window
        while dropped(impatient_gateway) == before:
            assert time.monotonic() < deadline, impatient_gateway.output()
            time.sleep(0.1)
        # the gateway closed its end (the kernel may still be sending what it took in)
        assert server_side_state(impatient_gateway.port, sock.getsockname()[1]) != "01"
    assert sandbox.stats()["payments_count"] == 1
    impatient_gateway.assert_alive()


def test_the_header_clock_does_not_cut_an_idle_keep_alive_connection(
        impatient_gateway: GatewayProcess) -> None:
    """Between requests the keep-alive timeout (30 s) applies, not the header deadline."""
    with socket.create_connection(("127.0.0.1", impatient_gateway.port)) as sock:
        for idle in (0, HEADER_TIMEOUT * 1.5):  # (idle after the last one proves nothing)
            time.sleep(idle)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            status, _, _ = read_response(sock)
            assert status == 200


@pytest.mark.parametrize("path,status,code", [
    ("/v1/images/generations", 405, "method_not_allowed"),
    ("/v1/realtime", 404, "not_found"),
])
def test_websocket_upgrades_get_the_envelope(shared_gateway: GatewayProcess, path: str,
                                             status: int, code: str) -> None:
    """The gateway has no WebSocket routes; an upgrade is answered as the request it is."""
    handshake = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\n"
                 "Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n").encode()
    assert_connection_refusal(exchange(shared_gateway.port, handshake), status, code)
    # A client that starts sending frames at once: they are not parsed as HTTP.
    with socket.create_connection(("127.0.0.1", shared_gateway.port)) as sock:
        sock.sendall(handshake)
        time.sleep(0.05)
        sock.sendall(b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58")  # a masked "Hello"
        got, headers, body = read_response(sock)
        assert got == status and json.loads(body)["error"]["code"] == code
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
        assert rest == b"", rest  # closed after the answer: no second answer to the frame
    assert "Unsupported upgrade" not in shared_gateway.output()


def test_an_upgrade_request_with_a_body_is_refused_not_answered_without_it(
        shared_gateway: GatewayProcess, sandbox: Sandbox) -> None:
    """httptools skips the body of an upgrade request (`curl --http2` over http:// asks for
    h2c): answering as if it had none would be answering another request."""
    body = b'{"prompt": "a cat"}'
    head = request_head("/v1/images/generations", Content_Type="application/json",
                        Content_Length=str(len(body)), Connection="Upgrade, HTTP2-Settings",
                        Upgrade="h2c", HTTP2_Settings="AAMAAABkAAQCAAAAAAIAAAAA")
    assert_connection_refusal(exchange(shared_gateway.port, head + body), 400,
                              "upgrade_with_body")
    nothing_reached(sandbox)


def test_pipelined_requests_in_one_read_are_all_answered(shared_gateway: GatewayProcess) -> None:
    """80 requests with 1 KB heads arrive in one read: 80 KB, none of it one head."""
    one = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"p" * 900 + b"\r\n\r\n"
    statuses = []
    with socket.create_connection(("127.0.0.1", shared_gateway.port)) as sock:
        sock.settimeout(10)
        sock.sendall(one * 80 + b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        with sock.makefile("rb") as answers:
            for _ in range(80):
                statuses.append(int(answers.readline().split()[1]))
                length = 0
                while (line := answers.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                answers.read(length)
    assert statuses == [200] * 80


def test_a_chunked_body_with_an_endless_trailer_is_cut_off(shared_gateway: GatewayProcess,
                                                           sandbox: Sandbox) -> None:
    """Trailers are buffered by httptools until they end, like headers: bounded the same way."""
    baseline = shared_gateway.rss_kb()
    head = request_head("/v1/images/generations", Content_Type="application/json",
                        Transfer_Encoding="chunked")
    sent = 0
    with socket.create_connection(("127.0.0.1", shared_gateway.port)) as sock:
        sock.settimeout(10)
        try:
            sock.sendall(head + b"1\r\n{\r\n0\r\nX-Trailer: ")
            for _ in range(256):  # up to 64 MB
                sock.sendall(b"t" * 256 * 1024)
                sent += 1
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:  # its own answer had not begun: the refusal, then the connection closed
            answer = sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 431") and b"headers_too_large" in answer
        except ConnectionResetError:
            pass
    assert sent < 64, f"{sent} × 256 KB of trailer were accepted"
    assert shared_gateway.rss_kb() - baseline < RSS_HEADROOM_KB
    shared_gateway.assert_alive()
    nothing_reached(sandbox)


@pytest.mark.parametrize("spec, how", [
    ("2.4", "send_raises"),       # the client left first: Starlette raises ClientDisconnect
    ("2.3", "send_raises"),       # any failure to send the head
    ("2.3", "leaves_mid_send"),   # cancelled while a body send blocks: the stream is at a yield
    ("2.3", "started_then_send_raises"),  # an edit's work starts first (`inputs_judged`)
])
def test_a_stream_that_cannot_be_sent_gives_its_place_back_and_pays_nothing(spec, how) -> None:
    """However sending a stream ends, its place among the big requests comes back as soon as
    its work is over (not at a garbage collection, not never), work that never started never
    runs, and work started before the stream is told its client left."""
    from types import SimpleNamespace

    from clawrouter.api import streaming
    from clawrouter.api.heavy import HeavyPhase
    from clawrouter.context import RequestContext
    from clawrouter.errors import ClientGone

    async def scenario() -> tuple[list[str], bool, bool, bool]:
        heavy = HeavyPhase(slots=1, body_bytes=1)
        ran: list[str] = []

        ctx = RequestContext("r", "http://localhost")

        async def work():
            ran.append("started")
            if how == "started_then_send_raises":
                await ctx.gone.wait()  # runs until told its client left
            await asyncio.sleep(0.05)
            raise ClientGone()

        async with heavy.slot() as slot:
            await slot.enter(2 * 1024 * 1024)  # a big request: admission and expansion held
            job = SimpleNamespace(route="generations", size="1024x1024", images=[])
            started = (asyncio.ensure_future(work()) if how == "started_then_send_raises"
                       else work())
            response = streaming.stream_response(started, job, ctx, {}, ended=slot.hand_off())
        held = heavy._admission.held > 0 and heavy._expansion.locked()

        async def receive():
            await asyncio.sleep(0.02 if how == "leaves_mid_send" else 30)
            return {"type": "http.disconnect"}

        async def send(message):
            if how.endswith("send_raises"):
                raise OSError("the peer is gone")
            if message["type"] == "http.response.body":
                await asyncio.sleep(30)  # a client that stopped reading

        with (pytest.raises(BaseException) if how.endswith("send_raises")
              else contextlib.nullcontext()):
            await response({"type": "http", "asgi": {"spec_version": spec}}, receive, send)
        # work started before the stream was told its client left, and holds its place
        # until it stops
        told = ctx.gone.is_set() and heavy._admission.held > 0
        await asyncio.sleep(0.2)  # the work, if it started, stops at its next safe point
        return ran, held, heavy._admission.held > 0 or heavy._expansion.locked(), told

    ran, held, still_held, told = asyncio.run(scenario())
    assert held and not still_held
    assert ran == ([] if how == "send_raises" else ["started"])
    assert told or how != "started_then_send_raises"


def test_a_streamed_edit_cancelled_while_its_inputs_are_judged_tells_its_work() -> None:
    """`inputs_judged` starts the work before the stream exists; if the handler is cancelled
    meanwhile (a server shutting down), nobody will send that stream: the work is told its
    client left, so it stops at its next safe point instead of paying for nobody, and holds
    its place among the big requests until it has (its error retrieved)."""
    from types import SimpleNamespace

    from clawrouter.api.heavy import HeavyPhase
    from clawrouter.api.images import inputs_judged
    from clawrouter.context import RequestContext
    from clawrouter.errors import ClientGone

    async def scenario() -> tuple[bool, bool, bool]:
        ctx = RequestContext("r", "http://localhost")
        heavy = HeavyPhase(slots=1, body_bytes=1)

        async def work():
            await ctx.gone.wait()
            await asyncio.sleep(0.1)  # reaching its next safe point
            raise ClientGone()

        async def receive():
            await asyncio.sleep(30)

        async def handle() -> None:
            async with heavy.slot() as slot:
                await slot.enter(2 * 1024 * 1024)
                await inputs_judged(SimpleNamespace(receive=receive), work(), ctx, slot)

        handler = asyncio.ensure_future(handle())
        await asyncio.sleep(0.05)
        handler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await handler
        held_while_stopping = heavy._admission.held > 0
        await asyncio.sleep(0.2)
        return ctx.gone.is_set(), held_while_stopping, heavy._admission.held > 0

    told, held_while_stopping, still_held = asyncio.run(scenario())
    assert told and held_while_stopping and not still_held
