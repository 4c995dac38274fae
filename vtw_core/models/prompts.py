"""Chat messages + images and videos -> the tensors the model's own processor makes of them."""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

import torch
from PIL import Image

from vtw_core.errors import InputError
from vtw_core.models.image_tokens import expanded_image_inputs, stock_inputs
from vtw_core.models.videos import Video
from vtw_core.validation import check_text

Message = dict[str, Any]  # {"role": "user" | "assistant" | "system", "content": str | list of items}


# Role markers that chat templates write as plain text (LLaVA-1.5, LLaVA-NeXT-vicuna, the default model).
TEXT_ROLE_MARKERS = ("USER:", "ASSISTANT:", "SYSTEM:")
# Inserted after the first character of a reserved string typed by a user, so the tokenizer cannot match it.
WORD_JOINER = "\u2060"


def user_message(text: str, num_images: int = 1, num_videos: int = 0) -> Message:
    """One user turn: the images first, then the videos, then the text (the order LLaVA was trained with)."""
    text = check_text(text)
    return {
        "role": "user",
        "content": [{"type": "image"}] * num_images
        + [{"type": "video"}] * num_videos
        + [{"type": "text", "text": text}],
    }


def assistant_message(text: str) -> Message:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def count_image_items(messages: list[Message], kind: str = "image") -> int:
    """How many `kind` ("image" or "video") slots the messages have."""
    return sum(
        1
        for message in messages
        if isinstance(message.get("content"), list)
        for item in message["content"]
        if item.get("type") == kind
    )


@lru_cache(maxsize=16)
def _reserved_pattern(reserved: tuple[str, ...]) -> re.Pattern[str]:
    # In any case: a template may change the case of user text (the default model's lowers it), and `<IMAGE>`
    # must not become `<image>` there.
    alternatives = "|".join(re.escape(text) for text in sorted(reserved, key=len, reverse=True))
    return re.compile(alternatives, re.IGNORECASE)


def reserved_strings(processor: Any) -> tuple[str, ...]:
    """Strings that must not reach the tokenizer from users: every added/special token, and text role markers."""
    tokenizer = getattr(processor, "tokenizer", processor)
    added = [token.content for token in getattr(tokenizer, "added_tokens_decoder", {}).values()]
    specials = list(getattr(tokenizer, "all_special_tokens", []))
    return tuple(sorted({text for text in [*added, *specials, *TEXT_ROLE_MARKERS] if len(text) > 1}))


def as_plain_text(text: str, reserved: tuple[str, ...]) -> str:
    """`text` with every reserved string broken by an invisible word joiner, so it tokenises as plain text.

    The template's own special tokens and role markers are then the only ones in the prompt: a user who types
    `</s>` or `USER:` (or `<IMAGE>`, for a template that lowers the case) cannot end the turn or forge another one.
    """
    if not reserved:
        return text
    return _reserved_pattern(reserved).sub(lambda match: match[0][0] + WORD_JOINER + match[0][1:], text)


def _plain_text_messages(messages: list[Message], reserved: tuple[str, ...]) -> list[Message]:
    def item(part: Any) -> Any:
        if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            return {**part, "text": as_plain_text(part["text"], reserved)}
        return part

    plain = []
    for message in messages:
        content = message.get("content")
        if message.get("role") == "user":  # user text has the question limits, however the messages were built
            parts = [{"text": content}] if isinstance(content, str) else content or []
            texts = [part.get("text") for part in parts if isinstance(part, dict)]
            for text in texts:
                if isinstance(text, str) and text.strip():
                    check_text(text)
        if isinstance(content, str):
            content = as_plain_text(content, reserved)
        elif isinstance(content, list):
            content = [item(part) for part in content]
        plain.append({**message, "content": content})
    return plain


def render_prompt(processor: Any, messages: list[Message]) -> str:
    """The chat as the model's own template writes it, ending with the assistant's turn opening.

    Message texts go in as plain text (`as_plain_text`): no special-token parsing of what users typed.
    """
    if not messages or messages[-1].get("role") != "user":
        raise InputError("the conversation must end with a user message")
    if getattr(processor, "chat_template", None) is None:
        raise InputError("the processor has no chat template; pass a model with one")
    plain = _plain_text_messages(messages, reserved_strings(processor))
    return processor.apply_chat_template(plain, add_generation_prompt=True, tokenize=False)


def processor_images(processor: Any, images: list[list[Image.Image]]) -> Any:
    """The `images` argument for a batch: one flat list in prompt order, or None without images.

    SmolVLM's processor is the exception: it takes one list per prompt (it does not split a flat list by the prompts'
    placeholders, as Idefics3's and the others' do).
    """
    if not any(images):
        return None
    if type(processor).__name__ == "SmolVLMProcessor":
        return [list(row) for row in images]
    return [image for row in images for image in row]


def build_model_inputs(
    processor: Any,
    conversations: list[list[Message]],
    images: list[list[Image.Image]],
    device: torch.device | str,
    dtype: torch.dtype,
    videos: list[list[Video]] | None = None,
) -> dict[str, torch.Tensor]:
    """Tokenize a batch of conversations (left-padded) with their images and videos, on `device`, floats in `dtype`.

    `videos` (vtw_core.models.videos.read_video results), one list per conversation, fill its "video" slots.
    """
    videos = videos if videos is not None else [[] for _ in conversations]
    if len(conversations) != len(images) or len(conversations) != len(videos):
        raise InputError("one image list and one video list per conversation are needed")
    for messages, conversation_images, conversation_videos in zip(conversations, images, videos, strict=True):
        expected = count_image_items(messages)
        if expected != len(conversation_images):
            raise InputError(f"the conversation has {expected} image slot(s) but {len(conversation_images)} image(s)")
        expected = count_image_items(messages, "video")
        if expected != len(conversation_videos):
            raise InputError(f"the conversation has {expected} video slot(s) but {len(conversation_videos)} video(s)")
    flat_videos = [video for conversation_videos in videos for video in conversation_videos]
    if flat_videos and getattr(processor, "video_processor", None) is None:
        raise InputError("this model's processor takes no video")
    prompts = [render_prompt(processor, messages) for messages in conversations]
    video_options = {}
    if flat_videos:
        video_options = {
            "videos": [video.as_array() for video in flat_videos],
            "video_metadata": [video.metadata() for video in flat_videos],
        }
    try:
        if video_options:
            batch = stock_inputs(processor, prompts, processor_images(processor, images), **video_options)
        else:  # LLaVA-1.5's image placeholders repeated in ids, not tokenized 576 times (the same tensors)
            batch = expanded_image_inputs(processor, prompts, processor_images(processor, images))
    except (ValueError, TypeError) as error:
        raise InputError(f"the processor rejected the input: {error}") from error
    return {
        name: value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        for name, value in batch.items()
        if isinstance(value, torch.Tensor)
    }


def prompt_length(
    processor: Any, messages: list[Message], images: list[Image.Image], videos: list[Video] | None = None
) -> int:
    """Tokens of one conversation as the model will see it (its images' and videos' tokens included).

    Counted by `build_model_inputs` with the model's own processor, on the CPU and without the model: a caller
    can check a prompt against the context before any device work, and never handles a tensor itself.
    """
    videos = list(videos or [])
    inputs = build_model_inputs(processor, [messages], [list(images)], "cpu", torch.float32, videos=[videos])
    return int(inputs["input_ids"].shape[1])


def eos_token_ids_of(model: Any, processor: Any) -> set[int]:
    """The ids that end a reply: the model's generation config, else the tokenizer's end token."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(processor, "tokenizer", processor), "eos_token_id", None)
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


def pad_token_id_of(processor: Any) -> int:
    """The id that fills rows which already ended in a batch: the tokenizer's pad token, else 0."""
    tokenizer = getattr(processor, "tokenizer", processor)
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
