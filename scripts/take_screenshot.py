"""Take the README's screenshots: the app on the default model, one easy-vqa question answered by both sides.

    python scripts/take_screenshot.py  # assets/screenshot.png (1280x800) and assets/screenshot-mobile.png (390x844)

Needs Debian's Chromium (`apt-get install chromium`) and the `playwright` package (requirements-dev.txt).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
VIEWPORTS = {"desktop": (1280, 800), "mobile": (390, 844)}


def answer_one_question(page, url: str, k: int | None) -> None:
    """Open the page, optionally move K, ask the first easy-vqa example and wait for both answers."""
    page.goto(url)
    page.wait_for_selector("#question textarea", timeout=30_000)
    if k is not None:
        page.locator("#k-slider input[type=number]").fill(str(k))
        page.locator("#k-slider input[type=number]").press("Enter")
    page.locator("#question input[type=file]").set_input_files(str(ROOT / "assets" / "examples" / "easyvqa-0.png"))
    page.wait_for_timeout(700)  # the upload finishes before the question is sent
    page.locator("#question textarea").fill("what is the red shape?")
    page.locator("#question textarea").press("Enter")
    page.wait_for_function(
        "() => /identical|different/.test(document.querySelector('#summary').innerText)", timeout=120_000
    )
    page.wait_for_timeout(500)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "assets" / "screenshot.png"), help="the desktop screenshot")
    parser.add_argument("--mobile-out", default=str(ROOT / "assets" / "screenshot-mobile.png"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--k", type=int, default=None, help="slider position (default: the model's own K)")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from app.ui import build_demo, launch_options
    from vtw_core.generation.manager import ModelManager
    from vtw_core.models.defaults import require_model

    manager = ModelManager.load(require_model(args.model), device="cpu")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo = build_demo(manager)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options())
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    outputs = {"desktop": args.out, "mobile": args.mobile_out}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox"])
        for name, (width, height) in VIEWPORTS.items():
            page = browser.new_page(viewport={"width": width, "height": height}, device_scale_factor=1)
            answer_one_question(page, f"http://127.0.0.1:{port}/", args.k)
            page.screenshot(path=outputs[name], full_page=False)  # what a visitor sees without scrolling
            page.close()
            print(f"saved {outputs[name]} ({width}x{height})")
        browser.close()
    demo.close()


if __name__ == "__main__":
    main()
