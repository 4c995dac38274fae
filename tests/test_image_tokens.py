"""LLaVA-1.5's image placeholders repeated in token ids (vtw_core.models.image_tokens): the same tensors as the stock
processor, for every batch shape, and the stock path wherever that cannot be vouched for."""

from __future__ import annotations

import pytest
import torch

from vtw_core.errors import InputError
from vtw_core.models import image_tokens
from vtw_core.models.defaults import default_model
from vtw_core.models.processors import load_processor
from vtw_core.models.prompts import (
    assistant_message,
    build_model_inputs,
    processor_images,
    render_prompt,
    user_message,
)


def batches(images):
    """Batches of conversations with their images: one, left-padded rows of different lengths, a row without
    an image, two images in one question, a follow-up after an answer."""
    one = [user_message("What shape is in the image?")]
    follow_up = [user_message("What is it?"), assistant_message("A red circle."), user_message("And its colour?", 0)]
    two = [user_message("Compare them.", num_images=2)]
    plain = [user_message("Say hello", num_images=0)]
    return [
        ([one], [images[:1]]),
        ([one, follow_up, plain, two], [images[:1], images[1:2], [], images[1:3]]),
        ([one] * 8, [images[:1]] * 8),
    ]


def stock(processor, conversations, images):
    prompts = [render_prompt(processor, messages) for messages in conversations]
    batch = image_tokens.stock_inputs(processor, prompts, processor_images(processor, images))
    return {name: value for name, value in batch.items() if isinstance(value, torch.Tensor)}


def check_equal(processor, conversations, images):
    expected = stock(processor, conversations, images)
    for _ in range(2):  # the first batch of a processor learns the expansion, the next ones use it
        ours = build_model_inputs(processor, conversations, images, "cpu", torch.float32)
        assert set(ours) == set(expected)
        for name, value in expected.items():
            assert ours[name].dtype == value.dtype and torch.equal(ours[name], value), name


def test_a_tiny_llava_processor_gives_the_stock_tensors(tiny_model_path, sample_images):
    processor = load_processor(tiny_model_path("llava"))
    for conversations, images in batches(sample_images):
        check_equal(processor, conversations, images)
    one_image = stock(processor, *batches(sample_images)[0])["input_ids"]
    placeholders = int((one_image == processor.image_token_id).sum())
    assert placeholders > 1
    assert list(image_tokens._learned[processor].values()) == [placeholders]  # in use, not the stock path


@pytest.mark.skipif(default_model() is None, reason="the embedded default model is not in this checkout")
def test_the_default_models_processor_repeats_576_placeholders(sample_images):
    processor = load_processor(default_model())
    for conversations, images in batches(sample_images):
        check_equal(processor, conversations, images)
    assert image_tokens._learned[processor] == {(3, 72, 72): 576}


def test_a_placeholder_without_its_image_is_refused_as_before(tiny_model_path, sample_images):
    processor = load_processor(tiny_model_path("llava"))
    check_equal(processor, *batches(sample_images)[0])  # learned
    prompts = [render_prompt(processor, [user_message("What is it?", num_images=2)])]
    with pytest.raises(ValueError):  # the stock processor's own error, as without the expansion
        image_tokens.expanded_image_inputs(processor, prompts, sample_images[:1])


def test_a_processor_whose_tensors_differ_keeps_the_stock_path(tiny_model_path, sample_images):
    """A LLaVA processor that adds a tensor of its own: the expansion cannot vouch for it, so it is never used."""
    processor = load_processor(tiny_model_path("llava"))
    calls = []
    original = type(processor).__call__

    class LlavaProcessor(type(processor)):  # the name the expansion looks for
        def __call__(self, *args, **kwargs):
            calls.append(1)
            batch = original(self, *args, **kwargs)
            batch["extra"] = torch.zeros(1)
            return batch

    pixels = []
    image_processor = processor.image_processor
    original_pixels = type(image_processor).__call__

    class CountedImageProcessor(type(image_processor)):
        def __call__(self, *args, **kwargs):
            pixels.append(1)
            return original_pixels(self, *args, **kwargs)

    processor.__class__ = LlavaProcessor
    image_processor.__class__ = CountedImageProcessor
    conversations, images = batches(sample_images)[1]
    for _ in range(3):
        inputs = build_model_inputs(processor, conversations, images, "cpu", torch.float32)
        assert "extra" in inputs
    assert len(calls) == 3  # the stock processor ran every time
    assert list(image_tokens._learned[processor].values()) == [None]
    assert len(pixels) == 4  # both ways for the first batch only; then the processor's own preprocessing alone


def test_other_processors_are_not_touched(tiny_model_path, sample_images):
    processor = load_processor(tiny_model_path("llava_next"))
    check_equal(processor, *batches(sample_images)[1])
    assert processor not in image_tokens._learned


def test_a_prompt_beyond_the_images_still_gets_a_clear_message(tiny_model_path, sample_images):
    processor = load_processor(tiny_model_path("llava"))
    with pytest.raises(InputError, match="image slot"):
        build_model_inputs(processor, [[user_message("What is it?", num_images=2)]], [sample_images[:1]], "cpu",
                           torch.float32)  # fmt: skip
