"""What the sandbox saw: request counts, payments received and settled, rejections, bodies.

Tests read this through `GET /_sandbox/stats` to check what the gateway really sent upstream
(round trips per image, exactly-once settlement, the fields of each forwarded body). Lists are
bounded so a long benchmark cannot grow memory without limit; the totals stay exact.
"""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from typing import Any

MAX_EVENTS = 10_000  # payments and settlements kept in detail
MAX_BODIES = 50
MAX_REJECTIONS = 50


class Stats:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.round_trips = 0
        self.polls = 0
        #: polls carrying another authorization of the job's wallet than the one that paid
        self.polls_with_another_authorization = 0
        self.payments_received: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.payments_count = 0
        self.settled: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self.settled_count = 0
        self.settled_total_micro = 0
        self.rejected: Counter[str] = Counter()
        self.rejections: deque[dict[str, Any]] = deque(maxlen=MAX_REJECTIONS)
        self.bodies: deque[Any] = deque(maxlen=MAX_BODIES)
        self.faults_fired: Counter[str] = Counter()

    def request(self, route: str, phase: str) -> None:
        """Count one request; image routes and polls are upstream round trips."""
        self.requests[route][phase] += 1
        if route in ("generations", "image2image"):
            self.round_trips += 1
        if phase == "poll":
            self.polls += 1

    def payment(self, event: dict[str, Any]) -> None:
        self.payments_received.append(event)
        self.payments_count += 1

    def settle(self, event: dict[str, Any]) -> None:
        self.settled.append(event)
        self.settled_count += 1
        self.settled_total_micro += event["amount"]

    def reject(self, code: str, reason: str, message: str, route: str) -> None:
        self.rejected[code] += 1
        self.rejections.append({"code": code, "reason": reason, "message": message,
                                "route": route})

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": {route: dict(phases) for route, phases in self.requests.items()},
            "round_trips": self.round_trips,
            "polls": self.polls,
            "polls_with_another_authorization": self.polls_with_another_authorization,
            "payments_received": list(self.payments_received),
            "payments_count": self.payments_count,
            "settled": list(self.settled),
            "settled_count": self.settled_count,
            "settled_total_micro": self.settled_total_micro,
            "rejected": dict(self.rejected),
            "rejections": list(self.rejections),
            "faults_fired": dict(self.faults_fired),
            "bodies": list(self.bodies),
        }
