"""End to end in a real browser: Debian's Chromium driven by Playwright against the app on a tiny model."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = os.environ.get("VTW_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed (CI installs it)")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, served_app):
    """A fresh browser session (its own chat state) per test."""
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(served_app[1])
    page.wait_for_selector("#question textarea", timeout=30_000)
    yield page
    page.close()


def ask(page, question: str, image: Path | None = None) -> None:
    """Attach an image (optional), type the question and send it, as a user would."""
    if image is not None:
        page.locator("#question input[type=file]").set_input_files(str(image))
        page.wait_for_timeout(500)  # the upload finishes before the message is sent
    page.locator("#question textarea").fill(question)
    page.locator("#question textarea").press("Enter")


def wait_for_summary(page, text: str, timeout: int = 60_000) -> None:
    page.wait_for_function(f"() => document.querySelector('#summary').innerText.includes({text!r})", timeout=timeout)


def test_ask_move_slider_and_read_counters(page, tmp_path, sample_images):
    image = tmp_path / "shape.png"
    sample_images[0].save(image)
    ask(page, "What shape is this?", image)
    # Both panes fill, and each side's counters show a measured time to first token.
    page.wait_for_function(
        "() => document.querySelector('#vtw-stats').innerText.includes('time to first token:')"
        " && document.querySelector('#summary').innerText.includes('VTW / baseline')",
        timeout=60_000,
    )
    for side in ("baseline", "vtw"):
        stats = page.locator(f"#{side}-stats").inner_text()
        assert "FLOPs" in stats and "KV cache" in stats and "GPU peak: CPU" in stats
        assert page.locator(f"#{side}-chat img").count() >= 1  # the uploaded image is shown in the pane
    assert "one after the other" in page.locator("#summary").inner_text()

    # Move the K slider: the VTW pane's title follows.
    slider_number = page.locator("#k-slider input[type=number]")
    slider_number.fill("3")
    slider_number.press("Enter")
    page.wait_for_function("() => document.body.innerText.includes('VTW (K = 3)')", timeout=10_000)
    # Ask again at the new K: a second turn, and the summary updates.
    ask(page, "And its colour?")
    page.wait_for_function(
        "() => document.querySelectorAll('#vtw-chat .bot, #vtw-chat [data-testid=\"bot\"]').length >= 2",
        timeout=60_000,
    )
    screenshot = os.environ.get("VTW_SCREENSHOT")
    if screenshot:
        page.screenshot(path=screenshot, full_page=True)


def test_bad_upload_shows_a_message_and_the_app_keeps_serving(page, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    ask(page, "What is it?", bad)
    wait_for_summary(page, "broken.png is not an image", timeout=30_000)
    # The app keeps serving: a good image right after works.
    good = tmp_path / "good.png"
    Image.new("RGB", (50, 50), "green").save(good)
    ask(page, "And this one?", good)
    wait_for_summary(page, "VTW / baseline")


def test_search_k_moves_the_slider_and_shows_the_curve(page, served_app):
    from vtw_core.calibration import load_calibration
    from vtw_core.search import search_k

    manager, _ = served_app
    expected = search_k(manager.model, manager.processor, load_calibration("default")).k
    assert expected is not None
    page.get_by_text("Search K (the paper's KL criterion)").click()
    page.locator("#search-k").click()
    page.wait_for_function(
        f"() => document.querySelector('#search-result').innerText.includes('K = {expected}')", timeout=60_000
    )
    assert page.locator("#k-slider input[type=number]").input_value() == str(expected)
    page.wait_for_function(f"() => document.body.innerText.includes('VTW (K = {expected})')", timeout=10_000)
    assert page.locator("#search-plot img, #search-plot canvas, #search-plot svg").count() >= 1
