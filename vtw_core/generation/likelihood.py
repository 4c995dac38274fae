"""Log-likelihood of a given continuation under a method (baseline, VTW, a schedule): multiple-choice scoring.

The prompt is prefilled with the method's token selector and the continuation is teacher-forced through the
decode steps, one token at a time: every continuation token gets exactly the distribution generation would
give it. Under VTW the continuation tokens are text, so they go through every layer; from layer K on they
see only the text part of the cache, as generated tokens do. (A single prefill over prompt + continuation
gives the same numbers for VTW, but not for FastV-like schedules, which rank vision tokens by the attention
of the last *prompt* token.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

from vtw_core.engine import flops
from vtw_core.engine.decoder import decode_step, prefill
from vtw_core.engine.embed import embed_prompt
from vtw_core.engine.schedules import Schedule
from vtw_core.errors import InputError
from vtw_core.generation.generate import method_selector
from vtw_core.generation.types import GenerationStats
from vtw_core.models.prompts import Message, build_model_inputs


@torch.inference_mode()
def continuation_logprobs(
    model: nn.Module,
    processor: Any,
    conversations: list[list[Message]],
    images: list[list[Image.Image]],
    continuations: Sequence[Sequence[int]],
    *,
    k: int | None = None,
    schedule: Schedule | None = None,
    stats: GenerationStats | None = None,
) -> list[tuple[float, bool]]:
    """(sum of log-probabilities, greedy) of each row's continuation token ids after its conversation's prompt.

    `greedy` says whether greedy decoding would produce the continuation. Rows are left-padded into one batch;
    a row whose continuation is shorter than the batch's longest is fed padding afterwards, which is ignored.
    `stats` receives per-row FLOPs counted for the row's own tokens (its continuation length minus one
    decode steps, as a single request would cost).
    """
    if len(continuations) != len(conversations):
        raise InputError("one continuation per conversation is needed")
    if any(len(ids) == 0 for ids in continuations):
        raise InputError("a continuation must have at least one token")
    model_inputs = build_model_inputs(processor, conversations, images, model.device, model.dtype)
    longest = max(len(ids) for ids in continuations)
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and model_inputs["input_ids"].shape[1] + longest > limit:
        raise InputError(f"prompt and continuation exceed the model's context of {limit} tokens")

    selector = method_selector(model, k, schedule)
    prompt = embed_prompt(model, model_inputs)
    logits, state = prefill(model, prompt, selector)
    rows = prompt.batch_size
    lengths = torch.tensor([len(ids) for ids in continuations], device=model.device)
    targets = torch.zeros(rows, longest, dtype=torch.long, device=model.device)
    for row, ids in enumerate(continuations):
        targets[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)

    total = torch.zeros(rows, dtype=torch.float64, device=model.device)
    greedy = torch.ones(rows, dtype=torch.bool, device=model.device)
    for step in range(longest):
        inside = step < lengths
        token = targets[:, step]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        total += torch.where(inside, log_probs.gather(1, token[:, None])[:, 0].double(), 0.0)
        greedy &= ~inside | (logits.argmax(-1) == token)
        if step + 1 < longest:
            logits = decode_step(model, state, token[:, None])

    if stats is not None:
        _fill_stats(stats, model, prompt, state.prompt_tokens_per_layer, [len(ids) for ids in continuations])
    return [(float(total[row]), bool(greedy[row])) for row in range(rows)]


def _fill_stats(stats: GenerationStats, model: nn.Module, prompt, tokens_per_layer, lengths: list[int]) -> None:
    dims = flops.DecoderDims.from_config(model.config)
    per_row_layers = [[int(count[row]) for count in tokens_per_layer] for row in range(len(lengths))]
    stats.prompt_tokens_per_row = prompt.attention_mask.sum(1).tolist()
    stats.vision_tokens_per_row = prompt.vision_mask.sum(1).tolist()
    stats.prefill_flops_per_row = [flops.prefill_flops(dims, layers) for layers in per_row_layers]
    stats.decode_flops_per_row = [
        flops.decode_flops(dims, layers, length - 1) for layers, length in zip(per_row_layers, lengths, strict=True)
    ]
    stats.prompt_tokens = sum(stats.prompt_tokens_per_row)
    stats.vision_tokens = sum(stats.vision_tokens_per_row)
    stats.prefill_flops = sum(stats.prefill_flops_per_row)
    stats.decode_flops = sum(stats.decode_flops_per_row)
    stats.new_tokens = sum(lengths)
