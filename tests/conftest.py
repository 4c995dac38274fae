"""Shared fixtures: tiny offline checkpoints (built once per session) and small synthetic images."""

from __future__ import annotations

import os
import socket

# Set before transformers reads them: every test must pass without network access to a model hub, and any
# accidental hub lookup should fail loudly instead of downloading.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Tiny models gain nothing from threads, and on a shared 2-core machine two OpenMP threads can stall each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Read once, when Ray is first imported (by whichever test file is collected first): a local cluster's every
# process on 127.0.0.1 rather than on the machine's network address, and no usage report.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"

from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from vtw_core.testing.tiny import build_tiny_model

# The longest test files first, longest to shortest (0.5-4 minutes each on one core, from pytest --durations),
# handed to the parallel workers as they free up (pytest-xdist, one file per worker at a time,
# `--no-loadscope-reorder`): the workers then finish close together instead of one starting a long file last.
SLOWEST_FIRST = (
    "test_tuned_kernels.py",
    "test_default_model.py",
    "test_lmms_eval.py",
    "test_app_browser.py",
    "test_serve_ray_cluster.py",
    "test_app_tabs.py",
    "test_compiled_prefill.py",
    "test_serve_ray.py",
    "test_compiled_decode.py",
    "test_hardening.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SLOWEST_FIRST.index(name) if name in SLOWEST_FIRST else len(SLOWEST_FIRST)

    items.sort(key=rank)  # stable: the order within each file and among the other files is kept


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: `tiny_model_path(family, num_layers=4)` -> folder of a saved tiny checkpoint, built once per session."""
    built: dict[tuple[str, int], Path] = {}

    def get(family: str, num_layers: int = 4) -> Path:
        key = (family, num_layers)
        if key not in built:
            folder = tmp_path_factory.mktemp(f"tiny-{family}-{num_layers}")
            built[key] = build_tiny_model(family, folder, num_layers=num_layers)
        return built[key]

    return get


def _shape_image(size: tuple[int, int], background: str, shape: str, colour: str) -> Image.Image:
    width, height = size
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    box = (width // 6, height // 6, width - width // 6, height - height // 6)
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(width // 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=colour)
    return image


@pytest.fixture(scope="session")
def sample_images() -> list[Image.Image]:
    """Three small PIL images of different sizes and aspect ratios: 64x64, 48 wide x 80 high, 96 wide x 64 high."""
    return [
        _shape_image((64, 64), "white", "circle", "red"),
        _shape_image((48, 80), "black", "square", "blue"),
        _shape_image((96, 64), "yellow", "triangle", "green"),
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served_app(tiny_model_path):
    """The app on a tiny 8-layer LLaVA, served on a free local port: (manager, url). One per test module.

    Eight layers, so the K search (K from 5 to N-1) has candidates.
    """
    from app.ui import build_demo, launch_options
    from vtw_core.generation.manager import ModelManager

    manager = ModelManager.load(str(tiny_model_path("llava", 8)), device="cpu")
    demo = build_demo(manager)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **launch_options())
    yield manager, f"http://127.0.0.1:{port}/"
    demo.close()
