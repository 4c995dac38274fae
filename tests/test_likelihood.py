"""Continuation log-likelihoods through the engine against independent references on tiny checkpoints."""

from __future__ import annotations

import pytest
import torch

from vtw_core.engine.decoder import Withdrawal, prefill
from vtw_core.engine.embed import embed_prompt
from vtw_core.errors import InputError
from vtw_core.generation.likelihood import continuation_logprobs
from vtw_core.generation.manager import ModelManager
from vtw_core.generation.types import GenerationStats
from vtw_core.models.prompts import build_model_inputs, user_message


@pytest.fixture(scope="module")
def manager(tiny_model_path):
    torch.manual_seed(0)
    return ModelManager.load(str(tiny_model_path("llava", 6)), device="cpu", attention="eager")


def _with_continuation(inputs: dict, ids: list[int]) -> dict:
    extra = torch.tensor([ids], dtype=torch.long)
    joined = dict(inputs)
    joined["input_ids"] = torch.cat([inputs["input_ids"], extra], dim=1)
    joined["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(extra)], dim=1)
    return joined


def _reference_stock(model, inputs: dict, ids: list[int]) -> tuple[float, bool]:
    """The stock transformers forward over prompt + continuation, log-softmax at the continuation positions."""
    with torch.no_grad():
        logits = model(**_with_continuation(inputs, ids)).logits[0].float()
    start = inputs["input_ids"].shape[1] - 1
    rows = logits[start : start + len(ids)]
    log_probs = torch.log_softmax(rows, -1)[torch.arange(len(ids)), torch.tensor(ids)]
    return float(log_probs.sum()), bool((rows.argmax(-1) == torch.tensor(ids)).all())


def _reference_prefixes(model, inputs: dict, ids: list[int], k: int) -> float:
    """VTW at K with one engine prefill per prefix of the continuation (no decode steps at all)."""
    total = 0.0
    for i, token in enumerate(ids):
        logits, _ = prefill(model, embed_prompt(model, _with_continuation(inputs, ids[:i])), Withdrawal(k))
        total += float(torch.log_softmax(logits[0].float(), -1)[token])
    return total


def test_baseline_equals_stock_forward(manager, sample_images):
    model, processor = manager.model, manager.processor
    conversations = [[user_message("What shape is this?", 1)], [user_message("Colour?", 1)]]
    images = [[sample_images[0]], [sample_images[1]]]
    continuations = [[40, 41, 42], [50]]
    got = continuation_logprobs(model, processor, conversations, images, continuations)
    for row in range(2):
        inputs = build_model_inputs(processor, [conversations[row]], [images[row]], "cpu", model.dtype)
        reference, greedy = _reference_stock(model, inputs, continuations[row])
        assert got[row][0] == pytest.approx(reference, abs=1e-4)
        assert got[row][1] == greedy


def test_greedy_flag_on_the_models_own_reply(manager, sample_images):
    model, processor = manager.model, manager.processor
    conversation = [user_message("What is it?", 1)]
    inputs = build_model_inputs(processor, [conversation], [[sample_images[2]]], "cpu", model.dtype)
    with torch.no_grad():
        reply = model.generate(**inputs, max_new_tokens=3, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    ids = reply.tolist()
    assert continuation_logprobs(model, processor, [conversation], [[sample_images[2]]], [ids])[0][1] is True
    other = [(ids[0] + 1) % model.config.get_text_config().vocab_size, *ids[1:]]
    assert continuation_logprobs(model, processor, [conversation], [[sample_images[2]]], [other])[0][1] is False


@pytest.mark.parametrize("k", [0, 2, 5])
def test_vtw_equals_prefix_prefills(manager, sample_images, k):
    model, processor = manager.model, manager.processor
    conversation = [user_message("Is it red?", 1)]
    ids = [33, 34, 35, 36]
    stats = GenerationStats(k=k, num_layers=6)
    got = continuation_logprobs(model, processor, [conversation], [[sample_images[0]]], [ids], k=k, stats=stats)
    inputs = build_model_inputs(processor, [conversation], [[sample_images[0]]], "cpu", model.dtype)
    assert got[0][0] == pytest.approx(_reference_prefixes(model, inputs, ids, k), abs=1e-4)
    baseline = continuation_logprobs(model, processor, [conversation], [[sample_images[0]]], [ids])
    assert got[0][0] != pytest.approx(baseline[0][0], abs=1e-6)  # withdrawing vision changes the numbers
    assert stats.prefill_flops_per_row[0] == stats.prefill_flops > 0
    assert stats.decode_flops > 0


def test_empty_continuation_is_refused(manager, sample_images):
    with pytest.raises(InputError, match="at least one token"):
        continuation_logprobs(manager.model, manager.processor, [[user_message("Hi?", 1)]], [[sample_images[0]]], [[]])
