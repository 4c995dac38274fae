"""Latency / FLOPs / memory of baseline vs VTW at several K, as a table like the paper's Table 4.

Inputs are either a real image and prompt through the model's processor, or (random-weight models,
which have no processor) a synthetic prompt of the family's real shape: one image's worth of vision
tokens plus `text_tokens` text tokens. Every setting runs once untimed (warm-up), then the settings run
interleaved (A B C A B C ...) `repeats` times, at a thread count the caller fixes; the table reports
medians with min and max. Times come from CUDA events on CUDA and perf_counter on CPU. Generation ignores
EOS so every run decodes the same number of tokens.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.image_processing_utils import select_best_resolution

from vtw_core.engine.methods import Method
from vtw_core.engine.schedules import Schedule
from vtw_core.errors import InputError
from vtw_core.generation.generate import generate_tokens
from vtw_core.generation.manager import ModelManager
from vtw_core.generation.types import GenerationStats, SamplingConfig


def llava_next_image_tokens(config: Any, height: int, width: int) -> int:
    """Vision tokens LLaVA-NeXT's processor gives an image of this size (anyres tiles, unpadded, newlines)."""
    tile = config.vision_config.image_size
    patches = tile // config.vision_config.patch_size
    best_height, best_width = select_best_resolution([height, width], config.image_grid_pinpoints)
    grid_height, grid_width = patches * (best_height // tile), patches * (best_width // tile)
    # Crop the grid to the image's aspect ratio, as the model's `unpad_image` does.
    if width / height > grid_width / grid_height:
        new_height = int(round(height * (grid_width / width), 7))
        grid_height -= 2 * ((grid_height - new_height) // 2)
    else:
        new_width = int(round(width * (grid_height / height), 7))
        grid_width -= 2 * ((grid_width - new_width) // 2)
    base = patches * patches + (1 if config.vision_feature_select_strategy == "full" else 0)
    return base + grid_height * grid_width + grid_height  # one newline token per grid row


def synthetic_inputs(
    model: nn.Module, text_tokens: int = 62, image_size: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """A one-image prompt of the model's real shape: text, the image's vision tokens, more text."""
    config = model.config
    device, dtype = model.device, model.dtype
    family = config.model_type
    inputs: dict[str, torch.Tensor] = {}
    if family == "video_llava":  # one CLIP image; the CLS token is dropped ("default")
        tile = config.vision_config.image_size
        vision_tokens = (tile // config.vision_config.patch_size) ** 2
        inputs["pixel_values_images"] = torch.randn(1, 3, tile, tile, device=device, dtype=dtype)
        image_token = config.image_token_id
    elif family in ("llava", "llava_next"):
        tile = config.vision_config.image_size
        height, width = image_size or (tile, tile)
        if family == "llava":
            vision_tokens = (tile // config.vision_config.patch_size) ** 2
            vision_tokens += 1 if config.vision_feature_select_strategy == "full" else 0
            inputs["pixel_values"] = torch.randn(1, 3, tile, tile, device=device, dtype=dtype)
        else:
            from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

            crops = image_size_to_num_patches((height, width), config.image_grid_pinpoints, tile)
            vision_tokens = llava_next_image_tokens(config, height, width)
            inputs["pixel_values"] = torch.randn(1, crops, 3, tile, tile, device=device, dtype=dtype)
            inputs["image_sizes"] = torch.tensor([[height, width]], device=device)
        image_token = config.image_token_id
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        vision = config.vision_config
        patch, merge = vision.patch_size, vision.spatial_merge_size
        height, width = image_size or (448, 448)
        grid = (1, height // patch, width // patch)
        vision_tokens = grid[0] * grid[1] * grid[2] // merge**2
        features = vision.in_channels * vision.temporal_patch_size * patch * patch
        inputs["pixel_values"] = torch.randn(grid[0] * grid[1] * grid[2], features, device=device, dtype=dtype)
        inputs["image_grid_thw"] = torch.tensor([grid], device=device)
        image_token = config.image_token_id
    else:
        raise InputError(f"no synthetic input for model type {family!r}")
    inputs.update(_prompt_ids(model, vision_tokens, image_token, text_tokens, token_type=1))
    return inputs


def synthetic_video_inputs(model: nn.Module, frames: int = 8, text_tokens: int = 62) -> dict[str, torch.Tensor]:
    """A one-video prompt of the model's real shape: text, `frames` frames' worth of video tokens, more text.

    Video-LLaVA keeps CLS per frame (257 tokens per 224 px frame); LLaVA-NeXT-Video pools each frame's patch grid
    by its spatial stride; LLaVA-OneVision pools 2x2 (rounding up) and adds one newline token per video;
    Qwen2-VL / Qwen2.5-VL take 448 px frames in temporal pairs.
    """
    config = model.config
    device, dtype = model.device, model.dtype
    family = config.model_type
    if frames < 1:
        raise InputError(f"a synthetic video needs at least one frame, got {frames}")
    inputs: dict[str, torch.Tensor] = {}
    if family in ("video_llava", "llava_next_video", "llava_onevision"):
        tile = config.vision_config.image_size
        side = tile // config.vision_config.patch_size
        if family == "video_llava":
            per_frame = side * side + 1
        elif family == "llava_next_video":
            per_frame = (side // config.spatial_pool_stride) ** 2
        else:
            per_frame = math.ceil(side / 2) ** 2
        vision_tokens = frames * per_frame + (1 if family == "llava_onevision" else 0)
        inputs["pixel_values_videos"] = torch.randn(1, frames, 3, tile, tile, device=device, dtype=dtype)
    elif family in ("qwen2_vl", "qwen2_5_vl"):
        vision = config.vision_config
        patch, merge, temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
        grid = (math.ceil(frames / temporal), 448 // patch, 448 // patch)
        vision_tokens = grid[0] * grid[1] * grid[2] // merge**2
        features = vision.in_channels * temporal * patch * patch
        inputs["pixel_values_videos"] = torch.randn(grid[0] * grid[1] * grid[2], features, device=device, dtype=dtype)
        inputs["video_grid_thw"] = torch.tensor([grid], device=device)
    else:
        raise InputError(f"no synthetic video input for model type {family!r}")
    video_token = config.video_token_id
    inputs.update(_prompt_ids(model, vision_tokens, video_token, text_tokens, token_type=2))
    return inputs


def _prompt_ids(
    model: nn.Module, vision_tokens: int, vision_token: int, text_tokens: int, token_type: int
) -> dict[str, torch.Tensor]:
    """input_ids (a little text, the vision placeholders, the rest of the text), its attention mask and, for Qwen's
    multimodal rope, the token types the processor would return (1 marks image tokens, 2 video tokens)."""
    config = model.config
    head = _text_ids(config, min(5, text_tokens))
    tail = _text_ids(config, text_tokens - len(head), seed=1)
    input_ids = torch.cat([head, torch.full((vision_tokens,), vision_token), tail])[None].to(model.device)
    ids = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if "mm_token_type_ids" in inspect.signature(model.model.forward).parameters:
        ids["mm_token_type_ids"] = (input_ids == vision_token).long() * token_type
    return ids


def _text_ids(config: Any, count: int, seed: int = 0) -> torch.Tensor:
    """Ordinary text ids, avoiding every special id the configs name (image, video, pad, bos, eos ...)."""
    vocab = config.get_text_config().vocab_size
    special = set()
    for cfg in (config, config.get_text_config()):
        for name, value in vars(cfg).items():
            if name.endswith("_token_id") or name.endswith("_token_index"):
                special.update(value if isinstance(value, list) else [value])
    ordinary = torch.tensor([i for i in range(3, min(vocab, 32000)) if i not in special])
    picks = torch.randint(len(ordinary), (count,), generator=torch.Generator().manual_seed(seed))
    return ordinary[picks]


# The paper's Table 4: VTW's peak GPU memory against the baseline's (LLaVA-1.5, one sample).
PAPER_PEAK_MEMORY_RATIO = 0.65


@dataclass
class BenchRow:
    """One setting on one engine at one number of new tokens: every timed run, and their medians."""

    label: str
    k: int | None
    engine: str  # the decode engine that ran
    ttft_s: float  # median over the timed runs
    decode_ms_per_token: float  # median of each run's (total - TTFT) / (new tokens - 1)
    total_s: float
    tokens_per_s: float
    prefill_flops: int
    total_flops: int
    kv_cache_bytes: int
    peak_memory_bytes: int | None  # CUDA: median peak above the memory in use before the run; CPU: None
    prompt_tokens: int
    vision_tokens: int
    new_tokens: int
    ttft_samples_s: list[float] = field(default_factory=list)
    decode_samples_ms: list[float] = field(default_factory=list)
    total_samples_s: list[float] = field(default_factory=list)
    peak_memory_samples: list[int] = field(default_factory=list)
    prefill_engine: str = "plain"  # the prefill engine that ran (with the reason if it fell back to plain)
    vision_flops: int = 0  # vision tower + projector, the same for every setting


class DeviceClock:
    """Marks points in time; on CUDA as events on the stream (read after one synchronisation at the end),
    elsewhere as perf_counter readings (a CPU run is finished when the call returns)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[Any] = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds_since_first(self) -> list[float]:
        """Seconds from the first mark to each later one."""
        if self.cuda:
            torch.cuda.synchronize()
            return [self.marks[0].elapsed_time(event) / 1e3 for event in self.marks[1:]]
        return [mark - self.marks[0] for mark in self.marks[1:]]


def _timed_run(
    model: nn.Module, inputs: dict[str, torch.Tensor], k: int | None, new_tokens: int, engine: str,
    schedule: Schedule | None = None, prefill_engine: str = "plain",
) -> GenerationStats:  # fmt: skip
    device = model.device
    stats = GenerationStats(k=k, num_layers=model.config.get_text_config().num_hidden_layers)
    memory_before = 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        memory_before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    clock = DeviceClock(device)
    clock.mark()
    sampling = SamplingConfig(max_new_tokens=new_tokens)
    steps = generate_tokens(model, inputs, k=k, sampling=sampling, stats=stats, engine=engine, schedule=schedule,
                            prefill_engine=prefill_engine)  # fmt: skip
    for index, _ in enumerate(steps):
        if index == 0:
            clock.mark()  # the first token exists once the work queued before this mark is done
    clock.mark()
    stats.ttft_s, stats.total_s = clock.seconds_since_first()
    if device.type == "cuda":
        stats.peak_memory_bytes = torch.cuda.max_memory_allocated(device) - memory_before
    return stats


def interleaved_order(settings: int, repeats: int) -> list[int]:
    """The order runs go in: each setting once (the untimed warm-up), then A B C A B C ... `repeats` times.

    Interleaving spreads slow drifts (other processes, clock boost, thermal state) over every setting alike
    instead of charging them to whichever setting ran during them.
    """
    return list(range(settings)) * (1 + repeats)


def time_interleaved(
    device: torch.device, runs: Sequence[Callable[[], Callable[[], object]]], repeats: int
) -> list[list[float]]:
    """Seconds of every run, `repeats` times each, in `interleaved_order` after an untimed warm-up of each.

    `runs[i]()` sets run i up untimed (copies, buffers) and returns the call to time; sample j of every run comes
    from the same cycle, so runs can be compared pairwise per cycle.
    """
    if repeats < 1:
        raise InputError(f"repeats must be at least 1, got {repeats}")
    seconds: list[list[float]] = [[] for _ in runs]
    for position, index in enumerate(interleaved_order(len(runs), repeats)):
        timed = runs[index]()
        clock = DeviceClock(device)
        clock.mark()
        timed()
        clock.mark()
        if position >= len(runs):  # the first pass is the warm-up
            seconds[index].extend(clock.seconds_since_first())
    return seconds


def no_setup(call: Callable[[], object]) -> Callable[[], Callable[[], object]]:
    """A run for `time_interleaved` with nothing to set up: `call` is timed whole."""
    return lambda: call


def run_bench(
    manager: ModelManager,
    ks: list[int],
    *,
    new_tokens: int | list[int] = 64,
    repeats: int = 3,
    inputs: dict[str, torch.Tensor] | None = None,
    engines: tuple[str, ...] = ("auto",),
    methods: tuple[Method, ...] = (),
    prefill_engines: tuple[str, ...] = ("plain",),
) -> list[BenchRow]:
    """Rows for each decode engine x prefill engine x new-token count x (baseline, each K, each method), run
    interleaved after a warm-up.

    Rows come in that order (the baseline first in each group of settings); values are medians over
    `repeats` timed runs, with every run kept in the row's *_samples lists.
    """
    if repeats < 1:
        raise InputError(f"repeats must be at least 1, got {repeats}")
    model = manager.model
    inputs = inputs if inputs is not None else synthetic_inputs(model)
    counts = [new_tokens] if isinstance(new_tokens, int) else list(new_tokens)
    methods_all = [Method("baseline"), *(Method(f"VTW K={k}", k=k) for k in ks), *methods]
    settings = [
        (engine, prefill, count, method)
        for engine in engines
        for prefill in prefill_engines
        for count in counts
        for method in methods_all
    ]
    runs: list[list[GenerationStats]] = [[] for _ in settings]
    with manager.lock:
        for position, index in enumerate(interleaved_order(len(settings), repeats)):
            engine, prefill, count, method = settings[index]
            stats = _timed_run(model, inputs, method.k, count, engine, method.schedule, prefill)
            if position >= len(settings):  # the first pass is the warm-up: allocator, kernels, caches
                runs[index].append(stats)
    return [_row(method, timed) for (*_, method), timed in zip(settings, runs, strict=True)]


def _row(method: Method, runs: list[GenerationStats]) -> BenchRow:
    last = runs[-1]
    steps = last.new_tokens - 1
    decode_ms = [(run.total_s - run.ttft_s) / steps * 1e3 if steps > 0 else float("nan") for run in runs]
    decode = statistics.median(decode_ms)
    peaks = [run.peak_memory_bytes for run in runs if run.peak_memory_bytes is not None]
    return BenchRow(
        label=method.label,
        k=method.k,
        engine=last.engine,
        ttft_s=statistics.median(run.ttft_s for run in runs),
        decode_ms_per_token=decode,
        total_s=statistics.median(run.total_s for run in runs),
        tokens_per_s=1e3 / decode if decode > 0 else float("nan"),
        prefill_flops=last.prefill_flops,
        total_flops=last.prefill_flops + last.decode_flops,
        kv_cache_bytes=last.kv_cache_bytes,
        peak_memory_bytes=int(statistics.median(peaks)) if peaks else None,
        prompt_tokens=last.prompt_tokens,
        vision_tokens=last.vision_tokens,
        new_tokens=last.new_tokens,
        ttft_samples_s=[run.ttft_s for run in runs],
        decode_samples_ms=decode_ms,
        total_samples_s=[run.total_s for run in runs],
        peak_memory_samples=peaks,
        prefill_engine=last.prefill_engine,
        vision_flops=last.vision_flops,
    )


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def median_spread(values: list[float], scale: float, digits: int) -> str:
    """median [min-max] of `values` times `scale`."""
    if not values:
        return "-"
    low, mid, high = min(values) * scale, statistics.median(values) * scale, max(values) * scale
    return f"{mid:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


def format_table(rows: list[BenchRow], bandwidth_gb_s: float | None = None, weights: int | None = None) -> str:
    """A Markdown table, ratios against the baseline of each group of settings (`run_bench`'s order).

    Times are median [min-max] over the timed runs. "vision+prefill ratio" is the FLOPs up to the first token,
    vision tower and projector included: what the TTFT ratio can at best approach.
    The floor is the time to read every weight once per token
    (weights / memory bandwidth): a decode step at batch 1 cannot beat it; "% of bw" is floor / decode time.
    Peak memory (CUDA) is per run at batch 1, i.e. per sample, with its ratio next to the paper's 0.65x.
    """
    floor_ms = weights / (bandwidth_gb_s * 1e9) * 1e3 if bandwidth_gb_s and weights else None

    def ratio(value: float | None, reference: float | None) -> str:
        return f"{value / reference:.2f}" if value and reference else "-"

    header = (
        "| engine | setting | new tokens | TTFT ms | TTFT ratio | prefill TFLOPs | FLOPs ratio | vision+prefill ratio "
        "| decode ms/token | decode ratio | floor ms | % of bw | total ms | total ratio | KV MB | peak MB "
        "| peak ratio |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    base = rows[0]
    for row in rows:
        if row.label == "baseline":
            base = row
        engine = row.engine if row.prefill_engine == "plain" else f"{row.engine}, prefill {row.prefill_engine}"
        peak = f"{row.peak_memory_bytes / 2**20:.0f}" if row.peak_memory_bytes is not None else "CPU"
        floor = f"{floor_ms:.2f}" if floor_ms else "-"
        efficiency = f"{floor_ms / row.decode_ms_per_token * 100:.0f}%" if floor_ms and row.new_tokens > 1 else "-"
        lines.append(
            f"| {engine} | {row.label} | {row.new_tokens} | {median_spread(row.ttft_samples_s, 1e3, 1)} "
            f"| {ratio(row.ttft_s, base.ttft_s)} | {row.prefill_flops / 1e12:.4g} "
            f"| {ratio(row.prefill_flops, base.prefill_flops)} "
            f"| {ratio(row.vision_flops + row.prefill_flops, base.vision_flops + base.prefill_flops)} "
            f"| {median_spread(row.decode_samples_ms, 1, 2)} "
            f"| {ratio(row.decode_ms_per_token, base.decode_ms_per_token)} "
            f"| {floor} "
            f"| {efficiency} | {median_spread(row.total_samples_s, 1e3, 1)} | {ratio(row.total_s, base.total_s)} "
            f"| {row.kv_cache_bytes / 2**20:.2f} | {peak} | {ratio(row.peak_memory_bytes, base.peak_memory_bytes)} |"
        )
    if any(row.peak_memory_bytes is not None for row in rows):
        lines.append(
            f"\nPeak ratio: the paper's Table 4 gives {PAPER_PEAK_MEMORY_RATIO:.2f}x for VTW against the baseline."
        )
    return "\n".join(lines)
