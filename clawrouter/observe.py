"""Metrics (Prometheus text via prometheus-client) and one JSON log line per request.

Logs never contain prompts (unless `log_prompts`), images, payment headers or keys: the line is
built from an allowlist of fields, not from the request.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import queue
import select
import sys
import threading
import time
from logging.handlers import QueueHandler, QueueListener
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clawrouter.catalog import to_usd

access_log = logging.getLogger("clawrouter.access")

#: label values for routes; anything else is "other" (bounded label cardinality)
ROUTES = {
    "/v1/images/generations": "generations", "/images/generations": "generations",
    "/v1/images/image2image": "image2image", "/images/image2image": "image2image",
    "/v1/images/edits": "edits", "/images/edits": "edits",
}
QUIET_PREFIXES = ("/images/", "/health", "/healthz", "/readyz", "/metrics")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.5)
#: log lines waiting for the writer thread (about 1 MB); more are dropped and counted
LOG_QUEUE_LINES = 1024
#: how long exit waits for the writer to empty the queue: stderr may be a pipe nobody reads
LOG_FLUSH_SECONDS = 5.0


class Metrics:
    """One registry per app, so several gateways in one process keep separate numbers."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("clawrouter_requests", "Requests by route, model and status",
                                ["route", "model", "status"], registry=r)
        self.latency = Histogram("clawrouter_request_seconds", "Total request latency",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.upstream = Histogram("clawrouter_upstream_seconds",
                                  "Time spent waiting on the upstream (incl. polling)",
                                  ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram("clawrouter_overhead_seconds",
                                  "Gateway time: total minus upstream", ["route"],
                                  buckets=OVERHEAD_BUCKETS, registry=r)
        self.images = Counter("clawrouter_images", "Images delivered", ["model"], registry=r)
        self.spent = Counter("clawrouter_spent_usd", "USD signed for settled payments",
                             ["model"], registry=r)
        self.payments = Counter("clawrouter_payments", "Signed payments by outcome",
                                ["outcome"], registry=r)
        #: requests being served; a plain int read only when /metrics is scraped (a Gauge's
        #: inc/dec takes a lock on every request)
        self.serving = 0
        Gauge("clawrouter_requests_in_flight", "Requests being served",
              registry=r).set_function(lambda: self.serving)
        Gauge("clawrouter_log_lines_dropped", "Log lines dropped since start because stderr "
              "was not read as fast as they came", registry=r).set_function(
                  lambda: _handler.dropped if _handler is not None else 0)

    def payment(self, outcome: str, amount: int, model: str) -> None:
        self.payments.labels(outcome).inc()
        if outcome == "settled":
            self.spent.labels(model).inc(to_usd(amount))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Observe:
    """Count, time and log every request (pure ASGI: a few microseconds each)."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics, log_prompts: bool = False) -> None:
        self.app = app
        self.metrics = metrics
        self.log_prompts = log_prompts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        self.metrics.serving += 1

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            self.metrics.serving -= 1
            self._record(scope, status, time.perf_counter() - started)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        path = scope["path"]
        route = ROUTES.get(path, "other")
        st = scope.get("state", {})
        obs: dict[str, Any] = st.get("obs", {})
        model = obs.get("model", "")
        m = self.metrics
        m.requests.labels(route, model, str(status)).inc()
        m.latency.labels(route).observe(seconds)
        upstream = obs.get("upstream_ms")
        if upstream is not None:
            m.upstream.labels(route).observe(upstream / 1000)
            m.overhead.labels(route).observe(max(0.0, seconds - upstream / 1000))
        if status == 200 and obs.get("images"):
            m.images.labels(model).inc(obs["images"])
        # quiet: reads of images and health (many, free); never a paid request (a POST)
        if (path.startswith(QUIET_PREFIXES) and status < 400 and route == "other"
                or not access_log.isEnabledFor(logging.INFO)):
            return
        line: dict[str, Any] = {
            "request_id": st.get("request_id"), "method": scope["method"], "route": path,
            "model": model or None, "status": status, "latency_ms": round(seconds * 1000, 2),
            "upstream_ms": round(upstream, 2) if upstream is not None else None,
            "overhead_ms": (round(max(0.0, seconds * 1000 - upstream), 2)
                            if upstream is not None else None),
            "cost_usd": to_usd(obs["amount"]) if obs.get("amount") else 0.0,
            # a stream's error comes after its 200: the pipeline notes it in `obs`
            "outcome": _outcome(status, st.get("error_code") or obs.get("error_code")),
        }
        payment = st.get("payment") or obs.get("payment")
        if payment is not None:  # what happened to a failed request's payment, if any
            line["payment"] = payment
        if self.log_prompts and obs.get("prompt"):
            line["prompt"] = obs["prompt"]
        access_log.info(json.dumps(line, separators=(",", ":")))


def _outcome(status: int, code: str | None) -> str:
    if code:
        return code
    return "ok" if status < 400 else "client_error" if status < 500 else "error"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        if record.name == "clawrouter.access":
            return record.getMessage()
        line = {"time": round(record.created, 3), "level": record.levelname.lower(),
                "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info).splitlines()[-1]
        return json.dumps(line, separators=(",", ":"))


class DroppingQueueHandler(QueueHandler):
    """Hand each formatted line to the writer thread without ever waiting for it.

    Written on the event loop, a line to stderr on a pipe nobody reads blocked the loop: the
    gateway froze after ~290 requests. When the queue is full the line is dropped and counted,
    and the next line that fits is preceded by one saying how many were lost.
    """

    def __init__(self, lines: queue.Queue[Any]) -> None:
        super().__init__(lines)
        self.dropped = 0
        self._told = 0  # of `dropped`, how many a line has reported

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.tell_dropped()
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def tell_dropped(self) -> None:
        """Queue a line saying how many lines were dropped since the last one said so (call
        with the handler's lock held); `queue.Full` if it does not fit either."""
        if self.dropped > self._told:
            self.queue.put_nowait(self.prepare(logging.LogRecord(
                __name__, logging.WARNING, __file__, 0, "%d log lines were dropped: stderr was "
                "not read as fast as they came", (self.dropped - self._told,), None)))
            self._told = self.dropped


class LogWriter(QueueListener):
    """The thread that writes queued lines to stderr: straight to its file descriptor, holding
    no lock of Python's while a write blocks (a pipe nobody reads), so nothing else — the exit's
    `logging.shutdown`, a final flush of `sys.stderr` — can be stuck behind it."""

    def __init__(self, lines: queue.Queue[Any]) -> None:
        super().__init__(lines)
        try:
            self._fd: int | None = sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):  # stderr replaced by something in memory
            self._fd = None

    def handle(self, record: logging.LogRecord | threading.Event) -> None:
        if isinstance(record, threading.Event):  # `flush`'s mark: all lines before it written
            record.set()
            return
        line = record.getMessage() + "\n"  # formatted already (`QueueHandler.prepare`)
        if self._fd is None:
            sys.stderr.write(line)
            return
        data = memoryview(line.encode("utf-8", "replace"))
        try:
            while data:
                try:
                    data = data[os.write(self._fd, data):]
                except BlockingIOError:  # a non-blocking stderr (shared with a parent): wait
                    select.select([], [self._fd], [])
        except OSError:  # stderr closed: there is nobody to tell
            pass

    def flush(self, timeout: float) -> bool:
        """Wait until the lines queued so far are written, or about `timeout` seconds (stderr
        may be a pipe nobody reads); True if they were."""
        deadline = time.monotonic() + timeout
        mark = threading.Event()
        try:
            self.queue.put(mark, timeout=timeout)
        except queue.Full:
            return False
        return mark.wait(max(0.0, deadline - time.monotonic()))


_handler: DroppingQueueHandler | None = None
_writer: LogWriter | None = None
_stuck = False  # a flush timed out: the writer cannot write


def setup_logging(level: str) -> None:
    """JSON lines on stderr for our loggers and uvicorn's, written by a thread of their own
    (see `DroppingQueueHandler`; `flush_logs` at exit).

    uvicorn speaks from warnings up (bad requests, errors) unless `level` is debug: its
    lifecycle lines (started, waiting for startup, running on …) only repeat `serve`'s one ready
    line, and the in-process sandbox's "running on" names a port that is not the gateway's.
    """
    global _handler, _writer
    handler = DroppingQueueHandler(queue.Queue(LOG_QUEUE_LINES))
    handler.setFormatter(JsonFormatter())  # formatted here: the writer prints `msg` as it is
    for name in ("clawrouter", "uvicorn", "uvicorn.error"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        quiet = name.startswith("uvicorn") and level != "debug"
        logger.setLevel("WARNING" if quiet else level.upper())
        logger.propagate = False
    # Everyone else's warnings (asyncio, aiohttp, Python's own) take the same way: never a
    # write to stderr on the event loop, never a line that is not JSON.
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel("WARNING")
    logging.captureWarnings(True)
    # A malformed form is the client's 400, which says what was wrong; no warning of ours.
    logging.getLogger("python_multipart").setLevel("ERROR")
    if _writer is not None:  # set up again: the old writer ends after its lines
        with contextlib.suppress(queue.Full):
            _writer.enqueue_sentinel()
    _handler, _writer = handler, LogWriter(handler.queue)
    _writer.start()
    atexit.unregister(flush_logs)
    atexit.register(flush_logs)


def flush_logs() -> None:
    """Write the lines queued so far before the process ends (at exit, and when a server shuts
    down: uvicorn then re-raises the signal that stopped it, and `atexit` never runs)."""
    global _stuck
    if _writer is None or _handler is None or _stuck:
        return
    if not _writer.flush(LOG_FLUSH_SECONDS):
        _stuck = True  # a writer stuck on a pipe nobody reads: later calls wait no more
        return
    with _handler.lock:  # `emit` holds it too
        with contextlib.suppress(queue.Full):
            _handler.tell_dropped()  # the queue was full when the last line was dropped
    _writer.flush(LOG_FLUSH_SECONDS)
