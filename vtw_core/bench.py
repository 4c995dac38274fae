"""Latency / FLOPs / memory of baseline vs VTW at several K, as a table like the paper's Table 4.

Inputs are either a real image and prompt through the model's processor, or (random-weight models,
which have no processor) a synthetic prompt of the family's real shape: one image's worth of vision
tokens plus `text_tokens` text tokens. Every setting is warmed up once, then timed `repeats` times with
the device synchronised; the table reports medians. Generation ignores EOS so every run decodes the
same number of tokens.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.image_processing_utils import select_best_resolution

from vtw_core.errors import InputError
from vtw_core.generate import GenerationStats, SamplingConfig, generate_tokens
from vtw_core.manager import ModelManager
from vtw_core.methods import Method
from vtw_core.schedules import Schedule


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
    head = _text_ids(config, min(5, text_tokens))
    tail = _text_ids(config, text_tokens - len(head), seed=1)
    input_ids = torch.cat([head, torch.full((vision_tokens,), image_token), tail])[None].to(device)
    inputs["input_ids"] = input_ids
    inputs["attention_mask"] = torch.ones_like(input_ids)
    if "mm_token_type_ids" in inspect.signature(model.model.forward).parameters:
        # Qwen's multimodal rope reads the token types the processor would return: 1 marks image tokens.
        inputs["mm_token_type_ids"] = (input_ids == image_token).long()
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
    head = _text_ids(config, min(5, text_tokens))
    tail = _text_ids(config, text_tokens - len(head), seed=1)
    input_ids = torch.cat([head, torch.full((vision_tokens,), video_token), tail])[None].to(device)
    inputs["input_ids"] = input_ids
    inputs["attention_mask"] = torch.ones_like(input_ids)
    if "mm_token_type_ids" in inspect.signature(model.model.forward).parameters:
        inputs["mm_token_type_ids"] = (input_ids == video_token).long() * 2  # 2 marks video tokens, as the processor
    return inputs


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


@dataclass
class BenchRow:
    label: str
    k: int | None
    engine: str
    ttft_s: float
    decode_ms_per_token: float
    total_s: float
    tokens_per_s: float
    prefill_flops: int
    total_flops: int
    kv_cache_bytes: int
    peak_memory_bytes: int | None
    prompt_tokens: int
    vision_tokens: int
    new_tokens: int


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_run(
    model: nn.Module, inputs: dict[str, torch.Tensor], k: int | None, new_tokens: int, engine: str,
    schedule: Schedule | None = None,
) -> GenerationStats:  # fmt: skip
    device = model.device
    stats = GenerationStats(k=k, num_layers=model.config.get_text_config().num_hidden_layers)
    memory_before = 0
    if device.type == "cuda":
        _synchronize(device)
        memory_before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    sampling = SamplingConfig(max_new_tokens=new_tokens)
    steps = generate_tokens(model, inputs, k=k, sampling=sampling, stats=stats, engine=engine, schedule=schedule)
    for _ in steps:
        _synchronize(device)
        if stats.ttft_s is None:
            stats.ttft_s = time.perf_counter() - start
    _synchronize(device)
    stats.total_s = time.perf_counter() - start
    if device.type == "cuda":
        stats.peak_memory_bytes = torch.cuda.max_memory_allocated(device) - memory_before
    return stats


def run_bench(
    manager: ModelManager,
    ks: list[int],
    *,
    new_tokens: int = 64,
    repeats: int = 3,
    inputs: dict[str, torch.Tensor] | None = None,
    engines: tuple[str, ...] = ("auto",),
    methods: tuple[Method, ...] = (),
) -> list[BenchRow]:
    """For each engine, the baseline, each K, then each method: a warm-up run, then medians of `repeats` runs."""
    model = manager.model
    inputs = inputs if inputs is not None else synthetic_inputs(model)
    settings = [Method("baseline"), *(Method(f"VTW K={k}", k=k) for k in ks), *methods]
    rows = []
    for engine in engines:
        for setting in settings:
            k, schedule = setting.k, setting.schedule
            with manager.lock:
                _timed_run(model, inputs, k, new_tokens, engine, schedule)  # warm-up: allocator, kernels, caches
                runs = [_timed_run(model, inputs, k, new_tokens, engine, schedule) for _ in range(repeats)]
            last = runs[-1]
            ttft = statistics.median(run.ttft_s for run in runs)
            total = statistics.median(run.total_s for run in runs)
            decode_time = total - ttft
            steps = last.new_tokens - 1
            rows.append(
                BenchRow(
                    label=setting.label,
                    k=k,
                    engine=last.engine,
                    ttft_s=ttft,
                    decode_ms_per_token=decode_time / steps * 1e3 if steps > 0 else float("nan"),
                    total_s=total,
                    tokens_per_s=steps / decode_time if decode_time > 0 else float("nan"),
                    prefill_flops=last.prefill_flops,
                    total_flops=last.prefill_flops + last.decode_flops,
                    kv_cache_bytes=last.kv_cache_bytes,
                    peak_memory_bytes=last.peak_memory_bytes,
                    prompt_tokens=last.prompt_tokens,
                    vision_tokens=last.vision_tokens,
                    new_tokens=last.new_tokens,
                )
            )
    return rows


def weight_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def format_table(rows: list[BenchRow], bandwidth_gb_s: float | None = None, weights: int | None = None) -> str:
    """A Markdown table with ratios to each engine's baseline; the decode floor if a bandwidth is given.

    The floor is the time to read every weight once per token (weights / memory bandwidth): a decode step
    cannot beat it at batch 1.
    """
    floor = f"{weights / (bandwidth_gb_s * 1e9) * 1e3:.2f}" if bandwidth_gb_s and weights else "-"

    def ratio(value: float | None, reference: float | None) -> str:
        return f"{value / reference:.2f}" if value and reference else "-"

    header = (
        "| engine | setting | TTFT ms | TTFT ratio | prefill TFLOPs | FLOPs ratio | decode ms/token | floor ms "
        "| total ms | total ratio | KV MB | peak MB |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    base = rows[0]
    for row in rows:
        if row.label == "baseline":
            base = row
        peak = f"{row.peak_memory_bytes / 2**20:.0f}" if row.peak_memory_bytes is not None else "CPU"
        lines.append(
            f"| {row.engine} | {row.label} | {row.ttft_s * 1e3:.1f} | {ratio(row.ttft_s, base.ttft_s)} "
            f"| {row.prefill_flops / 1e12:.4g} | {ratio(row.prefill_flops, base.prefill_flops)} "
            f"| {row.decode_ms_per_token:.2f} | {floor} | {row.total_s * 1e3:.1f} | {ratio(row.total_s, base.total_s)} "
            f"| {row.kv_cache_bytes / 2**20:.2f} | {peak} |"
        )
    return "\n".join(lines)
