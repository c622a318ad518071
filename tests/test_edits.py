"""Edits end to end: the three ways users edit (image2image JSON, the OpenAI SDK's multipart
`images.edit`, curl JSON to /edits), every input form, and every refusal — each refusal
reaching nothing upstream and costing nothing."""

from __future__ import annotations

import base64
import hashlib
import os
import socket

import httpx
import openai
import pytest
from openai import OpenAI

from clawrouter.sandbox.images import make_png
from tests.servers import leaving, until

JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(200)


def png(seed: int = 1, size: int = 64) -> bytes:
    return make_png(size, size, seed)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def sent_images(sandbox) -> list[dict]:
    """What the upstream received as `image`, as a list of {mime, sha256, bytes}."""
    image = sandbox.stats()["bodies"][-1]["image"]
    return image if isinstance(image, list) else [image]


def nothing_upstream(sandbox) -> None:
    stats = sandbox.stats()
    assert stats["round_trips"] == 0 and stats["payments_count"] == 0


@pytest.fixture
def files(tmp_path):
    folder = tmp_path / "pictures"
    folder.mkdir()
    paths = {}
    for i in range(1, 6):
        paths[i] = folder / f"photo{i}.png"
        paths[i].write_bytes(png(i))
    return paths


def test_sdk_edit_with_one_uploaded_file(gateway, sandbox, files):
    client = OpenAI(base_url=gateway.v1, api_key="unused")
    with open(files[1], "rb") as f:
        result = client.images.edit(image=f, prompt="add a hat", model="gpt-image-1")
    # OpenAI's name for the model, and no response_format: b64_json, as OpenAI answers it
    assert base64.b64decode(result.data[0].b64_json).startswith(b"\x89PNG")
    assert sent_images(sandbox) == [{"mime": "image/png", "sha256": sha(files[1].read_bytes()),
                                     "bytes": files[1].stat().st_size}]
    assert sandbox.stats()["bodies"][-1]["model"] == "openai/gpt-image-1"


def test_an_image_this_gateway_made_is_edited_by_its_url(gateway, sandbox, make_gateway):
    """Generate, then edit the URL that came back. That URL is a loopback address (refused for
    any other URL) and its file lies in the data directory (refused as a path): the gateway
    reads it from its own store, by any loopback name for itself."""
    made = gateway.http.post("/v1/images/generations", json={"model": "cogview", "prompt": "cat"})
    url = made.json()["data"][0]["url"]
    stored = gateway.http.get(url).content
    host = url.split("/")[2].split(":")[0]
    for same in (url, url.replace(host, "localhost" if host != "localhost" else "127.0.0.1")):
        r = gateway.http.post("/v1/images/image2image", json={"prompt": "add a hat",
                                                              "image": same})
        assert r.status_code == 200, r.text
        assert sent_images(sandbox)[0]["sha256"] == sha(stored)
    gone = url.rsplit("/", 1)[0] + "/" + "0" * 32 + ".png"
    r = gateway.http.post("/v1/images/image2image", json={"prompt": "x", "image": gone})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "file_not_found")
    assert "not in this gateway's image store" in r.json()["error"]["message"]
    # another data directory's gateway: not in its store (and never fetched from ours)
    other = make_gateway()
    r = other.http.post("/v1/images/image2image", json={"prompt": "x", "image": url})
    assert (r.status_code, r.json()["error"]["code"]) == (400, "file_not_found")
    assert "another gateway made it" in r.json()["error"]["message"]
    # a CLI run's own gateway on this data directory, on another port: the same store
    twin = make_gateway(home=gateway.gw.settings.home.parent / "twin")
    assert twin.http.post("/v1/images/generations",
                          json={"model": "cogview", "prompt": "cat"}).status_code == 200
    twin_url = twin.http.get("/v1/images").json()["data"][0]["url"]
    assert twin_url.split("/")[2] != url.split("/")[2]  # another port
    r = twin.http.post("/v1/images/image2image", json={"prompt": "x", "image": url.replace(
        url.rsplit("/", 1)[1], twin_url.rsplit("/", 1)[1])})
    assert r.status_code == 200, r.text
    assert sandbox.stats()["payments_count"] == 5


def test_sdk_edit_with_several_files_and_bare_bytes(gateway, sandbox, files):
    client = OpenAI(base_url=gateway.v1, api_key="unused")
    with open(files[1], "rb") as f1, open(files[2], "rb") as f2:
        client.images.edit(image=[f1, f2, files[3].read_bytes()], prompt="merge",
                           model="nano-banana", response_format="b64_json")
    assert [i["sha256"] for i in sent_images(sandbox)] == [
        sha(files[i].read_bytes()) for i in (1, 2, 3)]


def test_sdk_edit_with_files_sent_without_a_filename(gateway, sandbox, files):
    """The SDK's `(None, bytes)` (and curl's `-F 'image=<a.png'`): parts with no filename,
    whose bytes are a file's, not text."""
    client = OpenAI(base_url=gateway.v1, api_key="unused")
    image, mask = files[1].read_bytes(), png(98)
    client.images.edit(image=(None, image), mask=(None, mask), prompt="x", model="gpt-image-1")
    assert sent_images(sandbox)[0]["sha256"] == sha(image)
    assert sandbox.stats()["bodies"][-1]["mask"]["sha256"] == sha(mask)
    # still text where text is due: a prompt that is not UTF-8 is refused, not paid for
    r = gateway.http.post("/v1/images/edits", files=[
        ("image", ("a.png", image, "image/png")), ("prompt", (None, b"caf\xe9"))])
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize("twice", ["prompt", "mask files", "mask file and text"])
def test_a_form_field_given_twice_is_refused_not_guessed(gateway, sandbox, files, twice):
    """Which prompt, which mask would be paid for? (Repeated images are meant: a list.)"""
    image = ("image", ("a.png", files[1].read_bytes(), "image/png"))
    mask = ("mask", ("m.png", png(5), "image/png"))
    extra = {"prompt": [("prompt", (None, "one")), ("prompt", (None, "two"))],
             "mask files": [("prompt", (None, "x")), mask, mask],
             "mask file and text": [("prompt", (None, "x")), mask,
                                    ("mask", (None, data_uri(png(6))))]}[twice]
    r = gateway.http.post("/v1/images/edits", files=[image, ("model", (None, "gpt-image-1")),
                                                     *extra])
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("duplicate_field", twice.split()[0])
    nothing_upstream(sandbox)


def test_sdk_edit_with_a_mask(gateway, sandbox, files):
    client = OpenAI(base_url=gateway.v1, api_key="unused")
    mask = png(99)
    with open(files[1], "rb") as f:
        client.images.edit(image=f, mask=("mask.png", mask, "image/png"), prompt="sky",
                           model="gpt-image-1")
    body = sandbox.stats()["bodies"][-1]
    assert body["mask"]["sha256"] == sha(mask)


@pytest.mark.parametrize("sent", ["multipart", "json"])
def test_the_images_and_mask_are_let_go_of_before_the_upstream_wait(gateway, sandbox, sent):
    """Once the upstream body holds them, the request keeps no other copy of its inputs: an
    upload or data URI held through the upstream wait (minutes for a slow job) would double
    what every waiting edit costs in memory."""
    seen: dict[str, object] = {}
    pipeline, exchange = gateway.gw.pipeline, gateway.gw.pipeline.exchange
    run_pipeline, run_exchange = pipeline.run, exchange.run

    async def watched_pipeline(job, ctx):
        seen["job"] = job
        return await run_pipeline(job, ctx)

    async def watched_exchange(call, ctx):  # the upstream wait starts here
        job = seen["job"]
        seen["during"] = (list(job.images), job.mask, b'"mask":"data:image/png' in call.body)
        return await run_exchange(call, ctx)

    pipeline.run, exchange.run = watched_pipeline, watched_exchange
    image, mask = png(3), png(4)
    if sent == "multipart":
        r = httpx.post(gateway.v1 + "/images/edits", timeout=30,
                       data={"prompt": "masked", "model": "gpt-image-1"},
                       files=[("image", ("a.png", image, "image/png")),
                              ("mask", ("m.png", mask, "image/png"))])
    else:
        r = httpx.post(gateway.v1 + "/images/image2image", timeout=30, json={
            "prompt": "masked", "model": "gpt-image-1", "image": data_uri(image),
            "mask": data_uri(mask)})
    assert r.status_code == 200, r.text
    assert seen["during"] == ([], None, True)  # the mask went upstream, and was let go of
    assert sandbox.stats()["bodies"][-1]["mask"]["sha256"] == sha(mask)


def test_a_big_edit_s_upstream_body_is_built_off_the_event_loop(gateway, sandbox, monkeypatch):
    """Base64-encoding big uploads and joining the body takes tens of milliseconds, which every
    other client would wait out on the loop; a small body is built inline (a hop costs more)."""
    import asyncio

    from clawrouter import pipeline
    from clawrouter.offloop import OFF_LOOP_BYTES

    built_on_loop: list[bool] = []
    build = pipeline.upstream_body

    def watched(*args):
        try:
            asyncio.get_running_loop()
            built_on_loop.append(True)
        except RuntimeError:  # a worker thread runs no loop
            built_on_loop.append(False)
        return build(*args)

    monkeypatch.setattr(pipeline, "upstream_body", watched)
    for image in (png(3), make_png(64, 64, 3, pad_to=OFF_LOOP_BYTES + 4096)):
        r = httpx.post(gateway.v1 + "/images/edits", timeout=30,
                       data={"prompt": "how big", "model": "gpt-image-1"},
                       files={"image": ("a.png", image, "image/png")})
        assert r.status_code == 200, r.text
        assert sent_images(sandbox)[0]["sha256"] == sha(image)
    assert built_on_loop == [True, False]


def test_multipart_with_repeated_image_fields_and_blank_fields(gateway, sandbox, files):
    multipart = [("image", ("a.png", files[1].read_bytes(), "image/png")),
                 ("image", ("b.bin", files[2].read_bytes(), "application/octet-stream")),
                 ("prompt", (None, "two")), ("model", (None, "gpt-image-1")),
                 ("size", (None, "")), ("n", (None, "1")), ("stream", (None, "false"))]
    r = gateway.http.post("/v1/images/edits?trace=1", files=multipart)
    assert r.status_code == 200, r.text
    assert len(sent_images(sandbox)) == 2
    # media types are case-insensitive (RFC 9110 §8.3.1)
    request = gateway.http.build_request("POST", "/v1/images/edits", files=multipart[:1] + [
        ("prompt", (None, "shouting")), ("model", (None, "gpt-image-1"))])
    request.headers["content-type"] = request.headers["content-type"].replace(
        "multipart/form-data", "Multipart/Form-Data")
    r = gateway.http.send(request)
    assert r.status_code == 200, r.text


def test_a_form_mixing_uploads_and_text_images_keeps_the_forms_order(gateway, sandbox, files):
    """Uploads and text `image` fields are one list in the form's order: that order reaches
    the upstream, and an error names an input by its place in the form."""
    upload = ("image", ("a.png", files[1].read_bytes(), "image/png"))
    rest = [("prompt", (None, "x")), ("model", (None, "gpt-image-1"))]
    r = gateway.http.post("/v1/images/edits",
                          files=[("image", (None, str(files[2]))), upload, *rest])
    assert r.status_code == 200, r.text
    assert [i["sha256"] for i in sent_images(sandbox)] == [
        sha(files[i].read_bytes()) for i in (2, 1)]
    trips = sandbox.stats()["round_trips"]
    r = gateway.http.post("/v1/images/edits",
                          files=[upload, ("image", (None, "/etc/hostname")), *rest])
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"]) == ("image[1]", "path_refused")
    assert error["message"].startswith("image[1]: ")
    assert sandbox.stats()["round_trips"] == trips


def test_curl_json_to_edits_in_openai_shape(gateway, sandbox, files):
    data = files[1].read_bytes()
    r = gateway.http.post("/v1/images/edits", json={
        "model": "gpt-image-1", "prompt": "x", "images": [{"image_url": data_uri(data)}],
        "mask": {"image_url": data_uri(png(7))}})
    assert r.status_code == 200, r.text
    assert sent_images(sandbox)[0]["sha256"] == sha(data)


@pytest.mark.parametrize("form", ["absolute", "file_url", "data_uri", "data_uri_lying_type",
                                  "raw_base64", "relative"])
def test_image2image_input_forms(gateway, sandbox, files, form, monkeypatch):
    path = files[4]
    data = path.read_bytes()
    value = {
        "absolute": str(path),
        "file_url": path.as_uri(),
        "data_uri": data_uri(data),
        "data_uri_lying_type": data_uri(data, "image/gif"),  # the bytes decide, not the label
        "raw_base64": base64.b64encode(data).decode(),
        "relative": os.path.relpath(path),
    }[form]
    r = gateway.http.post("/v1/images/image2image", json={"prompt": "x", "image": value})
    assert r.status_code == 200, r.text
    assert sent_images(sandbox) == [{"mime": "image/png", "sha256": sha(data),
                                     "bytes": len(data)}]


def test_image2image_with_a_url_when_private_urls_are_allowed(make_gateway, sandbox):
    gw = make_gateway(allow_private_urls=True)
    generated = gw.http.post("/v1/images/generations", json={"model": "cogview", "prompt": "x"})
    url = generated.json()["data"][0]["url"]  # a loopback URL: refused by default, allowed here
    original = httpx.get(url).content
    r = gw.http.post("/v1/images/image2image", json={"prompt": "x", "image": [url, url],
                                                      "model": "nano-banana"})
    assert r.status_code == 200, r.text
    assert [i["sha256"] for i in sent_images(sandbox)] == [sha(original)] * 2


def test_url_default_model_and_both_response_formats(gateway, sandbox, files):
    def edit(fmt):
        return gateway.http.post("/v1/images/image2image", json={
            "prompt": "x", "image": str(files[1]), "response_format": fmt}).json()["data"][0]

    assert edit("url")["url"].startswith(gateway.url + "/images/")
    assert base64.b64decode(edit("b64_json")["b64_json"]).startswith(b"\x89PNG")
    assert sandbox.stats()["bodies"][-1]["model"] == "openai/gpt-image-1"


@pytest.mark.parametrize("value, code", [
    ("http://127.0.0.1:9/x.png", "url_refused"),
    ("http://[::1]:9/x.png", "url_refused"),
    ("http://169.254.169.254/latest/meta-data/", "url_refused"),
    ("http://10.0.0.1/x.png", "url_refused"),
    ("http://localhost:9/x.png", "url_refused"),
    ("http://[::ffff:127.0.0.1]:9/", "url_refused"),
    ("ftp://example.com/x.png", None),
    ("/etc/hostname", "path_refused"),
    ("not an image at all", "unrecognized_input"),
    ("data:image/png;base64,aGVsbG8gd29ybGQ=", "invalid_image"),
])
def test_refused_inputs_cost_nothing(gateway, sandbox, value, code):
    r = gateway.http.post("/v1/images/image2image", json={"prompt": "x", "image": [value]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "image[0]"
    if code:
        assert error["code"] == code
    # advice only where it is safe: never "allow private URLs" for this machine or metadata
    assert ("allow_private_urls" in error["message"]) == value.startswith("http://10.")
    nothing_upstream(sandbox)


def test_local_file_refusals(make_gateway, sandbox, tmp_path):
    root = tmp_path / "root"
    (root / ".ssh").mkdir(parents=True)
    (root / ".ssh" / "id.png").write_bytes(png())
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(png())
    (root / "escape.png").symlink_to(outside / "secret.png")
    (root / "notes.png").write_text("AWS_SECRET_ACCESS_KEY=abc123\n")
    gw_home = tmp_path / "home0"  # make_gateway's first home: the wallet key lives there
    gw = make_gateway(allowed_roots=[str(root), str(gw_home)])
    cases = {
        str(outside / "secret.png"): "path_refused",
        str(root / ".." / "outside" / "secret.png"): "path_refused",
        str(root / ".ssh" / "id.png"): "path_refused",
        str(root / "escape.png"): "path_refused",
        str(root / "notes.png"): "invalid_image",
        str(root / "missing.png"): "file_not_found",
        str(gw_home / "wallet.key"): "path_refused",
    }
    for value, code in cases.items():
        r = gw.http.post("/v1/images/image2image", json={"prompt": "x", "image": value})
        assert r.status_code == 400, (value, r.text)
        error = r.json()["error"]
        assert (error["param"], error["code"]) == ("image", code), value
        assert "abc123" not in r.text
    nothing_upstream(sandbox)


def test_local_files_can_be_turned_off(make_gateway, sandbox, files):
    gw = make_gateway(allow_local_files=False)
    r = gw.http.post("/v1/images/image2image", json={"prompt": "x", "image": str(files[1])})
    assert r.status_code == 400 and r.json()["error"]["code"] == "local_files_disabled"
    nothing_upstream(sandbox)


def test_a_wrapped_data_uri_in_a_form_field_fits_the_cap_as_a_file_does(make_gateway,
                                                                         sandbox):
    """A form's text field holding the image as a data URI wrapped at 76 columns with CRLF
    (MIME's base64) is read whole up to the image cap, as the decoder counts it; past it, the
    form is refused before anything is paid."""
    gw = make_gateway(max_image_mb=0.05)
    cap = int(0.05 * 1024 * 1024)

    def field(size: int) -> str:
        data = make_png(16, 16, 1, pad_to=size)
        return "data:image/png;base64," + base64.encodebytes(data).decode().replace("\n", "\r\n")

    def send(size: int) -> httpx.Response:
        return gw.http.post("/v1/images/edits", files=[
            ("image", (None, field(size))), ("prompt", (None, "x")),
            ("model", (None, "gpt-image-1"))])

    assert send(cap - 64).status_code == 200
    r = send(cap + 2000)
    assert r.status_code in (400, 413) and r.json()["error"]["code"] in (
        "image_too_large", "field_too_large", "request_too_large"), r.text
    assert sandbox.stats()["payments_count"] == 1


def test_an_empty_allowed_roots_allows_no_folder_not_the_default_ones(make_gateway, sandbox,
                                                                     files):
    """Emptying the list to lock local files down must not open home and the temp dir."""
    gw = make_gateway(allowed_roots=[])
    r = gw.http.post("/v1/images/image2image", json={"prompt": "x", "image": str(files[1])})
    assert r.status_code == 400 and r.json()["error"]["code"] == "path_refused", r.text
    assert "none configured" in r.json()["error"]["message"]
    nothing_upstream(sandbox)


def test_a_deleted_working_folder_refuses_only_relative_paths(gateway, sandbox, files,
                                                               tmp_path, monkeypatch):
    """With the gateway's working folder deleted under it, absolute paths still work and a
    relative path or bare file name is a clear 400, never a 500."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)  # the gateway runs in this process: this is its cwd
    gone.rmdir()
    r = gateway.http.post("/v1/images/image2image", json={"prompt": "x", "image": str(files[1])})
    assert r.status_code == 200, r.text
    assert sent_images(sandbox)[0]["sha256"] == sha(files[1].read_bytes())
    trips = sandbox.stats()["round_trips"]
    for value in ("./photo1.png", "pictures/photo1.png", "photo1.png"):
        r = gateway.http.post("/v1/images/image2image", json={"prompt": "x", "image": value})
        assert r.status_code == 400, (value, r.text)
        error = r.json()["error"]
        assert (error["param"], error["code"]) == ("image", "path_refused"), value
        assert "working folder no longer exists" in error["message"]
        assert "absolute path" in error["message"]
    assert sandbox.stats()["round_trips"] == trips


@pytest.mark.parametrize("body, param, code", [
    ({"model": "gpt-image-1", "image": "5 files"}, "image", "too_many_images"),
    ({"model": "nano-banana", "image": "4 files"}, "image", "too_many_images"),
    ({"model": "seedream", "image": "1 file"}, "model", "model_cannot_edit"),
    ({"model": "nano-banana", "image": "1 file", "mask": "png"}, "mask", "mask_not_supported"),
    ({"model": "gpt-image-1", "image": "2 files", "mask": "png"}, "mask", "mask_needs_one_image"),
    ({"model": "gpt-image-1", "image": "1 file", "mask": "jpeg"}, "mask", "mask_not_png"),
    ({"model": "gpt-image-1", "image": "1 file", "mask": "small png"}, "mask",
     "mask_size_mismatch"),
    ({"model": "gpt-image-1"}, "image", "missing_image"),
])
def test_model_rules_are_checked_before_paying(gateway, sandbox, files, body, param, code):
    body = dict(body, prompt="x")
    if "image" in body:
        count = int(body["image"].split()[0])
        body["image"] = [str(files[i]) for i in range(1, count + 1)]
    if body.get("mask") == "png":
        body["mask"] = data_uri(png(5))
    elif body.get("mask") == "jpeg":
        body["mask"] = data_uri(JPEG, "image/jpeg")
    elif body.get("mask") == "small png":
        body["mask"] = data_uri(png(5, size=32))  # the image is 64x64
    r = gateway.http.post("/v1/images/image2image", json=body)
    if code == "mask_size_mismatch":
        assert "the mask is 32x32, the image 64x64" in r.json()["error"]["message"]
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == (param, code)
    nothing_upstream(sandbox)


def test_oversize_inputs_by_upload_and_by_declared_body_length(make_gateway, sandbox):
    gw = make_gateway(max_image_mb=0.01)  # 10 KiB per image, 40 KiB per body
    big = make_png(64, 64, 3, pad_to=20_000)
    r = gw.http.post("/v1/images/edits", files={"image": ("a.png", big, "image/png")},
                     data={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_too_large"
    r = gw.http.post("/v1/images/image2image", json={"prompt": "x", "image": data_uri(big)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "image_too_large"
    huge = b"x" * 50_000
    r = gw.http.post("/v1/images/edits", content=huge,
                     headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    nothing_upstream(sandbox)


def test_oversize_streamed_body_without_length(make_gateway, sandbox):
    gw = make_gateway(max_image_mb=0.01)

    def chunks():
        for _ in range(20):
            yield b"a" * 4096

    r = gw.http.post("/v1/images/image2image", content=chunks(),
                     headers={"content-type": "application/json"})
    assert r.status_code == 413
    nothing_upstream(sandbox)


def test_client_that_disconnects_mid_upload_costs_nothing(gateway, sandbox):
    head = (b"POST /v1/images/edits HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=XX\r\nContent-Length: 900000\r\n\r\n"
            b"--XX\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n")
    with socket.create_connection(("127.0.0.1", gateway.server.port)) as s:
        s.sendall(head + png()[:100])
    assert gateway.http.get("/health").status_code == 200
    nothing_upstream(sandbox)


@pytest.mark.parametrize("mask", [{"file_id": "file-abc"}, {"image_url": ""}, ""])
def test_a_mask_without_an_image_is_refused_never_dropped(gateway, sandbox, files, mask):
    """An edit asked with a mask is never paid for without it."""
    r = gateway.http.post("/v1/images/edits", json={
        "model": "gpt-image-1", "prompt": "x", "images": [{"image_url": str(files[1])}],
        "mask": mask})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "mask"
    nothing_upstream(sandbox)


@pytest.mark.parametrize("charset, prompt", [
    ("", b"caf\xe9 \xff"),  # not UTF-8 (Starlette would fall back to latin-1: "café ÿ")
    ("; charset=unicode_escape", b"\\ud800 cat"),  # decodes to a lone surrogate
])
def test_form_text_that_is_not_text_in_its_charset_is_a_400(gateway, sandbox, charset, prompt):
    """A prompt whose bytes are not text is refused, never paid for as something else, and
    never a 500 later."""
    body = (b"--B\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\n" + prompt
            + b"\r\n--B\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + png() + b"\r\n--B--\r\n")
    r = gateway.http.post("/v1/images/edits", content=body, headers={
        "content-type": "multipart/form-data; boundary=B" + charset})
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["param"], r.json()["error"]["code"]) == ("prompt", "invalid_type")
    good = body.replace(prompt, "café".encode())
    r = gateway.http.post("/v1/images/edits", content=good,
                          headers={"content-type": "multipart/form-data; boundary=B"})
    assert r.status_code == 200, r.text
    assert sandbox.stats()["bodies"][-1]["prompt"] == "café"


@pytest.mark.parametrize("ending", [b"", b"\r\n--B\r\n", b"\r\n--B"])
def test_a_form_without_its_closing_boundary_is_refused_not_paid(gateway, sandbox, ending):
    """Its last part (here n=3) may be cut short: paying for what arrived would pay for a
    request the client did not send."""
    body = (b"--B\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n"
            b"--B\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + png()
            + b"\r\n--B\r\nContent-Disposition: form-data; name=\"n\"\r\n\r\n3")
    r = gateway.http.post("/v1/images/edits", content=body + ending, headers={
        "content-type": "multipart/form-data; boundary=B"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_multipart", r.text
    nothing_upstream(sandbox)
    r = gateway.http.post("/v1/images/edits", content=body + b"\r\n--B--\r\n", headers={
        "content-type": "multipart/form-data; boundary=B"})
    assert r.status_code == 200 and len(r.json()["data"]) == 3, r.text


def test_an_image_sent_as_form_text_may_be_as_big_as_an_upload(make_gateway, sandbox):
    """Base64 is 4/3 of the image: a form's text field takes as big an image as an upload,
    and one past that is a clear image_too_large."""
    gw = make_gateway(max_image_mb=0.01)  # 10,485 bytes per image
    near = make_png(64, 64, 3, pad_to=9_500)  # 12,668 characters as base64
    r = gw.http.post("/v1/images/edits", files={"prompt": (None, "x"),
                                                "image": (None, data_uri(near))})
    assert r.status_code == 200, r.text
    assert sent_images(sandbox)[0]["sha256"] == sha(near)
    over = make_png(64, 64, 4, pad_to=12_000)
    r = gw.http.post("/v1/images/edits", files={"prompt": (None, "x"),
                                                "image": (None, data_uri(over))})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "image_too_large"
    assert sandbox.stats()["payments_count"] == 1


def test_a_streamed_edit_whose_input_is_refused_is_an_http_400(gateway, sandbox, tmp_path):
    """With `stream: true` the inputs are judged before the 200 goes out, so the SDK raises
    BadRequestError with the code, as it does without streaming."""
    client = OpenAI(base_url=gateway.v1, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.edit(image=("notes.png", b"not an image", "image/png"), prompt="x",
                           model="gpt-image-1", stream=True)
    assert raised.value.code == "invalid_image"
    r = gateway.http.post("/v1/images/image2image", json={
        "prompt": "x", "image": "/etc/hostname", "stream": True})
    assert r.status_code == 400 and r.json()["error"]["code"] == "path_refused"
    nothing_upstream(sandbox)
    with open(tmp_path / "ok.png", "wb") as f:
        f.write(png(8))
    with open(tmp_path / "ok.png", "rb") as f:  # and an accepted one still streams
        events = list(client.images.edit(image=f, prompt="x", model="gpt-image-1", stream=True))
    assert [e.type for e in events] == ["image_edit.completed"]


def test_a_repeated_edit_of_a_file_changed_since_is_made_again(gateway, sandbox, files):
    """An identical request is shared within the coalescing window, but one that names a path
    or URL only while in flight: an agent that edits a file in place and asks again gets its
    new bytes edited, not the first result."""
    body = {"model": "gpt-image-1", "prompt": "brighter", "image": str(files[1])}
    first = gateway.http.post("/v1/images/image2image", json=body)
    files[1].write_bytes(png(9))
    second = gateway.http.post("/v1/images/image2image", json=body)
    assert first.status_code == second.status_code == 200, second.text
    assert "x-clawrouter-shared" not in second.headers
    assert sent_images(sandbox)[0]["sha256"] == sha(png(9))
    inline = {**body, "image": data_uri(png(10))}  # inline bytes cannot change: shared
    assert gateway.http.post("/v1/images/image2image", json=inline).status_code == 200
    again = gateway.http.post("/v1/images/image2image", json=inline)
    assert again.headers["x-clawrouter-shared"] == "true"
    assert sandbox.stats()["payments_count"] == 3


def test_a_path_edit_whose_client_left_is_shared_with_its_retry(gateway, sandbox, files):
    """A path edit's result is shared once done only if someone received it: when its client
    timed out before it came, the retry that follows gets it instead of paying again."""
    sandbox.faults({"kind": "delay", "phase": "paid", "seconds": 2.0, "times": 1})
    body = {"model": "gpt-image-1", "prompt": "left early", "image": str(files[2])}
    with leaving(gateway.v1 + "/images/image2image", body):
        until(lambda: sandbox.paid() == 1)  # it times out once its payment is on its way
    until(lambda: [p["status"] for p in gateway.http.get("/v1/spend").json()["latest"]]
          == ["settled"])
    retry = gateway.http.post("/v1/images/image2image", json=body)
    assert retry.status_code == 200 and retry.headers["x-clawrouter-shared"] == "true"
    assert sandbox.stats()["payments_count"] == 1


def test_a_url_encoded_form_is_told_to_send_json_or_multipart(gateway, sandbox):
    """`curl -d prompt=x` sends a URL-encoded form: the error says what to send instead of
    only that the JSON is malformed. (A JSON body under that content type, curl -d '{…}'
    without -H, is read as JSON.)"""
    r = gateway.http.post("/v1/images/edits", data={"prompt": "x", "image": "a.png"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_json"
    assert "multipart/form-data" in r.json()["error"]["message"]
    r = gateway.http.post("/v1/images/generations", content=b'{"prompt": "x", "model": "cogview"}',
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200, r.text
    nothing = gateway.http.post("/v1/images/generations", data={"prompt": "x"})
    assert "URL-encoded" in nothing.json()["error"]["message"]
