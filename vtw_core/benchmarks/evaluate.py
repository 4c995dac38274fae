"""Accuracy, time and FLOPs of the baseline and of VTW on a VQA set (easy-vqa, or a JSONL file).

Questions go through the model's chat template one user turn each, in left-padded batches, greedy; the reply
is scored by normalised match (vtw_core.training.easyvqa). `k="auto"` picks K with the K search on calibration
samples from the *train* split, never from the evaluated one.

`evaluate_turns` asks several questions about one image as one chat instead (`conversations_of`): turn t's
prompt is the conversation so far, with the model's own earlier replies in it, exactly as the app sends a chat,
and each turn's reply is scored like a single question.
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
from vtw_core.models.prompts import assistant_message, user_message
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
    """Greedy replies for every item at one K (None: baseline), scored, timed, with analytic FLOPs: the
    one-turn case of `evaluate_turns`, each item a conversation of its own.

    `share_image_prefill`: consecutive questions about one image form a batch that runs the image's prefix once
    (vtw_core.engine.shared_prefill; schedules cannot, and batch as usual). FLOPs stay those of one question alone.
    """
    if not items:
        return SideResult(k, _label(k, schedule), 0.0, 0, 0, 0.0, 0.0, 0.0, "plain")
    (result,) = evaluate_turns(model, processor, [[item] for item in items], k, schedule=schedule,
                               batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
                               share_image_prefill=share_image_prefill)  # fmt: skip
    return result


def _label(k: int | None, schedule: Schedule | None) -> str:
    return schedule.name if schedule is not None else ("baseline" if k is None else f"VTW K={k}")


def conversations_of(items: Sequence[VQAItem], turns: int) -> list[list[VQAItem]]:
    """The questions about each image, in the set's order, as conversations of `turns` consecutive questions:
    an image with 11 questions gives 3 conversations of 3 (its last 2 questions fill none and are left out)."""
    if turns < 1:
        raise InputError(f"--turns must be positive, got {turns}")
    by_image: dict[str, list[VQAItem]] = {}
    for item in items:
        by_image.setdefault(item.image, []).append(item)
    return [
        questions[start : start + turns]
        for questions in by_image.values()
        for start in range(0, len(questions) - turns + 1, turns)
    ]


def evaluate_turns(
    model: nn.Module,
    processor: Any,
    conversations: Sequence[Sequence[VQAItem]],
    k: int | None,
    *,
    schedule: Schedule | None = None,
    batch_size: int = 64,
    max_new_tokens: int = 16,
    progress: Progress | None = None,
    share_image_prefill: bool = True,
) -> list[SideResult]:
    """Each conversation asked turn by turn at one K (None: baseline), greedy: one `SideResult` per turn.

    Turn t's prompt is the whole chat so far, as the app builds it (`user_message` with the image in the first
    one only, the model's own earlier replies as `assistant_message`s) and as the model's chat template writes
    it; VTW withdraws the image after layer K for that whole prompt, the follow-up question included. Every
    reply is scored like a single question (`is_correct`). A batch holds conversations about one image when
    `share_image_prefill` (they share its prefix, `vtw_core.engine.shared_prefill`; schedules cannot), else up to
    `batch_size` of any. FLOPs per question are those of the turn's whole prompt, alone; a turn's wall time is
    everything it took (turn 1's includes reading the images).
    """
    if not conversations:
        raise InputError("no conversations to evaluate (fewer questions per image than turns?)")
    turns = len(conversations[0])
    if any(len(conversation) != turns for conversation in conversations):
        raise InputError("every conversation needs the same number of turns")
    known = answers()
    items = [item for conversation in conversations for item in conversation]
    vocabulary = known if all(item.answer in known for item in items[:50]) else []
    tokenizer = getattr(processor, "tokenizer", processor)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    correct = [0] * turns
    prefill_flops = [0.0] * turns
    decode_flops = [0.0] * turns
    elapsed = [0.0] * turns
    ran: list[dict[str, None]] = [{} for _ in range(turns)]  # in order of first use
    share = share_image_prefill and schedule is None
    done = 0
    for group in _conversation_batches(conversations, batch_size, share):
        started = time.perf_counter()
        images = [[_image(conversation[0].image)] for conversation in group]
        chats: list[list] = [[] for _ in group]
        for turn in range(turns):
            for chat, conversation in zip(chats, group, strict=True):
                chat.append(user_message(conversation[turn].question, 1 if turn == 0 else 0))
            stats = GenerationStats(k=k, num_layers=num_decoder_layers(model.config))
            outputs = generate_batch(
                model,
                processor,
                [list(chat) for chat in chats],
                images,
                k=k,
                sampling=sampling,
                stats=stats,
                schedule=schedule,
                prefill_engine="shared" if share else "plain",
            )
            ran[turn].setdefault(stats.prefill_engine, None)
            prefill_flops[turn] += stats.prefill_flops
            decode_flops[turn] += stats.decode_flops
            for chat, conversation, ids in zip(chats, group, outputs, strict=True):
                reply = tokenizer.decode(ids, skip_special_tokens=True)
                correct[turn] += is_correct(reply, conversation[turn].answer, vocabulary)
                chat.append(assistant_message(reply))  # the model's own reply, as the app keeps it
            now = time.perf_counter()
            elapsed[turn] += now - started
            started = now
        done += len(group)
        if progress is not None:
            progress(done, len(conversations))
    count = len(conversations)
    label = _label(k, schedule)
    results = []
    for turn in range(turns):
        results.append(
            SideResult(k, label, correct[turn] / count, correct[turn], count, elapsed[turn],
                       prefill_flops[turn] / count, decode_flops[turn] / count, "; ".join(ran[turn]) or "plain")
        )  # fmt: skip
    return results


def _conversation_batches(
    conversations: Sequence[Sequence[VQAItem]], batch_size: int, by_image: bool
) -> list[Sequence[Sequence[VQAItem]]]:
    firsts = [conversation[0] for conversation in conversations]
    out, start = [], 0
    for chunk in batches(firsts, batch_size, by_image):
        out.append(conversations[start : start + len(chunk)])
        start += len(chunk)
    return out


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
