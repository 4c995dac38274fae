"""Prompts prepared one by one (`prepare_prompt`, as the server does while the device is busy) and joined later
(`collate_prompts`) give the very tensors the processor makes of the whole batch, for every family; and an engine
call fed prepared prompts answers as one that runs the processor itself."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vtw_core.generation.manager import ModelManager
from vtw_core.generation.types import SamplingConfig
from vtw_core.models.defaults import default_model
from vtw_core.models.prompts import (
    assistant_message,
    build_model_inputs,
    collate_prompts,
    prepare_prompt,
    user_message,
)
from vtw_core.testing.tiny import SUPPORTED_TINY_FAMILIES, build_tiny_processor


def batch_rows():
    """Rows of different lengths, image counts and image sizes (one image each, so every family can take them)."""
    wide, tall = Image.new("RGB", (96, 40), "red"), Image.new("RGB", (36, 80), "blue")
    return [
        ([user_message("What is it?")], [wide]),
        ([user_message("What is it?"), assistant_message("A red bar."), user_message("And this one, in detail?")],
         [wide, tall]),
        ([user_message("Colour?")], [tall]),
    ]  # fmt: skip


def assert_same_tensors(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("family", list(SUPPORTED_TINY_FAMILIES))
def test_collated_rows_equal_the_processors_batch(family):
    processor = build_tiny_processor(family)
    rows = batch_rows()
    conversations, images = [messages for messages, _ in rows], [list(pictures) for _, pictures in rows]
    try:
        expected = build_model_inputs(processor, conversations, images, "cpu", torch.bfloat16)
    except Exception:  # a family whose processor cannot batch these rows at all: one row each, then
        rows = rows[:1] * 2
        conversations, images = [messages for messages, _ in rows], [list(pictures) for _, pictures in rows]
        expected = build_model_inputs(processor, conversations, images, "cpu", torch.bfloat16)
    prepared = [prepare_prompt(processor, messages, pictures, torch.bfloat16) for messages, pictures in rows]
    lengths = {row["input_ids"].shape[1] for row in prepared}
    try:
        got = collate_prompts(processor, prepared)
    except ValueError:  # allowed (the engine then runs the processor on the batch), but never for LLaVA's shapes
        assert family not in ("llava", "qwen2_vl"), family
        return
    assert_same_tensors(got, expected)
    if len(rows) == 3:
        assert len(lengths) > 1  # the rows really needed padding


def test_rows_that_cannot_be_joined_are_refused():
    processor = build_tiny_processor("llava")
    image = Image.new("RGB", (32, 32), "red")
    with_image = prepare_prompt(processor, [user_message("What is it?")], [image], torch.float32)
    text_only = prepare_prompt(processor, [user_message("Hello", num_images=0)], [], torch.float32)
    with pytest.raises(ValueError, match="differ"):
        collate_prompts(processor, [with_image, text_only])
    with pytest.raises(ValueError):
        collate_prompts(processor, [])
    odd = dict(with_image, pixel_values=with_image["pixel_values"][..., :16])
    with pytest.raises(ValueError, match="pixel_values"):
        collate_prompts(processor, [with_image, odd])


@pytest.mark.skipif(default_model() is None, reason="the embedded default model is not in this checkout")
def test_the_engine_answers_prepared_prompts_as_it_answers_raw_ones(sample_images):
    manager = ModelManager.load(default_model(), dtype="float32")
    rows = [
        ([user_message("What shape is in the image?")], sample_images[:1]),
        ([user_message("What color is the shape in the image?")], sample_images[1:2]),
    ]
    conversations, images = [messages for messages, _ in rows], [list(pictures) for _, pictures in rows]
    sampling = SamplingConfig(max_new_tokens=6)
    prepared = [manager.prepare(messages, pictures) for messages, pictures in rows]

    def texts(events):
        out = ["", ""]
        for row, event in events:
            out[row] += event.text
        return out

    raw = texts(manager.stream_batch(conversations, images, k=5, sampling=sampling))
    assert texts(manager.stream_batch(conversations, images, k=5, sampling=sampling, prepared=prepared)) == raw
    alone = "".join(e.text for e in manager.stream(conversations[0], images[0], k=5, sampling=sampling))
    assert alone == raw[0]
    assert "".join(e.text for e in manager.stream(conversations[0], images[0], k=5, sampling=sampling,
                                                  prepared=prepared[0])) == alone  # fmt: skip
    assert all(raw)
    # A prepared prompt that belongs to another conversation is not silently answered.
    with pytest.raises(ValueError, match="prepared"):
        list(manager.stream_batch(conversations, images, k=5, sampling=sampling, prepared=prepared[:1]))
