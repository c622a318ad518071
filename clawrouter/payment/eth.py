"""eth-account, imported here only, with the recursion limit py_ecc raises put back.

py_ecc (imported by eth-account) raises the recursion limit to 100,000 at import. With it,
Python's C JSON parser overflows the C stack on deeply nested input and the process dies (a
segfault, not a RecursionError). We never use py_ecc's deep recursion: put it back.
Only what signs or verifies imports this, so commands that do neither (`models`, `status`,
`stats`, a `generate` that finds a gateway running) start without its third of a second.
"""

import sys

_limit = sys.getrecursionlimit()
from eth_account import Account  # noqa: E402
from eth_account.messages import encode_typed_data  # noqa: E402

sys.setrecursionlimit(_limit if _limit < 100_000 else 1_000)

__all__ = ["Account", "encode_typed_data"]
