"""Properties under hostile input: what is signed, what is read from disk, what is connected to.

1. Challenges (`payment.wire.parse_challenge` + `payment.policy.select`): whatever a 402 says,
   either it is refused or the requirement chosen is `exact`, on our network, in our USDC, to the
   pinned payee, for a positive whole amount within the ceiling and the cap, with an int timeout
   in 6..600. The parser raises nothing but `ChallengeError`, whatever the bytes, and reads
   no `x402Version` but the integers 1 and 2.
2. Local paths (`inputs.InputResolver`): no byte from outside the allowed roots (or from a
   hidden or forbidden folder inside them) is ever returned, and no refusal echoes a file.
3. URLs: with the default policy, no connection is ever made to a private address, however the
   host is spelled, and whatever DNS answers.

Each property runs a bounded, derandomized hypothesis search inside its test, then checks that
the search reached both outcomes (accepted and refused), so it cannot pass by refusing everything.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import re
import socket
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from clawrouter.config import BLOCKRUN_PAYEE, Settings
from clawrouter.errors import InvalidRequest, PaymentRefused
from clawrouter.inputs import InputPolicy, InputResolver
from clawrouter.inputs.addresses import is_public_address
from clawrouter.payment import policy
from clawrouter.payment.networks import NETWORKS, Network
from clawrouter.payment.wire import ChallengeError, b64_json, parse_challenge
from clawrouter.store.download import DownloadFailed, DownloadRefused, download
from clawrouter.store.sources import ResultSources
from tests.test_inputs import PNG

PROPERTY = settings(max_examples=500, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


# --- 1. challenges --------------------------------------------------------------------------

OTHER_ADDRESS = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
HEX40 = st.text(alphabet="0123456789abcdefABCDEF", min_size=40, max_size=40)


def spellings(value: str) -> list[str]:
    """Case and whitespace variants a hostile challenge might use for a string we match on."""
    return [value, value.lower(), value.upper(), " " + value, value + "\n", value + "0",
            value[:-1], value.replace("0x", "0X")]


@functools.cache
def networks_named() -> st.SearchStrategy[str]:
    ours = [name for n in NETWORKS.values() for name in (n.name, n.caip2)]
    return st.one_of(
        st.sampled_from(ours + [s for n in ours for s in spellings(n)]),
        st.sampled_from(["eip155:1", "eip155:10", "eip155:845320", "eip155:8453 ", "eip155:",
                         "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp", "ethereum", "base-mainnet",
                         "sepolia", "", "eip155:84532\x00", "ｅｉｐ155:8453"]),
        st.text(max_size=20))


@functools.cache
def assets() -> st.SearchStrategy[str]:
    usdc = [n.usdc for n in NETWORKS.values()]
    return st.one_of(st.sampled_from([s for a in usdc for s in spellings(a)]),
                     HEX40.map(lambda h: "0x" + h), st.text(max_size=44))


@functools.cache
def payees() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(spellings(BLOCKRUN_PAYEE) + [OTHER_ADDRESS]),
                     HEX40.map(lambda h: "0x" + h), st.text(max_size=44))


@functools.cache
def amounts(ceiling: int, cap: int) -> st.SearchStrategy[Any]:
    limit = min(ceiling, cap)
    near = st.integers(min_value=max(-2, limit - 3), max_value=limit + 3)
    as_text = st.one_of(near, st.integers(0, 10**40)).map(str)
    return st.one_of(
        near, as_text, as_text.map(lambda s: s + "\n"), as_text.map(lambda s: " " + s),
        as_text.map(lambda s: "+" + s), as_text.map(lambda s: s + ".0"),
        st.sampled_from(["0", "1e3", "0x3e8", "1_000", "１０００", "٣", "-0", "00", "", "NaN",
                         "Infinity", str(10**30), str(10**31)]),
        st.integers(), st.floats(), st.booleans(), st.none(), st.lists(near, max_size=2),
        st.text(max_size=12))


@functools.cache
def timeouts() -> st.SearchStrategy[Any]:
    return st.one_of(st.integers(-5, 605), st.integers(), st.sampled_from([600, 601, 0, 1, 5, 6]),
                     st.floats(), st.booleans(), st.none(), st.text(max_size=5),
                     st.integers(1, 600).map(str), st.integers(1, 600).map(float),
                     st.lists(st.integers(1, 600), max_size=2),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def mostly(good: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Good most of the time, so that the later checks are reached, not just the first.

    (Hypothesis favours small integers, so the rare branch is the large one.)"""
    return st.integers(0, 3).flatmap(lambda i: hostile if i == 3 else good)


def domain(network: Network) -> dict[str, str]:
    return {"name": network.domain_name, "version": network.domain_version}


@functools.cache
def extras(network: Network) -> st.SearchStrategy[Any]:
    """`extra` as a hostile upstream might write it: another network's domain, a spelling of
    ours, a transfer method we do not sign (permit2), or anything at all."""
    names = [n.domain_name for n in NETWORKS.values()] + ["usd coin", "USD Coin ", ""]
    return st.one_of(
        st.fixed_dictionaries({"name": st.sampled_from(names),
                               "version": st.sampled_from(["2", "1", 2, ""])}),
        st.sampled_from(["eip3009", "permit2", "EIP3009", None]).map(
            lambda method: {**domain(network), "assetTransferMethod": method}),
        JSON_VALUES)


@st.composite
def entries(draw: st.DrawFn, network: Network, ceiling: int, cap: int, version: int) -> Any:
    """One `accepts[]` entry: mostly plausible, every field possibly hostile or missing."""
    if draw(st.integers(0, 19)) == 19:
        return draw(JSON_VALUES)
    entry = {}
    for key, strategy in entry_fields(network, ceiling, cap, version).items():
        if draw(st.integers(0, 15)) < 15:  # now and then a field is missing
            entry[key] = draw(strategy)
    if draw(st.integers(0, 3)) == 3:  # the other version's amount field, to confuse the parser
        entry["amount" if version == 1 else "maxAmountRequired"] = draw(amounts(ceiling, cap))
    return entry


@functools.cache
def entry_fields(network: Network, ceiling: int, cap: int,
                 version: int) -> dict[str, st.SearchStrategy[Any]]:
    """Each field's strategy, built once per challenge, not per entry (a fresh strategy is
    validated on its first draw: the search spent most of its time there)."""
    amount_key = "maxAmountRequired" if version == 1 else "amount"
    limit = max(1, min(ceiling, cap))
    return {
        "scheme": mostly(st.just("exact"), st.one_of(
            st.sampled_from(["upto", "EXACT", "exact ", "permit2", ""]), st.text(max_size=8))),
        "network": mostly(st.sampled_from([network.name, network.caip2]), networks_named()),
        amount_key: mostly(st.integers(1, limit).map(str), amounts(ceiling, cap)),
        "asset": mostly(st.just(network.usdc), assets()),
        "payTo": mostly(st.just(BLOCKRUN_PAYEE), payees()),
        "maxTimeoutSeconds": mostly(st.integers(6, 600), timeouts()),
        "extra": mostly(st.just(domain(network)), extras(network)),
    }


@st.composite
def challenges(draw: st.DrawFn) -> tuple[dict[str, str], bytes, Network, int, int]:
    """(headers, body, our network, ceiling, cap): a 402 as a hostile upstream might send it."""
    network = draw(st.sampled_from(list(NETWORKS.values())))
    ceiling = draw(st.integers(0, 2_000_000))
    cap = draw(st.integers(0, 2_000_000))
    version = draw(st.sampled_from([1, 2]))
    accepts = draw(st.lists(entries(network, ceiling, cap, version), min_size=0, max_size=4)
                   .filter(bool) if draw(st.integers(0, 9)) < 9 else st.just([]))
    if draw(st.integers(0, 3)) == 3:  # a well-formed entry for us, somewhere in the list
        good = {"scheme": "exact", "network": draw(st.sampled_from([network.name, network.caip2])),
                "amount": str(draw(st.integers(1, max(1, min(ceiling, cap))))),
                "asset": network.usdc, "payTo": BLOCKRUN_PAYEE,
                "maxTimeoutSeconds": draw(st.integers(6, 600)), "extra": domain(network)}
        if version == 1:
            good["maxAmountRequired"] = good.pop("amount")
        accepts.insert(draw(st.integers(0, len(accepts))), good)
    near_versions = st.sampled_from([True, False, 1.0, 2.0, "1", "2", 0, 3])  # true == 1, 2.0 == 2
    document: Any = {"x402Version": draw(mostly(st.just(version),
                                                st.one_of(near_versions, JSON_VALUES))),
                     "accepts": accepts, "resource": draw(st.one_of(st.none(), JSON_VALUES))}
    shape = draw(st.sampled_from(["header", "header", "header-urlsafe", "body", "body-x402",
                                  "garbage"]))
    if shape == "garbage":
        return (draw(garbage_headers()), draw(st.binary(max_size=200)), network, ceiling, cap)
    if shape.startswith("header"):
        text = b64_json(document)
        if shape == "header-urlsafe":
            text = text.replace("+", "-").replace("/", "_").rstrip("=")
        name = draw(st.sampled_from(["payment-required", "PAYMENT-REQUIRED"]))
        return {name: text}, draw(st.binary(max_size=50)), network, ceiling, cap
    if shape == "body-x402":
        document = {"x402": document, "error": "Payment required"}
    return {}, json.dumps(document).encode(), network, ceiling, cap


@functools.cache
def garbage_headers() -> st.SearchStrategy[dict[str, str]]:
    value = st.one_of(
        st.text(max_size=80),
        st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
        st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode()),
        JSON_VALUES.map(lambda v: base64.b64encode(json.dumps(v).encode()).decode()),
        JSON_VALUES.map(lambda v: base64.urlsafe_b64encode(json.dumps(v).encode()).decode()),
    )
    return st.dictionaries(st.sampled_from(["payment-required", "PAYMENT-REQUIRED", "x-other"]),
                           value, max_size=2)


def assert_safe_to_sign(req: Any, network: Network, ceiling: int, cap: int) -> None:
    """The property, written without the policy's own helpers."""
    assert req.scheme == "exact"
    assert req.network.strip().lower() in (network.name, network.caip2)
    assert req.asset.lower() == network.usdc.lower()
    assert re.fullmatch(r"0x[0-9a-fA-F]{40}", req.pay_to)
    assert req.pay_to.lower() == BLOCKRUN_PAYEE.lower()
    assert re.fullmatch(r"[0-9]+", req.amount), f"amount {req.amount!r} is not plain digits"
    assert 0 < int(req.amount) <= min(ceiling, cap)
    timeout = req.max_timeout_seconds
    assert type(timeout) is int and 6 <= timeout <= 600  # x402.md §10.7, §7 (now + 6)
    assert (req.extra.get("name"), req.extra.get("version")) == \
        (network.domain_name, network.domain_version)  # the domain we sign with (§10.8)
    assert req.extra.get("assetTransferMethod", "eip3009") == "eip3009"  # never permit2


def test_no_challenge_outside_our_tables_is_ever_selected() -> None:
    outcomes: Counter[str] = Counter()

    @PROPERTY
    @given(challenges())
    @example(({"payment-required": b64_json({"x402Version": 2, "accepts": [
        {"scheme": "exact", "network": "eip155:84532", "amount": "1000\n",
         "asset": NETWORKS["base-sepolia"].usdc, "payTo": BLOCKRUN_PAYEE,
         "maxTimeoutSeconds": 60, "extra": {"name": "USDC", "version": "2"}}]})}, b"",
        NETWORKS["base-sepolia"], 10_000, 10_000))
    def check(drawn: tuple[dict[str, str], bytes, Network, int, int]) -> None:
        headers, body, network, ceiling, cap = drawn
        try:
            challenge = parse_challenge(headers, body)
        except ChallengeError:
            outcomes["unreadable"] += 1
            return
        assert type(challenge.version) is int and challenge.version in (1, 2)  # not true, 2.0
        try:
            req = policy.select(challenge, network=network, pay_to=BLOCKRUN_PAYEE,
                                ceiling=ceiling, cap=cap)
        except PaymentRefused as refusal:
            outcomes[f"refused: {refusal.extra['check']}"] += 1
            return
        assert_safe_to_sign(req, network, ceiling, cap)
        assert any(req.raw is entry.raw for entry in challenge.requirements)
        outcomes["selected"] += 1

    check()
    # The search reached every branch: unreadable, each refusal, and selection.
    assert {"unreadable", "selected", "refused: scheme", "refused: network", "refused: asset",
            "refused: payee", "refused: amount", "refused: timeout", "refused: domain"} \
        <= set(outcomes), outcomes


TAMPERING = {
    "more than the ceiling": ("amount", lambda ceiling, cap: str(min(ceiling, cap) + 1)),
    "far more": ("amount", lambda ceiling, cap: str(10**30)),
    "nothing": ("amount", lambda ceiling, cap: "0"),
    "nothing, padded": ("amount", lambda ceiling, cap: "000"),
    "negative": ("amount", lambda ceiling, cap: "-1"),
    "amount with a newline": ("amount", lambda ceiling, cap: f"{min(ceiling, cap)}\n"),
    "another payee": ("payTo", lambda ceiling, cap: OTHER_ADDRESS),
    "another asset": ("asset", lambda ceiling, cap: NETWORKS["base"].usdc),
    "another network": ("network", lambda ceiling, cap: "eip155:1"),
    "upto": ("scheme", lambda ceiling, cap: "upto"),
    "long timeout": ("maxTimeoutSeconds", lambda ceiling, cap: 601),
    "expiring timeout": ("maxTimeoutSeconds", lambda ceiling, cap: 5),
    "timeout as text": ("maxTimeoutSeconds", lambda ceiling, cap: "60"),
    "timeout as true": ("maxTimeoutSeconds", lambda ceiling, cap: True),
    "timeout as a float": ("maxTimeoutSeconds", lambda ceiling, cap: 60.0),
    "no timeout": ("maxTimeoutSeconds", lambda ceiling, cap: None),
    "mainnet's domain": ("extra", lambda ceiling, cap: {"name": "USD Coin", "version": "2"}),
    "no domain": ("extra", lambda ceiling, cap: {}),
    "permit2": ("extra", lambda ceiling, cap: {"name": "USDC", "version": "2",
                                               "assetTransferMethod": "permit2"}),
}
EXPECTED_CHECK = {"amount": "amount", "payTo": "payee", "asset": "asset", "network": "network",
                  "scheme": "scheme", "maxTimeoutSeconds": "timeout"}
#: a tampered `extra` fails the domain check, or (permit2) is no `exact` we sign at all
EXPECTED_EXTRA = {"mainnet's domain": "domain", "no domain": "domain", "permit2": "scheme"}


def test_one_tampered_field_in_a_good_challenge_is_always_refused() -> None:
    """A valid challenge is selected; change any one field to ask for more and it is refused,
    with the check that caught it named, wherever the entry sits among decoys."""
    network = NETWORKS["base-sepolia"]

    @PROPERTY
    @given(ceiling=st.integers(1, 10**7), cap=st.integers(1, 10**7),
           tampering=st.sampled_from(sorted(TAMPERING)), timeout=st.integers(6, 600),
           decoys=st.lists(st.fixed_dictionaries({
               "scheme": st.sampled_from(["upto", "permit2"]),
               "network": networks_named(), "amount": st.just("1"),
               "asset": st.just(network.usdc), "payTo": st.just(BLOCKRUN_PAYEE),
               "maxTimeoutSeconds": st.just(60)}), max_size=3),
           v1=st.booleans())
    def check(ceiling: int, cap: int, tampering: str, timeout: int,
              decoys: list[dict[str, Any]], v1: bool) -> None:
        good = {"scheme": "exact", "network": "base-sepolia" if v1 else network.caip2,
                "amount": str(min(ceiling, cap)), "asset": network.usdc,
                "payTo": BLOCKRUN_PAYEE, "maxTimeoutSeconds": timeout,
                "extra": domain(network)}
        field, value = TAMPERING[tampering]
        bad = {**good, field: value(ceiling, cap)}

        def chosen(entry: dict[str, Any]) -> Any:
            entry = dict(entry)
            if v1:
                entry["maxAmountRequired"] = entry.pop("amount")
                document = {"x402Version": 1, "accepts": [*decoys, entry]}
                ch = parse_challenge({}, json.dumps(document).encode())
            else:
                document = {"x402Version": 2, "accepts": [*decoys, entry]}
                ch = parse_challenge({"payment-required": b64_json(document)}, b"")
            return policy.select(ch, network=network, pay_to=BLOCKRUN_PAYEE, ceiling=ceiling,
                                 cap=cap)

        assert chosen(good).amount == str(min(ceiling, cap))
        with pytest.raises(PaymentRefused) as refusal:
            chosen(bad)
        assert refusal.value.extra["check"] == (EXPECTED_EXTRA[tampering] if field == "extra"
                                                 else EXPECTED_CHECK[field])

    check()


def test_the_parser_raises_only_challenge_error() -> None:
    @PROPERTY
    @given(headers=garbage_headers(), body=st.one_of(
        st.binary(max_size=300), JSON_VALUES.map(lambda v: json.dumps(v).encode()),
        JSON_VALUES.map(lambda v: json.dumps({"x402Version": 1, "accepts": v}).encode()),
        JSON_VALUES.map(lambda v: json.dumps({"x402": v}).encode())))
    def check(headers: dict[str, str], body: bytes) -> None:
        try:
            parse_challenge(headers, body)
        except ChallengeError:
            pass

    check()


_DEEP_CHALLENGE = r"""
import base64
import clawrouter.api.app  # everything the gateway imports (eth-account's py_ecc among them)
from clawrouter.payment.wire import ChallengeError, parse_challenge
deep = ("[" * 100_000 + "]" * 100_000).encode()
for headers, body in (({"payment-required": base64.b64encode(deep).decode()}, b""),
                      ({}, b'{"x402Version": 1, "accepts": ' + deep + b"}")):
    try:
        parse_challenge(headers, body)
    except ChallengeError:
        print("ChallengeError")
"""


def test_a_deeply_nested_challenge_is_a_challenge_error_not_a_crash() -> None:
    """A hostile upstream's 100,000-deep 402 (270 KB) must be refused, not kill the gateway.

    Run in a child process with the gateway's imports, so a crash fails this test only.
    """
    child = subprocess.run([sys.executable, "-c", _DEEP_CHALLENGE], capture_output=True,
                           text=True, timeout=60, cwd=Path(__file__).parent.parent)
    assert child.returncode == 0, (f"exit {child.returncode}: "
                                   f"{child.stderr.strip().splitlines()[-1:]}")
    assert child.stdout.split() == ["ChallengeError", "ChallengeError"], child.stderr[-500:]


# --- 2. local paths -------------------------------------------------------------------------

def marked_png(tag: str) -> bytes:
    """A valid PNG carrying a unique marker, so any leak can be traced to its file."""
    return PNG + f"MARK-{tag}-MARK".encode()


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Any]:
    """base/{granted (allowed), outside, granted-evil (shares its prefix)}.

    Every folder holds an `a.png` with its own marker, so any path ending in `a.png` names a
    readable image in the root or a forbidden one elsewhere: which one is read tells the story.
    Inside the root are a hidden folder and the forbidden data dir, and symlinks that stay
    inside, leave the root, enter the hidden or forbidden folders, or loop.
    """
    base = tmp_path / "base"
    root, outside, evil = base / "granted", base / "outside", base / "granted-evil"
    folders = {"IN": root, "IN-PICS": root / "pics", "HIDDEN": root / ".ssh",
               "DATA-DIR": root / "data", "OUTSIDE": outside, "PREFIX-TWIN": evil,
               "BASE": base}
    inside, forbidden = set(), set()
    for tag, folder in folders.items():
        folder.mkdir(parents=True, exist_ok=True)
        data = marked_png(tag)
        (folder / "a.png").write_bytes(data)
        (inside if tag.startswith("IN") else forbidden).add(data)
    (root / ".a.png").write_bytes(marked_png("HIDDEN-FILE"))
    forbidden.add(marked_png("HIDDEN-FILE"))
    (root / "txt").mkdir()  # a text file named like an image: refused, and never echoed
    (root / "txt" / "a.png").write_bytes(b"PRIVATE_KEY=0xMARK-TEXT-INSIDE-MARK")
    (outside / "secret.png").write_bytes(b"PRIVATE_KEY=0xMARK-TEXT-OUTSIDE-MARK")
    links = {"in": root / "pics", "in.png": root / "pics" / "a.png", "out": outside,
             "out.png": outside / "a.png", "twin": evil, "up": base, "hid": root / ".ssh",
             "hid.png": root / ".ssh" / "a.png", "dat": root / "data", "loop": root / "loop",
             "gone.png": root / "missing.png"}
    for name, target in links.items():
        (root / name).symlink_to(target)
    (root / "pics" / "rel").symlink_to("../..")  # relative, out through the parent
    return {"base": base, "granted": root, "inside": inside, "forbidden": forbidden}


def path_values(base: Path) -> st.SearchStrategy[str]:
    """prefix + folders + file: folders that stay in the root, leave it, or hide; files that
    exist in every folder. Mostly well-formed, so that reads happen and escapes are possible."""
    root = base / "granted"
    folder = st.sampled_from([
        ".", "pics", "in", "txt", "..", "out", "twin", "up", "hid", "dat", "rel", "loop", ".ssh",
        "data", "outside", "granted", "granted-evil", "~", "%2e%2e", "..%2f", "...", "", "\ud800",
        "\udc80", "a.png"])
    name = mostly(st.just("a.png"), st.sampled_from([
        "in.png", "out.png", "hid.png", ".a.png", "secret.png", "gone.png", "loop",
        "a.png%00", "a.png\x00", "a.png/", "/etc/passwd", "/proc/self/environ", "C:\\a.png"]))
    prefix = mostly(
        st.sampled_from(["", "./", str(root) + "/", "file://" + str(root) + "/", "../granted/"]),
        st.sampled_from(["/", "../", "~/", "~", str(base) + "/", "//", str(root) + "/../",
                         "file://", "file:///", "file://localhost/", "file://" + str(base) + "/",
                         "file://evil.example/", str(base) + "/granted-evil/"]))
    joined = st.tuples(prefix, st.lists(folder, max_size=4), name).map(
        lambda t: t[0] + "".join(f + "/" for f in t[1]) + t[2])
    # file: URLs may also arrive percent-encoded.
    encoded = joined.map(lambda v: "file://" + quote(v.removeprefix("file://"), safe="/~",
                                                     errors="surrogatepass")
                         if v.startswith("file://") else v)
    return st.one_of(joined, encoded)


def test_no_byte_outside_the_allowed_roots_is_ever_returned(
        tree: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    base, root = tree["base"], tree["granted"]
    monkeypatch.setenv("HOME", str(base / "outside"))  # `~` is outside the root
    leaks, inside = tree["forbidden"], tree["inside"]
    outcomes: Counter[str] = Counter()
    loop = asyncio.new_event_loop()

    def resolver_for(cwd: Path) -> InputResolver:
        return InputResolver(InputPolicy(max_bytes=1024 * 1024, roots=(root,),
                                         forbidden=(root / "data",), cwd=cwd))

    resolvers = {name: resolver_for(cwd) for name, cwd in
                 (("granted", root), ("base", base), ("outside", base / "outside"))}

    @PROPERTY
    @given(value=path_values(base), cwd=st.sampled_from(sorted(resolvers)))
    @example(value=str(root / "a.png"), cwd="granted")
    @example(value="../granted-evil/a.png", cwd="granted")
    @example(value="in/../out/a.png", cwd="granted")
    def check(value: str, cwd: str) -> None:
        try:
            image = loop.run_until_complete(resolvers[cwd].resolve(value, param="image"))
        except InvalidRequest as refusal:
            assert "MARK-" not in refusal.message and "PRIVATE_KEY" not in refusal.message
            assert refusal.status == 400
            outcomes[f"refused: {refusal.code}"] += 1
            return
        except Exception as exc:  # anything else would be a 500, and is a bug
            raise AssertionError(f"{value!r} (cwd {cwd}) raised {exc!r}") from exc
        assert image.data not in leaks, f"{value!r} (cwd {cwd}) read a forbidden file"
        assert image.data in inside, f"{value!r} (cwd {cwd}) read unexpected bytes"
        outcomes["read"] += 1

    try:
        check()
    finally:
        for resolver in resolvers.values():
            loop.run_until_complete(resolver.aclose())
        loop.close()
    assert {"read", "refused: path_refused", "refused: file_not_found",
            "refused: invalid_image"} <= set(outcomes), outcomes


# --- 3. URLs --------------------------------------------------------------------------------

class CountingOrigin:
    """A TCP listener on loopback that counts every connection it accepts, and serves a PNG.

    It stands in for "something on the private network": the count must stay at zero.
    """

    def __init__(self) -> None:
        self.connections = 0
        self.sockets = [socket.create_server(("127.0.0.1", 0))]
        self.port = self.sockets[0].getsockname()[1]
        try:
            self.sockets.append(socket.create_server(("::1", self.port),
                                                     family=socket.AF_INET6))
        except OSError:
            pass  # no IPv6 loopback here
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._serve, args=(s,), daemon=True)
                         for s in self.sockets]
        for thread in self._threads:
            thread.start()

    def _serve(self, server: socket.socket) -> None:
        server.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            with conn:
                conn.settimeout(10)  # (a loaded machine's client may take its time)
                try:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n"
                                 b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(PNG)
                                 + PNG)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=2)
        for server in self.sockets:
            server.close()


@pytest.fixture
def origin() -> Iterator[CountingOrigin]:
    server = CountingOrigin()
    yield server
    server.close()


#: Addresses of every special-purpose range, in every family, as literals a URL may carry.
PRIVATE_V4 = ["0.0.0.0", "0.1.2.3", "10.0.0.1", "10.255.255.255", "100.64.0.1", "100.127.255.254",
              "127.0.0.1", "127.0.0.2", "127.255.255.254", "169.254.169.254", "169.254.0.1",
              "172.16.0.1", "172.31.255.255", "192.0.2.1",
              "192.168.0.1", "192.168.255.255", "198.18.0.1", "198.51.100.7", "203.0.113.9",
              "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255",
              "192.0.0.8", "192.0.0.100"]  # IETF protocol assignments: not global (RFC 6890)
PRIVATE_V6 = ["::1", "::", "fe80::1", "fe80::1%25lo", "fc00::1", "fd12:3456::1", "ff02::1",
              "2001:db8::1", "100::1", "::127.0.0.1", "::ffff:127.0.0.1", "::ffff:7f00:1",
              "::ffff:10.0.0.1", "::ffff:169.254.169.254", "::ffff:0:127.0.0.1",
              "64:ff9b::7f00:1", "64:ff9b::a00:1", "64:ff9b:1::a9fe:a9fe", "2002:7f00:1::1",
              "64:ff9b:1:7f00:0:100:808:808", "64:ff9b:1::808:808",  # local-use NAT64
              "2002:a9fe:a9fe::", "0:0:0:0:0:ffff:7f00:0001", "::FFFF:127.0.0.1",
              "fec0::1",  # site-local (deprecated, still routed inside some LANs)
              "3fff::1"]  # documentation (RFC 9637)
#: Other spellings of 127.0.0.1 and friends that some socket layers accept.
ODD_SPELLINGS = ["2130706433", "017700000001", "0x7f000001", "0x7f.0.0.1", "0177.0.0.1",
                 "127.1", "127.0.1", "127.000.000.001", "0", "0x0", "127.0.0.1.", "localhost",
                 "LOCALHOST", "localhost.", "ip6-localhost", "3232235521", "0xa9fea9fe",
                 "169.254.43518", "①②⑦.0.0.1", "127。0。0。1", "127.0.0.1\t", "[::1]x"]


class PrivateDNS(AbstractResolver):
    """Every name resolves to private addresses (the name's first label picks which)."""

    ANSWERS = [["127.0.0.1"], ["::1"], ["10.0.0.1"], ["169.254.169.254"],
               ["8.8.8.8", "127.0.0.1"], ["127.0.0.1", "8.8.8.8"], ["::ffff:127.0.0.1"],
               ["192.168.1.1"], ["0.0.0.0"], ["fd00::1", "1.1.1.1"]]

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        answer = self.ANSWERS[sum(host.encode()) % len(self.ANSWERS)]
        return [{"hostname": host, "host": a, "port": port, "proto": 0,
                 "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                 "flags": socket.AI_NUMERICHOST} for a in answer]

    async def close(self) -> None:
        pass


def hosts() -> st.SearchStrategy[str]:
    v6 = st.sampled_from(PRIVATE_V6).map(lambda a: f"[{a}]")
    names = st.one_of(st.sampled_from(["internal", "metadata.google.internal", "intranet.corp",
                                       "a.example", "xn--nxasmq6b", "printer.local"]),
                      st.from_regex(r"[a-z0-9-]{1,12}(\.[a-z]{2,6}){0,2}", fullmatch=True))
    return st.one_of(st.sampled_from(PRIVATE_V4), v6, st.sampled_from(ODD_SPELLINGS), names)


def urls(port: int) -> st.SearchStrategy[str]:
    return st.builds(
        lambda scheme, userinfo, host, with_port, path: (
            f"{scheme}://{userinfo}{host}{f':{port}' if with_port else ''}{path}"),
        st.sampled_from(["http", "https", "HTTP", "hTtP"]),
        st.sampled_from(["", "", "", "user@", "user:pw@", "8.8.8.8@", "@"]),
        hosts(), st.booleans(),
        st.sampled_from(["/a.png", "", "/", "/%2e%2e/a.png", "?x=1", "#frag", "/a.png@8.8.8.8"]))


def refuses_without_connecting(resolver: InputResolver, loop: asyncio.AbstractEventLoop,
                               origin: CountingOrigin, url: str) -> None:
    before = origin.connections
    try:
        loop.run_until_complete(resolver.resolve(url, param="image"))
    except InvalidRequest as refusal:
        # Refused before any connection: `url_fetch_failed` would mean one was attempted.
        assert refusal.code == "url_refused", f"{url!r}: {refusal.message}"
    except Exception as exc:
        raise AssertionError(f"{url!r} raised {exc!r}") from exc
    else:
        raise AssertionError(f"{url!r} was fetched")
    assert origin.connections == before, f"{url!r} connected to the private origin"


@pytest.fixture
def default_resolver(tmp_path: Path) -> Iterator[tuple[InputResolver, asyncio.AbstractEventLoop]]:
    """The default policy (private URLs not allowed), with DNS answering private addresses."""
    default = InputPolicy.from_settings(Settings(home=tmp_path / "home"))
    assert not default.allow_private_urls
    # Bounded, so a broken check costs seconds, not minutes, before failing.
    policy = replace(default, connect_timeout=0.3, total_timeout=1.0)
    loop = asyncio.new_event_loop()
    resolver = InputResolver(policy, resolver=PrivateDNS())
    yield resolver, loop
    loop.run_until_complete(resolver.aclose())
    loop.close()


def test_every_special_address_is_refused_before_connecting(
        origin: CountingOrigin, default_resolver: tuple[InputResolver, Any]) -> None:
    resolver, loop = default_resolver
    literals = PRIVATE_V4 + [f"[{a}]" for a in PRIVATE_V6] + ODD_SPELLINGS
    for host in literals:
        for url in (f"http://{host}:{origin.port}/a.png", f"https://{host}/a.png"):
            refuses_without_connecting(resolver, loop, origin, url)
    assert origin.connections == 0


def test_no_private_address_is_ever_connected_to(
        origin: CountingOrigin, default_resolver: tuple[InputResolver, Any]) -> None:
    """Any spelling, any name (DNS answers private addresses), credentials, odd paths."""
    resolver, loop = default_resolver

    @settings(PROPERTY, max_examples=300)
    @given(url=urls(origin.port))
    @example(url=f"http://internal:{origin.port}/a.png")
    def check(url: str) -> None:
        refuses_without_connecting(resolver, loop, origin, url)

    check()
    assert origin.connections == 0


def test_no_result_url_reaches_a_private_address(origin: CountingOrigin) -> None:
    """The same URLs, as result URLs in a paid answer (`store.sources`): never connected to,
    and refused as such, not failed by chance."""
    loop = asyncio.new_event_loop()
    sources = ResultSources(is_public_address, dns=PrivateDNS(), connect_timeout=0.3)
    quick = aiohttp.ClientTimeout(total=1.0, sock_connect=0.3)

    @settings(PROPERTY, max_examples=300)
    @given(url=urls(origin.port))
    @example(url=f"http://internal:{origin.port}/a.png")
    @example(url=f"http://127.0.0.1:{origin.port}/a.png")
    def check(url: str) -> None:
        before = origin.connections
        try:
            loop.run_until_complete(download(url, sources, timeout=quick))
        except DownloadRefused:
            pass
        except DownloadFailed as exc:  # only a URL that is not one at all may fail otherwise
            assert "not an http(s) URL" in str(exc), f"{url!r}: {exc}"
        else:
            raise AssertionError(f"{url!r} was fetched")
        assert origin.connections == before, f"{url!r} connected to the private origin"

    try:
        check()
        # The control: with the check off, the same kind of URL connects (in time on a
        # loaded machine too: the short timeouts above are for a broken check, not for it).
        trusting = ResultSources(None, dns=PrivateDNS(), connect_timeout=10)
        data = loop.run_until_complete(download(f"http://internal:{origin.port}/a.png",
                                                trusting, timeout=aiohttp.ClientTimeout(30)))
        loop.run_until_complete(trusting.aclose())
    finally:
        loop.run_until_complete(sources.aclose())
        loop.close()
    assert data == PNG and origin.connections == 1


def test_the_origin_counts_connections_when_the_check_is_off(origin: CountingOrigin,
                                                            tmp_path: Path) -> None:
    """The control for the property above: with private URLs allowed, the same URLs connect."""
    policy = replace(InputPolicy.from_settings(Settings(home=tmp_path / "home",
                                                        allow_private_urls=True)),
                     connect_timeout=10, total_timeout=30)

    async def fetch_all() -> None:
        async with InputResolver(policy, resolver=PrivateDNS()) as resolver:
            for host in ("127.0.0.1", "[::ffff:127.0.0.1]", "internal"):
                image = await resolver.resolve(f"http://{host}:{origin.port}/a.png",
                                               param="image")
                assert image.data == PNG

    asyncio.run(fetch_all())
    assert origin.connections == 3


# --- base64: the SIMD fast path accepts nothing the strict reference would not ---------------

B64_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=-_ \n"


def test_the_fast_base64_path_agrees_with_the_strict_reference() -> None:
    """Inputs are decoded by pybase64 (SIMD) first, by our lenient rules only when it refuses.
    Whatever the fast path accepts, the stdlib's strict decoder must accept with the same
    bytes, and so must `decode_base64` as a whole."""
    import binascii

    import pybase64

    from clawrouter.errors import ClawError
    from clawrouter.inputs.encoded import decode_base64

    @settings(PROPERTY, max_examples=2000)
    @given(text=st.one_of(
        st.text(alphabet=B64_CHARS, max_size=24),
        st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
        st.tuples(st.binary(max_size=40), st.integers(0, 60), st.sampled_from(B64_CHARS)).map(
            lambda t: (lambda s: s[:t[1]] + t[2] + s[t[1]:])(base64.b64encode(t[0]).decode())),
    ))
    def check(text: str) -> None:
        try:
            fast = pybase64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            fast = None
        if fast is not None:
            assert binascii.a2b_base64(text, strict_mode=True) == fast
        try:
            ours = decode_base64(text, max_bytes=1 << 20, param="image")
        except ClawError:
            ours = None
        if fast is not None:
            assert ours == fast

    check()


def test_reading_image_dimensions_never_raises() -> None:
    """`sniff.dimensions` reads headers of anything a client sends (a mask, an image): any
    bytes after any magic give a size or None, never an exception (a 500)."""
    from clawrouter.sniff import dimensions

    magics = [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"\xff\xd8", b"\xff\xd8\xff",
              b"GIF89a", b"RIFF\x00\x00\x00\x00WEBPVP8X", b"RIFF\x00\x00\x00\x00WEBPVP8L",
              b"RIFF\x00\x00\x00\x00WEBPVP8 ", b""]
    seen = Counter()

    @settings(PROPERTY, max_examples=2000)
    @given(magic=st.sampled_from(magics), rest=st.binary(max_size=64))
    def check(magic: bytes, rest: bytes) -> None:
        size = dimensions(magic + rest)
        seen[size is None] += 1
        assert size is None or (len(size) == 2 and all(isinstance(x, int) for x in size))

    check()
    assert seen[True] and seen[False]
