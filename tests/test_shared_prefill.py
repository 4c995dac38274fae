"""One image prefill shared by several questions: against the full prefill, stock transformers and fallbacks."""

from __future__ import annotations

import pytest
import torch

from vtw_core.benchmarks.evaluate import batches
from vtw_core.engine.decoder import TokenState, extend, prefill, run_decoder, withdrawal_selector
from vtw_core.engine.embed import embed_prompt
from vtw_core.engine.schedules import Schedule
from vtw_core.engine.shared_prefill import shared_prefix_length
from vtw_core.generation.generate import _prefill, generate_batch, method_selector, prompt_inputs_within_context
from vtw_core.generation.manager import ModelManager
from vtw_core.generation.types import SamplingConfig
from vtw_core.models.prompts import user_message
from vtw_core.training.easyvqa import VQAItem

# Different lengths (the chunk after the prefix is padded), two that tokenise alike up to their last words.
QUESTIONS = ["What shape is it?", "Is there a red circle in the image?", "Colour?", "What colour is the shape?"]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def manager(request, tiny_model_path):
    return ModelManager.load(str(tiny_model_path("llava", 6)), device="cpu", attention=request.param)


def _inputs(manager, questions, images):
    conversations = [[user_message(question, 1)] for question in questions]
    return prompt_inputs_within_context(
        manager.model, manager.processor, conversations, [[image] for image in images], SamplingConfig()
    )


@pytest.mark.parametrize("k", [None, 1, 3])
def test_shared_prefill_equals_the_full_prefill(manager, sample_images, k):
    """Logits, tokens per layer and every decode step after it agree with the full pass (float32 rounding)."""
    inputs = _inputs(manager, QUESTIONS, [sample_images[0]] * len(QUESTIONS))
    full_logits, full_state, _ = _prefill(
        manager.model, inputs, method_selector(manager.model, k, None), "original", "plain"
    )
    logits, state, ran = _prefill(manager.model, inputs, method_selector(manager.model, k, None), "original", "shared")
    assert ran == "shared"
    torch.testing.assert_close(logits, full_logits, rtol=0, atol=1e-5)
    assert [c.tolist() for c in state.prompt_tokens_per_layer] == [
        c.tolist() for c in full_state.prompt_tokens_per_layer
    ]
    # Under VTW the deep layers cache the prefix's text tokens and each question, never a vision token.
    if k is not None:
        assert state.cache_lengths()[-1] < full_state.cache_lengths()[0]
    conversations = [[user_message(question, 1)] for question in QUESTIONS]
    images = [[sample_images[0]]] * len(QUESTIONS)
    sampling = SamplingConfig(max_new_tokens=6)
    for engine in ("plain", "static"):
        shared = generate_batch(manager.model, manager.processor, conversations, images, k=k, sampling=sampling,
                                engine=engine, prefill_engine="shared")  # fmt: skip
        full = generate_batch(manager.model, manager.processor, conversations, images, k=k, sampling=sampling,
                              engine=engine)  # fmt: skip
        assert shared == full


def test_shared_baseline_equals_stock_forward_of_each_question_alone(manager, sample_images):
    """An independent reference: the stock model's own forward on each unpadded prompt, last position."""
    inputs = _inputs(manager, QUESTIONS, [sample_images[1]] * len(QUESTIONS))
    logits, _, ran = _prefill(manager.model, inputs, None, "original", "shared")
    assert ran == "shared"
    for row, question in enumerate(QUESTIONS):
        alone = _inputs(manager, [question], [sample_images[1]])
        with torch.no_grad():
            stock = manager.model(**alone).logits[:, -1].float()
        torch.testing.assert_close(logits[row : row + 1], stock, rtol=0, atol=1e-5)


def test_extend_after_a_prefix_equals_one_prefill_without_padding(manager, sample_images):
    """A chunk with no padding takes an explicit causal mask: sdpa's own causal flag would align the chunk's
    queries with the first cached keys."""
    prompt = embed_prompt(manager.model, _inputs(manager, [QUESTIONS[1]], [sample_images[2]]))
    selector = withdrawal_selector(2, 6)
    full_logits, _ = prefill(manager.model, prompt, selector)
    split = int(prompt.vision_mask[0].nonzero().max()) + 2  # the image and one text token after it
    tokens = TokenState(torch.arange(split)[None], prompt.attention_mask[:, :split], prompt.vision_mask[:, :split],
                        prompt.position_ids[:, :split])  # fmt: skip
    _, state = run_decoder(manager.model, prompt.inputs_embeds[:, :split], tokens, selector=selector)
    rest = prompt.inputs_embeds[:, split:]
    logits = extend(manager.model, state, rest, torch.ones(rest.shape[:2], dtype=torch.bool))
    torch.testing.assert_close(logits, full_logits, rtol=0, atol=1e-5)


def test_what_cannot_share_falls_back_to_the_plain_prefill_and_says_why(manager, sample_images):
    model = manager.model
    fastv = method_selector(model, None, Schedule.fastv(2, 0.5, 6))
    cases = [
        (_inputs(manager, QUESTIONS[:2], sample_images[:2]), None, "rows with different images"),
        (_inputs(manager, QUESTIONS[:1], sample_images[:1]), None, "one row"),
        (_inputs(manager, QUESTIONS[:2], [sample_images[0]] * 2), fastv, "a question-dependent selector"),
    ]  # fmt: skip
    for inputs, selector, reason in cases:
        logits, _, ran = _prefill(model, inputs, selector, "original", "shared")
        plain, _, _ = _prefill(model, inputs, selector, "original", "plain")
        assert ran == f"plain (no shared image prefill: {reason})"
        assert torch.equal(logits, plain)
    inputs = _inputs(manager, QUESTIONS[:2], [sample_images[0]] * 2)
    _, _, ran = _prefill(model, inputs, withdrawal_selector(2, 6), "rearrange", "shared")
    assert ran == "plain (no shared image prefill: position_mode 'rearrange')"


def test_shared_prefix_length_holds_the_image_and_leaves_each_row_a_token():
    vision_id = 9
    rows = [[0, 0, 1, 5, 9, 9, 7, 3, 4], [0, 1, 5, 9, 9, 7, 3, 8, 8], [1, 5, 9, 9, 7, 3, 4, 6, 2]]
    ids = torch.tensor(rows)
    valid = torch.tensor([[False, False] + [True] * 7, [False] + [True] * 8, [True] * 9])
    assert shared_prefix_length(ids, valid, (ids == vision_id) & valid) == 6  # 1 5 9 9 7 3: where the rows part
    same = torch.tensor([[1, 9, 9, 7, 3]] * 2)
    ones = torch.ones_like(same, dtype=torch.bool)
    assert shared_prefix_length(same, ones, same == vision_id) == 4  # identical rows: all but the last token
    image_last = torch.tensor([[1, 9, 9, 3], [1, 9, 9, 4]])
    assert shared_prefix_length(image_last, torch.ones_like(image_last, dtype=torch.bool), image_last == vision_id) == 0
    different_images_place = torch.tensor([[1, 9, 9, 7, 3], [1, 7, 9, 9, 3]])
    assert shared_prefix_length(different_images_place, torch.ones_like(different_images_place, dtype=torch.bool),
                                different_images_place == vision_id) == 0  # fmt: skip


def test_evaluation_batches_never_mix_images_when_sharing():
    items = [VQAItem(image, f"q{i}", "a") for i, image in enumerate("aaaabbcaa")]
    assert [[item.image for item in batch] for batch in batches(items, 3, by_image=True)] == [
        ["a", "a", "a"], ["a"], ["b", "b"], ["c"], ["a", "a"]
    ]  # fmt: skip
    assert [len(batch) for batch in batches(items, 4, by_image=False)] == [4, 4, 1]
