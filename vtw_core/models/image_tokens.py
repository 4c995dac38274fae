"""LLaVA-1.5's processor inputs with each image's placeholder repeated in token ids, not in text.

`LlavaProcessor` writes an image's placeholder into the prompt once per vision token (576 `<image>` for LLaVA-1.5)
and then tokenizes that text: for the default model 0.5 of the processor's 1.1 ms for one prompt, 2.8 of 6.3 ms
for eight. The placeholder is an added token, at which the tokenizer cuts the text, so tokenizing the prompt with
one placeholder per image and repeating its id gives the same ids. `expanded_image_inputs` does that, with the
pixels from the processor's own image processor and left padding as the processor pads.

It vouches for itself: the first batch of each processor and image size is built both ways, and where the two
differ in any tensor that processor keeps the stock path. Only `LlavaProcessor` is taken (one placeholder run of a
fixed length per image); every other processor, and prompts without images, take the stock path.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from PIL import Image

# processor -> {pixel size (height, width): vision tokens per image, or None where the stock path must be kept}
_learned: weakref.WeakKeyDictionary[Any, dict[tuple[int, ...], int | None]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _applies(processor: Any) -> bool:
    tokenizer = getattr(processor, "tokenizer", None)
    return (
        type(processor).__name__ == "LlavaProcessor"
        and getattr(processor, "image_token_id", None) is not None
        and tokenizer is not None
        and tokenizer.pad_token_id is not None
    )


def _refused(processor: Any) -> bool:
    """The expansion could not vouch for this processor at some size: it keeps the stock path at every size, and
    its images are not preprocessed twice (once here for the size, once by the processor)."""
    with _lock:
        return None in _learned.get(processor, {}).values()


def stock_inputs(processor: Any, prompts: list[str], images: list[Image.Image] | None, **options: Any) -> Any:
    """The processor's own batch, left-padded, as PyTorch tensors."""
    return processor(text=prompts, images=images, padding=True, padding_side="left", return_tensors="pt", **options)


def _expanded(processor: Any, prompts: list[str], pixel_values: torch.Tensor, per_image: int) -> dict | None:
    """input_ids, attention_mask and pixel_values, or None where the prompts' placeholders do not match the images
    (the stock processor then raises its own error)."""
    tokenizer, image_id = processor.tokenizer, processor.image_token_id
    rows, placeholders = [], 0
    for ids in tokenizer(prompts)["input_ids"]:
        row = []
        for token in ids:
            if token == image_id:
                row.extend([image_id] * per_image)
                placeholders += 1
            else:
                row.append(token)
        rows.append(row)
    if placeholders != pixel_values.shape[0]:
        return None
    longest = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), longest), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            input_ids[index, longest - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[index, longest - len(row) :] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def _same(stock: Any, ours: dict[str, torch.Tensor]) -> bool:
    names = {name for name, value in stock.items() if isinstance(value, torch.Tensor)}
    if names != set(ours) or len(stock) != len(ours):
        return False
    return all(
        stock[name].dtype == ours[name].dtype and stock[name].shape == ours[name].shape
        and torch.equal(stock[name], ours[name])
        for name in names
    )  # fmt: skip


def expanded_image_inputs(processor: Any, prompts: list[str], images: list[Image.Image] | None) -> Any:
    """`stock_inputs(processor, prompts, images)`, the same tensors, sooner where the processor is LLaVA-1.5's."""
    if not images or not _applies(processor) or _refused(processor):
        return stock_inputs(processor, prompts, images)
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    size = tuple(pixel_values.shape[1:])
    with _lock:
        per_image = _learned.setdefault(processor, {}).get(size, 0)
    if per_image:
        ours = _expanded(processor, prompts, pixel_values, per_image)
        return ours if ours is not None else stock_inputs(processor, prompts, images)
    # First batch of this size: build it both ways; keep the expansion only if it gives the stock tensors.
    stock = stock_inputs(processor, prompts, images)
    count = int((stock["input_ids"] == processor.image_token_id).sum())
    learned = count // len(images) if count and count % len(images) == 0 else None
    if learned is not None:
        ours = _expanded(processor, prompts, pixel_values, learned)
        learned = learned if ours is not None and _same(stock, ours) else None
    with _lock:
        _learned[processor][size] = learned
    return stock
