"""Web pages cannot drive the gateway: no cross-site request spends money or reads a file, and
no rebound DNS name reaches it — in a real headless Chromium, and header by header with httpx.
Programs (curl, SDKs, agents) send no Origin and are not affected."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, sync_playwright
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from tests.conftest import Gateway, Sandbox
from tests.servers import serving
from tests.test_gallery import CHROMIUM_ARGS, find_chromium
from tests.test_inputs import PNG

COGVIEW = {"model": "cogview", "prompt": "from a web page"}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Chromium that resolves `rebound.test` to 127.0.0.1, as DNS rebinding would."""
    executable = find_chromium()
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=executable, headless=True,
            args=[*CHROMIUM_ARGS, "--host-resolver-rules=MAP rebound.test 127.0.0.1"])
        yield browser
        browser.close()


def attack_page(gateway_url: str, image_path: str) -> str:
    """A page on another origin that tries every request a page can send without asking:
    a text/plain fetch, a JSON-in-a-form post, and a multipart form naming a local file."""
    return f"""<!doctype html><body>
<form id="json" method="POST" action="{gateway_url}/v1/images/generations" enctype="text/plain"
      target="a"><input name='{{"model":"cogview","prompt":"form","x":"' value='"}}'></form>
<form id="file" method="POST" action="{gateway_url}/v1/images/edits"
      enctype="multipart/form-data" target="b">
  <input name="prompt" value="steal"><input name="image" value="{image_path}"></form>
<iframe name="a"></iframe><iframe name="b"></iframe>
<script>
  fetch("{gateway_url}/v1/images/generations", {{method: "POST", mode: "no-cors",
        headers: {{"content-type": "text/plain"}},
        body: JSON.stringify({{model: "cogview", prompt: "fetch"}})}});
  document.getElementById("json").submit();
  document.getElementById("file").submit();
</script></body>"""


def test_a_web_page_on_another_origin_cannot_spend_or_read_files(browser: Browser,
                                                                  gateway: Gateway,
                                                                  sandbox: Sandbox, tmp_path):
    image = tmp_path / "private.png"
    image.write_bytes(PNG)
    html = attack_page(gateway.url, str(image))
    evil = Starlette(routes=[Route("/", lambda _: HTMLResponse(html))])
    with serving(evil) as site:
        page = browser.new_page()
        answers: list[tuple[str, int]] = []
        page.on("response", lambda r: answers.append((r.url.rsplit("/", 1)[1], r.status))
                if r.url.startswith(gateway.url) else None)
        page.goto(site.url.replace("127.0.0.1", "localhost") + "/")  # another site
        for _ in range(200):  # the page's three attempts, however slow the machine
            if len(answers) >= 3:
                break
            page.wait_for_timeout(50)
        page.wait_for_timeout(200)  # and nothing more
        page.close()
    assert sorted(answers) == [("edits", 403), ("generations", 403), ("generations", 403)]
    assert sandbox.stats()["payments_count"] == 0 and sandbox.round_trips() == 0
    assert gateway.http.get("/v1/spend").json()["latest"] == []


def test_another_site_cannot_frame_the_gallery(browser: Browser, gateway: Gateway):
    """The gallery can spend money in two clicks: a site that frames it (to lure those clicks
    onto its own buttons) gets an empty frame."""
    html = f'<!doctype html><body><iframe src="{gateway.url}/"></iframe></body>'
    framing = Starlette(routes=[Route("/", lambda _: HTMLResponse(html))])
    with serving(framing) as site:
        page = browser.new_page()
        with page.expect_response(lambda r: r.url.startswith(gateway.url)):
            page.goto(site.url.replace("127.0.0.1", "localhost") + "/")
        page.wait_for_load_state("load")  # the frame's navigation has ended, one way or other
        (frame,) = page.main_frame.child_frames
        assert not frame.url.startswith(gateway.url)  # blocked: the browser's error page
        page.close()
    page = browser.new_page()  # on its own, the gallery loads
    assert page.goto(gateway.url + "/").status == 200
    page.close()


def test_a_rebound_dns_name_reaches_nothing(browser: Browser, gateway: Gateway):
    page = browser.new_page()
    port = gateway.server.port
    assert page.goto(f"http://rebound.test:{port}/v1/spend").status == 403
    assert page.goto(f"http://rebound.test:{port}/health").status == 403
    assert page.goto(f"http://127.0.0.1:{port}/v1/spend").status == 200
    page.close()


def test_the_gateways_own_page_may_post(gateway: Gateway, sandbox: Sandbox):
    for host in (f"127.0.0.1:{gateway.server.port}", f"localhost:{gateway.server.port}"):
        r = httpx.post(gateway.v1 + "/images/generations", json={**COGVIEW, "prompt": host},
                       headers={"host": host, "origin": f"http://{host}",
                                "sec-fetch-site": "same-origin"})
        assert r.status_code == 200, r.text
    assert sandbox.stats()["payments_count"] == 2


@pytest.mark.parametrize("headers, code", [
    ({"origin": "https://evil.example"}, "cross_origin_refused"),
    ({"origin": "null"}, "cross_origin_refused"),  # sandboxed iframes, file:// pages
    ({"origin": "http://localhost:3000"}, "cross_origin_refused"),  # same site, other port
    ({"sec-fetch-site": "cross-site"}, "cross_origin_refused"),  # a browser without Origin
    ({"sec-fetch-site": "same-site"}, "cross_origin_refused"),
    ({"host": "rebound.example:8402"}, "forbidden_host"),
    ({"host": "127.0.0.1.nip.io"}, "forbidden_host"),
    ({"host": "localhost:8402@evil.example"}, "forbidden_host"),  # would go into our URLs
    ({"host": "[::1]@evil.example"}, "forbidden_host"),
    ({"host": "localhost/evil"}, "forbidden_host"),
])
def test_browser_requests_from_elsewhere_are_refused_before_anything_runs(
        gateway: Gateway, sandbox: Sandbox, headers, code):
    r = httpx.post(gateway.v1 + "/images/generations", json=COGVIEW, headers=headers)
    assert r.status_code == 403 and r.json()["error"]["code"] == code, r.text
    assert sandbox.round_trips() == 0


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:1", "[::1]:8402", "127.0.0.2",
                                  "app.localhost:8402", "localhost."])
def test_loopback_names_are_this_gateway(gateway: Gateway, host):
    assert httpx.get(gateway.url + "/health", headers={"host": host}).status_code == 200


def test_behind_a_proxy_the_public_host_is_allowed(make_gateway, sandbox: Sandbox):
    gw = make_gateway(public_url="https://pics.example.com", api_key="k")
    r = httpx.post(gw.v1 + "/images/generations", json=COGVIEW,
                   headers={"host": "pics.example.com", "origin": "https://pics.example.com",
                            "authorization": "Bearer k"})
    assert r.status_code == 200, r.text
    other = httpx.get(gw.url + "/health", headers={"host": "other.example.com"})
    assert other.status_code == 403
