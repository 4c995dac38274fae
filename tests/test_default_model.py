"""The embedded default model (a small LLaVA trained on easy-vqa) and its training script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vtw_core.defaults import DEFAULT_MODEL_DIR, require_model
from vtw_core.evaluate import evaluate_side, load_items
from vtw_core.manager import ModelManager

ROOT = Path(__file__).resolve().parent.parent
SUBSET = 200  # the first 200 questions of easy-vqa's test split


@pytest.fixture(scope="module")
def default_manager():
    return ModelManager.load(require_model(None), device="cpu")


def test_the_default_model_is_shipped_and_loads_offline(default_manager):
    assert require_model(None) == str(DEFAULT_MODEL_DIR)
    info = default_manager.info
    assert info.family == "llava" and info.num_layers >= 12
    assert sum(path.stat().st_size for path in DEFAULT_MODEL_DIR.iterdir()) < 25 * 2**20
    result = default_manager.generate
    assert callable(result)


def test_training_script_runs_a_few_steps(tmp_path):
    command = [
        sys.executable, str(ROOT / "scripts" / "train_default_model.py"), "--out", str(tmp_path / "m"),
        "--steps", "2", "--limit", "64", "--batch-size", "8", "--hidden", "32", "--layers", "2",
        "--vision-layers", "1", "--device", "cpu", "--threads", "1",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "saved to" in done.stdout
    manager = ModelManager.load(str(tmp_path / "m"), device="cpu")
    assert manager.info.num_layers == 2
    # The saved checkpoint answers through the full path (random-ish answers after 2 steps).
    assert evaluate_side(manager.model, manager.processor, load_items("easy-vqa", "test", 4), None).questions == 4
