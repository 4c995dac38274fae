"""The embedded default model (a small LLaVA trained on easy-vqa, shipped in assets/) and its training script.

The thresholds are the targets the model was built to, not measurements, on the first 200 test questions: the
baseline answers >= 99.5%; VTW at the shipped K (saved in vtw.json) within 0.3 points of it; K <= N/2; and the
paper's own criterion (KL at the last prompt position, eta 0.003, 20 train questions) picks the shipped K. Asked
as chats of 3 questions about one image (the model's own replies in the history): on the full split every turn
>= 99% and VTW within 0.5 points of the baseline; on the 59 chats here at most one wrong reply per turn and VTW
no more than one below the baseline.
Measured values, on the full test split, are in docs/default-model.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vtw_core.analysis.k_search import search_k
from vtw_core.benchmarks.evaluate import (
    auto_k,
    conversations_of,
    evaluate_side,
    evaluate_turns,
    load_items,
    train_calibration,
)
from vtw_core.generation.generate import generate_batch
from vtw_core.generation.manager import ModelManager
from vtw_core.models.defaults import DEFAULT_MODEL_DIR, require_model
from vtw_core.models.images import load_image
from vtw_core.models.prompts import user_message

SUBSET = 200  # the first 200 questions of easy-vqa's test split


@pytest.fixture(scope="module")
def manager():
    return ModelManager.load(require_model(None), device="cpu")


@pytest.fixture(scope="module")
def subset():
    return load_items("easy-vqa", "test", limit=SUBSET)


def test_the_default_model_is_shipped_and_loads_offline(manager):
    assert require_model(None) == str(DEFAULT_MODEL_DIR)
    assert manager.info.family == "llava" and manager.info.num_layers >= 16
    assert manager.model.config.image_seq_length == 576  # a 24x24 grid, as LLaVA-1.5
    assert sum(path.stat().st_size for path in DEFAULT_MODEL_DIR.iterdir()) < 40 * 2**20


def test_baseline_and_vtw_accuracy_on_200_test_questions(manager, subset):
    k = manager.info.searched_k
    assert k is not None and k <= manager.info.num_layers // 2
    baseline = evaluate_side(manager.model, manager.processor, subset, None)
    vtw = evaluate_side(manager.model, manager.processor, subset, k)
    assert baseline.accuracy >= 0.995
    assert vtw.accuracy >= baseline.accuracy - 0.003
    assert vtw.prefill_flops < (k + 1) / manager.info.num_layers * baseline.prefill_flops


def test_follow_up_questions_are_answered_as_well_as_the_first(manager, subset):
    """The app's chat: 3 questions about one image in one conversation, the model's own replies in the history
    (59 chats from the first 200 test questions). v3, trained on single questions, answered 27 and 16 of these
    59 follow-ups right (baseline; 25 and 18 with VTW at K = 5); under VTW the follow-up's tokens see the image
    only in the first K layers."""
    chats = conversations_of(subset, 3)
    assert len(chats) == 59
    k = manager.info.searched_k
    baseline = evaluate_turns(manager.model, manager.processor, chats, None)
    vtw = evaluate_turns(manager.model, manager.processor, chats, k)
    for turn in range(3):  # 58 of 59 is 98.3%: one reply is the resolution here (the full split's: docs)
        assert baseline[turn].correct >= 58, (turn + 1, baseline[turn])
        assert vtw[turn].correct >= baseline[turn].correct - 1, (turn + 1, vtw[turn])


def test_shared_image_prefill_gives_the_full_prefills_replies(manager, subset):
    """The evaluation above runs each image's prefix once for its questions (vtw_core.engine.shared_prefill): on the
    trained weights, the first image's questions get the same replies as with every prefill in full."""
    questions = [item for item in subset if item.image == subset[0].image]
    assert len(questions) > 5
    conversations = [[user_message(item.question, 1)] for item in questions]
    images = [[load_image(item.image)] for item in questions]
    for k in (None, manager.info.searched_k):
        replies = {
            engine: generate_batch(manager.model, manager.processor, conversations, images, k=k, prefill_engine=engine)
            for engine in ("plain", "shared")
        }
        assert replies["shared"] == replies["plain"]


def test_the_papers_criterion_picks_the_shipped_k(manager):
    """KL at the last prompt position, eta 0.003, 20 train questions (the paper's Algorithm 1): the reply's
    first word is read off the image, so that position sees whether the image has reached the text."""
    at_prompt = auto_k(manager.model, manager.processor, over="prompt")
    assert at_prompt.eta == 0.003
    assert at_prompt.k == manager.info.searched_k
    # The criterion is not blind (it was on the first default model, < 3e-6 at every K): withdrawn after
    # layer 2, the image has not reached the text and the first reply word is a guess.
    early = search_k(manager.model, manager.processor, train_calibration(20), eta=0.003, start=2)
    assert dict(early.curve)[2] > 100 * at_prompt.eta


def test_training_script_runs_a_few_steps_and_is_reproducible(tmp_path):
    """Two tiny runs of the real script (the tower stage, one step on sampled vision tokens, one on all of them,
    both withdrawing at K = 1) give bit-identical weights: the recipe is seeded."""

    def run(out, *extra):
        command = [
            sys.executable, "-m", "vtw_core.training.train_default", "--out", str(out), "--max-steps", "2", "--epochs",
            "0.5", "--limit-images", "8", "--batch-images", "4", "--hidden", "32", "--layers", "2",
            "--vision-hidden", "32", "--vision-layers", "1", "--withdraw-layers", "1", "1", "--withdraw-share", "1",
            *extra,
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "step 2/2" in done.stdout
        # Every vision token first (stage 1), then end to end; a fine-tune (--init) starts end to end.
        assert ("vision 1b step" in done.stdout) == ("--init" not in extra)
        return done

    run(tmp_path / "m")
    run(tmp_path / "again")
    weights = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("m", "again")]
    assert weights[0] == weights[1]
    summary = json.loads((tmp_path / "m" / "training.json").read_text())
    assert summary["sampled_steps"] == 1 and summary["steps"] == 2
    # The conversation fine-tune (v4's recipe on the tiny model): every row a chat, seeded as well.
    tune = ("--init", str(tmp_path / "m"), "--conversation-share", "1", "--max-turns", "3")
    run(tmp_path / "chat", *tune)
    run(tmp_path / "chat-again", *tune)
    tuned = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("chat", "chat-again")]
    assert tuned[0] == tuned[1] and tuned[0] != weights[0]
    tuned_summary = json.loads((tmp_path / "chat" / "training.json").read_text())
    assert tuned_summary["init"] == str(tmp_path / "m") and tuned_summary["init_training"] == summary
    assert tuned_summary["conversation_share"] == 1 and tuned_summary["token_epochs"] == 0
    trained = ModelManager.load(str(tmp_path / "m"), device="cpu")
    assert trained.info.num_layers == 2 and trained.model.config.image_seq_length == 576
    result = evaluate_side(trained.model, trained.processor, load_items("easy-vqa", "test", limit=4), None)
    assert result.questions == 4
