"""Take the README's screenshot: the app on the default model, one easy-vqa question answered by both sides.

    python scripts/take_screenshot.py --out assets/screenshot.png

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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "assets" / "screenshot.png"))
    parser.add_argument("--model", default=None)
    parser.add_argument("--k", type=int, default=None, help="slider position (default: the model's half)")
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from app.ui import build_demo, launch_options
    from vtw_core.defaults import require_model
    from vtw_core.manager import ModelManager

    manager = ModelManager.load(require_model(args.model), device="cpu")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    demo = build_demo(manager)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options())
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector("#question textarea", timeout=30_000)
        if args.k is not None:
            page.locator("#k-slider input[type=number]").fill(str(args.k))
            page.locator("#k-slider input[type=number]").press("Enter")
        page.locator("#question input[type=file]").set_input_files(str(ROOT / "assets" / "examples" / "easyvqa-0.png"))
        page.wait_for_timeout(700)
        page.locator("#question textarea").fill("what is the red shape?")
        page.locator("#question textarea").press("Enter")
        page.wait_for_function(
            "() => document.querySelector('#summary').innerText.includes('answers')", timeout=120_000
        )
        page.wait_for_timeout(500)
        page.screenshot(path=args.out, full_page=False)
        browser.close()
    demo.close()
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
