"""Several conversations answered in one left-padded engine call, each streamed and accounted on its own.

`stream_generate` answers one conversation; this is its batched sibling for servers that group concurrent
requests (vtw_core.serve.batching). The tokens come from the same loop (`generate_rows`, under `generate_tokens`),
and each row's text from the same streamer, so a greedy row gives the tokens and text that `stream_generate` gives
alone. Rows need not end together: each has its own new-token limit and stop event, and a row that ends leaves
the batch (its keys and values are sliced out), so the others go on at the cost of the rows that remain.

Per-row stats are the row's own: its prompt and vision tokens, the FLOPs of the tokens it had in each layer,
and the KV-cache bytes of those tokens (left padding excluded). Time runs from the start of the batch, like
`stream_generate` from the start of its request; the rows share the device, so the timings are the batch's.
The CUDA peak memory is the batch's, not a row's, so rows report none.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import torch
from PIL import Image
from torch import nn

from vtw_core.engine import flops
from vtw_core.engine.decoder import PositionMode
from vtw_core.engine.schedules import Schedule
from vtw_core.generation.generate import (
    DecodeEngine,
    PrefillChoice,
    generate_rows,
    prompt_inputs_within_context,
    row_limits,
    row_stops,
)
from vtw_core.generation.streaming import (
    TextStream,
    end_reason,
    model_placement,
    out_of_memory_as_resource_error,
    record_token_time,
    synchronize,
)
from vtw_core.generation.types import GenerationStats, SamplingConfig, StreamEvent
from vtw_core.models.families import num_decoder_layers, vision_token_ids
from vtw_core.models.prompts import Message, eos_token_ids_of


def _row_images(model_inputs: dict[str, torch.Tensor], first: int, count: int) -> dict[str, torch.Tensor]:
    """One row's images in the batch's image tensors: the tensors sliced to that row's images."""
    sliced = {}
    for name in ("pixel_values", "image_sizes", "image_grid_thw"):
        value = model_inputs.get(name)
        if value is not None and count:
            sliced[name] = value[first : first + count]
    return sliced


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
    stop_events: Sequence[threading.Event | None] | None = None,
    max_new_tokens: Sequence[int] | None = None,
    engine: DecodeEngine = "auto",
    schedule: Schedule | None = None,
    prefill_engine: PrefillChoice = "plain",
) -> Iterator[tuple[int, StreamEvent]]:
    """Yield (row, event) as the rows' tokens come; each row ends with one event that has finished=True.

    `stop_events` (one per row, or None) give up single rows: a row whose event is set leaves the batch before
    the next decode step (finish reason "stopped"), and the other rows go on without it; `stop_event` ends every
    row. `max_new_tokens` (one per row) gives each row its own limit (finish reason "length"); without it every
    row has `sampling.max_new_tokens`. A row that ends (end token, its limit, its stop event) costs no more
    compute: its keys and values leave the batch (vtw_core.generation.generate.generate_rows).

    Sampling draws every row from one generator, so seeded sampled rows differ from the same requests run
    alone: callers that promise reproducible seeds run sampled requests one at a time. `prefill_engine` as in
    `generate_rows`.
    """
    start = time.perf_counter()
    device = model.device
    tokenizer = getattr(processor, "tokenizer", processor)
    limits = row_limits(max_new_tokens, len(conversations), sampling)
    stops = row_stops(stop_events, len(conversations))
    batch_stats = GenerationStats(k=k, num_layers=num_decoder_layers(model.config))
    tokens_per_row: list[list[int]] = []
    advice = "try fewer concurrent requests, a smaller image or fewer new tokens"
    with out_of_memory_as_resource_error(device, advice):
        longest = replace(sampling, max_new_tokens=max(limits))  # the context check and the buffers: the longest
        model_inputs = prompt_inputs_within_context(model, processor, conversations, images, longest)
        eos_ids = eos_token_ids_of(model, processor)
        steps = generate_rows(
            model,
            model_inputs,
            k=k,
            position_mode=position_mode,
            sampling=longest,
            eos_token_ids=eos_ids,
            stop_event=stop_event,
            stop_events=stops,
            max_new_tokens=limits,
            stats=batch_stats,
            engine=engine,
            schedule=schedule,
            tokens_per_row=tokens_per_row,
            prefill_engine=prefill_engine,
        )
        rows = _new_rows(model, tokenizer, model_inputs, images, k)
        dims = flops.DecoderDims.from_config(model.config)
        for present, tokens in steps:
            synchronize(device)
            now = time.perf_counter() - start
            for index in sorted(set(range(len(rows))) - set(present)):  # rows that left the batch unfinished
                if not rows[index].done:
                    yield index, _end(rows[index], stop_event, stops[index], now)
            for index, token in zip(present, tokens.tolist(), strict=True):
                row = rows[index]
                event = _advance(row, token, now, eos_ids, dims, tokens_per_row[index], batch_stats)
                yield index, event
                if row.done:
                    yield index, row.finish(row.stats.finish_reason)
                elif len(row.token_ids) >= limits[index]:
                    yield index, row.finish("length")
    synchronize(device)
    for index, row in enumerate(rows):
        if not row.done:
            yield index, _end(row, stop_event, stops[index], time.perf_counter() - start)


def _end(row: TextStream, stop_event: threading.Event | None, own: threading.Event | None, now: float) -> StreamEvent:
    """The last event of a row that met neither an end token nor its limit: it was stopped (or the batch was)."""
    row.stats.total_s = now
    stopped = own if own is not None and own.is_set() else stop_event
    return row.finish(end_reason(stopped))


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
    prompt_tokens, vision_tokens = mask.sum(1).tolist(), vision.sum(1).tolist()
    placement, num_layers = model_placement(model), num_decoder_layers(model.config)  # once: config reads are slow
    tower_flops: dict[tuple, int] = {}  # rows whose images have the same tensor shapes cost the tower the same
    rows, first_image = [], 0
    for index, row_images in enumerate(images):
        sliced = _row_images(model_inputs, first_image, len(row_images))
        shapes = tuple((name, tuple(value.shape), tuple(value.flatten().tolist()) if name != "pixel_values" else ())
                       for name, value in sliced.items())  # fmt: skip
        if shapes not in tower_flops:
            tower_flops[shapes] = flops.request_vision_flops(model.config, sliced) if row_images else 0
        stats = GenerationStats(k=k, num_layers=num_layers, **placement, prompt_tokens=int(prompt_tokens[index]),
                                vision_tokens=int(vision_tokens[index]), vision_flops=tower_flops[shapes])  # fmt: skip
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
    stats.engine, stats.prefill_engine = batch_stats.engine, batch_stats.prefill_engine
    stats.new_tokens = len(row.token_ids) + 1  # this token included
    record_token_time(stats, now)
    # A row's decode steps come after its first token; its cache holds the prompt plus the tokens fed back.
    steps = stats.new_tokens - 1
    if steps == 0:  # the row's prefill: the same for every later token
        stats.prefill_flops = flops.prefill_flops(dims, layers)
    stats.decode_flops = flops.decode_flops(dims, layers, steps)
    bytes_per_token = 2 * dims.num_kv_heads * dims.head_dim * _element_size(stats.dtype)
    stats.kv_cache_bytes = sum(count + steps for count in layers) * bytes_per_token
    return row.add(token, eos_ids)


def _element_size(dtype_name: str) -> int:
    return getattr(torch, dtype_name).itemsize
