"""Stopping `clawrouter serve` (Ctrl-C, SIGTERM) at any moment: a real gateway process, real
signals, requests at each stage. It exits in bounded time, signs nothing new once stopping,
leaves every signed payment in the ledger for the next start, and every client still there
hears an OpenAI envelope (or an `error` event), never a hang or a traceback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from eth_account import Account

from tests.servers import clawrouter_command, dead_port, free_port, until
from tests.test_cli_polish import ctrl_c_as_in_a_terminal

#: how long a stopped gateway may take to exit once its grace is over (a loaded machine)
EXIT_SECONDS = 30
#: what must never reach stderr while stopping
NEVER = ("Traceback", "Task was destroyed", "never awaited", "ResourceWarning", "Unclosed",
         "Exception in ASGI", "without completing response")
#: Log lines go out through a writer thread, and the last flush comes when the server has shut
#: down: a line logged after it (a task destroyed at exit) would never be seen. So the gateway
#: also writes a plain copy of every line straight to stderr.
_PLAIN_COPY = (
    "import logging, sys, clawrouter.observe as o\n"
    "def _with_plain_copy(level, _setup=o.setup_logging):\n"
    "    _setup(level)\n"
    "    plain = logging.StreamHandler(sys.stderr)\n"
    "    plain.setFormatter(logging.Formatter('PLAIN %(name)s %(message)s'))\n"
    "    for name in ('', 'clawrouter', 'uvicorn', 'uvicorn.error'):\n"
    "        logging.getLogger(name).addHandler(plain)\n"
    "o.setup_logging = _with_plain_copy\n")


@dataclass
class Served:
    proc: subprocess.Popen[str]
    url: str
    home: Path
    key: str
    port: int

    def post(self, body: dict[str, Any], **headers: str) -> httpx.Response:
        return httpx.post(self.url + "/v1/images/generations", json=body, headers=headers,
                          timeout=120)


def serve(home: Path, sandbox, *, grace: float, key: str | None = None,
          port: int | None = None, **settings: str) -> Served:
    """`clawrouter serve` paying `sandbox`, stopping with `grace` seconds for its requests
    (`settings`: more environment, `CLAWROUTER_…`)."""
    key = key or Account.create().key.to_0x_hex()
    port = port or free_port()
    env = {**os.environ, "CLAWROUTER_HOME": str(home), "BLOCKRUN_API_URL": sandbox.api,
           "CLAWROUTER_NETWORK": "base-sepolia", "BLOCKRUN_WALLET_KEY": key,
           "CLAWROUTER_RPC_URLS": json.dumps([sandbox.url + "/_sandbox/rpc"]),
           "CLAWROUTER_SHUTDOWN_GRACE_SECONDS": str(grace),
           "PYTHONWARNINGS": "always::ResourceWarning", **settings}
    command = clawrouter_command("serve", "--port", str(port), "--no-sandbox")
    command[2] = _PLAIN_COPY + command[2]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    line = proc.stdout.readline()
    if "ready" not in line:
        proc.kill()
        pytest.fail(f"the gateway did not start: {line} {proc.communicate()[1][-2000:]}")
    return Served(proc, f"http://127.0.0.1:{port}", home, key, port)


def exited(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """The exit code and stderr of a stopping gateway, which must exit within `EXIT_SECONDS`."""
    try:
        _, stderr = proc.communicate(timeout=EXIT_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"still running {EXIT_SECONDS} s after it was told to stop: "
                    f"{proc.communicate()[1][-2000:]}")
    return proc.returncode, stderr


def quiet(stderr: str) -> None:
    """Nothing went wrong on the way out: JSON lines (and their plain copies) only, and no
    traceback, destroyed task or unclosed resource among them."""
    for line in stderr.splitlines():
        assert not any(word in line for word in NEVER), stderr
        if not line.startswith("PLAIN "):
            json.loads(line)


def in_background(call: Callable[[], Any]) -> Callable[[], Any]:
    """Start `call` in a thread; the returned function waits for its result (or exception)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = call()
        except Exception as exc:
            box["result"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def result() -> Any:
        thread.join(EXIT_SECONDS)
        assert not thread.is_alive(), "the client still hangs"
        return box["result"]

    return result


def payments(home: Path, *, missing: list[Any] | None = None) -> list[tuple[str, str | None]]:
    """(status, note) of each ledger row, read as the next start would find the file;
    `missing` if the gateway has not made its table yet (else that fails)."""
    conn = sqlite3.connect(home / "ledger-base-sepolia.sqlite3")
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        return conn.execute("SELECT status, note FROM payments ORDER BY id").fetchall()
    except sqlite3.OperationalError:
        if missing is None:
            raise
        return missing
    finally:
        conn.close()


def stopped_listening(url: str) -> bool:
    """Whether the gateway stopped listening: it has begun to stop."""
    try:
        httpx.get(url + "/healthz", timeout=5)
    except httpx.ConnectError:
        return True
    except httpx.TransportError:  # taken just before, then closed unanswered
        pass
    return False


def paid(sandbox) -> int:
    return sandbox.stats()["payments_count"]


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The OpenAI envelope's `error`: the body's, or a stream's closing `error` event's."""
    if not response.headers["content-type"].startswith("text/event-stream"):
        body = response.json()
    else:
        event, data = response.text.strip().split("\n\n")[-1].split("\n")
        assert event == "event: error", response.text
        body = json.loads(data.removeprefix("data: "))
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body
    return body["error"]


def test_a_paid_request_under_way_ends_normally_while_new_connections_are_refused(
        tmp_path, own_sandbox):
    own_sandbox.faults({"kind": "delay", "phase": "paid", "seconds": 3, "times": 1})
    gw = serve(tmp_path, own_sandbox, grace=120)
    answer = in_background(lambda: gw.post({"model": "cogview", "prompt": "a fox"}))
    until(lambda: paid(own_sandbox) == 1, "the payment to arrive")
    gw.proc.send_signal(signal.SIGINT)
    until(lambda: stopped_listening(gw.url), "the gateway to stop listening")
    code, stderr = exited(gw.proc)  # well before the grace: nothing was left to wait for
    assert answer().status_code == 200
    assert payments(tmp_path) == [("settled", None)]
    assert code in (130, -signal.SIGINT)
    quiet(stderr)


def test_no_payment_is_signed_once_stopping_has_begun(tmp_path, own_sandbox):
    """A request whose 402 comes back after Ctrl-C is not paid: a 503 saying nothing was."""
    own_sandbox.faults({"kind": "delay", "phase": "unpaid", "seconds": 3, "times": 1})
    gw = serve(tmp_path, own_sandbox, grace=120)
    answer = in_background(lambda: gw.post({"model": "cogview", "prompt": "a fox"}))
    until(lambda: own_sandbox.stats()["round_trips"] == 1, "the unpaid request upstream")
    gw.proc.send_signal(signal.SIGINT)
    code, stderr = exited(gw.proc)
    response = answer()
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "gateway_stopping" and error["payment"] == "none"
    assert paid(own_sandbox) == 0 and payments(tmp_path) == []
    quiet(stderr)


@pytest.mark.parametrize("stream", [False, True])
def test_a_slow_job_is_cut_off_after_the_grace_and_its_retry_after_a_restart_pays_nothing(
        tmp_path, own_sandbox, stream):
    own_sandbox.configure(slow_seconds=600)
    gw = serve(tmp_path, own_sandbox, grace=2)
    body = {"model": "gpt-image-2", "prompt": "a slow lighthouse", "stream": stream}
    answer = in_background(lambda: gw.post(body, **{"x-stainless-retry-count": "0"}))
    until(lambda: own_sandbox.stats()["polls"] >= 1, "the paid job to be polled")
    gw.proc.send_signal(signal.SIGTERM)
    code, stderr = exited(gw.proc)
    response = answer()  # (a stream's 200 went out with the job: it ends with an event)
    assert response.status_code == (200 if stream else 503)
    assert error_of(response)["code"] == "gateway_stopped"
    assert code in (-signal.SIGTERM, 128 + signal.SIGTERM)
    quiet(stderr)
    # Left as it was, for the next start to mark `unknown` and settle with the chain ...
    assert payments(tmp_path) == [("signed", None)] and paid(own_sandbox) == 1
    again = serve(tmp_path, own_sandbox, grace=2, key=gw.key, port=gw.port)
    try:  # ... and the SDK's retry of the request it cut off is not paid again
        retry = again.post(body, **{"x-stainless-retry-count": "1"})
        assert retry.status_code == (200 if stream else 409), retry.text
        assert error_of(retry)["code"] == "repeat_paid_before_restart"
        assert paid(own_sandbox) == 1
    finally:
        again.proc.send_signal(signal.SIGINT)
        exited(again.proc)


@pytest.mark.parametrize("stop", ["cut off after the grace", "kill -9"])
def test_a_paid_result_cut_off_before_it_was_stored_is_not_paid_again_by_its_retry(
        tmp_path, own_sandbox, stop):
    """The payment settled, but the gateway stopped (or died) while it fetched the image: the
    client never had its answer, so the SDK's retry after the restart is a 409 naming the
    payment, not a second one. A request whose image was stored before the stop is paid
    anew (its client had its answer), and so is the cut-off one when its user asks anew."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    from tests.servers import serving

    fetches, released = [], threading.Event()

    async def hanging(request):
        fetches.append(request.url.path)
        while not released.is_set():  # (asleep on the event loop, not blocking it)
            await asyncio.sleep(0.05)
        return Response(b"too late", 503)

    private = {"CLAWROUTER_ALLOW_PRIVATE_URLS": "true"}  # the image host is on loopback
    fox, owl = {"model": "cogview", "prompt": "a fox"}, {"model": "cogview", "prompt": "an owl"}
    with serving(Starlette(routes=[Route("/owl.png", hanging)])) as host:
        gw = serve(tmp_path, own_sandbox, grace=1, **private)
        try:
            assert gw.post(fox, **{"x-stainless-retry-count": "0"}).status_code == 200
            own_sandbox.faults({"kind": "respond", "phase": "paid", "status": 200,
                                "settle": True, "times": 1,
                                "body": {"created": 1, "data": [{"url": host.url + "/owl.png"}]}})
            answer = in_background(lambda: gw.post(owl, **{"x-stainless-retry-count": "0"}))
            until(lambda: fetches and payments(tmp_path)[-1][0] == "settled",
                  "the settled payment's image to be fetched")
            if stop == "kill -9":
                gw.proc.kill()
                gw.proc.wait()
                assert isinstance(answer(), httpx.TransportError)
            else:
                gw.proc.send_signal(signal.SIGTERM)
                code, stderr = exited(gw.proc)
                assert error_of(answer())["code"] == "gateway_stopped"
                quiet(stderr)
        finally:
            released.set()
            gw.proc.kill()
            gw.proc.wait()
    assert [status for status, _ in payments(tmp_path)] == ["settled", "settled"]
    assert paid(own_sandbox) == 2
    again = serve(tmp_path, own_sandbox, grace=1, key=gw.key, port=gw.port, **private)
    try:
        retry = again.post(owl, **{"x-stainless-retry-count": "1"})
        assert retry.status_code == 409, retry.text
        error = error_of(retry)
        assert (error["code"], error["payment"]) == ("repeat_paid_before_restart", "settled")
        assert retry.headers["x-should-retry"] == "false"
        assert paid(own_sandbox) == 2
        # a request whose image was stored is paid anew, retry or not: its client had it
        assert again.post(fox, **{"x-stainless-retry-count": "1"}).status_code == 200
        assert paid(own_sandbox) == 3
        # and the cut-off one, asked for anew by its user (`clawrouter generate` run again)
        assert again.post(owl, **{"x-clawrouter-new-call": "true"}).status_code == 200
        assert paid(own_sandbox) == 4
    finally:
        again.proc.send_signal(signal.SIGINT)
        exited(again.proc)


def test_generate_run_again_after_ctrl_c_makes_and_pays_for_the_image(tmp_path):
    """`clawrouter generate` interrupted once it had paid (its own gateway cut the slow job
    off) says a payment may have been made. Run again, the same command is a new call: paid
    and saved, not a 409 about the first payment, which no gateway a command starts for
    itself could ever get past."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CLAWROUTER_", "BLOCKRUN_"))}
    env |= {"CLAWROUTER_HOME": str(home), "CLAWROUTER_OUT": str(tmp_path / "out"),
            "CLAWROUTER_SANDBOX": "true", "CLAWROUTER_PORT": str(dead_port())}
    args = ("generate", "a slow fox", "--model", "gpt-image-2", "--json")
    first = subprocess.Popen(
        clawrouter_command(*args, constants={"clawrouter.launch.SANDBOX_SLOW_SECONDS": 600.0}),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=ctrl_c_as_in_a_terminal)
    ledger = home / "ledger-base-sepolia.sqlite3"
    until(lambda: ledger.exists() and payments(home, missing=[]), "the slow job's payment")
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=EXIT_SECONDS)
    assert first.returncode == 130, err
    assert json.loads(out)["error"]["code"] == "interrupted" and "may already have paid" in err
    second = subprocess.run(clawrouter_command(*args), env=env, capture_output=True, text=True,
                            timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    [image] = json.loads(second.stdout)["images"]
    assert Path(image["path"]).is_file()
    assert [status for status, _ in payments(home)] == ["unknown", "settled"]


def test_a_stream_whose_client_left_is_waited_for_before_the_ledger_closes(
        tmp_path, own_sandbox):
    """The stream's work outlives its client (it stops at its next safe point): stopping
    waits for it, so its outcome reaches the ledger before the ledger closes."""
    own_sandbox.configure(slow_seconds=600)
    gw = serve(tmp_path, own_sandbox, grace=60)
    with httpx.stream("POST", gw.url + "/v1/images/generations", timeout=60,
                      json={"model": "gpt-image-2", "prompt": "gone", "stream": True}) as r:
        assert r.status_code == 200  # sent once the paid job was accepted: then it leaves
    gw.proc.send_signal(signal.SIGINT)
    _, stderr = exited(gw.proc)
    # (the job it left is abandoned, unsettled, once no client came back for it)
    assert payments(tmp_path) == [("rejected", "not settled: the client left during polling")]
    quiet(stderr)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_stops_at_once_and_closes_the_ledger(tmp_path, own_sandbox, sig):
    own_sandbox.configure(slow_seconds=600)
    gw = serve(tmp_path, own_sandbox, grace=600)  # (a second signal must not wait it out)
    answer = in_background(lambda: gw.post({"model": "gpt-image-2", "prompt": "p"}))
    until(lambda: own_sandbox.stats()["polls"] >= 1, "the paid job to be polled")
    gw.proc.send_signal(sig)
    until(lambda: stopped_listening(gw.url), "the gateway to begin stopping")
    gw.proc.send_signal(sig)
    _, stderr = exited(gw.proc)
    # closed, not abandoned: the write-ahead log was checkpointed and removed (looked at
    # before the ledger is opened here, which would do the same when it closes)
    assert not (tmp_path / "ledger-base-sepolia.sqlite3-wal").exists()
    assert error_of(answer())["code"] == "gateway_stopped"
    assert payments(tmp_path) == [("signed", None)]
    quiet(stderr)


def test_an_upload_still_being_read_is_cut_off_after_the_grace(tmp_path, own_sandbox):
    gw = serve(tmp_path, own_sandbox, grace=1)
    heard: list[bytes] = []
    with socket.create_connection(("127.0.0.1", gw.port), timeout=EXIT_SECONDS) as sock:
        sock.sendall(b"POST /v1/images/edits HTTP/1.1\r\nHost: localhost\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 8000000\r\n\r\n"
                     b'{"prompt": "x", "image": "data:image/png;base64,')
        sock.sendall(b"A" * 200_000)
        gw.proc.send_signal(signal.SIGINT)
        sock.settimeout(0.2)
        try:  # the upload goes on (well above the slowest rate allowed) until it is cut off
            for _ in range(int(EXIT_SECONDS / 0.2)):
                sock.sendall(b"A" * 20_000)
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                heard.append(data)
                if not data:
                    break
        except OSError:
            pass  # reset while sending: the answer may be lost, the connection is closed
        else:
            assert heard and not heard[-1], "the connection stayed open"
    _, stderr = exited(gw.proc)
    answer = b"".join(heard)
    if answer:
        assert answer.startswith(b"HTTP/1.1 503") and b'"gateway_stopped"' in answer
    quiet(stderr)


def test_the_built_in_sandbox_outlives_the_gateway_that_uses_it(tmp_path, monkeypatch):
    """The commands stop their in-process gateway by telling both of its servers at once
    (`LocalGateway.stop`): the sandbox goes on serving until the gateway's requests under way
    have ended, so a payment already sent still brings its image."""
    from clawrouter.cli import client
    from clawrouter.cli.client import LocalGateway
    from tests.conftest import gateway_settings

    # (time enough for the delayed answer on a loaded machine; the grace's own test is below)
    monkeypatch.setattr(client, "STOP_GRACE", 30.0)
    monkeypatch.setattr(client, "STOP_WAIT", 60.0)
    local = LocalGateway(gateway_settings(tmp_path, "http://unused.invalid/api", sandbox=True))
    url = local.start()
    sandbox = httpx.Client(base_url=local._app.state.gw.settings.upstream_url.removesuffix("/api"))
    sandbox.post("/_sandbox/faults", json=[{"kind": "delay", "phase": "paid", "seconds": 2}])
    answer = in_background(lambda: httpx.post(url + "/v1/images/generations", timeout=60,
                                              json={"model": "cogview", "prompt": "a fox"}))
    until(lambda: sandbox.get("/_sandbox/stats").json()["payments_count"] == 1,
          "the payment to arrive")
    local.stop()
    sandbox.close()
    response = answer()
    assert response.status_code == 200, response.text


def test_a_commands_own_gateway_cuts_off_its_requests_in_time_to_close_the_ledger(
        tmp_path, monkeypatch):
    """A command's in-process gateway is waited for `STOP_WAIT` seconds only (the command's
    user waits too): its grace is shorter, so a slow job still running is cut off and the
    ledger closed, not abandoned with the process, and the payment stays `signed`."""
    from clawrouter import launch
    from clawrouter.cli.client import STOP_WAIT, LocalGateway
    from tests.conftest import gateway_settings

    monkeypatch.setattr(launch, "SANDBOX_SLOW_SECONDS", 600.0)
    local = LocalGateway(gateway_settings(tmp_path, "http://unused.invalid/api", sandbox=True))
    url = local.start()
    answer = in_background(lambda: httpx.post(url + "/v1/images/generations", timeout=60,
                                              json={"model": "gpt-image-2", "prompt": "slow"}))
    home = local._app.state.gw.settings.home
    until(lambda: payments(home) == [("signed", None)], "the payment to be signed")
    local.stop()
    assert not local._thread.is_alive(), f"still stopping after {STOP_WAIT} s"
    assert not (home / "ledger-base-sepolia.sqlite3-wal").exists()  # closed, not abandoned
    assert error_of(answer())["code"] == "gateway_stopped"
    assert payments(home) == [("signed", None)]
