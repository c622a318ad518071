"""Fault rules: make the sandbox misbehave on purpose, so the gateway's failure paths get tested.

`POST /_sandbox/faults` takes a JSON list of rules (or `{"rules": [...]}`) and replaces the
previous list; `GET` shows them with the uses left; `POST /_sandbox/reset` clears them.

Every rule has a `kind` plus optional filters, all of which must match:

    phase   "unpaid" (POST without payment) | "paid" (POST with payment) | "poll" (GET job);
            omitted = every phase the kind supports
    route   "generations" | "image2image" (a poll belongs to its job's route)
    model   full model id (a poll belongs to its job's model)
    times   fire for the next N matching requests only; omitted = always

Each request asks for at most one rule of each kind; the first matching rule with uses left
fires and spends one use. Kinds and their parameters:

    challenge  (unpaid) tamper with the 402 challenge; the sandbox still verifies payments
               against the requirement it really wants.
               override {...}    merged into the real entry (accepts[0] unless prepend
                                 puts entries before it), e.g. {"payTo": "0x…"},
                                 {"amount": "1"}, {"scheme": "upto"}, {"maxTimeoutSeconds": 3600}
               prepend/append [{...}]  extra accepts[] entries, each merged over a copy of
                                 the real requirement (so {"scheme": "upto"} is enough)
               header "…"        send this raw PAYMENT-REQUIRED value (e.g. malformed)
               v1 true           no header; a v1 challenge in the body
                                 ({"x402Version":1,"accepts":[{…"maxAmountRequired"…}]})
    respond    answer this instead of the normal response:
               status (required), body (JSON value; a string is sent as text/plain unless
               content_type says otherwise), headers {...}, content_type,
               settle true (paid/poll) = record the payment as settled and send the receipt
               header. In the paid phase the payment is verified and recorded as received first.
    price      standing price change (no phase/times; applies to challenges and verification
               alike): multiply 2.0 | amount 123456 (atomic USDC, fee included)
    reject     (paid, poll) refuse the payment with 402 before verifying it (nothing recorded):
               code "PAYMENT_INVALID" | "PAYMENT_UNFUNDED" | …, reason (invalidReason),
               message (invalidMessage); defaults per code
    job        (paid) force the 202 path, for any model, with this outcome:
               outcome "completed" (default) | "failed" | "never"; error (for failed,
               default "content policy violation"); lost true = the job starts but its 202
               is never sent (the connection closes): a resend of the payment gets the
               PAYMENT_REPLAY 402 that names the job
    delay      hang `seconds` before answering (paid: after the payment is recorded)
    drop       close the socket without a response (paid: after the payment is recorded);
               settle true = the payment counts as settled (response lost after settlement)

Examples:
    {"kind": "challenge", "override": {"amount": "999999"}}
    {"kind": "challenge", "prepend": [{"scheme": "upto"}], "append": [{"network": "eip155:1"}]}
    {"kind": "challenge", "header": "%%%not-base64"}
    {"kind": "challenge", "v1": true}
    {"kind": "respond", "phase": "paid", "status": 500, "body": {"error": "provider down"}}
    {"kind": "respond", "phase": "unpaid", "status": 503, "headers": {"Retry-After": "1"},
     "body": {"error": "busy"}, "times": 1}
    {"kind": "respond", "phase": "paid", "status": 200, "body": "<html>oops</html>",
     "content_type": "text/html"}
    {"kind": "price", "multiply": 2}
    {"kind": "reject", "code": "PAYMENT_UNFUNDED"}
    {"kind": "job", "outcome": "failed"}        {"kind": "job", "outcome": "never"}
    {"kind": "job"}                               (every model answers 202, then completes)
    {"kind": "delay", "phase": "paid", "seconds": 5}
    {"kind": "drop", "phase": "poll", "times": 1}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PHASES = ("unpaid", "paid", "poll")
ROUTES = ("generations", "image2image")
JOB_OUTCOMES = ("completed", "failed", "never")

_NUMBER = (int, float)
#: kind -> (phases it can fire in, {parameter: accepted types})
KINDS: dict[str, tuple[tuple[str, ...], dict[str, tuple[type, ...]]]] = {
    "challenge": (("unpaid",), {"override": (dict,), "prepend": (list,), "append": (list,),
                                "header": (str,), "v1": (bool,)}),
    "respond": (PHASES, {"status": (int,), "body": (dict, list, str, int, float, bool),
                         "headers": (dict,), "content_type": (str,), "settle": (bool,)}),
    "price": (PHASES, {"multiply": _NUMBER, "amount": (int, str)}),
    "reject": (("paid", "poll"), {"code": (str,), "reason": (str,), "message": (str,)}),
    "job": (("paid",), {"outcome": (str,), "error": (str,), "lost": (bool,)}),
    "delay": (PHASES, {"seconds": _NUMBER}),
    "drop": (PHASES, {"settle": (bool,)}),
}
_FILTERS = ("kind", "phase", "route", "model", "times")


@dataclass
class Rule:
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    phase: str | None = None
    route: str | None = None
    model: str | None = None
    times: int | None = None
    used: int = 0

    @property
    def remaining(self) -> int | None:
        return None if self.times is None else self.times - self.used

    def matches(self, phase: str, route: str, model: str) -> bool:
        return ((self.phase or phase) == phase and phase in KINDS[self.kind][0]
                and (self.route or route) == route and (self.model or model) == model
                and (self.remaining is None or self.remaining > 0))

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, **self.params}
        for name in ("phase", "route", "model", "times"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out["used"] = self.used
        out["remaining"] = self.remaining
        return out


def parse_rule(spec: Any) -> Rule:
    """Build a rule from its JSON form; raise ValueError with a readable reason."""
    if not isinstance(spec, dict):
        raise ValueError("each rule must be a JSON object")
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; use one of {list(KINDS)}")
    phases, allowed = KINDS[kind]
    params = {k: v for k, v in spec.items() if k not in _FILTERS}
    for name, value in params.items():
        if name not in allowed:
            raise ValueError(f"{kind}: unknown parameter {name!r}; allowed: {list(allowed)}")
        if not isinstance(value, allowed[name]) or (
                isinstance(value, bool) and bool not in allowed[name]):
            raise ValueError(f"{kind}: {name!r} has the wrong type")
    rule = Rule(kind, params, spec.get("phase"), spec.get("route"), spec.get("model"),
                spec.get("times"))
    if rule.phase is not None and rule.phase not in phases:
        raise ValueError(f"{kind}: phase must be one of {list(phases)}")
    if rule.route is not None and rule.route not in ROUTES:
        raise ValueError(f"route must be one of {list(ROUTES)}")
    if rule.times is not None and (not isinstance(rule.times, int) or isinstance(rule.times, bool)
                                   or rule.times < 1):
        raise ValueError("times must be a positive integer")
    _check_kind(rule)
    return rule


def _check_kind(rule: Rule) -> None:
    p = rule.params
    if rule.kind == "challenge" and not p:
        raise ValueError("challenge: give override, prepend, append, header or v1")
    if rule.kind == "challenge":
        for name in ("prepend", "append"):
            if not all(isinstance(entry, dict) for entry in p.get(name, [])):
                raise ValueError(f"challenge: {name} must be a list of objects")
    if rule.kind == "respond" and not 100 <= p.get("status", 0) <= 599:
        raise ValueError("respond: status (100-599) is required")
    if rule.kind == "price":
        if rule.phase is not None or rule.times is not None:
            raise ValueError("price: a price change is standing; phase and times do not apply")
        if ("multiply" in p) == ("amount" in p):
            raise ValueError("price: give exactly one of multiply or amount")
        if "multiply" in p and p["multiply"] <= 0:
            raise ValueError("price: multiply must be > 0")
        if "amount" in p and not str(p["amount"]).isdigit():
            raise ValueError("price: amount must be a non-negative integer (atomic USDC)")
    if rule.kind == "job" and p.get("outcome", "completed") not in JOB_OUTCOMES:
        raise ValueError(f"job: outcome must be one of {list(JOB_OUTCOMES)}")
    if rule.kind == "delay" and not (isinstance(p.get("seconds"), _NUMBER)
                                     and p["seconds"] >= 0):
        raise ValueError("delay: seconds (>= 0) is required")


class Faults:
    """The installed rules, consulted by the image routes once per kind and request."""

    def __init__(self) -> None:
        self.rules: list[Rule] = []

    def install(self, specs: Any) -> None:
        if isinstance(specs, dict):
            specs = specs.get("rules")
        if not isinstance(specs, list):
            raise ValueError('send a list of rules or {"rules": [...]}')
        self.rules = [parse_rule(spec) for spec in specs]

    def clear(self) -> None:
        self.rules = []

    def take(self, kind: str, phase: str, route: str, model: str) -> Rule | None:
        """The first matching rule of this kind with uses left; spends one use."""
        for rule in self.rules:
            if rule.kind == kind and rule.matches(phase, route, model):
                rule.used += 1
                return rule
        return None

    def price(self, route: str, model: str, amount: int) -> int:
        """The amount after standing price rules (the first matching one wins)."""
        for rule in self.rules:
            if rule.kind == "price" and (rule.route or route) == route \
                    and (rule.model or model) == model:
                if "amount" in rule.params:
                    return int(rule.params["amount"])
                return max(0, round(amount * rule.params["multiply"]))
        return amount

    def public(self) -> list[dict[str, Any]]:
        return [rule.public() for rule in self.rules]
