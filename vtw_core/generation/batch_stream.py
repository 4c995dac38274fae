"""Several conversations answered in one left-padded engine call, each streamed and accounted on its own.

`stream_generate` answers one conversation; this is its batched sibling for servers that group concurrent
requests (vtw_core.serve.batching). The tokens come from the same `generate_tokens` loop, and each row's text
from the same streamer, so a greedy row gives the tokens and text that `stream_generate` gives alone.

Per-row stats are the row's own: its prompt and vision tokens, the FLOPs of the tokens it had in each layer,
and the KV-cache bytes of those tokens (left padding excluded). Time runs from the start of the batch, like
`stream_generate` from the start of its request; the rows share the device, so the timings are the batch's.
The CUDA peak memory is the batch's, not a row's, so rows report none.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
from PIL import Image
from torch import nn

from vtw_core.engine import flops
from vtw_core.engine.decoder import PositionMode
from vtw_core.engine.schedules import Schedule
from vtw_core.generation.generate import DecodeEngine, conversation_tokens
from vtw_core.generation.streaming import (
    TextStream,
    end_reason,
    out_of_memory_as_resource_error,
    record_token_time,
    request_stats,
    synchronize,
)
from vtw_core.generation.types import GenerationStats, SamplingConfig, StreamEvent
from vtw_core.models.families import num_decoder_layers, vision_token_ids
from vtw_core.models.prompts import Message


def _row_vision_flops(config: Any, model_inputs: dict[str, torch.Tensor], first: int, count: int) -> int:
    """The vision tower's FLOPs for one row's images: the batch's image tensors sliced to that row's images."""
    if count == 0:
        return 0
    sliced = {}
    for name in ("pixel_values", "image_sizes", "image_grid_thw"):
        value = model_inputs.get(name)
        if value is not None:
            sliced[name] = value[first : first + count]
    return flops.request_vision_flops(config, sliced)


def stream_generate_batch(
    model: nn.Module,
    processor: Any,
    conversations: list[list[Message]],
    images: list[list[Image.Image]],
    *,
    k: int | None = None,
    position_mode: PositionMode = "original",
    sampling: SamplingConfig = SamplingConfig(),
    stop_event: threading.Event | None = None,
    engine: DecodeEngine = "auto",
    schedule: Schedule | None = None,
) -> Iterator[tuple[int, StreamEvent]]:
    """Yield (row, event) as the rows' tokens come; each row ends with one event that has finished=True.

    Sampling draws every row from one generator, so seeded sampled rows differ from the same requests run
    alone: callers that promise reproducible seeds run sampled requests one at a time.
    """
    start = time.perf_counter()
    device = model.device
    tokenizer = getattr(processor, "tokenizer", processor)
    batch_stats = GenerationStats(k=k, num_layers=num_decoder_layers(model.config))
    tokens_per_row: list[list[int]] = []
    advice = "try fewer concurrent requests, a smaller image or fewer new tokens"
    with out_of_memory_as_resource_error(device, advice):
        model_inputs, eos_ids, steps = conversation_tokens(
            model,
            processor,
            conversations,
            images,
            sampling=sampling,
            k=k,
            position_mode=position_mode,
            stop_event=stop_event,
            stats=batch_stats,
            engine=engine,
            schedule=schedule,
            tokens_per_row=tokens_per_row,
        )
        rows = _new_rows(model, tokenizer, model_inputs, images, k)
        dims = flops.DecoderDims.from_config(model.config)
        for tokens in steps:
            synchronize(device)
            now = time.perf_counter() - start
            for index, row in enumerate(rows):
                if row.done:
                    continue
                event = _advance(row, int(tokens[index]), now, eos_ids, dims, tokens_per_row[index], batch_stats)
                yield index, event
                if row.done:
                    yield index, row.finish(row.stats.finish_reason)
    reason = end_reason(stop_event)
    synchronize(device)
    for index, row in enumerate(rows):
        if not row.done:
            row.stats.total_s = time.perf_counter() - start
            yield index, row.finish(reason)


def _new_rows(
    model: nn.Module, tokenizer: Any, model_inputs: dict[str, torch.Tensor], images: list[list[Image.Image]], k
) -> list[TextStream]:
    """Per-row streams whose stats hold the row's own prompt, vision tokens and vision-tower FLOPs."""
    mask = model_inputs.get("attention_mask")
    input_ids = model_inputs["input_ids"]
    if mask is None:
        mask = torch.ones_like(input_ids)
    vision = torch.isin(input_ids, torch.tensor(vision_token_ids(model.config), device=input_ids.device))
    vision = vision & mask.bool()
    rows, first_image = [], 0
    for index, row_images in enumerate(images):
        stats = request_stats(
            model,
            k,
            prompt_tokens=int(mask[index].sum()),
            vision_tokens=int(vision[index].sum()),
            vision_flops=_row_vision_flops(model.config, model_inputs, first_image, len(row_images)),
        )
        first_image += len(row_images)
        rows.append(TextStream(stats, tokenizer))
    return rows


def _advance(
    row: TextStream,
    token: int,
    now: float,
    eos_ids: set[int],
    dims: flops.DecoderDims,
    layers: list[int],
    batch_stats: GenerationStats,
) -> StreamEvent:
    """Take the row's next token: text, timings and the FLOPs and KV bytes of its tokens so far."""
    stats = row.stats
    stats.engine = batch_stats.engine
    stats.new_tokens = len(row.token_ids) + 1  # this token included
    record_token_time(stats, now)
    # A row's decode steps come after its first token; its cache holds the prompt plus the tokens fed back.
    steps = stats.new_tokens - 1
    stats.prefill_flops = flops.prefill_flops(dims, layers)
    stats.decode_flops = flops.decode_flops(dims, layers, steps)
    bytes_per_token = 2 * dims.num_kv_heads * dims.head_dim * _element_size(stats.dtype)
    stats.kv_cache_bytes = sum(count + steps for count in layers) * bytes_per_token
    return row.add(token, eos_ids)


def _element_size(dtype_name: str) -> int:
    return torch.empty((), dtype=getattr(torch, dtype_name)).element_size()
