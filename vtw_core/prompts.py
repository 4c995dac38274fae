"""Chat messages + images -> the tensors the model's own processor makes of them."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from vtw_core.errors import InputError

Message = dict[str, Any]  # {"role": "user" | "assistant" | "system", "content": str | list of items}


def user_message(text: str, num_images: int = 1) -> Message:
    """One user turn: the images first, then the text (the order LLaVA was trained with)."""
    if not text or not text.strip():
        raise InputError("the question is empty")
    return {
        "role": "user",
        "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text.strip()}],
    }


def assistant_message(text: str) -> Message:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def count_image_items(messages: list[Message]) -> int:
    return sum(
        1
        for message in messages
        if isinstance(message.get("content"), list)
        for item in message["content"]
        if item.get("type") == "image"
    )


def render_prompt(processor: Any, messages: list[Message]) -> str:
    """The chat as the model's own template writes it, ending with the assistant's turn opening."""
    if not messages or messages[-1].get("role") != "user":
        raise InputError("the conversation must end with a user message")
    if getattr(processor, "chat_template", None) is None:
        raise InputError("the processor has no chat template; pass a model with one")
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def build_model_inputs(
    processor: Any,
    conversations: list[list[Message]],
    images: list[list[Image.Image]],
    device: torch.device | str,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Tokenize a batch of conversations (left-padded) with their images, on `device`, floats in `dtype`."""
    if len(conversations) != len(images):
        raise InputError("one image list per conversation is needed")
    for messages, conversation_images in zip(conversations, images, strict=True):
        expected = count_image_items(messages)
        if expected != len(conversation_images):
            raise InputError(f"the conversation has {expected} image slot(s) but {len(conversation_images)} image(s)")
    prompts = [render_prompt(processor, messages) for messages in conversations]
    flat_images = [image for conversation_images in images for image in conversation_images]
    try:
        batch = processor(
            text=prompts,
            images=flat_images or None,
            padding=True,
            padding_side="left",
            return_tensors="pt",
        )
    except (ValueError, TypeError) as error:
        raise InputError(f"the processor rejected the input: {error}") from error
    return {
        name: value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        for name, value in batch.items()
        if isinstance(value, torch.Tensor)
    }


def eos_token_ids_of(model: Any, processor: Any) -> set[int]:
    """The ids that end a reply: the model's generation config, else the tokenizer's end token."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(processor, "tokenizer", processor), "eos_token_id", None)
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)
