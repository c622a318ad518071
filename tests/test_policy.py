"""Challenge checks: every refusal names its check; nothing outside our tables is accepted."""

import pytest

from clawrouter.config import BLOCKRUN_PAYEE
from clawrouter.errors import PaymentRefused
from clawrouter.payment import policy
from clawrouter.payment.networks import NETWORKS
from clawrouter.payment.wire import Challenge, parse_challenge, b64_json

BASE = NETWORKS["base"]


def challenge(**changes):
    entry = {"scheme": "exact", "network": BASE.caip2, "amount": "21000", "asset": BASE.usdc,
             "payTo": BLOCKRUN_PAYEE, "maxTimeoutSeconds": 300,
             "extra": {"name": "USD Coin", "version": "2"}}
    entry.update(changes)
    return parse_challenge({"payment-required": b64_json({"x402Version": 2,
                                                          "accepts": [entry]})}, b"")


def select(ch: Challenge, ceiling=50_000, cap=1_000_000):
    return policy.select(ch, network=BASE, pay_to=BLOCKRUN_PAYEE, ceiling=ceiling, cap=cap)


def test_a_correct_challenge_is_selected():
    assert select(challenge()).amount == "21000"


@pytest.mark.parametrize("changes, check", [
    ({"scheme": "upto"}, "scheme"),
    ({"network": "eip155:1"}, "network"),
    ({"network": "eip155:84532"}, "network"),
    ({"asset": "0x0000000000000000000000000000000000000001"}, "asset"),
    ({"payTo": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"}, "payee"),
    ({"payTo": "not-an-address"}, "payee"),
    ({"amount": "50001"}, "amount"),
    ({"amount": "-5"}, "amount"),
    ({"amount": "1e6"}, "amount"),
    ({"amount": "0"}, "amount"),
    ({"amount": "21000\n"}, "amount"),
    ({"amount": " 21000"}, "amount"),
    ({"payTo": BLOCKRUN_PAYEE + "\n"}, "payee"),
    ({"maxTimeoutSeconds": 3600}, "timeout"),
    ({"maxTimeoutSeconds": 0}, "timeout"),
    ({"maxTimeoutSeconds": 5}, "timeout"),  # a facilitator wants validBefore ≥ now + 6
    ({"maxTimeoutSeconds": "300"}, "timeout"),
    ({"maxTimeoutSeconds": True}, "timeout"),
    # a facilitator verifies with the challenge's domain, we sign with our table's: a mismatch
    # would be a refused payment that is still spendable until it expires
    ({"extra": {"name": "USDC", "version": "2"}}, "domain"),
    ({"extra": {"name": "USD Coin", "version": 2}}, "domain"),
    ({"extra": {}}, "domain"),
    ({"extra": {"name": "USD Coin", "version": "2", "assetTransferMethod": "permit2"}},
     "scheme"),
])
def test_each_tampered_field_is_refused(changes, check):
    with pytest.raises(PaymentRefused) as err:
        select(challenge(**changes))
    assert err.value.extra["check"] == check
    assert err.value.status == 402 and err.value.code == "payment_refused"
    assert "nothing was signed" in err.value.message


@pytest.mark.parametrize("changes", [
    {"scheme": "\x1b]52;c;ZXZpbA==\x07\x1b[2J\r\nupto" + "y" * 3000},
    {"network": "\x1b[2Jevil\n" + "z" * 3000},
])
def test_a_refusal_quotes_the_challenge_as_plain_bounded_text(changes):
    """The refusal names what the challenge asked for; that text is the upstream's, and it
    reaches terminals and agents: no control characters, bounded."""
    with pytest.raises(PaymentRefused) as err:
        select(challenge(**changes))
    message = err.value.message
    assert len(message) < 700 and ("evil" in message or "upto" in message)
    assert not any(ord(c) < 32 or 0x7f <= ord(c) <= 0x9f for c in message)


def test_the_per_request_cap_applies_even_under_the_catalog_ceiling():
    with pytest.raises(PaymentRefused, match="per-request cap"):
        select(challenge(amount="21000"), ceiling=50_000, cap=20_000)


def test_an_upto_entry_first_does_not_hide_the_exact_one_and_is_never_chosen():
    ch = challenge()
    upto = ch.requirements[0].raw | {"scheme": "upto", "amount": "999999"}
    ch2 = parse_challenge({"payment-required": b64_json(
        {"x402Version": 2, "accepts": [upto, ch.requirements[0].raw]})}, b"")
    assert select(ch2).scheme == "exact"


def test_v1_body_challenge_with_network_names():
    ch = parse_challenge({}, b'{"x402Version":1,"accepts":[{"scheme":"exact","network":"base",'
                             b'"maxAmountRequired":"21000","asset":"' + BASE.usdc.encode() +
                         b'","payTo":"' + BLOCKRUN_PAYEE.encode() + b'","maxTimeoutSeconds":60,'
                             b'"extra":{"name":"USD Coin","version":"2"}}]}')
    assert ch.version == 1 and select(ch).amount == "21000"


@pytest.mark.parametrize("asked, want, cap, signed", [
    (300, 360, 600, 360),  # raised to cover the poll window
    (300, 900, 600, 600),  # never above the user's max_timeout_seconds
    (300, 60, 600, 300),   # never shortened
    (300, 360, 300, 300),  # a cap at the challenge's value leaves it alone
])
def test_a_slow_jobs_authorization_outlives_its_polls_within_the_cap(asked, want, cap, signed):
    req = select(challenge(maxTimeoutSeconds=asked))
    longer = policy.outliving(req, want, cap)
    assert longer.max_timeout_seconds == longer.raw["maxTimeoutSeconds"] == signed
    assert {**longer.raw, "maxTimeoutSeconds": asked} == req.raw  # nothing else changes


def test_a_permit2_entry_first_does_not_hide_the_eip3009_one():
    ch = challenge()
    permit2 = ch.requirements[0].raw | {"extra": {"name": "USD Coin", "version": "2",
                                                  "assetTransferMethod": "permit2"}}
    eip3009 = ch.requirements[0].raw | {"extra": {"name": "USD Coin", "version": "2",
                                                  "assetTransferMethod": "eip3009"}}
    ch2 = parse_challenge({"payment-required": b64_json(
        {"x402Version": 2, "accepts": [permit2, eip3009]})}, b"")
    assert select(ch2).extra["assetTransferMethod"] == "eip3009"


def test_an_exact_entry_that_fails_a_check_does_not_hide_a_later_one_that_passes():
    """A challenge may list several `exact` entries on one network: a Circle Gateway batching
    entry first (another EIP-712 domain, another payee, a week-long timeout), as a captured
    Base 402 does, then standard USDC. The first is passed over, the second signed; a
    challenge where none passes is refused with the first one's failure."""
    standard = challenge().requirements[0].raw
    gateway = standard | {"payTo": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
                          "maxTimeoutSeconds": 604900,
                          "extra": {"name": "GatewayWalletBatched", "version": "1"}}
    dearer = standard | {"amount": "900000"}

    def both(*entries):
        return parse_challenge({"payment-required": b64_json(
            {"x402Version": 2, "accepts": list(entries)})}, b"")

    assert select(both(gateway, standard)).raw == standard
    assert select(both(dearer, standard)).raw == standard  # never the dearer one
    assert select(both(standard, dearer)).raw == standard
    with pytest.raises(PaymentRefused) as err:
        select(both(gateway, dearer))
    assert err.value.extra["check"] == "domain"  # the first entry's failure


def test_the_cheapest_acceptable_entry_is_signed_not_the_first():
    """Two acceptable options, both under the ceiling: the challenge's order does not decide
    what we pay (a dearer one listed first is passed over); of equally cheap ones, the first.
    One that fails a check is never chosen for being cheaper."""
    standard = challenge().requirements[0].raw

    def entries(*accepts):
        return parse_challenge({"payment-required": b64_json(
            {"x402Version": 2, "accepts": list(accepts)})}, b"")

    dear, cheap = standard | {"amount": "79999"}, standard | {"amount": "53500"}
    assert select(entries(dear, cheap), ceiling=80_000).raw == cheap
    assert select(entries(cheap, dear), ceiling=80_000).raw == cheap
    twin = cheap | {"maxTimeoutSeconds": 120}
    assert select(entries(dear, cheap, twin), ceiling=80_000).raw == cheap
    assert select(entries(dear, twin, cheap), ceiling=80_000).raw == twin
    elsewhere = standard | {"amount": "1", "payTo": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"}
    assert select(entries(dear, elsewhere), ceiling=80_000).raw == dear
