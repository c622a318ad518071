"""The clients being compared. Every one ends with the image bytes in hand.

Direct: talks to the sandbox itself, the way a client without a gateway must:
    unpaid POST → 402 → parse the challenge → sign (Signer.pay) → paid POST →
    GET the image URL, or decode the data URI. It parses the answer with Python's standard
    library (json, base64), as a plain client does; `fast=True` uses the gateway's parsers
    instead (pydantic-core, pybase64), which matters for 1.5 MB data URIs (bench/ablate.py).
Gateway: POST the same JSON to the gateway (response_format defaults to `url`) →
    GET the returned /images/<id> URL.
Floor: the gateway client, pointed at bench/floor.py (the least a gateway can do).

Every request carries a unique prompt, so the gateway's coalescer never turns one request
into another's cached answer.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pybase64
import pydantic_core
from eth_account import Account

from clawrouter.payment.networks import NETWORKS
from clawrouter.payment.signer import Signer
from clawrouter.payment.wire import SIGNATURE_HEADER, ChallengeError, parse_challenge
from loadgen import Op, OpError

JSON = {"Content-Type": "application/json"}
NETWORK = NETWORKS["base-sepolia"]
Paid = Callable[[aiohttp.ClientSession, int], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Body:
    """A JSON request body with a per-request prompt spliced in (no re-serialising big images).

    `head` ends just inside the prompt string's opening quote; `tail` closes it and the object.
    """

    head: bytes
    tail: bytes

    @classmethod
    def of(cls, fields: dict[str, object]) -> Body:
        text = json.dumps({**fields, "prompt": "\x00"}, separators=(",", ":"))
        head, tail = text.split("\\u0000")
        return cls(head.encode(), tail.encode())

    def build(self, tag: str, i: int) -> bytes:
        return b"".join((self.head, f"{tag} #{i}".encode(), self.tail))

    @property
    def size(self) -> int:
        return len(self.head) + len(self.tail)


def new_key() -> str:
    key = Account.create().key.hex()
    return key if key.startswith("0x") else "0x" + key


async def _read_json(resp: aiohttp.ClientResponse, what: str,
                     fast: bool = False) -> dict[str, Any]:
    raw = await resp.read()
    if resp.status != 200:
        raise OpError(f"{what}_{resp.status}", raw[:200].decode(errors="replace"))
    try:
        return pydantic_core.from_json(raw) if fast else json.loads(raw)
    except ValueError:
        raise OpError(f"{what}_not_json") from None


async def _fetch(sess: aiohttp.ClientSession, url: str) -> int:
    async with sess.get(url) as resp:
        data = await resp.read()
        if resp.status != 200 or not data:
            raise OpError(f"get_{resp.status}")
        return len(data)


def direct(upstream: str, route: str, body: Body, tag: str, *, fast: bool = False) -> Op:
    """`upstream` is the sandbox's API base (…/api); `route` e.g. /v1/images/generations."""
    paid = direct_paid(upstream, route, body, tag, fast=fast)

    async def op(sess: aiohttp.ClientSession, i: int) -> int:
        return await _image(sess, (await paid(sess, i))["data"][0]["url"], fast)

    return op


async def _image(sess: aiohttp.ClientSession, url: str, fast: bool = False) -> int:
    """The bytes of an upstream result: decode a data URI, or download the URL."""
    if url.startswith("data:"):
        encoded = url[url.index(",") + 1:]
        png = pybase64.b64decode(encoded, validate=True) if fast else base64.b64decode(encoded)
        if not png:
            raise OpError("empty_data_uri")
        return len(png)
    return await _fetch(sess, url)


def direct_paid(upstream: str, route: str, body: Body, tag: str, *, fast: bool = False) -> Paid:
    """The x402 exchange alone: returns the paid 200's JSON."""
    signer = Signer(new_key())
    url = upstream.rstrip("/") + route

    async def paid(sess: aiohttp.ClientSession, i: int) -> dict[str, Any]:
        data = body.build(tag, i)
        async with sess.post(url, data=data, headers=JSON) as resp:
            raw = await resp.read()
            if resp.status != 402:
                raise OpError(f"unpaid_{resp.status}", raw[:200].decode(errors="replace"))
            try:
                challenge = parse_challenge(resp.headers, raw)
            except ChallengeError as exc:
                raise OpError("challenge", str(exc)) from None
        requirement = next((r for r in challenge.requirements
                            if r.scheme == "exact" and r.network == NETWORK.caip2), None)
        if requirement is None:
            raise OpError("no_requirement")
        payment = signer.pay(challenge, requirement, NETWORK, url)
        async with sess.post(url, data=data,
                             headers={**JSON, SIGNATURE_HEADER: payment.header}) as resp:
            return await _read_json(resp, "paid", fast)

    return paid


def gateway(base: str, route: str, body: Body, tag: str) -> Op:
    """`base` is the gateway's root URL; `route` e.g. /v1/images/generations."""
    url = base.rstrip("/") + route

    async def op(sess: aiohttp.ClientSession, i: int) -> int:
        async with sess.post(url, data=body.build(tag, i), headers=JSON) as resp:
            result = await _read_json(resp, "post")
        item = result["data"][0]
        if "url" not in item:
            raise OpError("no_url")
        return await _fetch(sess, item["url"])

    return op


def getter(url: str) -> Op:
    """GET one URL (serving benchmark)."""

    async def op(sess: aiohttp.ClientSession, i: int) -> int:
        return await _fetch(sess, url)

    return op
