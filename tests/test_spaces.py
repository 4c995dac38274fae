"""ZeroGPU: with `spaces` installed, the app imports and its spaces.GPU-wrapped calls run outside a Space."""

from __future__ import annotations

import importlib

from app import gpu


def test_spaces_is_installed_and_used():
    spaces = importlib.import_module("spaces")  # the test environment installs it, as ZeroGPU Spaces have it
    assert callable(spaces.GPU)
    importlib.import_module("app.ui")  # the app imports with spaces present


def test_wrapped_functions_and_generators_run_outside_a_space(monkeypatch):
    spaces = importlib.import_module("spaces")
    calls = []
    real_gpu = spaces.GPU

    def recording_gpu(*args, **kwargs):
        calls.append(kwargs)
        return real_gpu(*args, **kwargs)

    monkeypatch.setattr(spaces, "GPU", recording_gpu)

    @gpu.on_gpu
    def add(a: int, b: int) -> int:
        return a + b

    @gpu.on_gpu
    def count(n: int):
        yield from range(n)

    assert calls == [{"duration": gpu.GPU_SECONDS}] * 2  # both went through spaces.GPU
    assert add(2, 3) == 5
    assert list(count(3)) == [0, 1, 2]


def test_the_served_app_answers_through_the_wrapped_calls(served_app, tmp_path):
    """build_demo wraps every device call with spaces.GPU; /compare runs through one of them."""
    from gradio_client import Client, handle_file
    from PIL import Image

    _, url = served_app
    image = tmp_path / "red.png"
    Image.new("RGB", (48, 48), "red").save(image)
    result = Client(url, verbose=False).predict(handle_file(str(image)), "What colour?", 2, 3, api_name="/compare")
    assert result["vtw"]["k"] == 2 and result["baseline"]["token_ids"]
