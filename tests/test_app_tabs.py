"""Two users at once, in a real browser: no mix of Stop, Clear, Regenerate, questions, another tab's Search K or
benchmark, or a closed tab leaves a page stuck once the device is free.

Two browser contexts (two users, two sessions) on one served app with a tiny model. Another tab's long Search K
(on the real model the "reply" criterion holds the device for 10-90 s) is played by a gate: the search (or the
benchmark) holds the device until the test opens the gate, so every race below happens in a fixed order. The
tests wait for states (text on the page, the gate being reached), never for fixed times.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest
from test_app_browser import (
    CHROMIUM,
    CHROMIUM_ARGS,
    DESKTOP,
    answer_count,
    ask,
    text_of,
    wait_for_answers,
    wait_for_text,
)

from app import search
from app.session import Event, Sessions

playwright_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Chromium is not installed (CI installs it)")

OPEN = threading.Event()  # the gate: set = device work runs at its own speed
OPEN.set()
REACHED = threading.Event()  # set when a gated search or benchmark holds the device at the gate
STREAMS = [0]  # answers streamed so far (one per side and turn)
FREE_WITHIN_S = 20  # from opening the gate to the other page's answers (the freeze it guards against was forever)


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def app(served_app):
    """The served app, its K search and its benchmark held at the gate while it is shut."""
    manager, url = served_app
    original_search, original_generate, original_stream = search.search_k, manager.generate, manager.stream

    def gated_search(*args, progress=None, **kwargs):
        def report(done, total):
            REACHED.set()
            OPEN.wait(timeout=120)  # holds the model's lock: the device is busy until the gate opens
            if progress is not None:
                progress(done, total)

        return original_search(*args, progress=report, **kwargs)

    def gated_generate(*args, **kwargs):  # the benchmark's runs (the chat streams, so it never passes here)
        if not OPEN.is_set():
            REACHED.set()
            OPEN.wait(timeout=120)
        return original_generate(*args, **kwargs)

    def counted_stream(*args, **kwargs):
        STREAMS[0] += 1
        yield from original_stream(*args, **kwargs)

    search.search_k = gated_search
    manager.generate = gated_generate
    manager.stream = counted_stream
    yield manager, url
    search.search_k = original_search
    manager.generate = original_generate
    manager.stream = original_stream


@pytest.fixture()
def gate(app):
    """Shut the gate for one test; it always opens again, and the device is free before the next test."""
    OPEN.clear()
    REACHED.clear()
    yield OPEN
    OPEN.set()
    deadline = time.monotonic() + 60
    while app[0].lock.locked() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.fixture()
def tabs(browser, app):
    """Two users on the page, each in a browser context of their own: (a, b)."""
    contexts = [browser.new_context(viewport=DESKTOP) for _ in range(2)]
    pages = []
    for context in contexts:
        page = context.new_page()
        page.goto(app[1])
        page.wait_for_selector("#question textarea", timeout=30_000)
        pages.append(page)
    yield pages
    for context in contexts:
        context.close()


@pytest.fixture()
def image(tmp_path, sample_images):
    path = tmp_path / "shape.png"
    sample_images[0].save(path)
    return path


def hold_the_device_with_a_search(page) -> None:
    """Start Search K on `page` and wait until it holds the device at the gate."""
    page.get_by_text("Search K (the").click()
    page.locator("#search-k").click()
    assert REACHED.wait(30), "the K search never reached the device"


def send_an_example(page) -> None:
    """Choose the first example (its question and picture fill the box) and send it."""
    page.locator("#examples button").first.click()
    page.wait_for_function("() => document.querySelector('#question textarea').value.length > 0", timeout=10_000)
    page.wait_for_timeout(300)  # the example's picture reaches the box before the question is sent
    page.locator("#question textarea").press("Enter")


def assert_answers_once_free(page, gate, answers: int) -> None:
    """Open the gate; the page's queued question is answered soon after, with nothing left waiting."""
    gate.set()
    start = time.monotonic()
    page.wait_for_function(
        f"() => document.querySelector('#baseline-chat').innerText.split('⚙').length === {answers + 1}"
        " && !document.body.innerText.includes('waiting for the device')",
        timeout=FREE_WITHIN_S * 1000,
    )
    wait_for_answers(page)
    assert time.monotonic() - start < FREE_WITHIN_S
    assert "still" not in text_of(page, "#status")  # not "still running", not "still waits"


def assert_page_answers_a_new_question(page, image) -> None:
    """The page takes and answers one more question: it is not stuck."""
    before = answer_count(page, "baseline")
    ask(page, "And now?", image if before == 0 else None)
    page.wait_for_function(
        f"() => document.querySelector('#baseline-chat').innerText.split('⚙').length === {before + 2}"
        " && /identical|different/.test(document.querySelector('#summary').innerText)",
        timeout=30_000,
    )


def test_stop_clear_and_a_new_question_while_another_tab_searches(tabs, gate, image):
    """The reported freeze: an example queued behind another tab's Search K, a refused question, Stop, Clear,
    and a new question; once the search ends, the page answers it."""
    a, b = tabs
    hold_the_device_with_a_search(b)
    send_an_example(a)
    wait_for_text(a, "#status", "Queued: your question waits for the device (running now: a K search", 10_000)
    wait_for_text(a, "#vtw-chat", "waiting for the device", 10_000)
    a.locator("#question textarea").fill("one more?")
    a.locator("#question textarea").press("Enter")
    wait_for_text(a, "#status", "still waits for the device", 10_000)  # refused while queued, kept in the box
    assert a.locator("#question textarea").input_value() == "one more?"
    a.locator("#stop").click()
    wait_for_text(a, "#status", "Stopped while queued: nothing ran.", 10_000)
    wait_for_text(a, "#vtw-chat", "skipped", 10_000)
    a.locator("#clear").click()
    a.wait_for_function("() => !document.querySelector('#baseline-chat').innerText.includes('skipped')")
    ask(a, "What colour is it?", image)  # taken at once and queued: the device is still busy
    wait_for_text(a, "#status", "Queued: your question waits", 10_000)
    assert_answers_once_free(a, gate, answers=1)
    wait_for_text(b, "#search-result", "K = ", 30_000)  # the other tab got its search
    assert "What colour is it?" in text_of(a, "#baseline-chat") and "one more?" not in text_of(a, "#baseline-chat")
    assert_page_answers_a_new_question(a, image)


def test_stop_while_queued_then_a_question_while_the_search_still_runs(tabs, gate, image):
    a, b = tabs
    hold_the_device_with_a_search(b)
    ask(a, "What is it?", image)
    wait_for_text(a, "#status", "Queued", 10_000)
    a.locator("#stop").click()
    for pane in ("baseline", "vtw"):
        wait_for_text(a, f"#{pane}-chat", "skipped", 10_000)  # at once: nothing waits for the device any more
    ask(a, "And its colour?")
    wait_for_text(a, "#status", "Queued: your question waits", 10_000)
    assert_answers_once_free(a, gate, answers=2)
    assert text_of(a, "#baseline-chat").count("Stop was pressed before") == 1  # the stopped turn stays skipped
    assert_page_answers_a_new_question(a, image)


def test_clear_while_queued_leaves_an_empty_page_that_answers(tabs, gate, app, image):
    a, b = tabs
    hold_the_device_with_a_search(b)
    ask(a, "What is it?", image)
    wait_for_text(a, "#status", "Queued", 10_000)
    a.locator("#clear").click()
    a.wait_for_function("() => !document.querySelector('#baseline-chat').innerText.includes('What is it?')")
    gate.set()
    wait_for_text(b, "#search-result", "K = ", 30_000)
    a.wait_for_timeout(500)  # the cancelled turn's job reaches the device and must write nothing
    assert "What is it?" not in text_of(a, "#baseline-chat") and answer_count(a, "baseline") == 0
    assert_page_answers_a_new_question(a, image)


def test_regenerate_while_queued_is_refused_and_the_turn_still_answers(tabs, gate, image):
    a, b = tabs
    hold_the_device_with_a_search(b)
    ask(a, "What is it?", image)
    wait_for_text(a, "#status", "Queued", 10_000)
    a.locator("#regenerate").click()
    wait_for_text(a, "#status", "press Stop first", 10_000)
    assert_answers_once_free(a, gate, answers=1)
    streams = STREAMS[0]
    a.locator("#regenerate").click()  # and Regenerate works once the turn has ended
    deadline = time.monotonic() + 30
    while STREAMS[0] < streams + 2:  # both sides answered again
        assert time.monotonic() < deadline, "Regenerate did not run"
        time.sleep(0.05)
    wait_for_answers(a)
    assert answer_count(a, "baseline") == 1
    assert_page_answers_a_new_question(a, image)


def test_closing_the_searching_tab_frees_the_device_for_the_queued_one(tabs, gate, app, image, caplog):
    caplog.set_level(logging.INFO, logger="vtw_chat")  # a stop is logged at info level
    a, b = tabs
    hold_the_device_with_a_search(b)
    ask(a, "What is it?", image)
    wait_for_text(a, "#status", "Queued", 10_000)
    b.context.close()  # the other user leaves mid-search: the search is cancelled at its next sample
    assert_answers_once_free(a, gate, answers=1)
    assert any("K search was stopped" in record.getMessage() for record in caplog.records)
    assert_page_answers_a_new_question(a, image)


def test_stop_and_a_new_question_behind_another_tabs_benchmark(tabs, gate, image):
    a, b = tabs
    gate.set()  # B asks its own question first, at full speed
    ask(b, "What is it?", image)
    wait_for_answers(b)
    gate.clear()
    b.get_by_text("Timing: chart and benchmark").click()
    b.locator("#benchmark").click()
    assert REACHED.wait(30), "the benchmark never reached the device"
    ask(a, "What is it?", image)
    wait_for_text(a, "#status", "Queued: your question waits for the device (running now: a benchmark", 10_000)
    a.locator("#stop").click()
    wait_for_text(a, "#status", "Stopped while queued", 10_000)
    ask(a, "And its colour?")
    assert_answers_once_free(a, gate, answers=2)
    wait_for_text(b, "#benchmark-result", "runs per side", 30_000)


def test_a_question_behind_your_own_search_says_so_and_answers(tabs, gate, image):
    a, _ = tabs
    hold_the_device_with_a_search(a)
    assert "Queued" not in text_of(a, "#status")  # nothing waits: the search runs
    ask(a, "What is it?", image)
    wait_for_text(a, "#status", "Queued: your question waits for the device (running now: your K search", 10_000)
    assert_answers_once_free(a, gate, answers=1)
    wait_for_text(a, "#search-result", "K = ", 30_000)


@pytest.fixture()
def stops(monkeypatch):
    """Set each time the server has taken a Stop (it changes nothing on the page while only a search waits)."""
    taken = threading.Event()
    original = Sessions.fire

    def fire(self, session, event, ticket=None):
        step = original(self, session, event, ticket)
        if event is Event.STOP:
            taken.set()
        return step

    monkeypatch.setattr(Sessions, "fire", fire)
    return taken


def test_a_search_stopped_while_queued_stays_stopped_and_the_next_click_runs(tabs, gate, stops, caplog):
    """The chat's freeze, for Search K: a search queued behind another tab's, stopped, then asked again at another
    eta. The stopped search never runs and the new click's does, with its own eta. (With the ticket read when the
    job started and Gradio's "once", the stopped job ran with the new ticket and the old eta, and the new click's
    job was dropped.)"""
    caplog.set_level(logging.INFO, logger="vtw_chat")
    a, b = tabs
    hold_the_device_with_a_search(b)
    a.get_by_text("Search K (the").click()
    a.locator("#search-k").click()
    wait_for_text(a, "#status", "Queued: your request waits for the device (running now: a K search", 10_000)
    a.locator("#stop").click()
    assert stops.wait(10), "Stop never reached the server"
    eta = a.locator("#search-eta input")
    eta.fill("5")
    eta.press("Enter")
    a.locator("#search-k").click()  # queued too, behind B's search and the stopped one
    wait_for_text(a, "#status", "Queued: your request waits", 10_000)
    gate.set()
    wait_for_text(b, "#search-result", "K = ", 30_000)
    wait_for_text(a, "#search-result", "eta = 5 on", 60_000)  # the second click's search, with its own eta
    stopped = [record for record in caplog.records if "stopped before it started" in record.getMessage()]
    assert len(stopped) == 1 and stopped[0].levelname == "INFO"  # the first one never ran
    assert "refused" not in stopped[0].getMessage()
