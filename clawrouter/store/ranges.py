"""Parse an HTTP `Range` header (RFC 9110 §14) for a body of known size.

Only a single byte range is honoured; anything we do not serve as a range (multiple ranges,
other units, malformed values) is ignored, which the RFC allows: the answer is the full 200.
"""

from __future__ import annotations

import re

_SPEC = re.compile(r"(\d*)-(\d*)", re.ASCII)
#: past any real offset: what a longer number stands for (int() refuses very long ones)
_HUGE = 1 << 64


def _offset(digits: str) -> int:
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) <= 19 else _HUGE


class RangeNotSatisfiable(Exception):
    """The range is well-formed but starts past the end of the body (answer 416)."""


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Return the half-open byte span [start, stop) to send, or None to send the whole body."""
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    match = _SPEC.fullmatch(spec.strip())
    if match is None:  # also multiple ranges: "a-b,c-d"
        return None
    first, last = match.groups()
    if not first:
        if not last:
            return None
        suffix = _offset(last)  # bytes=-n: the last n bytes
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(0, size - suffix), size
    start = _offset(first)
    if last and _offset(last) < start:
        return None  # bytes=5-2 is invalid, not unsatisfiable
    if start >= size:
        raise RangeNotSatisfiable
    return start, min(_offset(last) + 1, size) if last else size
