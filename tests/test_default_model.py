"""The embedded default model (a small LLaVA trained on easy-vqa, shipped in assets/) and its training script.

The thresholds are the issue's targets, not measurements: >= 93% on the first 200 test questions, baseline
and with VTW at the K that the reply-level KL search picks on train questions (saved in vtw.json).
Measured values are in docs/default-model.md.
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
    k = manager.info.searched_k
    assert k is not None and k <= 0.75 * manager.info.num_layers  # the target; 9 of 12 when shipped
    baseline = evaluate_side(manager.model, manager.processor, subset, None)
    vtw = evaluate_side(manager.model, manager.processor, subset, k)
    assert baseline.accuracy >= 0.93
    assert vtw.accuracy >= 0.93
    assert vtw.prefill_flops < (k + 1) / manager.info.num_layers * baseline.prefill_flops


def test_k_search_on_train_samples(manager):
    """The reply-level KL search on train questions reproduces the K saved beside the weights. The paper's
    criterion (KL at the last prompt position) is blind here: the first reply words ("It is a", "The shape is",
    "Is it") follow from the question alone, so it accepts a K that the reply-level search rejects."""
    over_reply = auto_k(manager.model, manager.processor, over="reply")
    assert over_reply.k == manager.info.searched_k
    at_prompt = auto_k(manager.model, manager.processor, over="prompt")
    assert at_prompt.k is not None and at_prompt.k < over_reply.k
    reply_kl = dict(over_reply.curve)
    assert reply_kl[at_prompt.k] > over_reply.eta  # what the prompt criterion accepts, the reply KL rejects


def test_training_script_runs_a_few_steps(tmp_path):
    command = [
        sys.executable, "-m", "vtw_core.train_default", "--out", str(tmp_path / "m"), "--max-steps", "2",
        "--limit-images", "8", "--batch-images", "4", "--hidden", "32", "--layers", "2", "--vision-hidden", "32",
        "--vision-layers", "1",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "vision step" in done.stdout and "vision 1b step" in done.stdout  # stage 1, then 1b (every token)
    trained = ModelManager.load(str(tmp_path / "m"), device="cpu")
    assert trained.info.num_layers == 2
    result = evaluate_side(trained.model, trained.processor, load_items("easy-vqa", "test", limit=4), None)
    assert result.questions == 4
