"""The gallery page (`GET /`) in a real headless Chromium against a real gateway on the sandbox.

Uses Debian's `chromium` (scripts/test installs it), never a downloaded browser. Screenshots go to
`test-artifacts/` for a person to look at.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

from tests.conftest import Gateway, Sandbox, gateway_settings
from tests.servers import ServerThread, free_port

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps calling Google services.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PAGE_SIZE = 24  # gallery.js asks for this many images per page
# A page on a loaded machine (the suite's other workers) can take longer than playwright's
# 5 s to show what it surely will: `expect` waits up to 30 s, and returns once it holds.
expect.set_options(timeout=30_000)


def find_chromium() -> str:
    """Debian's Chromium; installed here if missing and we may (root with apt-get)."""
    if not Path(CHROMIUM).exists() and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env,
                       capture_output=True)
    if not Path(CHROMIUM).exists():
        pytest.skip(f"Chromium is not at {CHROMIUM} and could not be installed "
                    "(scripts/test installs it with apt-get as root)")
    return CHROMIUM


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = find_chromium()
    with sync_playwright() as p:
        # launch() gives every run a fresh temporary profile (user-data dir).
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS,
                                    headless=True)
        yield browser
        browser.close()


class Visit:
    """A browser page plus everything it asked the network for and every script error."""

    def __init__(self, browser: Browser) -> None:
        self.context = browser.new_context(viewport=LAPTOP)
        self.page: Page = self.context.new_page()
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda request: self.requests.append(request.url))
        self.page.on("pageerror", lambda error: self.errors.append(str(error)))
        self.page.on("console", self._console)

    def _console(self, message: Any) -> None:
        # A 4xx answer the page shows to the user is logged as "Failed to load resource".
        if message.type == "error" and "Failed to load resource" not in message.text:
            self.errors.append(message.text)

    def open(self, url: str) -> Page:
        self.page.goto(url + "/")
        self.page.wait_for_selector("body[data-ready]")
        return self.page

    def remote_requests(self) -> list[str]:
        remote = []
        for url in self.requests:
            parts = urlsplit(url)
            if parts.scheme in ("data", "blob"):
                continue
            if parts.scheme not in ("http", "https") or parts.hostname not in LOOPBACK:
                remote.append(url)
        return remote


@pytest.fixture
def visit(browser: Browser) -> Iterator[Visit]:
    v = Visit(browser)
    yield v
    v.context.close()


@pytest.fixture
def sandbox_gateway(tmp_path: Path, sandbox: Sandbox) -> Iterator[Gateway]:
    """What `clawrouter serve --sandbox` runs: a gateway flagged as paying the sandbox."""
    from clawrouter.api.app import create_app

    settings = gateway_settings(tmp_path / "home", sandbox.api, max_usd_per_day=5)
    app = create_app(settings, sandbox=True)
    server = ServerThread(app).start()
    yield Gateway(server, app)
    server.stop()


def generate(gateway: Gateway, prompt: str, model: str = "google/nano-banana") -> str:
    body = {"model": model, "prompt": prompt, "size": "1024x1024", "n": 1}
    response = gateway.http.post("/v1/images/generations", json=body).raise_for_status()
    return response.json()["data"][0]["url"]


def usd(value: float) -> str:
    """Dollars as the page shows them: 2 to 6 decimals (micro-dollars, as the API gives them)."""
    whole, cents = f"{value:.6f}".rstrip("0").split(".")
    return f"${whole}.{cents.ljust(2, '0')}"


def price_label(card: dict[str, Any], size: str) -> str:
    """The page's price for one image: list price plus the per-request fee."""
    return f"{usd(card['prices'][size] + card['fee_per_request'])} / image"


def image_loaded(page: Page, selector: str) -> None:
    page.wait_for_function(
        "s => { const img = document.querySelector(s); return img && img.complete && "
        "img.naturalWidth > 0; }", arg=selector, timeout=15_000)


def no_horizontal_scroll(page: Page) -> None:
    width, inner = page.evaluate(
        "[document.documentElement.scrollWidth, window.innerWidth]")
    assert width <= inner, f"page is {width}px wide in a {inner}px viewport"


def test_generate_in_the_browser_and_see_it_in_the_gallery(
        visit: Visit, sandbox_gateway: Gateway, sandbox: Sandbox) -> None:
    gw = sandbox_gateway
    older = generate(gw, "an older image: a quiet harbor at dawn")
    models = {m["id"]: m for m in gw.http.get("/v1/models").json()["data"]}
    # a slow model's 202 job, so progress shows: long enough for the checks of it below to
    # see it (the clock past 1 s among them) on a loaded machine before it is done
    sandbox.configure(slow_seconds=5)
    ARTIFACTS.mkdir(exist_ok=True)

    page = visit.open(gw.url)

    # Header: the wallet (short, full in the title), network, the sandbox badge, today's spend.
    address = gw.gw.address
    expect(page.locator("#wallet")).to_have_attribute("title", address)
    expect(page.locator("#wallet")).to_have_text(f"{address[:6]}…{address[-4:]}")
    expect(page.locator("#network")).to_have_text("base-sepolia")
    expect(page.locator("#sandbox")).to_be_visible()
    spend = gw.http.get("/v1/spend").json()
    assert spend["today"]["usd"] > 0
    expect(page.locator("#spend-today")).to_have_text(usd(spend["today"]["usd"]))
    expect(page.locator("#spend-left")).to_contain_text("left of $5.00")
    expect(page.locator(".grid .grid-item")).to_have_count(1)

    # Pick a slow model and a non-default size; the price follows the choice.
    model, size = "openai/gpt-image-2", "1536x1024"
    assert models[model]["slow"] and size in models[model]["sizes"]
    page.select_option("#model", model)
    page.select_option("#size", size)
    expect(page.locator("#price")).to_have_text(price_label(models[model], size))

    # A prompt that would run script if it were ever parsed as HTML.
    prompt = 'a lighthouse at dusk <img src=x onerror="window.__pwned=1"> & "friends"'
    page.fill("#prompt", prompt)
    page.click("#generate")

    # Progress: a placeholder at the top of the grid and the elapsed seconds counting (beside
    # the live status, which a screen reader reads once, not every second).
    expect(page.locator(".grid .grid-item.pending")).to_have_count(1)
    expect(page.locator("#status")).to_contain_text(f"Generating with {model}…")
    expect(page.locator("#elapsed")).to_have_text(re.compile(r"[1-9]\d* s"), timeout=10_000)
    page.screenshot(path=ARTIFACTS / "gallery-progress.png")

    # The result replaces the placeholder at the top, newest first, and its image loads.
    expect(page.locator(".grid .grid-item.pending")).to_have_count(0, timeout=30_000)
    expect(page.locator("#status")).to_have_text(re.compile(r"Done in \d+ s\."))
    expect(page.locator("#error")).to_be_hidden()
    stored = gw.http.get("/v1/images").json()["data"]
    assert len(stored) == 2 and stored[1]["url"] == older
    newest = stored[0]
    assert (newest["model"], newest["size"], newest["prompt"]) == (model, size, prompt)
    first = page.locator(".grid .grid-item").first
    expect(page.locator(".grid .grid-item")).to_have_count(2)
    expect(first).to_have_attribute("data-name", newest["name"])
    expect(first.locator(".card-prompt")).to_have_text(prompt)
    expect(first.locator("img")).to_have_attribute("alt", "")  # the card's text says the prompt
    expect(first.locator("img")).to_have_attribute("loading", "lazy")
    expect(first.locator("img")).to_have_attribute("src", newest["url"])
    expect(first).to_contain_text("1536×1024")
    expect(first).to_contain_text(usd(newest["cost_usd"]))
    image_loaded(page, ".grid .grid-item:first-child img")
    natural = page.eval_on_selector(".grid .grid-item:first-child img",
                                    "img => [img.naturalWidth, img.naturalHeight]")
    assert natural == [1536, 1024]
    assert page.evaluate("window.__pwned") is None
    assert page.locator(".grid img[src='x']").count() == 0
    # Today's spend was refreshed after the payment.
    today = gw.http.get("/v1/spend").json()["today"]["usd"]
    expect(page.locator("#spend-today")).to_have_text(usd(today))
    page.screenshot(path=ARTIFACTS / "gallery-laptop.png", full_page=True)

    # Detail view: full image, metadata, the local URL in a read-only field; Escape closes it.
    first.locator("a.card").click()
    dialog = page.locator("#detail")
    expect(dialog).to_have_attribute("open", "")
    url_field = page.locator("#detail-url")
    expect(url_field).to_have_value(newest["url"])
    assert newest["url"].startswith(f"{gw.url}/images/")
    expect(url_field).not_to_be_editable()
    expect(page.locator("#detail-prompt")).to_have_text(prompt)
    expect(page.locator("#detail-meta")).to_contain_text(model)
    expect(page.locator("#detail-meta")).to_contain_text(newest["request_id"])
    image_loaded(page, "#detail-img")
    page.click("#copy-url")
    expect(page.locator("#copy-url")).to_have_text(re.compile("Copied|Failed"))
    page.screenshot(path=ARTIFACTS / "gallery-detail-laptop.png")
    page.keyboard.press("Escape")
    expect(dialog).not_to_have_attribute("open", "")
    expect(first.locator("a.card")).to_be_focused()

    # Phone: no sideways scrolling, on the page or in the detail view.
    page.set_viewport_size(PHONE)
    page.evaluate("window.scrollTo(0, 0)")
    no_horizontal_scroll(page)
    page.screenshot(path=ARTIFACTS / "gallery-phone.png", full_page=True)
    first.locator("a.card").click()
    expect(dialog).to_have_attribute("open", "")
    no_horizontal_scroll(page)
    page.screenshot(path=ARTIFACTS / "gallery-detail-phone.png")
    page.keyboard.press("Escape")
    expect(dialog).not_to_have_attribute("open", "")

    # An error from the gateway shows its envelope's message, and the grid stays as it was.
    page.evaluate("""() => {
        const option = document.createElement('option');
        option.value = option.textContent = 'no/such-model';
        document.getElementById('model').append(option);
        document.getElementById('model').value = 'no/such-model';
    }""")
    page.click("#generate")
    expect(page.locator("#error")).to_contain_text("Unknown image model 'no/such-model'")
    expect(page.locator(".grid .grid-item")).to_have_count(2)
    page.evaluate("document.getElementById('model').lastElementChild.remove()")
    page.select_option("#model", model)
    expect(page.locator("#error")).to_be_hidden()  # a new choice clears the old error

    assert visit.remote_requests() == []
    assert visit.errors == []


def test_load_more_pages_through_older_images(visit: Visit, gateway: Gateway,
                                              sandbox: Any) -> None:
    sandbox.configure(marked=False)  # answers like BlockRun's own
    urls = [generate(gateway, f"seed image number {i}") for i in range(PAGE_SIZE + 1)]

    page = visit.open(gateway.url)
    # A gateway on an upstream that does not say it is a sandbox is not one, and says so.
    expect(page.locator("#sandbox")).to_be_hidden()
    cards = page.locator(".grid .grid-item")
    expect(cards).to_have_count(PAGE_SIZE)
    expect(page.locator("#more")).to_be_visible()

    # A new image goes on top, so the next page starts one further down.
    page.select_option("#model", "google/nano-banana")
    page.fill("#prompt", "generated while the first page is shown")
    page.click("#generate")
    expect(cards).to_have_count(PAGE_SIZE + 1)
    expect(cards.first.locator(".card-prompt")).to_have_text(
        "generated while the first page is shown")
    expect(page.locator(".grid-item.pending")).to_have_count(0)  # stored, not still running

    page.click("#more")
    expect(cards).to_have_count(PAGE_SIZE + 2)
    expect(page.locator("#more")).to_be_hidden()
    names = cards.evaluate_all("items => items.map(li => li.dataset.name)")
    stored = [item["name"] for item in gateway.http.get("/v1/images?limit=100").json()["data"]]
    assert names == stored  # every image once, newest first
    assert urls[0].endswith(names[-1])
    assert visit.remote_requests() == []
    assert visit.errors == []


def test_generate_in_the_browser_on_a_gateway_that_defaults_to_base64(
        visit: Visit, make_gateway: Any) -> None:
    """`response_format = "b64_json"` in the config is only a default: the page asks for URLs,
    and still shows an image that comes back as base64 anyway."""
    gw = make_gateway(response_format="b64_json")
    page = visit.open(gw.url)
    cards = page.locator(".grid .grid-item")
    expect(cards).to_have_count(0)
    page.select_option("#model", "google/nano-banana")
    page.fill("#prompt", "a red kite over the dunes")
    page.click("#generate")
    expect(cards).to_have_count(1)
    expect(page.locator(".grid-item.pending")).to_have_count(0)
    expect(page.locator("#status")).to_have_text(re.compile(r"Done in \d+ s\."))
    stored = gw.http.get("/v1/images").json()["data"]
    expect(cards.first.locator("img")).to_have_attribute("src", stored[0]["url"])
    image_loaded(page, ".grid .grid-item:first-child img")

    # A gateway that ignores the request's format: the image is shown from its bytes.
    def without_format(route: Route) -> None:
        body = route.request.post_data_json
        del body["response_format"]
        route.fulfill(response=route.fetch(post_data=body))

    page.route("**/v1/images/generations", without_format)
    page.fill("#prompt", "a blue kite over the dunes")
    page.click("#generate")
    expect(cards).to_have_count(2)
    expect(page.locator(".grid-item.pending")).to_have_count(0)
    expect(cards.first.locator(".card-prompt")).to_have_text("a blue kite over the dunes")
    expect(cards.first.locator("img")).to_have_attribute(
        "src", re.compile(r"^data:image/png;base64,"))
    image_loaded(page, ".grid .grid-item:first-child img")
    expect(page.locator("#error")).to_be_hidden()
    assert visit.errors == []


def prefix_proxy(upstream: str, prefix: str) -> Any:
    """A reverse proxy that serves `upstream` under `prefix` (and nothing else), as one in
    front of a gateway with public_url https://host/claw would."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if not path.startswith(prefix + "/"):
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b"not behind the prefix"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        query = scope["query_string"].decode()
        headers = [(k, v) for k, v in scope["headers"] if k != b"accept-encoding"]
        async with httpx.AsyncClient(base_url=upstream, trust_env=False, timeout=60) as client:
            resp = await client.request(scope["method"], path[len(prefix):]
                                        + (f"?{query}" if query else ""),
                                        headers=headers, content=body)
        drop = {b"content-length", b"transfer-encoding", b"connection", b"content-encoding"}
        out = [(k, v) for k, v in resp.headers.raw if k.lower() not in drop]
        await send({"type": "http.response.start", "status": resp.status_code,
                    "headers": out + [(b"content-length", str(len(resp.content)).encode())]})
        await send({"type": "http.response.body", "body": resp.content})

    return app


def test_the_page_works_under_a_proxys_path_prefix(visit: Visit, make_gateway: Any) -> None:
    """Behind a proxy at http://host/claw/ every URL the page uses stays under /claw/."""
    port = free_port()
    public = f"http://127.0.0.1:{port}/claw"
    gw = make_gateway(public_url=public)
    older = generate(gw, "a harbour seen through the proxy")
    assert older.startswith(f"{public}/images/")
    proxy = ServerThread(prefix_proxy(gw.url, "/claw"), port=port).start()
    try:
        page = visit.open(public)
        cards = page.locator(".grid .grid-item")
        expect(cards).to_have_count(1)
        image_loaded(page, ".grid .grid-item:first-child img")
        expect(page.locator("#wallet")).to_have_attribute("title", gw.gw.address)
        page.select_option("#model", "google/nano-banana")
        page.fill("#prompt", "a pier seen through the proxy")
        page.click("#generate")
        expect(cards).to_have_count(2)
        expect(page.locator(".grid-item.pending")).to_have_count(0)
        expect(page.locator("#error")).to_be_hidden()
        image_loaded(page, ".grid .grid-item:first-child img")
        assert visit.requests and all(url.startswith(f"{public}/") for url in visit.requests), \
            visit.requests
        assert visit.errors == []
    finally:
        proxy.stop()
