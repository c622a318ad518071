"""`plaintext.scrub`: an upstream's words never carry back the payment we sent it.

A signed payment header is a bearer instrument: whoever holds it can settle it. An upstream that
quotes it in an error (whole, split into words, re-cased, re-encoded) must not hand it to the
client, an agent or the ledger's readers. `leaks` below looks for it independently of how
`scrub` does.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import json
import re
from urllib.parse import quote, unquote

import pytest

from clawrouter.payment.ledger import clean_note
from clawrouter.payment.networks import NETWORKS
from clawrouter.payment.signer import SignedPayment, Signer
from clawrouter.payment.wire import Challenge, Requirement
from clawrouter.plaintext import REDACTED, scrub, withhold
from clawrouter.upstream.client import UpstreamResponse
from clawrouter.upstream.errors import unpaid_error

KEY = "0x" + "4c" * 32
#: a piece this long of a payment, found in a text, is a leak (scrub's own pieces are shorter)
WINDOW = 20


def signature_of(header: str) -> str:
    """The 0x-hex signature inside an x402 payment header."""
    return json.loads(base64.b64decode(header))["payload"]["signature"]


def _b64_at_each_alignment(data: bytes) -> list[str]:
    return [base64.b64encode(bytes(lead) + data).decode()[4:-4] for lead in range(3)]


def leaks(text: str, header: str) -> list[str]:
    """The forms of the payment `header` that `text` still holds a piece of: its signature as
    hex (any case, any separators), the header's base64, the signature's base64 (raw bytes or
    its text, at any alignment), percent-encoded or not."""
    sig = signature_of(header)
    digits = sig[2:].lower()
    hexed = re.sub(r"[^0-9a-f]", "", text.lower())
    b64ed = re.sub(r"[^A-Za-z0-9+/]", "", unquote(text).replace("-", "+").replace("_", "/"))
    forms = {"signature as hex": (digits, hexed), "header": (header.rstrip("="), b64ed)}
    for data, what in ((bytes.fromhex(digits), "bytes"), (sig.encode(), "text")):
        for lead, encoded in enumerate(_b64_at_each_alignment(data)):
            forms[f"signature's {what} as base64 (+{lead})"] = (encoded, b64ed)
    return [name for name, (needle, hay) in forms.items()
            if any(needle[i:i + WINDOW] in hay for i in range(len(needle) - WINDOW + 1))]


def a_payment() -> SignedPayment:
    """A real payment header, as the gateway signs one."""
    net = NETWORKS["base-sepolia"]
    raw = {"scheme": "exact", "network": net.caip2, "amount": "52500", "asset": net.usdc,
           "payTo": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8", "maxTimeoutSeconds": 300,
           "extra": {"name": "USDC", "version": "2"}}
    req = Requirement("exact", net.caip2, "52500", net.usdc, raw["payTo"], 300, raw["extra"], raw)
    url = "https://blockrun.ai/api/v1/images/generations"
    return Signer(KEY).pay(Challenge(2, [req], {"url": url}), req, net, url)


def words(text: str, size: int, sep: str = " ") -> str:
    return sep.join(text[i:i + size] for i in range(0, len(text), size))


def _forms(header: str) -> dict[str, str]:
    sig = signature_of(header)
    raw = bytes.fromhex(sig[2:])
    return {
        "hex in 32-character words (the audit's repro)": words(sig[2:], 32),
        "upper-case hex in groups of 4 with dashes": words(sig[2:].upper(), 4, "-"),
        "hex bytes separated by colons": "0x" + words(sig[2:], 2, ":"),
        "the whole header": header,
        "the header in 12-character words": words(header, 12),
        "the header as base64url": header.replace("+", "-").replace("/", "_"),
        "the header percent-encoded in a URL":
            "https://x.example/i.png?p=" + quote(header, safe=""),
        **{f"the raw signature's base64 after {lead} bytes, in 10-character words":
           words(base64.b64encode(b"ab"[:lead] + raw).decode(), 10) for lead in range(3)},
        "a re-encoded JSON quoting the signature": base64.b64encode(
            json.dumps({"bad": {"signature": sig}}).encode()).decode(),
        "the signature's JSON text in upper case": json.dumps({"sig": sig.upper()}),
    }


PAYMENT = a_payment()
FORMS = _forms(PAYMENT.header)


def scrubbed_with(secret: str, text: str) -> str:
    """`scrub(text)` in a fresh context that has sent `secret` (tests share one thread)."""
    def run() -> str:
        withhold(secret)
        return scrub(text)
    return contextvars.Context().run(run)


def test_the_leak_check_sees_every_form() -> None:
    """The check below is only worth something if it finds each form unscrubbed."""
    for name, form in FORMS.items():
        assert leaks(f"upstream says: {form}", PAYMENT.header), name


@pytest.mark.parametrize("name", list(FORMS))
def test_every_form_of_the_payment_sent_is_scrubbed(name: str) -> None:
    text = scrubbed_with(PAYMENT.header, f"invalid payment (before) {FORMS[name]} (after)")
    assert leaks(text, PAYMENT.header) == []
    assert REDACTED in text and "invalid payment (before)" in text and "(after)" in text


def test_ordinary_words_are_left_as_they_are() -> None:
    """A message naming the wallet, an amount, a short id or a URL loses nothing."""
    text = ("insufficient balance: wallet 0x80A1c0F2dE4b6D9a1F3e5C7b9D2f4A6c8E0b90CD holds "
            "0.0100 USDC, needs 0.0525 (request 7f3a9c21, see https://blockrun.ai/docs/errors)")
    assert scrubbed_with(PAYMENT.header, text) == text


def test_addresses_and_ids_are_not_taken_for_secrets() -> None:
    """Words that cannot settle a payment or be a key stay: two addresses side by side, a
    list of short ids, a long URL path."""
    text = ("payment from 0x80A1c0F2dE4b6D9a1F3e5C7b9D2f4A6c8E0b90CD, "
            "0xe9030014F5DAe217d0A152f02A043567b16c1aBf; jobs 7f3a9c21d4e5b6a7, "
            "0b1c2d3e4f5a6b7c, 9e8d7c6b5a4f3e2d; see https://cdn.example/images/2026/11/22/"
            "generations/a-lighthouse-at-dusk-seen-from-the-sea-at-high-tide.png")
    assert scrub(text) == text and scrubbed_with(PAYMENT.header, text) == text


def test_long_hex_and_base64_runs_are_redacted_even_when_not_known() -> None:
    """The second line of defence: another request's payment (whose header this request never
    held) quoted whole, or cut into words however they are spaced, is still redacted (words
    shorter than 16 base64 characters or 8 hex digits read as prose: only this request's own
    header is found in pieces that small)."""
    sig = signature_of(PAYMENT.header)
    for form in (sig, words(sig[2:], 32), words(sig[2:], 16, ", "), words(PAYMENT.header, 16),
                 PAYMENT.header, words(sig[2:], 32, "    "), words(sig[2:], 32, "\n"),
                 words(PAYMENT.header, 16, ", ")):
        text = scrub(f"refused: {form}.")
        assert leaks(text, PAYMENT.header) == [] and text.startswith("refused: ["), form


def test_a_note_quoting_a_split_signature_is_redacted() -> None:
    """The audit: 64+ character runs were redacted, a signature in 32-character words was not,
    and showed in `/v1/spend`'s latest notes."""
    note = clean_note("PAYMENT_INVALID " + words(signature_of(PAYMENT.header)[2:], 32))
    assert note is not None and note.startswith("PAYMENT_INVALID") and REDACTED in note
    assert leaks(note, PAYMENT.header) == []


def test_what_a_request_sent_is_scrubbed_in_that_request_only() -> None:
    """`withhold` belongs to the task (the request) that signed, and the tasks it starts:
    another request's text is not searched for it (its own long runs still are)."""
    other = a_payment()
    groups = {h: words(signature_of(h)[2:], 4) for h in (PAYMENT.header, other.header)}

    async def scrub_later(text: str) -> str:
        await asyncio.sleep(0)
        return scrub(text)

    async def request(mine: str, theirs: str) -> tuple[str, str]:
        withhold(mine)
        await asyncio.sleep(0)  # the other request withholds its own meanwhile
        return (await asyncio.ensure_future(scrub_later(groups[mine])),
                await asyncio.ensure_future(scrub_later(groups[theirs])))

    async def both() -> list[tuple[str, str]]:
        return await asyncio.gather(request(PAYMENT.header, other.header),
                                    request(other.header, PAYMENT.header))

    first, second = contextvars.Context().run(asyncio.run, both())
    assert first == (REDACTED, groups[other.header])
    assert second == (REDACTED, groups[PAYMENT.header])
    assert scrub(groups[PAYMENT.header]) == groups[PAYMENT.header]  # nor in this context


def test_retry_after_is_passed_on_only_as_a_delay_or_a_date() -> None:
    """The one upstream header a client gets is a number or a date, never the upstream's text
    (which may quote a payment of another request)."""
    def kept(value: str) -> dict[str, str]:
        resp = UpstreamResponse(429, {"retry-after": value, "retry-after-ms": value},
                                b'{"error": "slow down"}')
        return {k.lower(): v for k, v in unpaid_error(resp).headers.items()}

    assert kept("5") == {"retry-after": "5", "retry-after-ms": "5"}
    assert kept("Wed, 21 Oct 2026 07:28:00 GMT") == {
        "retry-after": "Wed, 21 Oct 2026 07:28:00 GMT"}
    assert kept(PAYMENT.header[:200]) == {}
    assert kept("5 " + PAYMENT.header[:50]) == {}
    # not ASCII, yet a date to `parsedate_tz`: an HTTP header cannot carry it, and passing it
    # on made the answer a 500
    assert kept("Wed, 21 Oct 2026 07:28:00 \u2603") == {} and kept("\u0663") == {}


def test_a_signed_payment_keeps_its_header_out_of_its_repr() -> None:
    """A traceback's locals or a debug log show the payment, never its bearer header."""
    shown = repr(PAYMENT) + str(PAYMENT)
    assert "52500" in shown and leaks(shown, PAYMENT.header) == []
