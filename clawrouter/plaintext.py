"""Text from elsewhere (an upstream's error, a stored prompt) made safe to show on one line.

It reaches terminals (`clawrouter generate`, `images ls`), agents' contexts and the ledger's
notes: control characters (terminal escapes among them: a clipboard write, a cleared screen)
and line breaks become spaces, and long text is cut.
"""

from __future__ import annotations

import re
from typing import Any

#: C0 and C1 controls and Unicode's line and paragraph separators
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+")


def one_line(value: Any, limit: int) -> str:
    """`value` as text on one line, its runs of spaces and controls one space, at most
    `limit` characters (cut ones end in "…")."""
    text = " ".join(_CONTROLS.sub(" ", str(value)).split())
    return text if len(text) <= limit else text[:limit - 1] + "…"
