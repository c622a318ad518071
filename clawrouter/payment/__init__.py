"""x402 payments: wire format, policy checks, signing, wallet, ledger and budgets.

Nothing in this package knows about the web framework (the x402 SDK keeps the same split).
eth-account is imported by `eth` alone (it needs its recursion limit put back).
"""
