"""The library choices the README names, each timed against the plain alternative.

    .venv/bin/python bench/choices.py [--count 200] [--save NAME]

CPU per operation (this process, user + kernel), on the payloads the gateway handles:
- base64: a strict decode of a 4 MB image (an edit's input), pybase64 against the standard
  library's `base64.b64decode(validate=True)`;
- JSON: parsing a 1.5 MB data-URI answer, pydantic-core's `from_json` against `json.loads`;
- signing: one EIP-3009 authorization, our digest of the one fixed message type signed with
  coincurve (`Signer.sign_authorization`) against eth-account's general EIP-712 path
  (`encode_typed_data` + `Account.sign_message`), which gives the same signature.
The event loop (uvloop against asyncio's own) is measured on the whole gateway instead:
`bench/ablate.py full stdloop`.
"""

from __future__ import annotations

import argparse
import base64
import json
import secrets
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

import pybase64  # noqa: E402
import pydantic_core  # noqa: E402
from eth_account import Account  # noqa: E402

import record  # noqa: E402
from disk import cpu_ms_per_call  # noqa: E402
from clawrouter.payment.networks import NETWORKS  # noqa: E402
from clawrouter.payment.signer import Signer, signable  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=200, help="calls per measurement")
    record.add_save_option(parser, "choices")
    args = parser.parse_args()
    with record.saved(args.save, "The library choices, timed", "choices.py", fenced=False):
        measure(args.count)


def measure(count: int) -> None:
    image = base64.b64encode(secrets.token_bytes(4_000_000)).decode()
    answer = json.dumps({"created": 1, "data": [{"url": "data:image/png;base64," + base64
                                                 .b64encode(secrets.token_bytes(1_100_000))
                                                 .decode()}]}).encode()
    key = "0x" + secrets.token_hex(32)
    signer, network = Signer(key), NETWORKS["base"]
    authorization, signature = signer.authorize(network, signer.address, 10_000, valid_for=60)
    general = Account.sign_message(signable(network, authorization), key).signature.hex()
    assert general.removeprefix("0x") == signature.removeprefix("0x"), "not the same signature"
    rows = [
        ("strict base64 decode, 4 MB", "pybase64",
         cpu_ms_per_call(lambda: pybase64.b64decode(image, validate=True), count),
         "base64", cpu_ms_per_call(lambda: base64.b64decode(image, validate=True), count)),
        ("JSON parse, 1.5 MB data-URI answer", "pydantic-core",
         cpu_ms_per_call(lambda: pydantic_core.from_json(answer), count),
         "json", cpu_ms_per_call(lambda: json.loads(answer), count)),
        ("EIP-3009 signature", "fixed digest + coincurve",
         cpu_ms_per_call(lambda: signer.sign_authorization(network, authorization), count * 10),
         "eth-account EIP-712",
         cpu_ms_per_call(lambda: Account.sign_message(signable(network, authorization), key),
                     count * 10)),
    ]
    print(f"CPU per call, ms (user + kernel), {count} calls each (signatures: {count * 10})\n")
    print("| operation | ours | ms | alternative | ms |")
    print("|---|---|---|---|---|")
    for what, ours, ours_ms, other, other_ms in rows:
        print(f"| {what} | {ours} | {ours_ms:.3f} | {other} | {other_ms:.3f} |")


if __name__ == "__main__":
    main()
