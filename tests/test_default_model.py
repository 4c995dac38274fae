"""The embedded default model (a small LLaVA trained on easy-vqa, shipped in assets/) and its training script.

Thresholds are the measured values of the shipped weights minus a small margin (docs/default-model.md):
the first 200 test questions score 88.0% baseline and 87.0% with VTW at K = 8.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from vtw_core.defaults import DEFAULT_MODEL_DIR, require_model
from vtw_core.evaluate import auto_k, evaluate_side, load_items
from vtw_core.manager import ModelManager

SUBSET = 200  # the first 200 questions of easy-vqa's test split


@pytest.fixture(scope="module")
def manager():
    return ModelManager.load(require_model(None), device="cpu")


@pytest.fixture(scope="module")
def subset():
    return load_items("easy-vqa", "test", limit=SUBSET)


def test_the_default_model_is_shipped_and_loads_offline(manager):
    assert require_model(None) == str(DEFAULT_MODEL_DIR)
    assert manager.info.family == "llava" and manager.info.num_layers == 12
    assert manager.model.config.image_seq_length == 100
    assert sum(path.stat().st_size for path in DEFAULT_MODEL_DIR.iterdir()) < 25 * 2**20


def test_baseline_and_vtw_accuracy_on_200_test_questions(manager, subset):
    baseline = evaluate_side(manager.model, manager.processor, subset, None)
    vtw = evaluate_side(manager.model, manager.processor, subset, 8)
    assert baseline.accuracy >= 0.85
    assert vtw.accuracy >= baseline.accuracy - 0.02  # withdrawal after 8 of 12 layers keeps the answers
    assert vtw.prefill_flops < 0.75 * baseline.prefill_flops


def test_k_search_on_train_samples(manager):
    """The paper's criterion (KL at the last prompt position) cannot see this model's answers, which come after
    "It is a" / "The shape is": it accepts the first K tried. KL over the reply finds the layer that matters."""
    at_prompt = auto_k(manager.model, manager.processor, over="prompt")
    assert at_prompt.k == 5 and all(kl < at_prompt.eta for _, kl in at_prompt.curve)
    over_reply = auto_k(manager.model, manager.processor, over="reply")
    assert over_reply.k is not None and 7 <= over_reply.k <= 9  # <= 0.75 N


def test_training_script_runs_a_few_steps(tmp_path):
    command = [
        sys.executable, "-m", "vtw_core.train_default", "--out", str(tmp_path / "m"), "--max-steps", "2",
        "--limit-images", "8", "--batch-images", "4", "--hidden", "32", "--layers", "2", "--vision-hidden", "32",
        "--vision-layers", "1",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    trained = ModelManager.load(str(tmp_path / "m"), device="cpu")
    assert trained.info.num_layers == 2
    result = evaluate_side(trained.model, trained.processor, load_items("easy-vqa", "test", limit=4), None)
    assert result.questions == 4
