"""x402 payments: wire format, policy checks, signing, wallet, ledger and budgets.

Nothing in this package knows about the web framework (the x402 SDK keeps the same split).
"""

import sys as _sys

_limit = _sys.getrecursionlimit()
__import__("eth_account")  # for its side effect on the recursion limit, undone below

# py_ecc (imported by eth-account) raises the recursion limit to 100,000 at import. With it,
# Python's C JSON parser overflows the C stack on deeply nested input and the process dies
# (a segfault, not a RecursionError). We never use py_ecc's deep recursion: put it back.
_sys.setrecursionlimit(_limit if _limit < 100_000 else 1_000)
