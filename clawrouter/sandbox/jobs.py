"""Async image jobs (BlockRun's 202 + poll path): a paid request that finishes later.

A job is verified at POST time but settled only on its first `completed` poll; its state is a
function of the clock, so no background task is needed.
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Literal

from clawrouter.sandbox.validate import ImageRequest

Outcome = Literal["completed", "failed", "never"]
MAX_JOBS = 10_000
DEFAULT_ERROR = "content policy violation"


def poll_path(job_id: str) -> str:
    """Where a job is polled; BlockRun's `poll_url` already includes `/api`."""
    return f"/api/v1/images/generations/{job_id}"


@dataclass
class Job:
    request: ImageRequest
    payer: str
    nonce: str
    amount: int
    valid_before: int
    created: float
    ready_at: float
    outcome: Outcome = "completed"
    error: str = DEFAULT_ERROR
    base_url: str = ""
    id: str = field(default_factory=lambda: f"img_{secrets.token_hex(12)}")
    #: filled on the first completed poll
    result: list[dict[str, Any]] | None = None
    transaction: str | None = None

    @property
    def poll_url(self) -> str:
        return poll_path(self.id)

    def status(self, now: float) -> str:
        if self.outcome == "never" or now < self.ready_at:
            return "in_progress"
        return self.outcome

    def body(self, status: str) -> dict[str, Any]:
        """The job's JSON (a completed job's `data` is added by the response, results.py)."""
        req = self.request
        body: dict[str, Any] = {"id": self.id, "object": "image.generation.job",
                                "status": status, "model": req.model.id, "size": req.size,
                                "n": req.n, "created": int(self.created)}
        if status in ("queued", "in_progress"):
            body["poll_url"] = self.poll_url
        elif status == "failed":
            body["error"] = self.error
        return body

    def summary(self, now: float) -> dict[str, Any]:
        return {"id": self.id, "status": self.status(now), "model": self.request.model.id,
                "payer": self.payer, "transaction": self.transaction}


class Jobs:
    """The newest jobs by id (old ones fall out)."""

    def __init__(self, limit: int = MAX_JOBS) -> None:
        self.limit = limit
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def add(self, job: Job) -> None:
        self._jobs[job.id] = job
        while len(self._jobs) > self.limit:
            self._jobs.popitem(last=False)

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def clear(self) -> None:
        self._jobs.clear()

    def __iter__(self):
        return iter(self._jobs.values())
