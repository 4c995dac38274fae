"""Turn processor outputs into the decoder's input: merged text+vision embeddings and position ids.

Each family merges image features into the prompt differently (LLaVA-NeXT's anyres tiles, Qwen2-VL's
3-D rope indices, ...), and the stock code for it changes between transformers releases. Rather than
re-implementing that per family, we run the stock multimodal model up to the point where it calls its
language model, and capture the arguments of that call. Only the calling thread's call is captured, so
concurrent callers in one process don't see each other's prompts.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vtw_core.engine.compiled_vision import compiled_vision
from vtw_core.errors import InputError
from vtw_core.models.families import DEEPSTACK_FAMILIES, MROPE_FAMILIES, language_model, model_family, vision_token_ids


@dataclass
class PromptEmbeddings:
    """The decoder input of one (possibly left-padded) batch of prompts."""

    inputs_embeds: torch.Tensor  # (batch, seq, hidden)
    attention_mask: torch.Tensor  # (batch, seq) bool, False on left padding
    position_ids: torch.Tensor  # (batch, seq), or (3, batch, seq) for multimodal rope
    vision_mask: torch.Tensor  # (batch, seq) bool, True on vision placeholder positions
    # Added to the output of decoder layer i, each (batch, seq, hidden): Qwen3-VL's DeepStack vision features at
    # the vision positions, zero elsewhere. Empty for every other family.
    layer_additions: tuple[torch.Tensor, ...] = ()

    @property
    def batch_size(self) -> int:
        return self.inputs_embeds.shape[0]


class _LanguageModelCalled(Exception):
    def __init__(self, kwargs: dict[str, Any]):
        self.kwargs = kwargs


def _capture_language_model_inputs(model: nn.Module, model_inputs: dict[str, Any]) -> dict[str, Any]:
    decoder = language_model(model)
    caller = threading.get_ident()

    def stop_at_decoder(_module: nn.Module, _args: tuple, kwargs: dict[str, Any]) -> None:
        if threading.get_ident() == caller:
            raise _LanguageModelCalled(kwargs)

    handle = decoder.register_forward_pre_hook(stop_at_decoder, with_kwargs=True)
    try:
        model.model(**model_inputs, use_cache=False)
    except _LanguageModelCalled as called:
        return called.kwargs
    except ValueError as error:  # the stock code's own checks, e.g. image features vs placeholder tokens
        raise InputError(f"the model rejected the prompt: {error}") from error
    finally:
        handle.remove()
    raise RuntimeError(f"{type(model).__name__} never called its language model")


def default_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as stock `generate()` does for left-padded batches."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 0)


def prompt_masks(model: nn.Module, model_inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention mask, vision mask), each (batch, seq) bool: real tokens, and the image/video placeholders."""
    input_ids = model_inputs["input_ids"]
    attention_mask = model_inputs.get("attention_mask")
    valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    placeholders = torch.isin(input_ids, torch.tensor(vision_token_ids(model.config), device=input_ids.device))
    return valid, placeholders & valid


@torch.inference_mode()
def embed_prompt(
    model: nn.Module, model_inputs: dict[str, Any], compile_vision: bool = False, tuned_kernels: bool = False
) -> PromptEmbeddings:
    """Run the vision tower, projector and embedding merge of the stock model; stop before the decoder.

    `compile_vision`: the tower through torch.compile where it is one that compiles (compiled_vision.py), as the
    compiled engine asks, with `tuned_kernels` as the tuned engine asks; its features then agree with the stock
    tower's to a few ulps."""
    family = model_family(model.config)
    input_ids = model_inputs["input_ids"]
    valid, vision_mask = prompt_masks(model, model_inputs)
    # Video-LLaVA's processor names its image pixels `pixel_values_images`.
    pixel_names = ("pixel_values", "pixel_values_images", "pixel_values_videos")
    has_pixels = any(model_inputs.get(name) is not None for name in pixel_names)
    if bool(vision_mask.any()) and not has_pixels:
        raise InputError("the prompt has image or video placeholder tokens but no image or video was given")
    with compiled_vision(model, tuned_kernels) if compile_vision else contextlib.nullcontext():
        captured = _capture_language_model_inputs(model, {**model_inputs, "attention_mask": valid.long()})

    inputs_embeds = captured["inputs_embeds"]
    position_ids = captured.get("position_ids")
    if position_ids is None:
        position_ids = default_position_ids(valid)
        if family in MROPE_FAMILIES:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
    elif position_ids.ndim == 3 and position_ids.shape[0] == 4:
        # Some releases prepend a plain text-position row to the three rope rows; the rope uses the last three.
        position_ids = position_ids[1:]

    if inputs_embeds.shape[:2] != input_ids.shape:
        raise InputError(f"embeddings {tuple(inputs_embeds.shape[:2])} do not match input ids {tuple(input_ids.shape)}")
    layer_additions = ()
    if family in DEEPSTACK_FAMILIES and captured.get("deepstack_visual_embeds") is not None:
        layer_additions = _deepstack_additions(
            inputs_embeds, captured["visual_pos_masks"], captured["deepstack_visual_embeds"]
        )
    return PromptEmbeddings(
        inputs_embeds=inputs_embeds,
        attention_mask=valid,
        position_ids=position_ids.to(inputs_embeds.device),
        vision_mask=vision_mask,
        layer_additions=layer_additions,
    )


def _deepstack_additions(
    inputs_embeds: torch.Tensor, visual_pos_masks: torch.Tensor, deepstack_embeds: list[torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """Qwen3-VL: the stock decoder adds deepstack_embeds[i] (one row per vision position, in prompt order) to the
    output of layer i at the vision positions. As full (batch, seq, hidden) tensors, zero elsewhere, they follow
    the engine's token selection like every other per-token tensor (x + 0 is x exactly)."""
    mask = visual_pos_masks.to(inputs_embeds.device)
    additions = []
    for features in deepstack_embeds:
        addition = torch.zeros_like(inputs_embeds)
        addition[mask] = features.to(inputs_embeds.device, inputs_embeds.dtype)
        additions.append(addition)
    return tuple(additions)
