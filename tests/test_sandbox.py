"""The sandbox upstream over real HTTP: validation, 402 challenges, strict payment checks,
results, 202 jobs, the control API and every fault kind."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from eth_account import Account

from clawrouter.catalog import BY_ID, estimate_micro
from clawrouter.config import BLOCKRUN_PAYEE
from clawrouter.payment.networks import NETWORKS
from clawrouter.payment.signer import Signer
from clawrouter.payment.wire import b64_json, decode_b64_json, parse_challenge
from clawrouter.sandbox import SandboxConfig, create_sandbox_app
from clawrouter.sandbox.images import make_png
from clawrouter.sandbox.verify import SECP256K1_N
from tests.servers import serving

SEPOLIA, BASE = NETWORKS["base-sepolia"], NETWORKS["base"]
GEN, EDIT = "/api/v1/images/generations", "/api/v1/images/image2image"
SLOW_SECONDS = 2.0
DEFAULTS = {"latency_ms": 0, "slow_seconds": SLOW_SECONDS, "url_results": True,
            "image_bytes": None, "verify_cpu_ms": 0}
SIGNER = Signer(Account.create().key.to_0x_hex())
OTHER = Signer(Account.create().key.to_0x_hex())
CAT = {"model": "google/nano-banana", "prompt": "a cat", "size": "1024x1024", "n": 1}


class Clock:
    """Real time plus an offset tests can advance (instead of sleeping through a job)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


CLOCK = Clock()


@pytest.fixture(scope="module")
def server() -> Iterator[Any]:
    config = SandboxConfig(slow_seconds=SLOW_SECONDS, clock=CLOCK)
    with serving(create_sandbox_app(config)) as srv:
        yield srv


@pytest.fixture
def client(server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=10) as c:
        assert c.post("/_sandbox/reset").status_code == 200
        assert c.post("/_sandbox/config", json=DEFAULTS).status_code == 200
        CLOCK.offset = 0.0
        yield c


# --- helpers ------------------------------------------------------------------------------------

def stats(client: httpx.Client) -> dict[str, Any]:
    return client.get("/_sandbox/stats").json()


def requirement_for(client: httpx.Client, path: str, body: dict) -> dict[str, Any]:
    response = client.post(path, json=body)
    assert response.status_code == 402, response.text
    return decode_b64_json(response.headers["payment-required"])["accepts"][0]


def pay(client: httpx.Client, path: str, body: dict, signer: Signer = SIGNER,
        header: str = "PAYMENT-SIGNATURE") -> tuple[httpx.Response, str]:
    """The ordinary x402 dance with the project's Signer: 402 → sign → paid request."""
    url = client.base_url.join(path)
    first = client.post(path, json=body)
    assert first.status_code == 402, first.text
    challenge = parse_challenge(first.headers, first.content)
    payment = signer.pay(challenge, challenge.requirements[0], SEPOLIA, str(url))
    return client.post(path, json=body, headers={header: payment.header}), payment.header


def forge(accepted: dict[str, Any], *, signer: Signer = SIGNER, sign_network=SEPOLIA,
          mangle: Callable[[bytes], bytes] | None = None, **auth: Any) -> str:
    """A hand-built v2 payment header: sign `accepted` with overrides to the authorization."""
    now = int(time.time())
    authorization = {"from": signer.address, "to": accepted["payTo"],
                     "value": accepted["amount"], "validAfter": str(now - 600),
                     "validBefore": str(now + 300),
                     "nonce": "0x" + secrets.token_bytes(32).hex(), **auth}
    signature = signer.sign_authorization(sign_network, authorization)
    if mangle:
        signature = "0x" + mangle(bytes.fromhex(signature[2:])).hex()
    return b64_json({"x402Version": 2, "resource": {"url": "http://sandbox"},
                     "accepted": accepted,
                     "payload": {"signature": signature, "authorization": authorization}})


def rejection(response: httpx.Response) -> tuple[str, dict[str, Any]]:
    """(code, VerifyResponse) of a 402 rejection."""
    assert response.status_code == 402, response.text
    body = response.json()
    assert body["error"] == "Payment verification failed"
    assert body["details"].startswith("Verification failed: ") and body["details"].endswith("\n")
    return body["code"], json.loads(body["details"].removeprefix("Verification failed: "))


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def data_uri_png(url: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    return base64.b64decode(url[len(prefix):])


def data_uri(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(png).decode()


def high_s(sig: bytes) -> bytes:
    s = SECP256K1_N - int.from_bytes(sig[32:64], "big")
    return sig[:32] + s.to_bytes(32, "big") + bytes([55 - sig[64]])


# --- basics -------------------------------------------------------------------------------------

def test_health_models_and_the_sandbox_marker(client: httpx.Client) -> None:
    health = client.get("/health")
    assert health.json()["status"] == "ok" and health.json()["sandbox"] is True
    assert health.json()["network"] == "base-sepolia"
    models = client.get("/api/v1/models")
    assert models.headers["x-blockrun-sandbox"] == "true"
    assert models.headers["content-type"] == "application/json"
    rows = {row["id"]: row for row in models.json()["data"]}
    assert rows.keys() == BY_ID.keys()
    assert rows["openai/gpt-image-1"] == {
        "id": "openai/gpt-image-1", "object": "model", "owned_by": "openai",
        "categories": ["image"], "billing_mode": "per_image",
        "pricing": {"per_image": 0.021, "transaction_fee": 0.001},
        "supported_sizes": ["1024x1024", "1536x1024", "1024x1536"], "available": True}
    missing = client.get("/api/v1/images/models")
    assert missing.status_code == 404 and missing.json() == {"error": "Not Found"}
    assert missing.headers["x-blockrun-sandbox"] == "true"


PNG = data_uri(make_png(64, 64, 1))
JPEG = data_uri(b"\xff\xd8\xff\xe0" + b"\x00" * 32, "image/jpeg")
EDIT_OK = {"model": "openai/gpt-image-1", "prompt": "p", "image": PNG}


@pytest.mark.parametrize("path,body,param,code", [
    (GEN, [1, 2], None, "invalid_json"),
    (GEN, "not json", None, "invalid_json"),
    (GEN, {**CAT, "model": "nano-banana"}, "model", "model_not_found"),
    (GEN, {**CAT, "model": "openai/dall-e-3"}, "model", "model_delisted"),
    (GEN, {**CAT, "prompt": ""}, "prompt", "invalid_prompt"),
    (GEN, {"model": "google/nano-banana"}, "prompt", "invalid_prompt"),
    (GEN, {**CAT, "size": "512x512"}, "size", "invalid_size"),
    (GEN, {**CAT, "size": ["1024x1024"]}, "size", "invalid_size"),
    (GEN, {**CAT, "n": 0}, "n", "invalid_n"),
    (GEN, {**CAT, "n": 11}, "n", "invalid_n"),
    (GEN, {**CAT, "n": "2"}, "n", "invalid_n"),
    (GEN, {**CAT, "quality": "hd"}, "quality", "unsupported_parameter"),
    (EDIT, {"model": "openai/gpt-image-1", "prompt": "p"}, "image", "missing_image"),
    (EDIT, {**EDIT_OK, "image": []}, "image", "invalid_image"),
    (EDIT, {**EDIT_OK, "image": "https://example.com/cat.png"}, "image", "invalid_image"),
    (EDIT, {**EDIT_OK, "image": data_uri(b"not an image")}, "image", "invalid_image"),
    (EDIT, {**EDIT_OK, "model": "bytedance/seedream-5-pro"}, "model", "edits_not_supported"),
    (EDIT, {**EDIT_OK, "model": "google/nano-banana", "image": [PNG] * 4}, "image",
     "too_many_images"),
    (EDIT, {**EDIT_OK, "model": "google/nano-banana", "mask": PNG}, "mask",
     "mask_not_supported"),
    (EDIT, {**EDIT_OK, "image": [PNG, PNG], "mask": PNG}, "mask", "mask_with_multiple_images"),
    (EDIT, {**EDIT_OK, "mask": JPEG}, "mask", "invalid_mask"),
])
def test_validation_errors_come_before_any_402(client: httpx.Client, path: str, body: Any,
                                               param: str | None, code: str) -> None:
    if isinstance(body, str):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = client.post(path, json=body)
    assert response.status_code == 400, response.text
    assert "payment-required" not in response.headers
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert error["message"]
    route = "generations" if path == GEN else "image2image"
    assert stats(client)["requests"] == {route: {"invalid": 1}}


def test_quality_is_accepted_by_the_gpt_image_25_models(client: httpx.Client) -> None:
    body = {"model": "openai/gpt-image-2.5-flare", "prompt": "p", "quality": "high"}
    assert client.post(GEN, json=body).status_code == 402


@pytest.mark.parametrize("model,size,n", [
    ("google/nano-banana", "1024x1024", 1),
    ("openai/gpt-image-1", "1536x1024", 3),
    ("zai/cogview-4", "1440x1440", 10),
])
def test_challenge_shape_and_price(client: httpx.Client, model: str, size: str, n: int) -> None:
    response = client.post(GEN, json={"model": model, "prompt": "p", "size": size, "n": n})
    assert response.status_code == 402
    assert response.headers["content-type"] == "application/json"
    amount = estimate_micro(BY_ID[model], size, n)
    assert decode_b64_json(response.headers["payment-required"]) == {
        "x402Version": 2, "error": "Payment Required",
        "resource": {"url": f"{client.base_url}{GEN}", "mimeType": "application/json",
                     "description": f"{model}: {n} image(s) at {size}"},
        "accepts": [{"scheme": "exact", "network": "eip155:84532", "amount": str(amount),
                     "asset": SEPOLIA.usdc, "payTo": BLOCKRUN_PAYEE, "maxTimeoutSeconds": 300,
                     "extra": {"name": "USDC", "version": "2"}}]}
    price = response.json()["price"]
    assert price["currency"] == "USD"
    assert round(float(price["amount"]) * 1e6) == amount - 1000  # without the flat fee
    assert stats(client)["requests"] == {"generations": {"unpaid": 1}}


def test_an_empty_model_is_billed_as_the_default(client: httpx.Client) -> None:
    accepted = requirement_for(client, GEN, {**CAT, "model": ""})
    assert accepted["amount"] == str(estimate_micro(BY_ID["google/nano-banana"], "1024x1024", 1))


# --- paying -------------------------------------------------------------------------------------

def test_paid_generation_returns_fresh_downloadable_pngs(client: httpx.Client) -> None:
    response, _ = pay(client, GEN, {**CAT, "n": 2})
    assert response.status_code == 200, response.text
    receipt = decode_b64_json(response.headers["payment-response"])
    amount = estimate_micro(BY_ID["google/nano-banana"], "1024x1024", 2)
    assert receipt["success"] is True and receipt["network"] == "eip155:84532"
    assert receipt["payer"] == SIGNER.address and receipt["amount"] == str(amount)
    assert len(receipt["transaction"]) == 66
    body = response.json()
    assert isinstance(body["created"], int) and len(body["data"]) == 2
    images = []
    for item in body["data"]:
        assert item["url"].startswith(f"{client.base_url}/api/media/")
        download = client.get(item["url"])
        assert download.status_code == 200 and download.headers["content-type"] == "image/png"
        assert png_size(download.content) == (1024, 1024)
        images.append(download.content)
    again, _ = pay(client, GEN, {**CAT, "n": 1})
    images.append(client.get(again.json()["data"][0]["url"]).content)
    assert len(set(images)) == 3  # every image differs
    seen = stats(client)
    assert seen["requests"]["generations"] == {"unpaid": 2, "paid": 2}
    assert seen["round_trips"] == 4
    assert seen["payments_received"][0] | {"nonce": None, "valid_before": None} == {
        "amount": amount, "payer": SIGNER.address, "nonce": None, "route": "generations",
        "model": "google/nano-banana", "size": "1024x1024", "n": 2, "valid_before": None}
    assert [s["transaction"] for s in seen["settled"]][0] == receipt["transaction"]
    assert seen["settled_total_micro"] == amount + estimate_micro(
        BY_ID["google/nano-banana"], "1024x1024", 1)


def test_gpt_image_1_answers_data_uris(client: httpx.Client) -> None:
    body = {"model": "openai/gpt-image-1", "prompt": "p", "size": "1536x1024", "n": 2}
    response, _ = pay(client, GEN, body)
    assert response.status_code == 200
    pngs = [data_uri_png(item["url"]) for item in response.json()["data"]]
    assert [png_size(p) for p in pngs] == [(1536, 1024)] * 2 and pngs[0] != pngs[1]
    assert response.json()["data"][0]["revised_prompt"] == "p"


def test_x_payment_alone_and_urlsafe_base64_are_accepted(client: httpx.Client) -> None:
    response, _ = pay(client, GEN, CAT, header="X-PAYMENT")
    assert response.status_code == 200
    header = forge(requirement_for(client, GEN, CAT))
    urlsafe = header.replace("+", "-").replace("/", "_").rstrip("=")
    assert client.post(GEN, json=CAT, headers={"PAYMENT-SIGNATURE": urlsafe}).status_code == 200


def _other_price(accepted: dict) -> dict:
    return {**accepted, "amount": str(estimate_micro(BY_ID["google/nano-banana"], "1024x1024", 2))}


@pytest.mark.parametrize("make,reason", [
    (lambda a: forge(a, value=str(int(a["amount"]) + 1)),
     "invalid_exact_evm_payload_authorization_value_mismatch"),
    (lambda a: forge(_other_price(a)), "accepted_requirements_mismatch"),  # paid for n=2
    (lambda a: forge({**a, "payTo": "0x" + "22" * 20}), "accepted_requirements_mismatch"),
    (lambda a: forge(a, to="0x" + "22" * 20), "invalid_exact_evm_payload_recipient_mismatch"),
    (lambda a: forge(a, sign_network=BASE), "invalid_exact_evm_payload_signature"),
    (lambda a: forge({**a, "network": "eip155:8453"}), "network_mismatch"),
    (lambda a: forge(a, validBefore=str(int(time.time()) - 1)),
     "invalid_exact_evm_payload_authorization_valid_before"),
    (lambda a: forge(a, validAfter=str(int(time.time()) + 60)),
     "invalid_exact_evm_payload_authorization_valid_after"),
    (lambda a: forge(a, nonce="0x01"), "invalid_exact_evm_payload_nonce"),
    (lambda a: forge(a, mangle=high_s), "invalid_exact_evm_payload_signature"),
    (lambda a: forge(a, mangle=lambda s: s[:64] + bytes([s[64] + 2])),  # v = 29 or 30
     "invalid_exact_evm_payload_signature"),
    (lambda a: "%%% not base64 %%%", "invalid_payload"),
    (lambda a: b64_json({"x402Version": 1, "scheme": "exact", "network": "base-sepolia"}),
     "invalid_x402_version"),
])
def test_verifier_rejections(client: httpx.Client, make: Callable[[dict], str],
                             reason: str) -> None:
    header = make(requirement_for(client, GEN, CAT))
    code, verify = rejection(client.post(GEN, json=CAT, headers={"PAYMENT-SIGNATURE": header}))
    assert (code, verify["isValid"], verify["invalidReason"]) == ("PAYMENT_INVALID", False, reason)
    seen = stats(client)
    assert seen["payments_received"] == [] and seen["settled"] == []
    assert seen["rejected"] == {"PAYMENT_INVALID": 1}


def test_replayed_authorization_is_refused(client: httpx.Client) -> None:
    first, header = pay(client, GEN, CAT)
    assert first.status_code == 200
    code, verify = rejection(client.post(GEN, json=CAT, headers={"X-PAYMENT": header}))
    assert code == "PAYMENT_REPLAY" and verify["payer"] == SIGNER.address
    seen = stats(client)
    assert seen["settled_count"] == 1 and seen["rejected"] == {"PAYMENT_REPLAY": 1}


# --- 202 jobs -----------------------------------------------------------------------------------

def test_slow_model_202_then_polls_then_settles_once(client: httpx.Client) -> None:
    body = {"model": "openai/gpt-image-2", "prompt": "p", "size": "1536x1024", "n": 2}
    response, header = pay(client, GEN, body)
    assert response.status_code == 202 and "payment-response" not in response.headers
    job = response.json()
    assert job["object"] == "image.generation.job" and job["status"] == "queued"
    assert job["id"].startswith("img_") and job["poll_url"] == f"{GEN}/{job['id']}"
    assert (job["model"], job["size"], job["n"]) == ("openai/gpt-image-2", "1536x1024", 2)
    assert stats(client)["settled"] == []

    polled = client.get(job["poll_url"], headers={"PAYMENT-SIGNATURE": header})
    assert polled.status_code == 202 and polled.json()["status"] == "in_progress"
    CLOCK.offset = SLOW_SECONDS
    done = client.get(job["poll_url"], headers={"PAYMENT-SIGNATURE": header,
                                                "X-PAYMENT": header})
    assert done.status_code == 200 and done.json()["status"] == "completed"
    tx = done.headers["x-payment-receipt"]
    assert tx.startswith("0x") and len(tx) == 66
    assert [png_size(data_uri_png(i["url"])) for i in done.json()["data"]] == [(1536, 1024)] * 2
    again = client.get(job["poll_url"], headers={"PAYMENT-SIGNATURE": header})
    assert again.json() == done.json() and again.headers["x-payment-receipt"] == tx

    seen = stats(client)
    amount = estimate_micro(BY_ID["openai/gpt-image-2"], "1536x1024", 2)
    assert [(s["transaction"], s["amount"], s["job_id"]) for s in seen["settled"]] == [
        (tx, amount, job["id"])]
    assert seen["polls"] == 3 and seen["round_trips"] == 5
    assert seen["polls_with_another_authorization"] == 0
    assert seen["requests"]["generations"] == {"unpaid": 1, "paid": 1, "poll": 3}
    # the job's authorization cannot be spent again; the rejection points at the job
    replay = client.post(GEN, json=body, headers={"PAYMENT-SIGNATURE": header})
    assert rejection(replay)[0] == "PAYMENT_REPLAY"
    assert replay.json()["job_id"] == job["id"] and replay.json()["poll_url"] == job["poll_url"]


def test_polls_are_bound_to_the_paying_wallet(client: httpx.Client) -> None:
    body = {"model": "openai/gpt-image-2", "prompt": "p"}
    response, _ = pay(client, GEN, body)
    poll_url = response.json()["poll_url"]
    unpaid = client.get(poll_url)
    assert unpaid.status_code == 402 and unpaid.json()["error"] == "Payment Required"
    stranger = forge(requirement_for(client, GEN, body), signer=OTHER)
    code, verify = rejection(client.get(poll_url, headers={"PAYMENT-SIGNATURE": stranger}))
    assert code == "PAYMENT_INVALID" and verify["invalidReason"] == "payer_mismatch"
    assert client.get(f"{GEN}/img_nope").status_code == 404
    # a fresh authorization from the same wallet is accepted (wallet binding, not equality)
    same_wallet = forge(requirement_for(client, GEN, body))
    assert client.get(poll_url, headers={"PAYMENT-SIGNATURE": same_wallet}).status_code == 202
    assert stats(client)["settled"] == []
    assert stats(client)["polls_with_another_authorization"] == 1  # and counted: tests assert 0


def test_authorization_expiring_before_completion_fails_settlement(client: httpx.Client) -> None:
    response, header = pay(client, GEN, {"model": "openai/gpt-image-2", "prompt": "p"})
    CLOCK.offset = 400  # past validBefore (now + 300)
    failed = client.get(response.json()["poll_url"], headers={"PAYMENT-SIGNATURE": header})
    assert failed.status_code == 402
    assert failed.json() == {"error": "Payment settlement failed",
                             "details": "transaction_simulation_failed"}
    assert stats(client)["settled"] == []


# --- image2image --------------------------------------------------------------------------------

def test_image2image_inputs_results_and_body_hashes(client: httpx.Client) -> None:
    a, b = make_png(32, 32, 1), make_png(32, 32, 2)
    fusion = {"model": "google/nano-banana", "prompt": "merge", "image": [data_uri(a),
                                                                          data_uri(b)]}
    response, _ = pay(client, EDIT, fusion)
    assert response.status_code == 200
    assert png_size(data_uri_png(response.json()["data"][0]["url"])) == (1024, 1024)
    masked = {"model": "openai/gpt-image-1", "prompt": "fix", "image": data_uri(a),
              "mask": data_uri(b), "size": "1024x1536"}
    response, _ = pay(client, EDIT, masked)
    assert png_size(data_uri_png(response.json()["data"][0]["url"])) == (1024, 1536)

    def summary(png: bytes) -> dict:
        return {"mime": "image/png", "sha256": hashlib.sha256(png).hexdigest(),
                "bytes": len(png)}

    seen = stats(client)
    assert seen["bodies"][-1] == {**masked, "image": summary(a), "mask": summary(b)}
    assert seen["bodies"][0]["image"] == [summary(a), summary(b)]
    assert seen["requests"]["image2image"] == {"unpaid": 2, "paid": 2}
    assert seen["settled"][0]["route"] == "image2image"


def test_url_model_edits_from_google_are_data_uris_but_generations_are_urls(
        client: httpx.Client) -> None:
    edit = {"model": "google/nano-banana-2", "prompt": "p", "image": PNG}
    assert pay(client, EDIT, edit)[0].json()["data"][0]["url"].startswith("data:image/png")
    generated = pay(client, GEN, {**CAT, "model": "google/nano-banana-2"})[0]
    assert generated.json()["data"][0]["url"].startswith("http://")


# --- control API --------------------------------------------------------------------------------

def test_runtime_config_latency_padding_and_url_results(client: httpx.Client) -> None:
    assert client.post("/_sandbox/config", json={"latency_ms": 1000}).json()["latency_ms"] == 1000
    start = time.perf_counter()
    client.get("/api/v1/models")
    assert time.perf_counter() - start >= 1.0
    start = time.perf_counter()
    client.get("/_sandbox/stats")  # the control API is not delayed (a margin for slow machines)
    assert time.perf_counter() - start < 0.8
    client.post("/_sandbox/config", json={"latency_ms": 0, "image_bytes": 200_000})
    url = pay(client, GEN, CAT)[0].json()["data"][0]["url"]
    assert abs(len(client.get(url).content) - 200_000) < 100
    client.post("/_sandbox/config", json={"url_results": False})
    assert pay(client, GEN, CAT)[0].json()["data"][0]["url"].startswith("data:image/png")
    bad = client.post("/_sandbox/config", json={"network": "base"})
    assert bad.status_code == 400 and "network" in bad.json()["error"]
    assert client.post("/_sandbox/config", json={"latency_ms": "x"}).status_code == 400
    # benchmarks: an upstream that spends more CPU on each payment (`bench/run.py
    # --upstream-verify-cpu-ms`)
    client.post("/_sandbox/config", json={"url_results": True, "verify_cpu_ms": 60})
    start = time.perf_counter()
    pay(client, GEN, CAT)
    assert time.perf_counter() - start >= 0.06
    for bad in (b"-1", b"Infinity"):  # Python's JSON takes Infinity: it would hang the sandbox
        assert client.post("/_sandbox/config", content=b'{"verify_cpu_ms": ' + bad + b"}",
                           headers={"content-type": "application/json"}).status_code == 400


def test_reset_clears_stats_jobs_faults_and_the_replay_set(client: httpx.Client) -> None:
    _, header = pay(client, GEN, CAT)
    client.post("/_sandbox/faults", json=[{"kind": "delay", "seconds": 0}])
    pay(client, GEN, {"model": "openai/gpt-image-2", "prompt": "p"})
    assert client.post("/_sandbox/reset").json() == {"ok": True}
    seen = stats(client)
    assert seen["round_trips"] == 0 and seen["jobs"] == [] and seen["faults"] == []
    assert client.post(GEN, json=CAT, headers={"PAYMENT-SIGNATURE": header}).status_code == 200


# --- faults -------------------------------------------------------------------------------------

def install(client: httpx.Client, *rules: dict) -> None:
    response = client.post("/_sandbox/faults", json={"rules": list(rules)})
    assert response.status_code == 200, response.text


def test_fault_rules_are_validated_and_listed(client: httpx.Client) -> None:
    bad = client.post("/_sandbox/faults", json=[{"kind": "respond"}])
    assert bad.status_code == 400 and "status" in bad.json()["error"]
    install(client, {"kind": "drop", "phase": "poll", "times": 2})
    assert client.get("/_sandbox/faults").json() == {"rules": [
        {"kind": "drop", "phase": "poll", "times": 2, "used": 0, "remaining": 2}]}


def test_fault_tampered_challenge_is_still_verified_against_the_real_price(
        client: httpx.Client) -> None:
    real = requirement_for(client, GEN, CAT)
    install(client, {"kind": "challenge", "override": {
        "payTo": "0x" + "33" * 20, "amount": "1", "asset": BASE.usdc, "network": "eip155:8453",
        "scheme": "upto", "maxTimeoutSeconds": 3600}})
    tampered = requirement_for(client, GEN, CAT)
    assert tampered == {**real, "payTo": "0x" + "33" * 20, "amount": "1", "asset": BASE.usdc,
                        "network": "eip155:8453", "scheme": "upto", "maxTimeoutSeconds": 3600}
    code, verify = rejection(client.post(GEN, json=CAT, headers={
        "PAYMENT-SIGNATURE": forge({**tampered, "scheme": "exact"}, sign_network=BASE)}))
    assert code == "PAYMENT_INVALID" and verify["invalidReason"] == "network_mismatch"
    install(client, {"kind": "challenge", "override": {"amount": "1"}})
    cheap = requirement_for(client, GEN, CAT)
    code, verify = rejection(client.post(GEN, json=CAT, headers={
        "PAYMENT-SIGNATURE": forge(cheap)}))
    assert verify["invalidReason"] == "accepted_requirements_mismatch"
    # what it really wants is still accepted
    assert client.post(GEN, json=CAT, headers={"PAYMENT-SIGNATURE": forge(real)}).status_code \
        == 200


def test_fault_challenge_extra_entries_raw_header_and_v1_body(client: httpx.Client) -> None:
    real = requirement_for(client, GEN, CAT)
    install(client, {"kind": "challenge", "prepend": [{"scheme": "upto", "amount": "999"}],
                     "append": [{"network": "eip155:1"}], "times": 1},
            {"kind": "challenge", "header": "%%%garbage", "times": 1},
            {"kind": "challenge", "v1": True, "times": 1})
    accepts = decode_b64_json(client.post(GEN, json=CAT).headers["payment-required"])["accepts"]
    assert accepts == [{**real, "scheme": "upto", "amount": "999"}, real,
                       {**real, "network": "eip155:1"}]
    assert client.post(GEN, json=CAT).headers["payment-required"] == "%%%garbage"
    v1 = client.post(GEN, json=CAT)
    assert v1.status_code == 402 and "payment-required" not in v1.headers
    body = v1.json()
    assert body["x402Version"] == 1
    assert body["accepts"][0]["maxAmountRequired"] == real["amount"]
    assert body["accepts"][0]["network"] == "base-sepolia"
    assert parse_challenge(v1.headers, v1.content).requirements[0].amount == real["amount"]
    assert "payment-required" in client.post(GEN, json=CAT).headers  # all three used up
    assert stats(client)["faults_fired"] == {"challenge": 3}


def test_fault_respond_in_each_phase(client: httpx.Client) -> None:
    install(client,
            {"kind": "respond", "phase": "unpaid", "status": 503, "times": 1,
             "headers": {"Retry-After": "1"}, "body": {"error": "busy"}},
            {"kind": "respond", "phase": "unpaid", "status": 429, "times": 1,
             "headers": {"Retry-After": "10"}, "body": {"error": "rate limited"}},
            {"kind": "respond", "phase": "paid", "status": 500, "times": 1,
             "body": {"error": "provider failed"}},
            {"kind": "respond", "phase": "paid", "status": 200, "times": 1,
             "body": "<html>gateway</html>", "content_type": "text/html"})
    busy = client.post(GEN, json=CAT)
    assert (busy.status_code, busy.headers["retry-after"], busy.json()) == (
        503, "1", {"error": "busy"})
    assert client.post(GEN, json=CAT).status_code == 429
    failed, _ = pay(client, GEN, CAT)
    assert failed.status_code == 500 and "payment-response" not in failed.headers
    seen = stats(client)
    assert len(seen["payments_received"]) == 1 and seen["settled"] == []
    html, _ = pay(client, GEN, CAT)
    assert html.status_code == 200 and html.text == "<html>gateway</html>"
    assert html.headers["content-type"].startswith("text/html")
    assert pay(client, GEN, CAT)[0].status_code == 200  # rules used up: normal again


def test_fault_respond_after_settlement_sends_the_receipt(client: httpx.Client) -> None:
    install(client, {"kind": "respond", "phase": "paid", "status": 502, "settle": True})
    response, _ = pay(client, GEN, CAT)
    assert response.status_code == 502
    tx = decode_b64_json(response.headers["payment-response"])["transaction"]
    assert [s["transaction"] for s in stats(client)["settled"]] == [tx]


def test_fault_price_change(client: httpx.Client) -> None:
    old = requirement_for(client, GEN, CAT)
    stale = forge(old)
    install(client, {"kind": "price", "multiply": 2, "model": "google/nano-banana"})
    assert requirement_for(client, GEN, CAT)["amount"] == str(2 * int(old["amount"]))
    code, verify = rejection(client.post(GEN, json=CAT, headers={"PAYMENT-SIGNATURE": stale}))
    assert verify["invalidReason"] == "accepted_requirements_mismatch"
    assert pay(client, GEN, CAT)[0].status_code == 200  # paying the new price works
    install(client, {"kind": "price", "amount": "5000"})
    assert requirement_for(client, GEN, CAT)["amount"] == "5000"
    other = {**CAT, "model": "zai/cogview-4"}
    assert requirement_for(client, GEN, other)["amount"] == "5000"


@pytest.mark.parametrize("code,reason", [("PAYMENT_UNFUNDED", "insufficient_funds"),
                                         ("PAYMENT_INVALID", "invalid_payload")])
def test_fault_reject_with_code(client: httpx.Client, code: str, reason: str) -> None:
    install(client, {"kind": "reject", "code": code, "times": 1})
    response, header = pay(client, GEN, CAT)
    got_code, verify = rejection(response)
    assert (got_code, verify["invalidReason"], verify["payer"]) == (code, reason, SIGNER.address)
    if code == "PAYMENT_UNFUNDED":
        assert verify["invalidMessage"] == "insufficient balance: 0 < 53500"
    assert stats(client)["payments_received"] == []
    # nothing was recorded, so the same authorization still works once the fault is spent
    assert client.post(GEN, json=CAT, headers={"PAYMENT-SIGNATURE": header}).status_code == 200


def test_fault_jobs_fail_never_finish_or_are_forced(client: httpx.Client) -> None:
    install(client, {"kind": "job", "outcome": "failed", "times": 1},
            {"kind": "job", "outcome": "never", "times": 1},
            {"kind": "job", "times": 1})
    jobs = []
    for _ in range(3):
        response, header = pay(client, GEN, CAT)  # nano-banana is a fast model
        assert response.status_code == 202
        jobs.append((response.json()["poll_url"], header))
    CLOCK.offset = SLOW_SECONDS
    failed = client.get(jobs[0][0], headers={"PAYMENT-SIGNATURE": jobs[0][1]})
    assert failed.status_code == 200
    assert failed.json()["status"] == "failed"
    assert failed.json()["error"] == "content policy violation"
    CLOCK.offset = 10 * SLOW_SECONDS
    never = client.get(jobs[1][0], headers={"PAYMENT-SIGNATURE": jobs[1][1]})
    assert never.status_code == 202 and never.json()["status"] == "in_progress"
    forced = client.get(jobs[2][0], headers={"PAYMENT-SIGNATURE": jobs[2][1]})
    assert forced.status_code == 200 and forced.json()["data"][0]["url"].startswith("http://")
    assert stats(client)["settled_count"] == 1


def test_fault_delay_and_drop(client: httpx.Client) -> None:
    install(client, {"kind": "delay", "phase": "unpaid", "seconds": 0.3, "times": 1},
            {"kind": "drop", "phase": "paid", "times": 1},
            {"kind": "drop", "phase": "poll", "times": 1})
    start = time.perf_counter()
    challenge = client.post(GEN, json=CAT)
    assert challenge.status_code == 402 and time.perf_counter() - start >= 0.3
    with pytest.raises(httpx.RemoteProtocolError):
        pay(client, GEN, CAT)
    seen = stats(client)
    assert len(seen["payments_received"]) == 1 and seen["settled"] == []
    response, header = pay(client, GEN, {"model": "openai/gpt-image-2", "prompt": "p"})
    with pytest.raises(httpx.RemoteProtocolError):
        client.get(response.json()["poll_url"], headers={"PAYMENT-SIGNATURE": header})
    assert client.get(response.json()["poll_url"],
                      headers={"PAYMENT-SIGNATURE": header}).status_code == 202


# --- the spec vector end to end -----------------------------------------------------------------

def test_spec_vector_1_pays_a_frozen_clock_sandbox() -> None:
    """x402.md §11 vector 1 sent as-is to a sandbox whose clock is frozen inside its window."""
    to = "0x209693Bc6afc0C5328bA36FaF03C514EF312287C"
    config = SandboxConfig(pay_to=to, max_timeout_seconds=60, clock=lambda: 1740672100)
    authorization = {
        "from": "0x857b06519E91e3A54538791bDbb0E22373e36b66", "to": to, "value": "10000",
        "validAfter": "1740672089", "validBefore": "1740672154",
        "nonce": "0xf3746613c2d920b5fdabc0856f2aeb2d4f88ee6037b8cc5d04a71a4462f13480"}
    signature = ("0x2d6a7588d6acca505cbf0d9a4a227e0c52c6c34008c8e8986a1283259764173608a2ce6496"
                 "642e377d6da8dbbf5836e9bd15092f9ecab05ded3d6293af148b571c")
    with serving(create_sandbox_app(config)) as srv, httpx.Client(base_url=srv.url) as client:
        install(client, {"kind": "price", "amount": "10000"})
        accepted = requirement_for(client, GEN, CAT)
        assert accepted["maxTimeoutSeconds"] == 60 and accepted["payTo"] == to
        header = b64_json({"x402Version": 2, "accepted": accepted, "payload": {
            "signature": signature, "authorization": authorization}})
        response = client.post(GEN, json=CAT, headers={"PAYMENT-SIGNATURE": header})
        assert response.status_code == 200, response.text
        assert decode_b64_json(response.headers["payment-response"])["payer"] \
            == authorization["from"]
