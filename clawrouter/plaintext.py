"""Text from elsewhere (an upstream's error, a stored prompt) made safe to show on one line.

It reaches terminals (`clawrouter generate`, `images ls`), agents' contexts and the ledger's
notes: control characters (terminal escapes among them: a clipboard write, a cleared screen)
and line breaks become spaces, and long text is cut (`one_line`).

An upstream's words may also quote what we sent it: the signed payment header, a bearer
instrument anyone could settle. `scrub` removes every piece of the secrets this task sent
(`withhold`), in any case and with any separators, as hex or base64, and then any long
hex or base64 run, known or not, as a second line of defence.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

#: C0 and C1 controls and Unicode's line and paragraph separators
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")

REDACTED = "[redacted]"
#: the shortest piece of a secret `scrub` finds: 12 hex digits (48 bits) or base64 characters
#: (72 bits), which unrelated text does not match by chance
PIECE = 12
#: characters of a text `scrub` reads; callers cut theirs shorter still
SCRUB_MAX = 2048

#: unbroken runs this long are redacted whatever they are: 64 hex digits is a private key (or a
#: nonce, a transaction hash: shown elsewhere), 86 base64 characters a 65-byte signature (a
#: payment header is hundreds). Runs cut into words only from 128 hex digits (a signature is
#: 130; two addresses side by side are 80)
LONG_HEX = 64
LONG_SPLIT_HEX = 128
LONG_BASE64 = 86


class _Sent:
    """The secrets a task has sent, and their pieces (`_forms`), worked out on the first
    `scrub` only: a request that succeeds never pays for them."""

    def __init__(self, secrets: tuple[str, ...]) -> None:
        self.secrets = secrets
        self._forms: tuple[set[str], set[str]] | None = None

    def forms(self) -> tuple[set[str], set[str]]:
        if self._forms is None:
            self._forms = _forms(self.secrets)
        return self._forms


#: the secrets this task has sent (payment headers): a context variable, so an error built
#: anywhere in the request (the exchange, the poll loop, the pipeline, the store) scrubs them
_SENT: ContextVar[_Sent] = ContextVar("clawrouter_sent_secrets", default=_Sent(()))

_HEX_DIGIT = re.compile(r"[0-9a-fA-F]")
_B64_CHAR = re.compile(r"[A-Za-z0-9+/_-]")
_B64_FOLD = str.maketrans("-_", "+/")  # base64url reads as base64
_LONG_HEX = re.compile(r"(?:0[xX])?[0-9a-fA-F]{64,}")  # a signature or nonce in the JSON
_HEX_RUN = re.compile(r"(?:0[xX])?[0-9a-fA-F]+")
#: long runs that could be signatures or base64 payment headers (of another request: ours are
#: found by their pieces)
_LONG_RUN = re.compile(r"(?:0[xX])?[0-9a-fA-F]{%d,}(?![A-Za-z0-9+/_-])|[A-Za-z0-9+/_-]{%d,}=*"
                       % (LONG_HEX, LONG_BASE64))
#: base64 of random bytes this long mixes upper case, lower case and digits; a URL's path
#: or a slug seldom does
_MIXED = (re.compile("[A-Z]"), re.compile("[a-z]"), re.compile("[0-9]"))
#: the same cut into words: hex words of 8+ digits, base64 words of 16+ characters
_SPLIT_HEX = re.compile(r"(?<![0-9A-Za-z])(?:0[xX])?[0-9a-fA-F]{8,}"
                        r"(?:[^0-9A-Za-z]{1,3}(?:0[xX])?[0-9a-fA-F]{8,})+(?![0-9A-Za-z])")
_SPLIT_B64 = re.compile(r"(?<![A-Za-z0-9+/_=-])[A-Za-z0-9+/_-]{16,}=*"
                        r"(?:[^A-Za-z0-9+/_-]{1,3}[A-Za-z0-9+/_-]{16,}=*)+(?![A-Za-z0-9+/_-])")


def one_line(value: Any, limit: int) -> str:
    """`value` as text on one line, its runs of spaces and controls one space, at most
    `limit` characters (cut ones end in "…")."""
    text = " ".join(_CONTROLS.sub(" ", str(value)).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def withhold(secret: str) -> None:
    """`secret` (a payment header) is about to leave: from now on, in this task and the
    tasks it starts, `scrub` removes it and its parts from any text."""
    _SENT.set(_Sent((*_SENT.get().secrets, secret)))


def scrub(value: Any) -> str:
    """`value` as one line of text (`one_line`, at most `SCRUB_MAX` characters: what is split
    by line breaks or runs of spaces is judged as it will be shown) without any piece of what
    this task sent (`withhold`) and without long hex or base64 runs, each replaced by
    `REDACTED`."""
    text = one_line(str(value)[:SCRUB_MAX], SCRUB_MAX)
    sent = _SENT.get()
    if sent.secrets:
        hexes, b64s = sent.forms()
        spans = sorted(_found(text, _HEX_DIGIT, str.lower, hexes)
                       + _found(text, _B64_CHAR, lambda s: s.translate(_B64_FOLD), b64s))
        text = _replace(text, spans)
    text = _LONG_RUN.sub(_random_looking, text)
    text = _SPLIT_HEX.sub(lambda m: _long(m, _HEX_DIGIT, LONG_SPLIT_HEX), text)
    return _SPLIT_B64.sub(lambda m: _long(m, _B64_CHAR, LONG_BASE64), text)


def _random_looking(match: re.Match[str]) -> str:
    """A long run redacted if it is hex, or base64 that looks random (`_MIXED`)."""
    run = match.group()
    if _HEX_RUN.fullmatch(run) or all(kind.search(run) for kind in _MIXED):
        return REDACTED
    return run


def _long(match: re.Match[str], alphabet: re.Pattern[str], least: int) -> str:
    """A run of words redacted when together they hold `least` characters of `alphabet`."""
    words = match.group().replace("0x", "").replace("0X", "")
    return REDACTED if len(alphabet.findall(words)) >= least else match.group()


def _forms(secrets: tuple[str, ...]) -> tuple[set[str], set[str]]:
    """The `PIECE`-long pieces of every form in which a secret may come back: hex (lower case,
    no 0x) and base64 (base64url folded, no padding). A header that is base64 JSON (x402's)
    also gives its long hex strings (the signature), as hex and as base64 at any alignment,
    of the raw bytes and of the text."""
    hexes: list[str] = []
    b64s: list[str] = []
    for secret in secrets:
        b64s.append(secret.strip().translate(_B64_FOLD).rstrip("="))
        for value in _hex_strings(_json_of_base64(secret)):
            digits = value[2:] if value[:2] in ("0x", "0X") else value
            hexes.append(digits.lower())
            raw = bytes.fromhex(digits[:len(digits) // 2 * 2])
            for data in (raw, value.encode(), digits.lower().encode(), digits.upper().encode()):
                b64s.extend(_base64_forms(data))
    return _pieces(hexes), _pieces(b64s)


def _pieces(texts: list[str]) -> set[str]:
    return {t[i:i + PIECE] for t in texts for i in range(len(t) - PIECE + 1)}


def _json_of_base64(text: str) -> Any:
    try:
        return json.loads(base64.b64decode(text.strip().translate(_B64_FOLD) + "=="))
    except (binascii.Error, ValueError):
        return None


def _hex_strings(value: Any) -> Iterator[str]:
    """Every string in a JSON value that is a long hex number (a signature, a nonce)."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        for item in value:
            yield from _hex_strings(item)
    elif isinstance(value, str) and _LONG_HEX.fullmatch(value):
        yield value


def _base64_forms(data: bytes) -> Iterator[str]:
    """`data`'s base64 at each of the three alignments it may have inside a longer text,
    without the characters that would depend on its neighbours."""
    for lead in range(3):
        text = base64.b64encode(bytes(lead) + data).decode()
        tail = (0, 3, 2)[(lead + len(data)) % 3]
        yield text[(0, 2, 3)[lead]:len(text) - tail]


def _found(text: str, alphabet: re.Pattern[str], fold: Any,
           pieces: set[str]) -> list[tuple[int, int]]:
    """Spans of `text` (start, end) whose `alphabet` characters, everything else (spaces,
    dashes, words) skipped and `fold`ed, form pieces of a secret."""
    if not pieces:
        return []
    where = [m.start() for m in alphabet.finditer(text)]
    kept = fold("".join(text[i] for i in where))
    spans: list[tuple[int, int]] = []
    for i in range(len(kept) - PIECE + 1):
        if kept[i:i + PIECE] in pieces:
            start, end = where[i], where[i + PIECE - 1] + 1
            if spans and start <= spans[-1][1]:
                spans[-1] = (spans[-1][0], end)
            else:
                spans.append((start, end))
    return spans


def _replace(text: str, spans: list[tuple[int, int]]) -> str:
    """`text` with each of the sorted, possibly overlapping `spans` replaced by `REDACTED`."""
    out: list[str] = []
    done = 0
    for start, end in spans:
        if end <= done:
            continue
        if start >= done:
            out.append(text[done:start])
            out.append(REDACTED)
        done = end
    out.append(text[done:])
    return "".join(out)
