"""Accuracy, time and FLOPs of the baseline and of VTW on a VQA set (easy-vqa, or a JSONL file).

Questions go through the model's chat template one user turn each, in left-padded batches, greedy; the reply
is scored by normalised match (vtw_core.training.easyvqa). `k="auto"` picks K with the K search on calibration
samples from the *train* split, never from the evaluated one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

from torch import nn

from vtw_core.analysis.k_search import CalibrationSample, KSearchResult, search_k
from vtw_core.engine.schedules import Schedule
from vtw_core.errors import InputError
from vtw_core.generation.generate import generate_batch
from vtw_core.generation.types import GenerationStats, SamplingConfig
from vtw_core.models.families import num_decoder_layers
from vtw_core.models.images import load_image
from vtw_core.models.prompts import user_message
from vtw_core.training.easyvqa import VQAItem, answers, is_correct, load_jsonl, load_split

Progress = Callable[[int, int], None]


@dataclass
class SideResult:
    k: int | None
    method: str
    accuracy: float
    correct: int
    questions: int
    time_s: float
    prefill_flops: float  # mean per question, language model
    decode_flops: float  # mean per question
    prefill: str = "plain"  # the prefill engines that ran ("shared": questions shared their image's prefill)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@cache
def _image(path: str):
    return load_image(path)


def load_items(data: str, split: str = "test", limit: int | None = None) -> list[VQAItem]:
    items = load_split(split) if data == "easy-vqa" else load_jsonl(data)
    if limit is not None:
        if limit < 1:
            raise InputError(f"--limit must be positive, got {limit}")
        items = items[:limit]
    return items


def evaluate_side(
    model: nn.Module,
    processor: Any,
    items: Sequence[VQAItem],
    k: int | None,
    *,
    schedule: Schedule | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 16,
    progress: Progress | None = None,
    share_image_prefill: bool = True,
) -> SideResult:
    """Greedy replies for every item at one K (None: baseline), scored, timed, with analytic FLOPs.

    `share_image_prefill`: consecutive questions about one image form a batch that runs the image's prefix once
    (vtw_core.engine.shared_prefill; schedules cannot, and batch as usual). FLOPs stay those of one question alone.
    """
    known = answers()
    vocabulary = known if all(item.answer in known for item in items[:50]) else []
    tokenizer = getattr(processor, "tokenizer", processor)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    correct = 0
    prefill_flops = decode_flops = 0
    started = time.perf_counter()
    share = share_image_prefill and schedule is None
    done = 0
    ran: dict[str, None] = {}  # in order of first use
    for chunk in batches(items, batch_size, by_image=share):
        conversations = [[user_message(item.question, 1)] for item in chunk]
        images = [[_image(item.image)] for item in chunk]
        stats = GenerationStats(k=k, num_layers=num_decoder_layers(model.config))
        outputs = generate_batch(
            model,
            processor,
            conversations,
            images,
            k=k,
            sampling=sampling,
            stats=stats,
            schedule=schedule,
            prefill_engine="shared" if share else "plain",
        )
        ran.setdefault(stats.prefill_engine, None)
        prefill_flops += stats.prefill_flops
        decode_flops += stats.decode_flops
        for item, ids in zip(chunk, outputs, strict=True):
            correct += is_correct(tokenizer.decode(ids, skip_special_tokens=True), item.answer, vocabulary)
        done += len(chunk)
        if progress is not None:
            progress(done, len(items))
    elapsed = time.perf_counter() - started
    count = max(len(items), 1)
    label = schedule.name if schedule is not None else ("baseline" if k is None else f"VTW K={k}")
    return SideResult(
        k, label, correct / count, correct, len(items), elapsed, prefill_flops / count, decode_flops / count,
        "; ".join(ran) or "plain",
    )  # fmt: skip


def batches(items: Sequence[VQAItem], batch_size: int, by_image: bool) -> list[Sequence[VQAItem]]:
    """Consecutive items, at most `batch_size` per batch; `by_image`: a batch never mixes images."""
    out: list[Sequence[VQAItem]] = []
    start = 0
    while start < len(items):
        end = min(start + batch_size, len(items))
        if by_image:
            end = next((i for i in range(start + 1, end) if items[i].image != items[start].image), end)
        out.append(items[start:end])
        start = end
    return out


def train_calibration(count: int = 20) -> list[CalibrationSample]:
    """`count` train-split questions spread evenly over the split (never test data)."""
    items = load_split("train")
    step = len(items) // count
    return [CalibrationSample(item.question, [_image(item.image)]) for item in items[::step][:count]]


def auto_k(
    model: nn.Module, processor: Any, eta: float = 0.003, samples: int = 20, over: str = "prompt"
) -> KSearchResult:
    return search_k(model, processor, train_calibration(samples), eta=eta, over=over)
