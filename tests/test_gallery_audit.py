"""The gallery used as a demanding user would: refusals, outages, a restart, the keyboard, a screen
reader's view, a phone, a 32,000-character prompt, and a reload in the middle of a paid job.

Reuses `tests/test_gallery.py`'s Chromium and page helpers. The tests under "Defects found" each
failed before their fix (their docstrings say what the user saw).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from playwright.sync_api import Browser, Page, expect

from tests.conftest import Gateway, Sandbox
from tests.servers import ServerThread
from tests.test_gallery import (LAPTOP, PAGE_SIZE, PHONE, Visit, browser,
                                 no_horizontal_scroll, usd, visit)

__all__ = ["browser", "visit"]  # fixtures, imported for pytest

SLOW = "openai/gpt-image-2"


def make(gateway: Gateway, prompt: str, model: str = "cogview") -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "size": "1024x1024"}
    return gateway.http.post("/v1/images/generations", json=body).raise_for_status().json()


def submit(page: Page, prompt: str) -> None:
    """Type a prompt, press Generate and wait until no placeholder is left."""
    page.fill("#prompt", prompt)
    page.click("#generate")
    expect(page.locator(".grid-item.pending")).to_have_count(0, timeout=15_000)


def choose(page: Page, select: str, value: str) -> None:
    """Put a value the page never offers into a picker (a stale or hand-edited choice)."""
    page.evaluate("""([select, value]) => {
        const option = document.createElement('option');
        option.value = option.textContent = value;
        document.querySelector(select).append(option);
        document.querySelector(select).value = value;
    }""", [select, value])


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def stored_prompts(gateway: Gateway) -> list[str]:
    return [item["prompt"] for item in gateway.http.get("/v1/images").json()["data"]]


# --- Behaviour that works (and had no test) -----------------------------------------------------

def test_refusals_show_their_reason_and_cost_nothing(visit: Visit, make_gateway: Any,
                                                     sandbox: Sandbox) -> None:
    """Over the daily budget, a size the model lacks, a dropped model: the envelope's message
    in the alert, no card left behind, nothing paid, the budget line as it was."""
    gw = make_gateway(max_usd_per_day=0.03)
    page = visit.open(gw.url)
    page.select_option("#model", "zai/cogview-4")
    submit(page, "within the budget")
    expect(page.locator(".grid .grid-item")).to_have_count(1)
    expect(page.locator("#spend-left")).to_have_text("· $0.01325 left of $0.03")

    submit(page, "over the budget")
    expect(page.get_by_role("alert")).to_contain_text("Budget exceeded, nothing was signed")
    choose(page, "#size", "999x999")
    submit(page, "a size cogview does not make")
    expect(page.locator("#error")).to_contain_text("Size '999x999' is not available")
    choose(page, "#model", "flux")
    submit(page, "a dropped model")
    expect(page.locator("#error")).to_contain_text("Model 'flux' was dropped")

    expect(page.locator(".grid .grid-item")).to_have_count(1)
    expect(page.locator("#status")).to_have_text("")
    expect(page.locator("#spend-left")).to_have_text("· $0.01325 left of $0.03")
    assert sandbox.paid() == 1
    assert visit.errors == []


def test_the_upstream_down_says_nothing_was_paid(visit: Visit, make_gateway: Any,
                                                  own_sandbox: Sandbox) -> None:
    gw = make_gateway(own_sandbox.api)
    page = visit.open(gw.url)
    own_sandbox.server.stop()
    submit(page, "while BlockRun is unreachable")
    expect(page.locator("#error")).to_contain_text("Upstream unreachable")
    expect(page.locator("#error")).to_contain_text("Nothing was paid")
    expect(page.locator(".grid .grid-item")).to_have_count(0)
    expect(page.locator("#spend-today")).to_have_text("$0.00")


def test_a_gateway_restart_while_the_page_is_open(visit: Visit, gateway: Gateway) -> None:
    """Stopped: Generate says so. Back on the same port: Refresh and Generate work again,
    with the images and spend from before the restart."""
    from clawrouter.api.app import create_app

    make(gateway, "made before the restart")
    page = visit.open(gateway.url)
    port = gateway.server.port
    gateway.server.stop()
    submit(page, "while the gateway is stopped")
    expect(page.locator("#error")).to_have_text(
        "The gateway did not answer. Is clawrouter still running?")
    expect(page.locator(".grid .grid-item")).to_have_count(1)

    again = ServerThread(create_app(gateway.gw.settings), port=port).start()
    try:
        page.click("#refresh")
        expect(page.locator(".grid .grid-item")).to_have_count(1)
        expect(page.locator("#list-error")).to_be_hidden()
        submit(page, "after the restart")
        expect(page.locator(".grid .grid-item")).to_have_count(2)
        expect(page.locator("#error")).to_be_hidden()
        today = gateway.http.get("/v1/spend").json()["today"]["usd"]
        expect(page.locator("#spend-today")).to_have_text(usd(today))
    finally:
        again.stop()


def test_keyboard_only(visit: Visit, gateway: Gateway) -> None:
    """Tab reaches every control in reading order; Enter is a new line and Ctrl+Enter submits;
    an empty prompt puts focus back in the box; Enter on a card opens it."""
    make(gateway, "a card to reach with Tab")
    page = visit.open(gateway.url)
    order = []
    for _ in range(7):
        page.keyboard.press("Tab")
        order.append(page.evaluate("document.activeElement.id || document.activeElement.className"))
    assert order == ["copy-wallet", "prompt", "model", "size", "generate", "refresh", "card"]

    page.focus("#prompt")
    page.keyboard.press("Control+Enter")
    expect(page.get_by_role("alert")).to_have_text("Write a prompt first.")
    expect(page.locator("#prompt")).to_be_focused()
    page.keyboard.type("two lines")
    page.keyboard.press("Enter")
    expect(page.locator("#prompt")).to_have_value("two lines\n")
    expect(page.locator("#error")).to_be_hidden()  # typing cleared it
    page.keyboard.type("of prompt")
    page.keyboard.press("Control+Enter")
    expect(page.locator(".grid .grid-item")).to_have_count(2)
    expect(page.locator(".grid-item.pending")).to_have_count(0)
    expect(page.locator(".grid .card-prompt").first).to_have_text("two lines\nof prompt")

    page.locator(".grid a.card").first.focus()
    page.keyboard.press("Enter")
    expect(page.locator("#detail")).to_have_attribute("open", "")
    expect(page.locator("#detail-close")).to_be_focused()
    assert visit.errors == []


def test_what_a_screen_reader_finds(visit: Visit, gateway: Gateway) -> None:
    make(gateway, "a lighthouse for the screen reader")
    page = visit.open(gateway.url)
    for role, name in [("textbox", "Prompt"), ("combobox", "Model"), ("combobox", "Size"),
                       ("button", "Generate"), ("button", "Refresh"),
                       ("button", "Copy wallet address"), ("status", "Price")]:
        expect(page.get_by_role(role, name=name, exact=True)).to_have_count(1)
    expect(page.locator("#status")).to_have_attribute("aria-live", "polite")
    expect(page.locator("#error")).to_have_attribute("role", "alert")
    page.locator(".grid a.card").first.click()
    dialog = page.get_by_role("dialog", name="cogview-4")
    expect(dialog.get_by_role("img", name="a lighthouse for the screen reader")).to_be_visible()
    expect(page.get_by_role("textbox", name="Local URL")).to_be_visible()


def test_copy_buttons_put_the_whole_value_on_the_clipboard(browser: Browser,
                                                           gateway: Gateway) -> None:
    url = make(gateway, "an image whose URL is copied")["data"][0]["url"]
    context = browser.new_context(viewport=LAPTOP,
                                  permissions=["clipboard-read", "clipboard-write"])
    try:
        page = context.new_page()
        page.goto(gateway.url + "/")
        page.wait_for_selector("body[data-ready]")
        page.click("#copy-wallet")
        expect(page.locator("#copy-wallet")).to_have_attribute("aria-label", "Copied")
        assert page.evaluate("navigator.clipboard.readText()") == gateway.gw.address
        page.locator(".grid a.card").first.click()
        page.click("#copy-url")
        expect(page.locator("#copy-url")).to_have_text("Copied")
        assert page.evaluate("navigator.clipboard.readText()") == url
    finally:
        context.close()


def test_the_longest_prompt_on_a_phone(visit: Visit, gateway: Gateway) -> None:
    """32,000 characters (the most the gateway takes): stored whole, two lines on the card,
    nothing wider than the phone, and the detail view scrolls instead of overflowing."""
    prompt = ("a sprawling city of towers, bridges and canals " * 700)[:32_000].strip()
    page = visit.open(gateway.url)
    page.set_viewport_size(PHONE)
    page.select_option("#model", "zai/cogview-4")
    submit(page, prompt)
    expect(page.locator("#error")).to_be_hidden()
    assert stored_prompts(gateway) == [prompt]
    height = page.locator(".grid .card-prompt").first.evaluate("e => e.clientHeight")
    assert height < 60, f"the card's prompt is {height}px tall"
    no_horizontal_scroll(page)
    page.locator(".grid a.card").first.click()
    expect(page.locator("#detail-prompt")).to_have_text(prompt)
    box = page.locator("#detail-prompt").bounding_box()
    assert box is not None and box["height"] < PHONE["height"]
    no_horizontal_scroll(page)


# --- Defects found (and fixed) -----------------------------------------------------------------

def test_a_paid_slow_job_survives_a_reload(visit: Visit, gateway: Gateway,
                                           sandbox: Sandbox) -> None:
    """A reload (or Back) during a slow model's job abandoned the paid job: without
    `x-clawrouter-keep-paid-job` the gateway stopped polling once the page left, so no image
    appeared and the payment stayed held. The page now sends it, and says one may leave."""
    sandbox.configure(slow_seconds=2)
    page = visit.open(gateway.url)
    page.select_option("#model", SLOW)
    page.fill("#prompt", "reloaded while it was being made")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("you can leave this page")
    assert wait_until(lambda: sandbox.paid() == 1, 30)
    page.reload()
    page.wait_for_selector("body[data-ready]")
    # (an abandoned job is never stored: the wait can be a loaded machine's)
    assert wait_until(lambda: stored_prompts(gateway) == ["reloaded while it was being made"],
                      30), gateway.http.get("/v1/spend").json()["latest"]
    page.click("#refresh")
    expect(page.locator(".grid .card-prompt")).to_have_text(["reloaded while it was being made"])
    assert sandbox.paid() == 1


def test_generate_twice_makes_two_images(visit: Visit, gateway: Gateway,
                                         sandbox: Sandbox) -> None:
    """Generate again with the same prompt within 60 s made no new image: the gateway shared
    the earlier result, as it does a retry. Each click is now a first try
    (`x-stainless-retry-count: 0`)."""
    page = visit.open(gateway.url)
    submit(page, "a fox, and then another fox")
    submit(page, "a fox, and then another fox")
    assert (page.locator(".grid .grid-item").count(), sandbox.paid()) == (2, 2)


def test_a_double_click_makes_one_image(visit: Visit, gateway: Gateway,
                                        sandbox: Sandbox) -> None:
    """The gateway joins the second request to the first (in flight), and the page shows it as
    one: no second placeholder, no '2 images in progress'."""
    sandbox.configure(slow_seconds=1.5)
    page = visit.open(gateway.url)
    page.select_option("#model", SLOW)
    page.fill("#prompt", "one fox, clicked twice")
    page.dblclick("#generate")
    expect(page.locator(".grid-item.pending")).to_have_count(1)
    expect(page.locator("#status")).to_contain_text(f"Generating with {SLOW}…")
    expect(page.locator(".grid-item.pending")).to_have_count(0, timeout=15_000)
    expect(page.locator(".grid .grid-item")).to_have_count(1)
    assert sandbox.paid() == 1
    assert stored_prompts(gateway) == ["one fox, clicked twice"]


def test_a_cards_accessible_name_says_the_prompt_once(visit: Visit, gateway: Gateway) -> None:
    """The thumbnail's alt was the prompt and the card's text repeated it: a screen reader read
    every prompt twice (64,000 characters for the longest)."""
    prompt = "a harbour at dawn with boats"
    make(gateway, prompt)
    page = visit.open(gateway.url)
    name = page.locator(".grid a.card").first.aria_snapshot().splitlines()[0]
    assert name.count(prompt) == 1, name


def test_progress_is_announced_once_not_every_second(visit: Visit, gateway: Gateway,
                                                     sandbox: Sandbox) -> None:
    """The live status was rewritten every second ('… 1 s', '… 2 s'), and the grid was a live
    region with the placeholder's clock ticking in it: the clock was read aloud for minutes."""
    sandbox.configure(slow_seconds=2.5)
    page = visit.open(gateway.url)
    page.evaluate("""() => {
        window.announced = [];
        const status = document.getElementById('status');
        new MutationObserver(() => window.announced.push(status.textContent))
            .observe(status, {subtree: true, childList: true, characterData: true});
    }""")
    page.select_option("#model", SLOW)
    submit(page, "a slow lighthouse, quietly")
    announced = [text for text in page.evaluate("window.announced") if text]
    assert len(set(announced)) <= 2, announced  # "Generating…" and "Done"
    assert page.locator("#grid").get_attribute("aria-live") is None  # the grid is not read out


def test_refresh_during_an_outage_keeps_the_grid(visit: Visit, gateway: Gateway) -> None:
    """Refresh with the gateway unreachable emptied the grid and said 'No images yet' under
    the error: the cards were removed before the list arrived."""
    make(gateway, "an image that still exists")
    page = visit.open(gateway.url)
    gateway.server.stop()
    page.click("#refresh")
    expect(page.locator("#list-error")).to_be_visible()
    assert page.locator("#empty").is_hidden()
    assert page.locator(".grid .grid-item").count() == 1


def test_the_spend_line_accounts_for_held_money(visit: Visit, make_gateway: Any,
                                                sandbox: Sandbox) -> None:
    """After a payment refused once signed the line read 'Today $0.00 · $4.9465 left of $5.00'
    and nothing said where $0.0535 went (held); pending money was only in a tooltip."""
    gw = make_gateway(max_usd_per_day=5)
    page = visit.open(gw.url)
    sandbox.faults({"kind": "reject", "code": "PAYMENT_UNFUNDED"})
    submit(page, "a payment the upstream refuses")
    expect(page.locator("#error")).to_contain_text("rejected the payment")
    held = gw.http.get("/v1/spend").json()["budget"]["day"]["held_usd"]
    assert held > 0
    # (waited for: the line is redrawn once the page reads the spend again, and it said
    # "left of $5.00" before too)
    expect(page.locator("#spend")).to_contain_text(usd(held))
    expect(page.locator("#spend-left")).to_contain_text("left of $5.00")
    expect(page.locator("#spend-held")).to_have_text(f"· {usd(held)} held")

    sandbox.faults({"kind": "respond", "phase": "paid", "status": 500,
                    "body": {"error": "provider down"}})
    submit(page, "a payment whose outcome is not known")
    pending = gw.http.get("/v1/spend").json()["today"]["pending"]["usd"]
    assert pending > 0
    expect(page.locator("#spend-pending")).to_have_text(f"· {usd(pending)} pending")


def test_exactly_one_page_of_images_offers_no_load_more(visit: Visit, gateway: Gateway) -> None:
    """With exactly 24 images, 'Load more' was shown and loaded nothing."""
    for i in range(PAGE_SIZE):
        make(gateway, f"image {i} of one page")
    page = visit.open(gateway.url)
    expect(page.locator(".grid .grid-item")).to_have_count(PAGE_SIZE)
    expect(page.locator("#more")).to_be_hidden()


def test_a_list_that_did_not_load_is_not_called_empty(visit: Visit, gateway: Gateway) -> None:
    """The list failed to load, and the page still said 'No images yet' under the error."""
    make(gateway, "an image the page could not list")
    visit.page.route("**/v1/images?*", lambda route: route.abort())
    page = visit.open(gateway.url)
    expect(page.locator("#list-error")).to_contain_text("Could not load images")
    expect(page.locator("#empty")).to_be_hidden()


def test_a_later_success_clears_an_earlier_attempts_error(visit: Visit, gateway: Gateway,
                                                         sandbox: Sandbox) -> None:
    """Two generations at once, the first failing while the second ran: its error stayed on
    screen beside 'Done' after the second, later attempt succeeded."""
    sandbox.configure(slow_seconds=0.5)
    sandbox.faults({"kind": "job", "outcome": "failed", "model": SLOW},
                   {"kind": "delay", "phase": "paid", "seconds": 3, "model": "zai/cogview-4"})
    page = visit.open(gateway.url)
    page.select_option("#model", SLOW)
    page.fill("#prompt", "a first try that fails")
    page.click("#generate")
    page.select_option("#model", "zai/cogview-4")
    page.fill("#prompt", "a second try that works")
    page.click("#generate")
    expect(page.locator("#error")).to_be_visible(timeout=10_000)  # the first, while the second runs
    expect(page.locator(".grid-item.pending")).to_have_count(0, timeout=15_000)
    expect(page.locator("#status")).to_have_text(re.compile(r"Done in \d+ s\."))
    expect(page.locator("#error")).to_be_hidden()
    assert stored_prompts(gateway) == ["a second try that works"]
