"""Metrics, request ids, the JSON request log (and what it must never contain), free health
checks, and the rule for listening beyond loopback."""

from __future__ import annotations

import array
import fcntl
import json
import os
import signal
import socket
import re
import subprocess
import sys
import termios
import time

import httpx
import pytest
from eth_account import Account

from clawrouter import __version__
from tests.servers import clawrouter_command, free_port


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one Prometheus sample (0 when absent), whatever the label order."""
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        metric_name, _, label_text = series.partition("{")
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if metric_name == name and found == labels:
            return float(value)
    return 0.0


def test_metrics_move_after_requests(gateway):
    before = gateway.http.get("/metrics").text
    r = gateway.http.post("/v1/images/generations", json={"model": "cogview", "prompt": "m"})
    assert r.status_code == 200
    gateway.http.post("/v1/images/generations", json={"model": "nope", "prompt": "m"})
    after = gateway.http.get("/metrics")
    assert after.headers["content-type"].startswith("text/plain")
    text = after.text
    labels = {"route": "generations", "model": "zai/cogview-4", "status": "200"}
    assert metric(text, "clawrouter_requests_total", **labels) == \
        metric(before, "clawrouter_requests_total", **labels) + 1
    assert metric(text, "clawrouter_requests_total", route="generations", model="",
                  status="404") >= 1
    assert metric(text, "clawrouter_images_total", model="zai/cogview-4") >= 1
    assert metric(text, "clawrouter_payments_total", outcome="settled") >= 1
    assert metric(text, "clawrouter_spent_usd_total", model="zai/cogview-4") > 0
    assert metric(text, "clawrouter_overhead_seconds_count", route="generations") >= 1
    # the scrape itself is the one request being served (the finished ones were counted down)
    assert metric(text, "clawrouter_requests_in_flight") == 1


def test_request_ids_are_echoed_or_generated(gateway):
    assert gateway.http.get("/health", headers={"x-request-id": "abc-123"}).headers[
        "x-request-id"] == "abc-123"
    generated = gateway.http.get("/v1/nope").headers["x-request-id"]
    assert generated.startswith("req_")
    bad = gateway.http.get("/health", headers={"x-request-id": "bad id\twith junk"})
    assert bad.headers["x-request-id"].startswith("req_")


def test_health_endpoints_never_call_the_upstream(gateway, sandbox):
    for path in ("/health", "/healthz", "/readyz", "/v1/models", "/metrics", "/v1/spend"):
        assert gateway.http.get(path).status_code == 200, path
    assert gateway.http.get("/readyz").json()["status"] == "ready"
    assert sandbox.stats()["requests"] == {}


def run_gateway(tmp_path, sandbox, *args, constants=None, **env):
    """`clawrouter serve` paying `sandbox` (`constants`: as `clawrouter_command`'s)."""
    port = free_port()
    key = Account.create().key.to_0x_hex()
    full_env = {**os.environ, "CLAWROUTER_HOME": str(tmp_path), "BLOCKRUN_API_URL": sandbox.api,
                "CLAWROUTER_NETWORK": "base-sepolia", "BLOCKRUN_WALLET_KEY": key, **env}
    command = clawrouter_command("serve", "--port", str(port), "--no-sandbox", *args,
                                 constants=constants)
    proc = subprocess.Popen(command, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    return proc, port, key


def stop(proc) -> tuple[str, str]:
    proc.terminate()
    try:
        return proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()


@pytest.mark.parametrize("log_prompts", [False, True])
def test_logs_are_json_lines_without_prompts_keys_or_payment_headers(tmp_path, sandbox,
                                                                    log_prompts):
    api_key, wrong_key = "sk-local-Qm7vT2pLx9", "sk-guess-Wd4nR8kZy1"
    proc, port, key = run_gateway(tmp_path, sandbox, CLAWROUTER_API_KEY=api_key,
                                  CLAWROUTER_LOG_PROMPTS=str(log_prompts).lower())
    auth = {"Authorization": f"Bearer {api_key}"}
    try:
        assert "ready" in proc.stdout.readline()
        base = f"http://127.0.0.1:{port}"
        secret_prompt = "a very private prompt about Xyzzy"
        r = httpx.post(base + "/v1/images/generations", headers={"x-request-id": "log-1", **auth},
                       json={"model": "cogview", "prompt": secret_prompt})
        assert r.status_code == 200
        httpx.post(base + "/v1/images/generations", headers=auth,
                   json={"model": "nope", "prompt": "p2"})
        assert httpx.post(base + "/v1/images/generations",
                          headers={"Authorization": f"Bearer {wrong_key}"},
                          json={"model": "cogview", "prompt": "p"}).status_code == 401
        # the route without /v1 shares a prefix with image reads, which are not logged; a
        # paid request is, and so is its repeat (which waited less than the first's upstream)
        for _ in range(2):
            assert httpx.post(base + "/images/generations",
                              headers={"x-request-id": "log-3", **auth},
                              json={"model": "cogview", "prompt": "p3"}).status_code == 200
        httpx.get(r.json()["data"][0]["url"], headers=auth)
        for check in ("/health", "/healthz", "/readyz", "/metrics"):  # quiet when they pass
            assert httpx.get(base + check, headers=auth).status_code == 200, check
    finally:
        _, stderr = stop(proc)
    lines = [json.loads(line) for line in stderr.splitlines()]  # nothing but JSON lines
    # only what a person needs: the requests, not uvicorn's restatement of the ready line
    assert not [line for line in lines if line.get("logger", "").startswith("uvicorn")]
    request_line = next(line for line in lines if line.get("request_id") == "log-1")
    assert request_line["status"] == 200 and request_line["model"] == "zai/cogview-4"
    assert request_line["cost_usd"] == 0.01675 and request_line["outcome"] == "ok"
    assert request_line["latency_ms"] >= request_line["overhead_ms"] >= 0
    assert any(line.get("outcome") == "model_not_found" for line in lines)
    paid = [line for line in lines if line.get("request_id") == "log-3"]
    assert len(paid) == 2 and paid[0]["cost_usd"] == 0.01675
    assert all(line["overhead_ms"] >= 0 for line in paid)
    assert not [line for line in lines if str(line.get("route", "")).startswith("/images/")
                and line.get("method") == "GET"]  # image reads stay quiet
    assert not [line for line in lines if line.get("route") in
                ("/health", "/healthz", "/readyz", "/metrics")]
    assert any(line.get("status") == 401 for line in lines)  # the refusal is logged...
    assert api_key not in stderr and wrong_key not in stderr  # ...without either key
    assert key[2:] not in stderr and key[2:].lower() not in stderr.lower()
    assert "eyJ4NDAyVmVyc2lvbi" not in stderr  # base64 of '{"x402Version…': a payment header
    assert (secret_prompt in stderr) == log_prompts


def test_a_stderr_nobody_reads_never_stops_the_gateway(tmp_path, sandbox):
    """Log lines are written by a thread of their own: written on the event loop, a line to a
    pipe nobody reads froze the gateway after ~290 requests. Lines beyond a bounded queue are
    dropped, counted in /metrics and, once stderr is read again, said in a line."""
    # A queue of 256 lines, not 1024: the same overflow for 900 fewer requests.
    proc, port, _ = run_gateway(tmp_path, sandbox,
                                constants={"clawrouter.observe.LOG_QUEUE_LINES": 256})
    sent = 600  # a 404 is logged, and costs little: more than the pipe and the queue hold
    try:
        assert "ready" in proc.stdout.readline()  # stderr is never read until the end
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for _ in range(sent):
                assert client.get("/v1/nope").status_code == 404
            bad = (b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nhi\r\n'
                   b"--abc--\r\n")  # the parser warns of it; so would other libraries
            for _ in range(200):
                assert client.post("/v1/images/edits", content=bad, headers={
                    "content-type": "multipart/form-data; boundary=abc"}).status_code == 400
            assert client.get("/health").status_code == 200
            dropped = int(metric(client.get("/metrics").text, "clawrouter_log_lines_dropped"))
    finally:
        _, stderr = stop(proc)
    lines = [json.loads(line) for line in stderr.splitlines()]  # every line JSON
    written = [line for line in lines if line.get("status") in (400, 404)]
    assert dropped > 0 and len(written) == sent + 200 - dropped
    assert [line["message"] for line in lines if line.get("logger") == "clawrouter.observe"] \
        == [f"{dropped} log lines were dropped: stderr was not read as fast as they came"]


@pytest.mark.parametrize("command", ["serve", "sandbox"])
def test_a_taken_port_is_one_clear_line_before_anything_is_created(tmp_path, command):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    home = tmp_path / "home"
    with taken:
        run = subprocess.run([sys.executable, "-m", "clawrouter", command, "--port", str(port)],
                             env={**os.environ, "CLAWROUTER_HOME": str(home)},
                             capture_output=True, text=True, timeout=60)
    assert run.returncode == 2, run.stderr
    assert run.stderr == (f"clawrouter: 127.0.0.1:{port} is taken by another program: pick "
                          "another port with --port.\n")
    assert not home.exists()  # no wallet key made, no ledger locked, for nothing


def test_bind_listens_as_asyncio_would():
    """`bind` replaced uvicorn's own binding: "" is every interface, on one port; `::` stays
    IPv6 only; a name that cannot be used is one clear error, not a traceback."""
    from clawrouter.launch import AddressInUse, bind

    sockets = bind("", 0)
    try:
        assert {s.family for s in sockets} >= {socket.AF_INET}
        assert len({s.getsockname()[1] for s in sockets}) == 1
        for s in sockets:
            if s.family == socket.AF_INET6:
                assert s.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
    finally:
        for s in sockets:
            s.close()
    for host in ("a..b", "no-such-host.invalid"):
        with pytest.raises(AddressInUse, match="cannot listen on"):
            bind(host, 0)


def test_bind_skips_an_address_family_the_machine_lacks(monkeypatch):
    """IPv6 switched off: "" still listens on IPv4, as asyncio's binding did."""
    from clawrouter import launch

    real = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: object) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(97, "Address family not supported by protocol")
        return real(family, *args)

    monkeypatch.setattr(launch.socket, "socket", no_ipv6)
    sockets = launch.bind("", 0)
    assert [s.family for s in sockets] == [socket.AF_INET]
    sockets[0].close()


def test_non_loopback_without_api_key_refuses_to_start(tmp_path, sandbox):
    proc, _, _ = run_gateway(tmp_path, sandbox, "--host", "0.0.0.0")
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 2 and "CLAWROUTER_API_KEY" in stderr


def test_a_public_url_on_another_host_needs_the_key_and_turns_local_files_off(tmp_path,
                                                                              sandbox):
    """Behind a reverse proxy the gateway listens on loopback, but whoever reaches the proxy
    reaches it: the same rules as listening beyond loopback. A loopback public_url is not
    a proxy."""
    image = tmp_path / "in.png"
    from clawrouter.sandbox.images import make_png

    image.write_bytes(make_png(16, 16, 1))
    public = "https://pics.example.com"
    proc, _, _ = run_gateway(tmp_path / "a", sandbox, CLAWROUTER_PUBLIC_URL=public)
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 2 and "CLAWROUTER_API_KEY" in stderr and public in stderr
    proc, port, _ = run_gateway(tmp_path / "b", sandbox, CLAWROUTER_PUBLIC_URL=public,
                                CLAWROUTER_API_KEY="s3cret-key")
    try:
        assert "ready" in proc.stdout.readline()
        base, proxied = f"http://127.0.0.1:{port}", {"host": "pics.example.com"}
        r = httpx.post(base + "/v1/images/image2image", headers=proxied,
                       json={"prompt": "x", "image": str(image)})
        assert r.status_code == 401, r.text
        r = httpx.post(base + "/v1/images/image2image",
                       headers={**proxied, "authorization": "Bearer s3cret-key"},
                       json={"prompt": "x", "image": str(image)})
        assert r.status_code == 400 and r.json()["error"]["code"] == "local_files_disabled"
    finally:
        stop(proc)
    proc, _, _ = run_gateway(tmp_path / "c", sandbox,
                             CLAWROUTER_PUBLIC_URL="http://localhost:9000/claw")
    try:
        assert "ready" in proc.stdout.readline()
    finally:
        stop(proc)
    assert sandbox.stats()["payments_count"] == 0


def test_non_loopback_requires_the_key_and_turns_local_files_off(tmp_path, sandbox):
    image = tmp_path / "in.png"
    from clawrouter.sandbox.images import make_png

    image.write_bytes(make_png(16, 16, 1))
    proc, port, _ = run_gateway(tmp_path / "home", sandbox, "--host", "0.0.0.0",
                                CLAWROUTER_API_KEY="s3cret-key")
    try:
        assert "ready" in proc.stdout.readline()
        base = f"http://127.0.0.1:{port}"
        # health checks stay open, but only the key's holders see the wallet and its balance
        for headers in ({}, {"authorization": "Bearer wrong"}):
            anyone = httpx.get(base + "/health", headers=headers)
            assert anyone.status_code == 200
            assert anyone.json() == {"status": "ok", "version": __version__,
                                     "api_key": "required"}
        holder = httpx.get(base + "/health", headers={"authorization": "Bearer s3cret-key"})
        assert holder.json()["wallet"].startswith("0x") and "instance" in holder.json()
        assert httpx.get(base + "/healthz").status_code == 200
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret-key"}):
            r = httpx.get(base + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        good = {"authorization": "Bearer s3cret-key"}
        assert httpx.get(base + "/v1/models", headers=good).status_code == 200
        # the scheme is case-insensitive (RFC 9110 §11.1); a Host of any name is fine off
        # loopback, where the key is what protects the gateway
        assert httpx.get(base + "/v1/models", headers={"authorization": "bearer s3cret-key",
                                                       "host": "gpu-box.lan"}).status_code == 200
        r = httpx.post(base + "/v1/images/image2image", headers=good,
                       json={"prompt": "x", "image": str(image)})
        assert r.status_code == 400 and r.json()["error"]["code"] == "local_files_disabled"
    finally:
        stop(proc)
    assert sandbox.stats()["payments_count"] == 0


def test_bind_skips_an_address_the_machine_lacks(monkeypatch):
    """IPv6 switched off by sysctl: `::1` cannot be bound though the socket can be made;
    `localhost` (which may name both) still listens on 127.0.0.1."""
    import errno

    from clawrouter import launch

    v4 = (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0))
    v6 = (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 0, 0, 0))
    monkeypatch.setattr(launch.socket, "getaddrinfo", lambda *a, **k: [v6, v4])
    real_bind = socket.socket.bind

    class NoIPv6(socket.socket):
        def bind(self, address: object) -> None:
            if self.family == socket.AF_INET6:
                raise OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address")
            real_bind(self, address)

    monkeypatch.setattr(launch.socket, "socket", NoIPv6)
    sockets = launch.bind("localhost", 0)
    assert [s.family for s in sockets] == [socket.AF_INET]
    sockets[0].close()


def serve_alone(home, *args: str, **env: str) -> subprocess.Popen:
    """`serve` with its in-process sandbox and no configured key: the data directory's own."""
    return subprocess.Popen([sys.executable, "-m", "clawrouter", "serve", "--sandbox",
                             "--port", "0", *args],
                            env={**os.environ, "CLAWROUTER_HOME": str(home), **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _regular_file(home):
    home.write_text("not a directory")
    return f"{home} is a file, not a directory"


def _key_is_a_directory(home):
    (home / "wallet.key").mkdir(parents=True)
    return f"{home / 'wallet.key'}: it is a directory, not a file"


def _damaged_ledger(home):
    home.mkdir()
    (home / "ledger-base-sepolia.sqlite3").write_bytes(b"not a database at all " * 20)
    return f"{home / 'ledger-base-sepolia.sqlite3'} is damaged or not a database"


@pytest.mark.parametrize("spoil", [_regular_file, _key_is_a_directory, _damaged_ledger])
def test_a_data_directory_that_cannot_be_used_is_one_clear_line(tmp_path, spoil):
    """A data directory that is a file, a key file that is a folder, a damaged ledger: one
    line naming the file and what to do, exit 2, never a traceback."""
    home = tmp_path / "home"
    expected = spoil(home)
    proc = serve_alone(home)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 2, stderr
    assert "Traceback" not in stderr and stderr.count("\n") == 1, stderr
    assert stderr.startswith("clawrouter: ") and expected in stderr
    assert "move it away" in stderr


def test_serve_says_where_the_key_comes_from_and_to_back_up_a_new_one(tmp_path):
    """A key made on the first start must be backed up before the wallet is funded; later
    starts say which file pays. Never the key itself."""
    home = tmp_path / "home"
    logs = []
    for _ in range(2):
        proc = serve_alone(home)
        try:
            assert "ready" in proc.stdout.readline()
        finally:
            _, stderr = stop(proc)
        logs.append([json.loads(line)["message"] for line in stderr.splitlines()])
    key = (home / "wallet.key").read_text().strip()
    created, loaded = ([m for m in messages if "wallet key" in m] for messages in logs)
    assert created == [f"created a new wallet key in {home / 'wallet.key'} (mode 0600): back "
                       "it up before funding the wallet; it is the only copy of this wallet's "
                       "key"]
    assert loaded == [f"wallet key loaded from {home / 'wallet.key'}"]
    assert key[2:] not in str(logs)


def test_the_ready_line_brackets_an_ipv6_address(tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    proc = serve_alone(tmp_path / "home", "--host", "::", CLAWROUTER_API_KEY="k")
    try:
        line = proc.stdout.readline()
    finally:
        _, stderr = stop(proc)
    if "cannot listen on" in stderr:
        pytest.skip("IPv6 is off on this machine")
    assert re.match(r"clawrouter ready on http://\[::1\]:\d+/v1 "
                    r"\(listening on all IPv6 interfaces: \[::\], ", line), line


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_gateway_whose_stderr_nobody_reads_still_stops(tmp_path, sandbox, sig):
    """With its log writer stuck on a full pipe, Ctrl-C or SIGTERM must still end it: the
    writer holds no lock the exit needs, and the exit waits for it once, briefly."""
    # the exit's wait for the stuck writer: 0.3 s here, not 5 (it used to hang for good)
    proc, port, _ = run_gateway(tmp_path, sandbox,
                                constants={"clawrouter.observe.LOG_FLUSH_SECONDS": 0.3})
    try:
        assert "ready" in proc.stdout.readline()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            for _ in range(600):  # more lines than the pipe holds
                client.get("/v1/nope")
        proc.send_signal(sig)
        code = proc.wait(timeout=30)
        assert code in (-sig, 128 + sig, 0, 1), code
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_until_full(pipe: int) -> None:
    """Until the pipe whose read end is `pipe` has no room for another line (they are 6 KB;
    Linux leaves the last page's tail unused): a fixed wait could end before a child on a busy
    machine had even started writing. (A second where the pipe's size is unknown.)"""
    if not hasattr(fcntl, "F_GETPIPE_SZ"):
        time.sleep(1.0)
        return
    capacity, held = fcntl.fcntl(pipe, fcntl.F_GETPIPE_SZ), array.array("i", [0])
    deadline = time.monotonic() + 30
    while fcntl.ioctl(pipe, termios.FIONREAD, held) == 0 and held[0] < capacity - 4096:
        assert time.monotonic() < deadline, f"{held[0]} of {capacity} bytes in the pipe"
        time.sleep(0.02)


def test_log_lines_survive_a_non_blocking_stderr(tmp_path):
    """A parent may share a non-blocking stderr (a Node harness does): a full pipe is then an
    error to wait out, not a closed stderr; no line is lost or cut in two."""
    script = (
        "import logging, os\n"
        "os.set_blocking(2, False)\n"
        "from clawrouter.observe import flush_logs, setup_logging\n"
        "setup_logging('info')\n"
        "log = logging.getLogger('clawrouter.test')\n"
        "for i in range(40):\n"
        "    log.info('line %d %s', i, 'x' * 6000)\n"
        "flush_logs()\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    wait_until_full(proc.stderr.fileno())  # before anyone reads
    time.sleep(0.2)  # and stays full a while
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr[-500:]
    lines = [json.loads(line) for line in stderr.splitlines()]
    assert [line["message"].split()[1] for line in lines] == [str(i) for i in range(40)]
