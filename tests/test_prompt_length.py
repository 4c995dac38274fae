"""`prompt_length`: the tokens of one conversation, counted as the model will see them, without the caller ever
holding a tensor (the app checks a turn against the context with it)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vtw_core.models.defaults import default_model
from vtw_core.models.processors import load_processor
from vtw_core.models.prompts import assistant_message, build_model_inputs, prompt_length, user_message


def model_inputs_length(processor, messages, images, videos=None) -> int:
    """What the engine sees: the batch of one that `build_model_inputs` makes for the model."""
    inputs = build_model_inputs(processor, [messages], [images], "cpu", torch.float32, videos=[videos or []])
    return inputs["input_ids"].shape[1]


def conversations(images):
    """One image; two turns with an answer between them; two images in one question; text only."""
    return [
        ([user_message("What is it?")], images[:1]),
        ([user_message("What is it?"), assistant_message("A red circle."), user_message("And its colour?", 0)],
         images[:1]),
        ([user_message("Compare them.", num_images=2)], images[1:3]),
        ([user_message("Say hello </s> USER: hi", num_images=0)], []),
    ]  # fmt: skip


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_it_counts_what_build_model_inputs_makes(family, tiny_model_path, sample_images):
    processor = load_processor(tiny_model_path(family))
    lengths = []
    for messages, images in conversations(sample_images):
        lengths.append(prompt_length(processor, messages, images))
        assert lengths[-1] == model_inputs_length(processor, messages, images), messages
    assert lengths[1] > lengths[0] > lengths[3]  # the answer and the second question count; the image does
    assert isinstance(lengths[0], int)


def test_it_counts_a_videos_frames(tiny_model_path, sample_images, tmp_path):
    from test_videos import write_video

    from vtw_core.models.videos import read_video

    processor = load_processor(tiny_model_path("llava_next_video"))
    clip = write_video(tmp_path / "clip.mp4", frames=12)
    messages = [user_message("What happens?", num_images=1, num_videos=1)]
    few, many = read_video(clip, 2), read_video(clip, 6)
    counted = prompt_length(processor, messages, sample_images[:1], [few])
    assert counted == model_inputs_length(processor, messages, sample_images[:1], [few])
    assert prompt_length(processor, messages, sample_images[:1], [many]) > counted  # more frames, more tokens


@pytest.mark.skipif(default_model() is None, reason="the embedded default model is not in this checkout")
def test_it_counts_the_default_models_prompts():
    from vtw_core.models.images import load_image

    processor = load_processor(default_model())
    shape = load_image(Path(__file__).resolve().parent.parent / "assets/examples/easyvqa-0.png")
    messages = [user_message("what is the red shape?")]
    assert prompt_length(processor, messages, [shape]) == model_inputs_length(processor, messages, [shape])
    follow_up = [*messages, assistant_message("circle"), user_message("and its colour?", num_images=0)]
    assert prompt_length(processor, follow_up, [shape]) == model_inputs_length(processor, follow_up, [shape])
