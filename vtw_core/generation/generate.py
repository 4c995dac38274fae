"""Generation on top of the engine: greedy or seeded sampling, streaming text, honest per-request stats.

`stream_generate` is what the app and the CLI use: it yields a `StreamEvent` per new token with the text
delta and live stats. Timing starts when the request arrives, so time to first token includes image
preprocessing, the vision tower and prefill; the device is synchronised before every clock reading.
The values it passes around (`SamplingConfig`, `GenerationStats`, ...) are in `types`, the bookkeeping it
shares with batched streaming in `streaming`.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal, get_args

import torch
from PIL import Image
from torch import nn
from transformers import LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from vtw_core import validation
from vtw_core.engine import flops
from vtw_core.engine.compiled_prefill import compiled_prefill
from vtw_core.engine.decoder import (
    DecodeState,
    PositionMode,
    TokenSelector,
    decode_step,
    prefill,
    withdrawal_selector,
)
from vtw_core.engine.embed import embed_prompt, prompt_masks
from vtw_core.engine.fast_decode import (
    GraphedDecodeStep,
    compiled_decode_step,
    fast_state_from_prefill,
    static_decode_step,
)
from vtw_core.engine.fast_prefill import PrefillEngine, fast_prefill
from vtw_core.engine.schedules import Schedule, ScheduleSelector
from vtw_core.engine.shared_prefill import shared_prefill, why_not_shared
from vtw_core.errors import InputError
from vtw_core.generation.streaming import (
    TextStream,
    end_reason,
    out_of_memory_as_resource_error,
    record_token_time,
    request_stats,
    synchronize,
)
from vtw_core.generation.types import GenerationResult, GenerationStats, SamplingConfig, StreamEvent
from vtw_core.models.families import num_decoder_layers
from vtw_core.models.prompts import Message, build_model_inputs, eos_token_ids_of, pad_token_id_of
from vtw_core.models.videos import Video

DecodeEngine = Literal["auto", "plain", "static", "compiled", "tuned", "graph"]
DECODE_ENGINES = get_args(DecodeEngine)
PrefillChoice = PrefillEngine | Literal["shared", "compiled", "tuned"]
PREFILL_CHOICES = ("plain", "bucketed", "graph", "shared", "compiled", "tuned")
COMPILED_ENGINES = ("compiled", "tuned")  # the prefill and decode engines that run torch.compile'd graphs


def _next_tokens(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    if not sampling.do_sample:
        return logits.argmax(-1)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(sampling.temperature)])
    if sampling.top_k > 0:
        warpers.append(TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    probabilities = warpers(None, logits).softmax(-1)
    return torch.multinomial(probabilities, 1, generator=generator)[:, 0]


def prompt_inputs_within_context(
    model: nn.Module,
    processor: Any,
    conversations: list[list[Message]],
    images: list[list[Image.Image]],
    sampling: SamplingConfig,
    videos: list[list[Video]] | None = None,
) -> dict[str, torch.Tensor]:
    """The processor's batch on the model's device and dtype, refused early if the prompt and the new tokens
    do not fit the model's context."""
    model_inputs = build_model_inputs(processor, conversations, images, model.device, model.dtype, videos=videos)
    prompt_tokens, max_new_tokens = model_inputs["input_ids"].shape[1], sampling.max_new_tokens
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if limit is not None and prompt_tokens + max_new_tokens > limit:
        raise InputError(
            f"the prompt has {prompt_tokens} tokens; with {max_new_tokens} new tokens it exceeds the model's "
            f"context of {limit} tokens"
        )
    return model_inputs


def check_method(k: int | None, schedule: Schedule | None) -> None:
    """A request names one method at most: VTW at K or a schedule."""
    if k is not None and schedule is not None:
        raise InputError("pass either K (VTW) or a schedule, not both")


def method_selector(model: nn.Module, k: int | None, schedule: Schedule | None) -> TokenSelector | None:
    """The token selector of one request: VTW at K, or a per-layer schedule; None for the unchanged model."""
    num_layers = num_decoder_layers(model.config)
    check_method(k, schedule)
    if schedule is not None:
        return ScheduleSelector(model, schedule, num_layers)  # per request: it holds ranking rows
    return withdrawal_selector(k, num_layers)


def generate_tokens(
    model: nn.Module, model_inputs: dict[str, torch.Tensor], *, pad_token_id: int = 0, **options: Any
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row (batch,) until every row has ended or the stop event is set.

    Rows that already ended receive `pad_token_id`, as stock `generate()` does (in the engine they have left the
    batch: `generate_rows`, which takes the `options`).
    """
    batch = model_inputs["input_ids"].shape[0]
    for rows, tokens in generate_rows(model, model_inputs, **options):
        if len(rows) == batch:
            yield tokens
            continue
        column = tokens.new_full((batch,), pad_token_id)
        column[torch.tensor(rows, device=tokens.device)] = tokens
        yield column


def generate_rows(
    model: nn.Module,
    model_inputs: dict[str, torch.Tensor],
    *,
    k: int | None = None,
    position_mode: PositionMode = "original",
    sampling: SamplingConfig = SamplingConfig(),
    eos_token_ids: set[int] = frozenset(),
    stop_event: threading.Event | None = None,
    stop_events: Sequence[threading.Event | None] | None = None,
    max_new_tokens: Sequence[int] | None = None,
    stats: GenerationStats | None = None,
    engine: DecodeEngine = "auto",
    schedule: Schedule | None = None,
    tokens_per_row: list[list[int]] | None = None,
    prefill_engine: PrefillChoice = "plain",
) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield (rows, tokens) per step: the rows still in the batch (indices into `model_inputs`, ascending) and
    their next tokens (len(rows),), until no row is left or `stop_event` is set.

    A row leaves the batch after its end token, after its own `max_new_tokens[row]` tokens (default: every row
    `sampling.max_new_tokens`) or once its `stop_events[row]` is set (checked before each decode step); its keys,
    values, masks and positions are sliced out of the decode state (`_Decoder.select_rows`), so later steps cost
    only the rows that remain, and a greedy row's tokens do not depend on when the others leave.
    When `stats` is given, the token counts, FLOPs and KV-cache size (its peak) are filled in as generation
    proceeds. `engine`: "plain" (growing caches), "static" (preallocated buffers, vtw_core.engine.fast_decode,
    sized by the largest `max_new_tokens`), "compiled" (static, the step traced by torch.compile), "tuned"
    (compiled, its matmuls as inductor's CPU GEMM templates on frozen weights, vtw_core.engine.tuned_kernels),
    "graph" (static + the step as a CUDA graph, captured again when the batch shrinks), or "auto" (`auto_engine`:
    graph on CUDA; on CPU static, or with the compiled or tuned prefill the step of the same name; plain with flash
    attention); `stats.engine` says which one ran.
    `schedule` (vtw_core.engine.schedules) replaces K with a per-layer vision-token schedule (FastV, G-Search, ...).
    `tokens_per_row`, when given, receives each row's real prompt tokens per layer after prefill, so batched
    callers can account every row on its own (vtw_core.generation.batch_stream).
    `prefill_engine`: "plain" (the layer loop), "bucketed" or "graph" (fixed shapes, vtw_core.engine.fast_prefill),
    "shared" (rows showing one image run its prefix once, vtw_core.engine.shared_prefill), "compiled" (the layer
    loop traced by torch.compile, vtw_core.engine.compiled_prefill, and a CLIP or SigLIP vision tower too,
    vtw_core.engine.compiled_vision), "tuned" (compiled, with tuned kernels, the tower's too);
    `stats.prefill_engine` says which ran, with the reason when it fell back to plain.
    """
    sampling.validate()
    batch = model_inputs["input_ids"].shape[0]
    limits = row_limits(max_new_tokens, batch, sampling)
    stops = row_stops(stop_events, batch)
    selector = method_selector(model, k, schedule)
    device = model_inputs["input_ids"].device
    generator = None
    if sampling.do_sample:
        generator = torch.Generator(device=device)
        generator.manual_seed(sampling.seed if sampling.seed is not None else torch.seed())

    logits, state, ran = _prefill(model, model_inputs, selector, position_mode, prefill_engine)
    attention_mask, vision_mask = prompt_masks(model, model_inputs)
    dims = flops.DecoderDims.from_config(model.config)
    per_row_layers = [[int(count[row]) for count in state.prompt_tokens_per_layer] for row in range(batch)]
    if tokens_per_row is not None:
        tokens_per_row.extend(per_row_layers)
    if stats is not None:
        stats.prefill_engine = ran
        stats.prompt_tokens_per_row = attention_mask.sum(1).tolist()
        stats.vision_tokens_per_row = vision_mask.sum(1).tolist()
        stats.prefill_flops_per_row = [flops.prefill_flops(dims, layers) for layers in per_row_layers]
        stats.prompt_tokens = sum(stats.prompt_tokens_per_row)
        stats.vision_tokens = sum(stats.vision_tokens_per_row)
        stats.prefill_flops = sum(stats.prefill_flops_per_row)
        stats.decode_flops_per_row = [0] * batch
        stats.vision_flops = flops.request_vision_flops(model.config, model_inputs)
        stats.kv_cache_bytes = state.kv_cache_bytes()

    compiled = prefill_engine if prefill_engine in COMPILED_ENGINES else None
    decode = _decoder_for(model, state, engine, max(limits), stats, compiled)
    if stats is not None:
        stats.kv_cache_bytes = decode.kv_cache_bytes()

    rows = list(range(batch))  # the rows in the decode state, in its order
    decode_steps = [0] * batch
    eos = torch.tensor(sorted(eos_token_ids), device=device, dtype=torch.long)
    for step in itertools.count():
        tokens = _next_tokens(logits, sampling, generator)
        ended = torch.isin(tokens, eos).tolist()
        if stats is not None:
            stats.new_tokens += len(rows)
        yield list(rows), tokens
        if stop_event is not None and stop_event.is_set():
            break
        stay = [
            place
            for place, row in enumerate(rows)
            if not ended[place] and step + 1 < limits[row] and not (stops[row] is not None and stops[row].is_set())
        ]
        if not stay:
            break
        if len(stay) < len(rows):
            index = torch.tensor(stay, device=device)
            decode.select_rows(index)
            tokens = tokens.index_select(0, index)
            rows = [rows[place] for place in stay]
        for row in rows:
            decode_steps[row] += 1
        logits = decode(tokens)
        if stats is not None:
            stats.decode_flops_per_row = [
                flops.decode_flops(dims, layers, steps)
                for layers, steps in zip(per_row_layers, decode_steps, strict=True)
            ]
            stats.decode_flops = sum(stats.decode_flops_per_row)
            stats.kv_cache_bytes = max(stats.kv_cache_bytes, decode.kv_cache_bytes())


def row_stops(stop_events: Sequence[threading.Event | None] | None, rows: int) -> list[threading.Event | None]:
    """Each row's stop event: `stop_events` (one per row, None for a row nobody stops), or none at all."""
    if stop_events is None:
        return [None] * rows
    stops = list(stop_events)
    if len(stops) != rows:
        raise InputError(f"stop_events has {len(stops)} events for {rows} rows")
    return stops


def row_limits(max_new_tokens: Sequence[int] | None, rows: int, sampling: SamplingConfig) -> list[int]:
    """Each row's new-token limit: `max_new_tokens` (one per row, each checked), or the sampling's for all."""
    if max_new_tokens is None:
        return [sampling.max_new_tokens] * rows
    limits = [validation.check_max_new_tokens(value) for value in max_new_tokens]
    if len(limits) != rows:
        raise InputError(f"max_new_tokens has {len(limits)} limits for {rows} rows")
    return limits


def conversation_tokens(
    model: nn.Module,
    processor: Any,
    conversations: list[list[Message]],
    images: list[list[Image.Image]],
    *,
    sampling: SamplingConfig,
    videos: list[list[Video]] | None = None,
    **options: Any,
) -> tuple[dict[str, torch.Tensor], set[int], Iterator[torch.Tensor]]:
    """The processor's batch of these conversations (refused early if it does not fit the context), the ids that
    end a reply, and `generate_tokens` over the batch (not started yet) with the processor's padding;
    `options` go to `generate_tokens`."""
    model_inputs = prompt_inputs_within_context(model, processor, conversations, images, sampling, videos=videos)
    eos_ids = eos_token_ids_of(model, processor)
    pad = pad_token_id_of(processor)
    steps = generate_tokens(model, model_inputs, sampling=sampling, eos_token_ids=eos_ids, pad_token_id=pad, **options)
    return model_inputs, eos_ids, steps


def _prefill(
    model: nn.Module,
    model_inputs: dict[str, torch.Tensor],
    selector: TokenSelector | None,
    position_mode: PositionMode,
    engine: PrefillChoice,
) -> tuple[torch.Tensor, DecodeState, str]:
    """Logits, decode state and the prefill engine that ran (with the reason when it fell back to plain)."""
    if engine not in PREFILL_CHOICES:
        raise InputError(f"prefill engine must be one of {', '.join(PREFILL_CHOICES)}; got {engine!r}")
    if engine == "shared":
        reason = why_not_shared(model, model_inputs, selector, position_mode)
        shared = shared_prefill(model, model_inputs, selector) if reason is None else None
        if shared is not None:
            return (*shared, "shared")
        engine = f"plain (no shared image prefill: {reason or 'no common prefix holds the image'})"
    compiled = engine in COMPILED_ENGINES
    prompt = embed_prompt(model, model_inputs, compile_vision=compiled, tuned_kernels=engine == "tuned")
    if engine in ("bucketed", "graph"):
        return fast_prefill(model, prompt, selector, position_mode, engine)
    if compiled:
        return compiled_prefill(model, prompt, selector, position_mode, tuned_kernels=engine == "tuned")
    return (*prefill(model, prompt, selector, position_mode), engine)


class _Decoder:
    """Runs decode steps on the chosen engine; falls back from the CUDA graph to the eager static step."""

    def __init__(self, model: nn.Module, state: DecodeState, engine: str, max_new_tokens: int, stats):
        self.model, self.state, self.engine, self.stats = model, state, engine, stats
        self.max_new_tokens = max_new_tokens
        self.fast = None  # built at the first decode step, so the first token is not delayed by the copy
        self.graphed: GraphedDecodeStep | None = None
        self.prefill_slots: list[int] = []  # per layer group: cached prompt slots (padding included)
        self.steps = 0  # decode steps run on the buffers
        if stats is not None:
            stats.engine = engine

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.engine == "plain":
            return decode_step(self.model, self.state, tokens[:, None])
        if self.fast is None:
            self.fast = fast_state_from_prefill(self.state, self.max_new_tokens)
            self.prefill_slots = [group.valid.shape[1] for group in self.state.groups]
            self.state = None  # the buffers hold the caches now; let the prefill's cache go
        self.fast.input_ids.copy_(tokens[:, None])
        self.steps += 1
        if self.engine in COMPILED_ENGINES:
            return compiled_decode_step(self.model, self.fast, tuned_kernels=self.engine == "tuned")
        if self.engine == "graph":
            if self.graphed is None:
                try:
                    self.graphed = GraphedDecodeStep(self.model, self.fast)
                except RuntimeError:  # capture failed or disagreed with the eager step: stay eager
                    self.engine = "static"
                    if self.stats is not None:
                        self.stats.engine = "static (graph capture failed)"
                    return static_decode_step(self.model, self.fast, trim=True)
            return self.graphed()
        return static_decode_step(self.model, self.fast, trim=True)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (long indices into the current batch), in the prefill's cache or the
        static buffers; a captured CUDA graph is dropped and captured again, for the smaller batch, at the next
        step."""
        if self.fast is None:
            self.state.select_rows(rows)
            return
        starts = self.fast.select_rows(rows)
        self.prefill_slots = [slots - start for slots, start in zip(self.prefill_slots, starts, strict=True)]
        self.graphed = None

    def kv_cache_bytes(self) -> int:
        """Bytes of keys and values held for the tokens so far, whatever the engine (the plain cache's size);
        the static buffers reserve room for the remaining new tokens on top (`fast.cache.kv_cache_bytes()`)."""
        if self.fast is None:
            return self.state.kv_cache_bytes()
        total = 0
        for layer_idx, group_idx in enumerate(self.fast.group_of_layer):
            keys, values = self.fast.cache.keys[layer_idx], self.fast.cache.values[layer_idx]
            slot_bytes = (keys[:, :, 0].numel() * keys.element_size()) + (
                values[:, :, 0].numel() * values.element_size()
            )
            total += slot_bytes * (self.prefill_slots[group_idx] + self.steps)
        return total


def auto_engine(device: torch.device, attention: str, compiled: str | None = None) -> str:
    """The decode engine `engine="auto"` picks, per device, from measurements (docs/engines.md, "Decode engines").

    CUDA: the graph (launch overhead dominates a plain step: 26 -> 9.6 ms/token at 7B on an H100). CPU: the
    static buffers (no torch.cat of every layer's cache per step: 0.67-0.92x plain from 638 tokens up, equal
    at the default model's 162), their step compiled when the prefill is (`compiled`: "compiled" or "tuned", the
    prefill engine whose compile time the caller accepted; the compiled step took 0.68x the static step's time on
    the default model, the tuned one ~0.5x the compiled one's). Both build 4-D masks, so flash attention
    keeps the plain path, as do devices nobody has measured.
    """
    if attention not in ("sdpa", "eager"):
        return "plain"
    if device.type == "cpu" and compiled:
        return compiled
    return {"cuda": "graph", "cpu": "static"}.get(device.type, "plain")


def _decoder_for(
    model: nn.Module, state: DecodeState, engine: str, max_new_tokens: int, stats, compiled: str | None = None
) -> _Decoder:
    if engine not in DECODE_ENGINES:
        raise InputError(f"engine must be one of {', '.join(DECODE_ENGINES)}; got {engine!r}")
    fixed_ok = state.attention_implementation in ("sdpa", "eager")
    if engine == "auto":
        engine = auto_engine(state.cache.layers[0].keys.device, state.attention_implementation, compiled)
    elif engine == "graph" and not (state.cache.layers[0].keys.is_cuda and fixed_ok):
        raise InputError("the CUDA-graph engine needs a CUDA device and sdpa or eager attention")
    elif engine in COMPILED_ENGINES and not fixed_ok:
        raise InputError(f"the {engine} decode engine needs sdpa or eager attention")
    return _Decoder(model, state, engine, max_new_tokens, stats)


def _video_stats(
    model: nn.Module, model_inputs: dict[str, torch.Tensor], videos: list[Video], stats: GenerationStats
) -> None:
    """Frames and video tokens of the request (its video placeholders, as the processor expanded them)."""
    if not videos:
        return
    stats.video_frames = sum(len(video.frames) for video in videos)
    video_token = getattr(model.config, "video_token_id", None)
    if video_token is not None:
        stats.video_tokens = int((model_inputs["input_ids"] == video_token).sum())
    else:  # InternVL marks frames with its image token: one tile of image_seq_length tokens per frame
        stats.video_tokens = stats.video_frames * model.config.image_seq_length
    stats.vision_tokens_per_frame = stats.video_tokens / stats.video_frames


def stream_generate(
    model: nn.Module,
    processor: Any,
    messages: list[Message],
    images: list[Image.Image],
    *,
    videos: list[Video] | None = None,
    k: int | None = None,
    position_mode: PositionMode = "original",
    sampling: SamplingConfig = SamplingConfig(),
    stop_event: threading.Event | None = None,
    engine: DecodeEngine = "auto",
    schedule: Schedule | None = None,
    prefill_engine: PrefillChoice = "plain",
) -> Iterator[StreamEvent]:
    """Answer one conversation, yielding text deltas with live stats; the last event has finished=True.

    `videos`: vtw_core.models.videos.read_video results for the conversation's "video" slots, in order;
    `prefill_engine` as in `generate_tokens`.
    """
    start = time.perf_counter()
    device = model.device
    memory_before = 0
    if device.type == "cuda":
        synchronize(device)
        memory_before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    stats = request_stats(model, k)
    stream = TextStream(stats, getattr(processor, "tokenizer", processor))
    with out_of_memory_as_resource_error(device, "try a smaller image, fewer new tokens or a lower K"):
        model_inputs, eos_ids, steps = conversation_tokens(
            model,
            processor,
            [messages],
            [images],
            sampling=sampling,
            videos=[list(videos or [])],
            k=k,
            position_mode=position_mode,
            stop_event=stop_event,
            stats=stats,
            engine=engine,
            schedule=schedule,
            prefill_engine=prefill_engine,
        )
        _video_stats(model, model_inputs, list(videos or []), stats)
        for tokens in steps:
            synchronize(device)
            record_token_time(stats, time.perf_counter() - start)
            if device.type == "cuda":
                stats.peak_memory_bytes = torch.cuda.max_memory_allocated(device) - memory_before
            yield stream.add(int(tokens[0]), eos_ids)
    last = stream.finish(stats.finish_reason or end_reason(stop_event))
    synchronize(device)
    stats.total_s = time.perf_counter() - start
    yield last


def generate(
    model: nn.Module,
    processor: Any,
    messages: list[Message],
    images: list[Image.Image],
    **options: Any,
) -> GenerationResult:
    """`stream_generate` run to the end."""
    last = None
    for event in stream_generate(model, processor, messages, images, **options):
        last = event
    assert last is not None and last.finished
    return GenerationResult(last.text, last.token_ids, last.stats)


def generate_batch(
    model: nn.Module,
    processor: Any,
    conversations: list[list[Message]],
    images: list[list[Image.Image]],
    *,
    videos: list[list[Video]] | None = None,
    k: int | None = None,
    position_mode: PositionMode = "original",
    sampling: SamplingConfig = SamplingConfig(),
    engine: DecodeEngine = "auto",
    stats: GenerationStats | None = None,
    schedule: Schedule | None = None,
    prefill_engine: PrefillChoice = "plain",
) -> list[list[int]]:
    """Generated token ids per conversation, batched with left padding; each row ends at its first EOS.

    `stats`, when given, receives the batch's token counts and FLOPs (summed over rows, and per row), and its
    time to first token and total time, from this call on (preprocessing included; rows share them).
    `prefill_engine` as in `generate_tokens` ("shared": rows about one image run its prefill once).
    """
    start = time.perf_counter()
    _, eos_ids, steps = conversation_tokens(
        model,
        processor,
        conversations,
        images,
        sampling=sampling,
        videos=videos,
        k=k,
        position_mode=position_mode,
        engine=engine,
        stats=stats,
        schedule=schedule,
        prefill_engine=prefill_engine,
    )
    columns = []
    for column in steps:
        columns.append(column)
        if stats is not None and stats.ttft_s is None:
            synchronize(model.device)
            stats.ttft_s = time.perf_counter() - start
    if stats is not None:
        synchronize(model.device)
        stats.total_s = time.perf_counter() - start
    outputs = []
    for row in range(len(conversations)):
        ids: list[int] = []
        for column in columns:
            ids.append(int(column[row]))
            if ids[-1] in eos_ids:
                break
        outputs.append(ids)
    return outputs
