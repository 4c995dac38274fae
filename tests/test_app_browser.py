"""End to end in a real browser: Debian's Chromium driven by Playwright against the app on a tiny model.

One served app and one browser for the module. The tiny model answers in milliseconds, too fast to press a
button mid-answer, so a test-only hook slows it down where a test needs to act while something runs: a
pause before each streamed token, and before each K search sample's progress report. The tests wait for
states (text on the page, the device lock), never for fixed times, and assert no speed.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import pytest
from PIL import Image

from app import search

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
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
SLOW = {"token_s": 0.0, "sample_s": 0.0}  # the test-only slow-down; 0 = the tiny model's own speed


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def app(served_app):
    """The served app with the slow-down hook installed on its manager and on the K search."""
    manager, url = served_app
    original_stream, original_search = manager.stream, search.search_k

    def slow_stream(*args, **kwargs):
        for event in original_stream(*args, **kwargs):
            time.sleep(SLOW["token_s"])  # inside the answer: the device stays held, as with a slower model
            yield event

    def slow_search(*args, progress=None, **kwargs):
        def report(done, total):
            time.sleep(SLOW["sample_s"])
            if progress is not None:
                progress(done, total)

        return original_search(*args, progress=report, **kwargs)

    manager.stream = slow_stream
    search.search_k = slow_search
    yield manager, url
    manager.stream = original_stream
    search.search_k = original_search


@pytest.fixture()
def slow():
    """Slow the model down for one test (the device is held longer; nothing else changes)."""
    SLOW.update(token_s=0.03, sample_s=0.5)
    yield
    SLOW.update(token_s=0.0, sample_s=0.0)


def open_page(browser, url: str, viewport: dict[str, int] = DESKTOP):
    page = browser.new_page(viewport=viewport)
    page.goto(url)
    page.wait_for_selector("#question textarea", timeout=30_000)
    return page


@pytest.fixture()
def page(browser, app):
    """A fresh browser session (its own chat state) per test, at 1280x800."""
    page = open_page(browser, app[1])
    yield page
    page.close()


@pytest.fixture()
def image(tmp_path, sample_images) -> Path:
    path = tmp_path / "shape.png"
    sample_images[0].save(path)
    return path


def ask(page, question: str, image: Path | None = None) -> None:
    """Attach an image (optional), type the question and send it, as a user would."""
    if image is not None:
        uploaded = "document.querySelectorAll('#question img[src*=\"file=\"]').length"
        before = page.evaluate(f"() => {uploaded}")
        upload = page.locator("#question input[type=file]")
        upload.evaluate("input => { input.value = '' }")  # else the same file chosen again is ignored
        upload.set_input_files(str(image))
        # The upload has reached the server (its preview points at the stored file) before the message is sent.
        page.wait_for_function(f"() => {uploaded} > {before}", timeout=15_000)
    page.locator("#question textarea").fill(question)
    page.locator("#question textarea").press("Enter")


def text_of(page, selector: str) -> str:
    return page.locator(selector).inner_text()


def wait_for_text(page, selector: str, text: str, timeout: int = 60_000) -> None:
    page.wait_for_function(
        f"() => (document.querySelector({selector!r})?.innerText || '').includes({text!r})", timeout=timeout
    )


def wait_for_answers(page, timeout: int = 90_000) -> None:
    """Both sides finished: the summary says whether the answers are identical."""
    page.wait_for_function(
        "() => /identical|different/.test(document.querySelector('#summary')?.innerText || '')", timeout=timeout
    )


def wait_until_running(manager, timeout_s: float = 30.0) -> None:
    """Until a request holds the model: the turn (or search) just sent is on the device."""
    deadline = time.monotonic() + timeout_s
    while not manager.lock.locked():
        assert time.monotonic() < deadline, "nothing started on the device"
        time.sleep(0.02)


def wait_until_device_free(manager, timeout_s: float = 90.0) -> None:
    """Until no request holds the model (a turn, a search); a wait for a state, not a timing."""
    deadline = time.monotonic() + timeout_s
    while manager.lock.locked():
        assert time.monotonic() < deadline, "the device stayed busy"
        time.sleep(0.1)


def footers(page, pane: str) -> list[str]:
    """The first part of each answer's footer line (the method and K), in order."""
    lines = [line for line in text_of(page, f"#{pane}-chat").splitlines() if line.strip().startswith("⚙")]
    return [line.strip().removeprefix("⚙").strip().split(" · ")[0] for line in lines]


def answer_count(page, pane: str) -> int:
    return len(footers(page, pane))


def metrics_cells(page) -> dict[str, list[str]]:
    """The metrics table as {row name: [baseline, accelerated, ratio]}."""
    rows = page.locator("#metrics table tbody tr")
    table = {}
    for index in range(rows.count()):
        cells = [cell.strip() for cell in rows.nth(index).locator("td").all_inner_texts()]
        table[cells[0]] = cells[1:]
    return table


def test_input_and_controls_visible_without_scrolling_on_a_laptop(page):
    for selector in ("#question textarea", "#k-slider", "#method", "#stop", "#clear"):
        box = page.locator(selector).bounding_box()
        assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= DESKTOP["height"], selector
    assert page.evaluate("() => window.scrollY") == 0
    assert text_of(page, "#summary").strip() == ""  # nothing ran yet: no word on which side ran first


def in_view(page, selector: str, viewport: dict[str, int]) -> None:
    box = page.locator(selector).first.bounding_box()
    assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= viewport["height"], (selector, box)


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["laptop", "phone"])
def test_the_examples_sit_under_the_question_and_the_box_stays_in_view(browser, app, viewport):
    page = open_page(browser, app[1], viewport)
    try:
        page.wait_for_selector("#examples button", timeout=30_000)  # rendered after the question box
        examples = page.locator("#examples button")
        assert examples.count() >= 3
        if viewport is DESKTOP:  # both on screen at once, without scrolling
            in_view(page, "#question textarea", viewport)
            in_view(page, "#examples", viewport)
            assert page.evaluate("() => window.scrollY") == 0
        examples.last.click()  # the lowest one: the worst case on a phone
        page.wait_for_function("() => document.querySelector('#question textarea').value.length > 0")
        page.wait_for_selector('#question img[src*="file="]', timeout=10_000)  # its picture is in the box too
        in_view(page, "#question textarea", viewport)  # the question is right there to send
    finally:
        page.close()


def test_video_input_hidden_for_an_image_only_model(page, app):
    """The served model is a LLaVA-1.5 (images only): no video upload, no frame count."""
    assert app[0].info.family == "llava"
    assert not page.locator("#video").is_visible() and not page.locator("#frames").is_visible()


def test_input_near_the_top_on_a_phone_with_a_toggle_between_answers(browser, app):
    page = open_page(browser, app[1], PHONE)
    try:
        box = page.locator("#question textarea").bounding_box()
        assert box is not None and box["y"] + box["height"] <= PHONE["height"]
        # The panes stack: a toggle shows one answer at a time, and no text speaks of left and right. The page's
        # script shows the toggle after the textarea appears: on a loaded machine, a moment later (timeout: fails).
        page.wait_for_selector("#pane-toggle", state="visible", timeout=10_000)
        assert page.locator("#pane-toggle").is_visible()
        assert page.locator("#baseline-chat").is_visible() and not page.locator("#vtw-chat").is_visible()
        page.locator("#pane-toggle").get_by_text("Accelerated").click()
        page.wait_for_function("() => document.querySelector('#panes').dataset.pane === 'vtw'")
        assert page.locator("#vtw-chat").is_visible() and not page.locator("#baseline-chat").is_visible()
        words = page.locator("body").inner_text().lower()
        assert " left" not in words and " right" not in words
    finally:
        page.close()


def test_controls_that_do_not_apply_are_hidden_or_locked(page):
    assert not page.locator("#fastv-r").is_visible() and not page.get_by_text("temperature").is_visible()
    page.locator("#method input").click()
    page.locator("ul[role=listbox] li", has_text="FastV").first.click()
    page.wait_for_selector("#fastv-r", state="visible", timeout=10_000)
    wait_for_text(page, "#vtw-chat", "next turn: FastV", 10_000)
    page.get_by_text("Parameters").click()
    page.get_by_text("sample (off").click()
    page.get_by_text("temperature").wait_for(state="visible", timeout=10_000)


def test_metrics_table_filled_for_both_sides(page, image):
    ask(page, "What shape is this?", image)
    wait_for_answers(page)
    table = metrics_cells(page)
    for row in ("time to first token", "total time", "prefill FLOPs", "decode FLOPs", "KV cache"):
        baseline, accelerated, ratio = table[row]
        assert baseline not in ("", "–") and accelerated not in ("", "–") and ratio.endswith("×"), row
    assert "FLOPs" in table["prefill FLOPs"][0] and "B" in table["KV cache"][1]
    assert "not measured on CPU" in table["peak GPU memory"][0]
    # VTW withdraws the image: fewer prefill FLOPs, marked as the better value.
    assert "✓" in table["prefill FLOPs"][1] and "✓" not in table["prefill FLOPs"][0]
    for pane in ("baseline", "vtw"):
        assert page.locator(f"#{pane}-chat img").count() >= 1  # the uploaded image is shown in the pane
    assert "noisy" in text_of(page, "#timing-note") and "exact" in text_of(page, "#timing-note")


def test_each_answer_keeps_the_settings_that_produced_it(page, app, image):
    manager, _ = app
    first_k = manager.info.searched_k or manager.info.num_layers // 2
    ask(page, "What shape is this?", image)
    wait_for_answers(page)
    slider = page.locator("#k-slider input[type=number]")
    slider.fill("3")
    slider.press("Enter")
    # The title announces the next turn's K; the answer already given still names the K that produced it.
    wait_for_text(page, "#vtw-chat", "next turn: VTW K = 3", 10_000)
    assert footers(page, "vtw") == [f"VTW K = {first_k}"]
    ask(page, "And its colour?")
    page.wait_for_function(
        "() => document.querySelector('#vtw-chat').innerText.split('⚙').length === 3", timeout=60_000
    )
    wait_for_answers(page)
    assert footers(page, "vtw") == [f"VTW K = {first_k}", "VTW K = 3"]
    # K set by hand (below the search's floor of 5): the footers name no eta.
    assert "engine" in text_of(page, "#vtw-chat") and "eta" not in text_of(page, "#vtw-chat")
    assert footers(page, "baseline") == ["baseline (all 8 layers)"] * 2


def test_clear_mid_stream_empties_the_chat_for_good(page, app, image, slow):
    manager, _ = app
    ask(page, "Talk about it.", image)
    wait_until_running(manager)
    page.locator("#clear").click()
    wait_until_device_free(manager)
    page.wait_for_timeout(500)  # let any late update reach the page: none may arrive
    assert "Talk about it" not in text_of(page, "#baseline-chat") + text_of(page, "#vtw-chat")
    assert answer_count(page, "baseline") == 0 and answer_count(page, "vtw") == 0
    assert metrics_cells(page)["total time"][:2] == ["–", "–"]


def test_typing_during_streaming_is_kept_and_refused_clearly(page, app, image, slow):
    manager, _ = app
    ask(page, "Talk about it.", image)
    wait_until_running(manager)
    page.locator("#question textarea").fill("my next question")
    page.locator("#question textarea").press("Enter")
    wait_for_answers(page)
    wait_until_device_free(manager)
    assert page.locator("#question textarea").input_value() == "my next question"
    wait_for_text(page, "#status", "still in the box", 10_000)  # refused clearly, and said again at the end
    assert answer_count(page, "vtw") == 1  # the refused question did not start a turn


def test_a_second_image_and_long_answers_keep_the_question(page, app, image, sample_images, tmp_path, monkeypatch):
    """A context that holds one image and 40 new tokens (the embedded default model holds one image too)."""
    from app import turns
    from app.session import ChatState

    manager, _ = app
    one_image = turns.prompt_tokens(manager, turns.add_turn(ChatState(), "What shape?", [str(image)], [tmp_path]))
    monkeypatch.setattr(manager.model.config.get_text_config(), "max_position_embeddings", one_image + 40)
    ask(page, "What shape?", image)  # 128 new tokens do not fit: refused, and the page says what to do
    wait_for_text(page, "#status", "lower max new tokens (Parameters) to 40 or less", 30_000)
    assert page.locator("#question textarea").input_value() == "What shape?"
    assert page.locator('#question img[src*="file="]').count() == 1  # the image stays in the box too
    assert "What shape?" not in text_of(page, "#baseline-chat")
    page.get_by_role("button", name="Parameters").click()
    tokens = page.locator("#max-new-tokens input[type=number]")
    # The panel mounts its slider when it first opens: under load, a number typed before the slider holds its
    # own value was overwritten by it (the box read 128 again). Type once it is there, as a user would.
    tokens.wait_for(state="visible", timeout=10_000)
    page.wait_for_function("() => document.querySelector('#max-new-tokens input[type=number]').value === '128'")
    page.wait_for_timeout(200)
    tokens.fill("40")
    tokens.press("Tab")  # leaving the box commits the number, as a user's next click does
    page.wait_for_timeout(300)  # a late update to the slider (none is expected) would show here
    assert tokens.input_value() == "40"
    page.locator("#question textarea").press("Enter")  # the same question and image, as the box kept them
    wait_for_answers(page)
    assert answer_count(page, "baseline") == 1 and page.locator("#question textarea").input_value() == ""
    # The slider's top follows what is left: never more than the context can take.
    page.wait_for_function("() => Number(document.querySelector('#max-new-tokens input[type=number]').max) <= 40")
    assert int(tokens.input_value()) <= int(tokens.get_attribute("max"))
    second = tmp_path / "second.png"
    sample_images[1].save(second)
    ask(page, "And this one?", second)  # a second image does not fit with the first: a new conversation
    wait_for_text(page, "#vtw-chat", "New image: a new conversation started", 30_000)
    wait_for_answers(page)
    for pane in ("baseline", "vtw"):
        assert "New image: a new conversation started" in text_of(page, f"#{pane}-chat")
        assert "What shape?" not in text_of(page, f"#{pane}-chat") and answer_count(page, pane) == 1


def test_a_panes_trash_icon_clears_the_whole_conversation(page, image):
    ask(page, "What shape is this?", image)
    wait_for_answers(page)
    page.locator("#vtw-chat button[aria-label='Clear']").click()
    page.wait_for_function("() => !document.body.innerText.includes('What shape is this?')", timeout=10_000)
    assert text_of(page, "#summary").strip() == ""  # no claim about which side ran first: nothing ran
    ask(page, "What colour is it?", image)
    wait_for_answers(page)
    for pane in ("baseline", "vtw"):  # the next turn does not bring the cleared history back
        assert "What shape is this?" not in text_of(page, f"#{pane}-chat") and answer_count(page, pane) == 1


def test_stop_while_queued_cancels_the_request(browser, app, image, slow):
    manager, url = app
    first, second = open_page(browser, url), open_page(browser, url)
    try:
        ask(first, "Talk about it.", image)
        wait_until_running(manager)
        ask(second, "And this?", image)
        second.wait_for_timeout(1000)  # the request reaches the server's queue behind the first page's turn
        second.locator("#stop").click()
        wait_for_answers(first)
        for pane in ("baseline", "vtw"):
            wait_for_text(second, f"#{pane}-chat", "skipped", 30_000)
        wait_until_device_free(manager)
        assert "nothing ran" in text_of(second, "#status")
        assert metrics_cells(second)["time to first token"][:2] == ["–", "–"]
    finally:
        first.close()
        second.close()


def test_stop_after_the_first_side_marks_the_other_skipped(page, app, image, slow):
    ask(page, "Talk about it.", image)
    wait_until_running(app[0])
    page.locator("#stop").click()
    wait_until_device_free(app[0])
    page.wait_for_function("() => document.body.innerText.includes('skipped')", timeout=30_000)
    assert "…" not in text_of(page, "#vtw-chat") + text_of(page, "#baseline-chat")


def test_stop_during_search_k(page, app, slow):
    manager, _ = app
    page.get_by_text("Search K (the").click()
    page.locator("#search-k").click()
    wait_until_running(manager)  # the search holds the device
    page.locator("#stop").click()
    wait_for_text(page, "#search-result", "stopped", 30_000)
    wait_until_device_free(manager)


def test_bad_upload_shows_a_message_and_the_app_keeps_serving(page, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    ask(page, "What is it?", bad)
    wait_for_text(page, "#status", "broken.png is not an image", 30_000)
    page.wait_for_timeout(1000)  # the queued step behind the refused question ends: the message must stay
    assert "broken.png is not an image" in text_of(page, "#status")
    # The app keeps serving: a good image right after works, and the old message is gone.
    good = tmp_path / "good.png"
    Image.new("RGB", (50, 50), "green").save(good)
    ask(page, "And this one?", good)
    wait_for_answers(page)
    assert "not an image" not in text_of(page, "#status")


def test_search_k_moves_the_slider_and_shows_the_curve(page, app):
    from vtw_core.analysis.calibration import load_calibration
    from vtw_core.analysis.k_search import search_k

    manager, _ = app
    expected = search_k(manager.model, manager.processor, load_calibration("default")).k
    assert expected is not None
    page.get_by_text("Search K (the").click()
    page.locator("#search-k").click()
    wait_for_text(page, "#search-result", f"K = {expected}")
    assert page.locator("#k-slider input[type=number]").input_value() == str(expected)
    wait_for_text(page, "#vtw-chat", f"next turn: VTW K = {expected}", 10_000)
    assert page.locator("#search-plot img, #search-plot canvas, #search-plot svg").count() >= 1


def test_only_the_session_whose_search_chose_k_names_its_eta(browser, app, image):
    """A K search moves its page's slider, and that page's answers name the search's eta; another visitor who sets
    the same K by hand gets no eta (what a search chose is the session's own, not the process's)."""
    _, url = app
    searched, by_hand = open_page(browser, url), open_page(browser, url)
    try:
        searched.get_by_text("Search K (the").click()
        searched.locator("#search-k").click()
        wait_for_text(searched, "#search-result", "K = ")
        k = searched.locator("#k-slider input[type=number]").input_value()
        eta = float(searched.locator("#search-eta input").input_value())
        ask(searched, "What shape is this?", image)
        wait_for_answers(searched)
        assert f"VTW K = {k} · engine" in text_of(searched, "#vtw-chat")
        assert f"K searched at eta {eta:g}" in text_of(searched, "#vtw-chat")
        slider = by_hand.locator("#k-slider input[type=number]")
        slider.fill(k)
        slider.press("Enter")
        wait_for_text(by_hand, "#vtw-chat", f"next turn: VTW K = {k}", 10_000)
        ask(by_hand, "What shape is this?", image)
        wait_for_answers(by_hand)
        assert footers(by_hand, "vtw") == [f"VTW K = {k}"] and "eta" not in text_of(by_hand, "#vtw-chat")
    finally:
        searched.close()
        by_hand.close()


def test_a_search_k_whose_page_is_gone_is_cancelled(browser, app, slow, caplog):
    caplog.set_level(logging.INFO, logger="vtw_chat")  # a stop is logged at info level, as "stopped"
    manager, url = app
    page = open_page(browser, url)
    page.get_by_text("Search K (the").click()
    page.locator("#search-k").click()
    wait_until_running(manager)
    page.close()  # the visitor leaves mid-search
    wait_until_device_free(manager)
    stopped = [record for record in caplog.records if "K search was stopped" in record.getMessage()]
    assert stopped and all(record.getMessage().startswith("Search K stopped: ") for record in stopped)


# --- What the page says about timings, the K search, the method menu and the plots ------------------------------

# Words of the matched elements that the browser broke across lines ("baselin e"): one word, two line boxes. A
# line may end at a space or after a dash ("19 ms–" / "25 ms"), never inside a word.
SPLIT_WORDS_JS = """(selector) => {
  const split = [];
  for (const cell of document.querySelectorAll(selector)) {
    const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      for (const match of node.textContent.matchAll(/[^\\s–]+/g)) {
        const range = document.createRange();
        range.setStart(node, match.index);
        range.setEnd(node, match.index + match[0].length);
        if (Array.from(range.getClientRects()).filter((rect) => rect.width > 0).length > 1) split.push(match[0]);
      }
    }
  }
  return split;
}"""
# Whether the question box holds its placeholder's text without clipping (the same text, as a value).
PLACEHOLDER_FITS_JS = """() => {
  const box = document.querySelector('#question textarea');
  const kept = box.value;
  box.value = box.placeholder;
  const fits = box.scrollHeight <= box.clientHeight + 1;
  box.value = kept;
  return fits;
}"""


def svg_texts(page, selector: str) -> list[str]:
    return page.evaluate(f"() => Array.from(document.querySelectorAll('{selector} svg text')).map(t => t.textContent)")


def axis_ticks(page, selector: str, axis: str) -> list[str]:
    """The tick labels of a Vega chart's "X" or "Y" axis, in axis order (bottom to top, left to right)."""
    return page.evaluate(
        """([selector, axis]) => {
          const group = document.querySelector(`${selector} svg [aria-label^="${axis}-axis"]`);
          const labels = Array.from(group.querySelectorAll('.role-axis-label text'));
          const at = (text) => text.getBoundingClientRect();
          labels.sort((a, b) => axis === 'X' ? at(a).left - at(b).left : at(b).top - at(a).top);
          return labels.map((text) => text.textContent);
        }""",
        [selector, axis],
    )


def test_on_a_phone_the_placeholder_fits_and_no_metrics_word_is_split(browser, app, image):
    page = open_page(browser, app[1], PHONE)
    try:
        assert page.evaluate(PLACEHOLDER_FITS_JS)
        ask(page, "What shape is this?", image)
        wait_for_answers(page)
        assert page.evaluate(SPLIT_WORDS_JS, "#metrics th, #metrics td") == []
        page.get_by_text("Timing: chart and benchmark").click()
        page.locator("#benchmark").click()
        wait_for_text(page, "#benchmark-result", "runs per side")
        assert page.evaluate(SPLIT_WORDS_JS, "#benchmark-result th, #benchmark-result td") == []
        assert "baseline" in text_of(page, "#metrics thead")
    finally:
        page.close()


def test_timings_are_one_run_and_the_chart_counts_whole_turns_from_zero(page, app, image):
    manager, _ = app
    k = manager.info.searched_k or manager.info.num_layers // 2
    ask(page, "What shape is this?", image)
    wait_for_answers(page)
    table = metrics_cells(page)
    assert "timings, 1 run" in table and "exact counts" in table
    assert not any("✓" in cell for row in ("time to first token", "total time", "decode tokens/s")
                   for cell in table[row])  # fmt: skip
    ask(page, "And its colour?")
    page.wait_for_function(
        "() => document.querySelector('#vtw-chat').innerText.split('⚙').length === 3", timeout=60_000
    )
    wait_for_answers(page)
    page.get_by_text("Timing: chart and benchmark").click()
    page.wait_for_function(
        "() => document.querySelectorAll('#timing-plot svg text').length > 4 && "
        f"Array.from(document.querySelectorAll('#timing-plot svg text')).some(t => t.textContent === 'VTW K={k} TTFT')",
        timeout=30_000,
    )
    x_ticks, y_ticks = axis_ticks(page, "#timing-plot", "X"), axis_ticks(page, "#timing-plot", "Y")
    assert x_ticks == ["1", "2"], x_ticks  # whole turns, in order: not 1.0, 1.5, 2.0
    seconds = [float(tick) for tick in y_ticks]  # however Vega formats them ("0.0", "0", "0.05", "1.5")
    assert seconds[0] == 0 and seconds == sorted(seconds) and len(seconds) >= 2, y_ticks  # the axis starts at 0
    assert "accelerated TTFT" not in svg_texts(page, "#timing-plot")


def test_a_k_search_says_its_phase_and_whether_the_slider_moved(page, app, slow):
    import re

    page.get_by_text("Search K (the").click()
    before = page.locator("#k-slider input[type=number]").input_value()
    page.locator("#search-k").click()
    seen = set()
    for _ in range(600):  # the search's texts as it runs: a phase first, never a bar stuck at 0 %
        text = text_of(page, "#search-result")
        seen.add(text)
        if "K = " in text:
            break
        page.wait_for_timeout(100)
    assert any("Preparing the calibration set" in text or "calibration sample" in text for text in seen), seen
    assert not any(re.search(r"(?<![\d.])0\.0%", text) for text in seen), seen
    wait_for_text(page, "#search-result", "K = ")
    first = text_of(page, "#search-result")
    after = page.locator("#k-slider input[type=number]").input_value()
    assert ("moved from" in first) == (after != before) and "K = " in first
    page.locator("#search-k").click()  # again: the slider is already at the K it finds
    wait_for_text(page, "#search-result", "already there", 60_000)
    assert "moved" not in text_of(page, "#search-result")


def test_plots_show_their_own_titles_uncovered(page):
    page.get_by_text("Search K (the").click()
    page.get_by_text("Attention per layer").click()
    for plot in ("#search-plot", "#attention-prompt", "#attention-output"):
        page.wait_for_selector(plot, state="attached")
        chips = page.locator(f"{plot} [data-testid=block-label]")
        assert all(not chips.nth(index).is_visible() for index in range(chips.count())), plot


def test_the_method_menu_fits_its_labels_and_says_where_a_schedule_comes_from(page):
    page.locator("#method input").click()
    page.locator("ul[role=listbox] li", has_text="G-Search").first.click()
    wait_for_text(page, "#method", "G-Search on easy-vqa", 10_000)
    fits = "() => { const box = document.querySelector('#method input'); return box.scrollWidth <= box.clientWidth }"
    assert page.evaluate(fits)  # "G-Search", not a truncated "schedule: easyv"
