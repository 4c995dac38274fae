"""The app served_app for real on a tiny model, driven through gradio_client."""

from __future__ import annotations

import pytest
from gradio_client import Client, handle_file
from PIL import Image

from vtw_core.generation.types import SamplingConfig
from vtw_core.models.prompts import user_message


@pytest.fixture()
def image_path(tmp_path, sample_images):
    path = tmp_path / "shape.png"
    sample_images[2].save(path)
    return path


def test_compare_api_equals_the_engine(served_app, image_path):
    manager, url = served_app
    client = Client(url, verbose=False)
    result = client.predict(handle_file(str(image_path)), "What colour is it?", 2, 6, api_name="/compare")
    messages, images = [user_message("What colour is it?")], [Image.open(image_path)]
    direct = {k: manager.generate(messages, images, k=k, sampling=SamplingConfig(6)) for k in (None, 2)}
    assert result["baseline"]["token_ids"] == direct[None].token_ids
    assert result["vtw"]["token_ids"] == direct[2].token_ids and result["vtw"]["k"] == 2
    assert result["vtw"]["stats"]["prefill_flops"] < result["baseline"]["stats"]["prefill_flops"]


def test_compare_api_reports_bad_input(served_app, tmp_path):
    _, url = served_app
    client = Client(url, verbose=False)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(Exception, match=r"notes\.png is not an image"):
        client.predict(handle_file(str(bad)), "What?", 2, 4, api_name="/compare")
    # The server keeps serving after a failed request.
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 40), "blue").save(good)
    assert client.predict(handle_file(str(good)), "What?", 4, 3, api_name="/compare")["vtw"]["k"] == 4


def test_only_the_documented_endpoints_are_public(served_app):
    _, url = served_app
    endpoints = Client(url, verbose=False).view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert "/compare" in endpoints
    assert not any(name.startswith(("/on_", "/lambda")) for name in endpoints)


def test_search_k_api_equals_the_library(served_app):
    from vtw_core.analysis.calibration import load_calibration
    from vtw_core.analysis.k_search import search_k

    manager, url = served_app
    result = Client(url, verbose=False).predict(0.003, api_name="/search_k")  # the rest: the page's defaults
    direct = search_k(manager.model, manager.processor, load_calibration("default"), eta=0.003)
    # The response says what it searched on: a real checkpoint's page calibrates on the bundled photos.
    assert {key: result[key] for key in ("eta", "criterion", "calibration", "samples")} == {
        "eta": 0.003, "criterion": "prompt", "calibration": "bundled", "samples": 20}  # fmt: skip
    assert result["k"] == direct.k and result["smallest_k_tried"] == 5
    assert [point["k"] for point in result["curve"]] == [k for k, _ in direct.curve] == [5, 6, 7]
    assert [point["kl"] for point in result["curve"]] == pytest.approx([kl for _, kl in direct.curve], rel=1e-5)


def test_the_api_page_example_sends_an_image_to_compare(served_app):
    _, url = served_app
    api = Client(url, verbose=False).view_api(print_info=False, return_format="dict")
    image = api["named_endpoints"]["/compare"]["parameters"][0]
    example = image["example_input"]
    assert example["path"].endswith((".png", ".jpg")) and not example["path"].endswith(".pdf")


def test_startup_prints_the_apps_own_public_link_switch(tiny_model_path):
    """`python app.py` names its --share switch, not Gradio's `launch(share=True)`, which its user cannot reach."""
    import os
    import subprocess
    import sys
    import threading
    from pathlib import Path

    from conftest import free_port

    port = free_port()
    command = [sys.executable, "app.py", "--model", str(tiny_model_path("llava", 8)), "--port", str(port)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).resolve().parent.parent
    process = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(180, process.kill)  # a hung start fails the test instead of blocking it
    timer.start()
    lines = []
    try:
        for line in process.stdout:
            lines.append(line)
            if "public link" in line.lower():  # ours, or Gradio's "To create a public link, set share=True"
                break
    finally:
        process.terminate()
        process.wait(timeout=30)
        timer.cancel()
    output = "".join(lines)
    assert f"http://127.0.0.1:{port}/" in output and "python app.py --share" in output, output
    assert "share=True" not in output
