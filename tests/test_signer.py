"""The signer against the x402 test vectors (shared/reference/x402.md §11)."""

from eth_account import Account

from clawrouter.payment.networks import NETWORKS
from clawrouter.payment.signer import Signer, signable
from clawrouter.payment.wire import Challenge, Requirement, decode_b64_json

HARDHAT_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"

VECTOR_1 = {
    "from": "0x857b06519E91e3A54538791bDbb0E22373e36b66",
    "to": "0x209693Bc6afc0C5328bA36FaF03C514EF312287C",
    "value": "10000",
    "validAfter": "1740672089",
    "validBefore": "1740672154",
    "nonce": "0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480",
}
VECTOR_1_SIG = ("0x2d6a7588d6acca505cbf0d9a4a227e0c52c6c34008c8e8986a1283259764173608a2ce64966"
                "42e377d6da8dbbf5836e9bd15092f9ecab05ded3d6293af148b571c")


def test_vector_1_recovers_to_payer_only_with_the_sepolia_domain():
    sepolia, base = NETWORKS["base-sepolia"], NETWORKS["base"]
    assert Account.recover_message(signable(sepolia, VECTOR_1),
                                   signature=VECTOR_1_SIG) == VECTOR_1["from"]
    # The domain-name trap: the mainnet domain recovers to somebody else.
    assert Account.recover_message(signable(base, VECTOR_1), signature=VECTOR_1_SIG) == \
        "0x34aE57701723c302054fe521aC33679a9a94fe42"


def test_vector_2_deterministic_signature():
    signer = Signer(HARDHAT_KEY)
    assert signer.address == "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"
    authorization = {"from": signer.address, "to": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8",
                     "value": "1000", "validAfter": "1700000000", "validBefore": "1700000300",
                     "nonce": "0x" + "00" * 32}
    assert signer.sign_authorization(NETWORKS["base"], authorization) == (
        "0x05e2dc1173d263746cb0da3ca014b3cba7cf04173bebc72626962b720291c8d33b46bae716e97ea5b00c"
        "fd521108ac8ea62e6b305a1390053805944714749ddc1b")


def _requirement(amount="21000", timeout=300):
    net = NETWORKS["base"]
    raw = {"scheme": "exact", "network": net.caip2, "amount": amount, "asset": net.usdc,
           "payTo": "0x70997970C51812dc3A010C7d01b50e0d17dc79C8", "maxTimeoutSeconds": timeout,
           "extra": {"name": "USD Coin", "version": "2"}}
    return Requirement("exact", net.caip2, amount, net.usdc, raw["payTo"], timeout,
                       raw["extra"], raw)


def test_payment_header_is_a_v2_payload_echoing_the_requirement():
    signer = Signer(HARDHAT_KEY)
    req = _requirement()
    challenge = Challenge(2, [req], {"url": "https://blockrun.ai/api/v1/images/generations"})
    paid = signer.pay(challenge, req, NETWORKS["base"],
                      "https://blockrun.ai/api/v1/images/generations")
    payload = decode_b64_json(paid.header)
    assert payload["x402Version"] == 2
    assert payload["accepted"] == req.raw
    auth = payload["payload"]["authorization"]
    assert auth["value"] == "21000" and auth["to"] == req.pay_to and auth["from"] == signer.address
    assert int(auth["validBefore"]) - int(auth["validAfter"]) == 600 + 300
    assert len(bytes.fromhex(auth["nonce"][2:])) == 32
    recovered = Account.recover_message(signable(NETWORKS["base"], auth),
                                        signature=payload["payload"]["signature"])
    assert recovered == signer.address


def test_resource_from_another_host_is_replaced_and_nonces_are_fresh():
    signer = Signer(HARDHAT_KEY)
    req = _requirement()
    challenge = Challenge(2, [req], {"url": "https://evil.example/steal"})
    url = "https://blockrun.ai/api/v1/images/generations"
    first = decode_b64_json(signer.pay(challenge, req, NETWORKS["base"], url).header)
    second = decode_b64_json(signer.pay(challenge, req, NETWORKS["base"], url).header)
    assert first["resource"] == {"url": url}
    assert first["payload"]["authorization"]["nonce"] != second["payload"]["authorization"]["nonce"]


def test_the_fast_digest_and_signature_match_eth_account():
    """Random authorizations on both networks: our digest and signature equal eth-account's."""
    import secrets

    from clawrouter.payment.signer import TWA_TYPEHASH

    assert TWA_TYPEHASH.hex() == "7c7c6cdb67a18743f49ec6fa9b35f50d52ed05cbed4cc592e13b44501c1a2267"
    for network in NETWORKS.values():
        account = Account.create()
        signer = Signer(account.key.to_0x_hex())
        for _ in range(25):
            authorization = {
                "from": signer.address, "to": Account.create().address,
                "value": str(secrets.randbelow(10**12)), "validAfter": str(secrets.randbelow(2**40)),
                "validBefore": str(secrets.randbelow(2**40)),
                "nonce": "0x" + secrets.token_bytes(32).hex()}
            ours = signer.sign_authorization(network, authorization)
            theirs = Account.sign_message(signable(network, authorization), account.key)
            assert ours == "0x" + bytes(theirs.signature).hex()
            assert Account.recover_message(signable(network, authorization),
                                           signature=ours) == signer.address


def test_domain_separators_match_the_reference():
    from clawrouter.payment.signer import domain_separator

    assert domain_separator(NETWORKS["base"]).hex() == (
        "02fa7265e7c5d81118673727957699e4d68f74cd74b7db77da710fe8a2c7834f")
    assert domain_separator(NETWORKS["base-sepolia"]).hex() == (
        "71f17a3b2ff373b803d70a5a07c046c1a2bc8e89c09ef722fcb047abe94c9818")
