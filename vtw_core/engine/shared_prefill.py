"""One prefill for the image that several questions share: its prefix runs once, each question only its own tokens.

An evaluation asks ~10 questions about each image (easy-vqa; VQAv2, GQA alike). In LLaVA-1.5's prompt the image
comes before the question (`USER: <image>\\n{question} ASSISTANT:`), and attention is causal, so the image's
tokens and everything before them are the same in every question's pass, in every layer. Here a batch whose rows
show one image runs that common prefix once (batch 1, through the selector: under VTW its deep layers keep only
the prefix's text tokens, as they would in a full pass), copies the prefix's cache to every row, and feeds each
row's remaining tokens behind it (`engine.extend`):

    rows:   [pad][ prefix: <s> USER: <image x 576> \\n ][ question_r ASSISTANT: ]
    cache:  [ prefix, once ][ pad ][ question_r ... ]         (padding masked out, positions per row)

The arithmetic of every token is that of the full pass; only the matrix products run on fewer rows at a time, so
logits agree to float32 rounding, not bit for bit (tests/test_shared_prefill.py). Withdrawal is the only selector
it takes: a question-dependent one (FastV, schedules) ranks vision tokens by the last prompt token's attention,
which the prefix cannot know. Anything else falls back to the plain prefill, with the reason.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vtw_core.engine.decoder import (
    DecodeState,
    PositionMode,
    TokenSelector,
    TokenState,
    Withdrawal,
    extend,
    run_decoder,
)
from vtw_core.engine.embed import embed_prompt, prompt_masks
from vtw_core.models.families import model_family

SHAREABLE_INPUTS = {"input_ids", "attention_mask", "pixel_values"}


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor, vision: torch.Tensor) -> int:
    """Length of the prefix every row starts with (after its left padding), holding all vision tokens and
    ending on a text token, with at least one token of each row after it; 0 when there is none."""
    rows = unpadded_rows(input_ids, attention_mask)
    length = min(len(ids) for ids in rows) - 1
    for ids in rows[1:]:
        differs = (ids[:length] != rows[0][:length]).nonzero()
        if len(differs):
            length = int(differs[0])
    for row_vision in unpadded_rows(vision, attention_mask):
        if length < 1 or bool(row_vision[length - 1]) or bool(row_vision[length:].any()):
            return 0
    return length


def unpadded_rows(rows: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row of a left-padded (batch, seq) tensor without its padding."""
    return [row[padding:] for row, padding in zip(rows, (~attention_mask).sum(1).tolist(), strict=True)]


def why_not_shared(
    model: nn.Module, model_inputs: dict[str, Any], selector: TokenSelector | None, position_mode: PositionMode
) -> str | None:
    """Why this batch cannot share its image prefill (None if it can)."""
    if model_family(model.config) != "llava":
        return "a LLaVA-1.5 model only"
    if set(model_inputs) - SHAREABLE_INPUTS:
        return f"inputs {sorted(set(model_inputs) - SHAREABLE_INPUTS)}"
    if selector is not None and not isinstance(selector, Withdrawal):
        return "a question-dependent selector"
    if position_mode != "original":
        return f"position_mode {position_mode!r}"
    if model.config.get_text_config()._attn_implementation not in ("sdpa", "eager"):
        return "sdpa or eager attention only"
    pixels = model_inputs.get("pixel_values")
    batch = model_inputs["input_ids"].shape[0]
    if batch < 2:
        return "one row"
    if pixels is None or pixels.shape[0] != batch or not torch.equal(pixels, pixels[:1].expand_as(pixels)):
        return "rows with different images"
    return None


def shared_prefill(
    model: nn.Module, model_inputs: dict[str, Any], selector: TokenSelector | None
) -> tuple[torch.Tensor, DecodeState] | None:
    """Next-token logits (batch, vocab) and decode state of the batch, its common image prefix run once;
    None when its rows have no common prefix holding the image. Check `why_not_shared` first."""
    input_ids = model_inputs["input_ids"]
    attention_mask, vision = prompt_masks(model, model_inputs)
    length = shared_prefix_length(input_ids, attention_mask, vision)
    if length == 0:
        return None
    batch = input_ids.shape[0]
    rows = unpadded_rows(input_ids, attention_mask)
    first_row = rows[0][None]
    prompt = embed_prompt(
        model,
        {"input_ids": first_row, "attention_mask": torch.ones_like(first_row),
         "pixel_values": model_inputs["pixel_values"][:1]},
    )  # fmt: skip
    prefix = TokenState(
        prompt_index=torch.arange(length, device=input_ids.device)[None],
        valid=prompt.attention_mask[:, :length],
        vision=prompt.vision_mask[:, :length],
        position_ids=prompt.position_ids[:, :length],
    )
    _, state = run_decoder(model, prompt.inputs_embeds[:, :length], prefix, selector=selector)
    with torch.inference_mode():
        state.cache.batch_repeat_interleave(batch)
        for group in state.groups:
            group.valid = group.valid.expand(batch, -1).clone()
            group.next_position = group.next_position.expand(batch).clone()
            group.prompt_index = group.prompt_index.expand(batch, -1).clone()
        # Each row's own tokens after the prefix, left-padded into one chunk.
        rest = [ids[length:] for ids in rows]
        width = max(len(ids) for ids in rest)
        chunk = torch.zeros(batch, width, dtype=input_ids.dtype, device=input_ids.device)
        chunk_valid = torch.zeros(batch, width, dtype=torch.bool, device=input_ids.device)
        for row, ids in enumerate(rest):
            chunk[row, width - len(ids) :] = ids
            chunk_valid[row, width - len(ids) :] = True
        embeds = model.get_input_embeddings()(chunk)
    logits = extend(model, state, embeds, chunk_valid)
    state.prompt_tokens_per_layer = [count + chunk_valid.sum(1) for count in state.prompt_tokens_per_layer]
    return logits, state
