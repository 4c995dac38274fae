"""The chat's turns: asking one, answering it on both sides, and taking it back (Regenerate, Stop, a failure).

The two sides run one after the other on the shared device (honest, uncontended numbers; the side that runs
first alternates from turn to turn), or at once in "race" mode. Every answer keeps a footer naming what
produced it. Also here: the untimed warm-up and the `/compare` API, the same answers outside a chat.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from app.media import chat_videos, checked_images, checked_videos
from app.metrics import counters, footer
from app.session import SIDES, ChatState, RunMode, Turn, TurnSettings, fastv_layer
from vtw_core.engine.methods import Method, parse_method
from vtw_core.errors import InputError
from vtw_core.generation.manager import ModelManager
from vtw_core.generation.types import SamplingConfig
from vtw_core.models.families import VIDEO_FAMILIES
from vtw_core.models.images import load_image
from vtw_core.models.prompts import user_message
from vtw_core.models.videos import LIMITS, Video, check_num_frames
from vtw_core.validation import check_k, check_text


def add_turn(
    state: ChatState,
    text: str | None,
    image_paths: list[str],
    allowed_roots: list[Path],
    video_paths: list[str] | None = None,
    num_frames: Any = LIMITS.default_frames,
    family: str | None = None,
) -> ChatState:
    """Validate a new user turn (question, images, videos) and append it; nothing changes if it is invalid.

    Videos are decoded here with `num_frames` frames (a clear message now for corrupt, huge or overlong files,
    before any model work); `family` is the loaded model's, whose processor must take video.
    """
    video_paths = list(video_paths or [])
    if not (text or "").strip():
        raise InputError("please type a question")
    text = check_text(text)
    paths = checked_images(image_paths, allowed_roots)
    # The frame count matters only with a video (the control may sit at any value otherwise).
    frames = check_num_frames(num_frames) if video_paths else LIMITS.default_frames
    videos = checked_videos(video_paths, frames, allowed_roots, family)
    if not paths and not videos and not any(turn.image_paths or turn.video_paths for turn in state.turns):
        media = "an image or a video" if family in VIDEO_FAMILIES else "an image"
        raise InputError(f"please upload {media} with your first question")
    state.turns.append(Turn(text, paths, videos, frames))
    return state


def _trim(state: ChatState, side: str, length: int) -> None:
    for per_answer in (state.answers, state.status, state.footers):
        del per_answer[side][length:]


def _open_answers(state: ChatState, status: str, note: Callable[[str], str]) -> None:
    """Empty answers to the last turn on both sides (replacing any), with the status and footer they start with."""
    for side in SIDES:
        _trim(state, side, len(state.turns) - 1)
        state.answers[side].append("")
        state.status[side].append(status)
        state.footers[side].append(note(side))


def show_waiting(state: ChatState) -> ChatState:
    """Placeholders for the last turn while it waits for the device, so the question shows at once."""
    _open_answers(state, "waiting", lambda side: "")
    return state


def drop_last_answers(state: ChatState) -> ChatState:
    """For Regenerate: forget the answers to the last turn (the turn itself stays)."""
    if not state.turns:
        raise InputError("nothing to regenerate yet")
    for side in SIDES:
        _trim(state, side, len(state.turns) - 1)
    return state


def undo_last_turn(state: ChatState) -> ChatState:
    """After a failed turn: remove it and any partial answers, so the chat stays consistent."""
    if state.turns:
        for side in SIDES:
            _trim(state, side, len(state.turns) - 1)
        state.turns.pop()
    return state


def skip_last_turn(state: ChatState, settings: TurnSettings | None = None) -> ChatState:
    """Stop pressed before the turn reached the device: both sides say "skipped" and nothing runs."""
    _open_answers(state, "skipped", lambda side: footer(side, settings, None, "skipped") if settings else "skipped")
    state.results = {side: None for side in SIDES}
    return state


def run_order(runs: int) -> tuple[str, str]:
    """Which side goes first on the device: the baseline on even turns, the accelerated side on odd ones.

    Whatever runs first can pay costs the second does not (caches, allocator, CPU frequency); alternating
    spreads them evenly over a conversation instead of always charging the baseline.
    """
    return SIDES if runs % 2 == 0 else (SIDES[1], SIDES[0])


def accelerated_method(method: str, k: int, num_layers: int) -> Method:
    """The right pane's method: VTW at the slider's K, FastV at K with its ratio, or a schedule file."""
    if method == "vtw":
        return parse_method(f"vtw:{k}", num_layers)
    if method.startswith("fastv:"):
        return parse_method(f"fastv:{fastv_layer(k, num_layers)}:{method.split(':', 1)[1]}", num_layers)
    return parse_method(method, num_layers)


def side_request(state: ChatState, side: str, accelerated: Method, videos: list[Video]) -> dict[str, Any]:
    """What one side is sent for the chat's last turn: its own conversation, the images, and its method."""
    messages, paths = state.conversation(side)
    request: dict[str, Any] = {
        "messages": messages,
        "images": [load_image(path) for path in paths],
        "k": None if side == "baseline" else accelerated.k,
        "schedule": None if side == "baseline" else accelerated.schedule,
    }
    if videos:  # only then: a backend that takes images only never sees the option
        request["videos"] = videos
    return request


def sampling_config(max_new_tokens: Any, sample: Any, temperature: Any, top_p: Any, seed: Any) -> SamplingConfig:
    """The parameters panel as a checked SamplingConfig; greedy unless sampling is on (then one seed for both)."""
    if not sample:  # greedy: the two answers are comparable token for token
        return SamplingConfig(max_new_tokens=max_new_tokens)
    return SamplingConfig(max_new_tokens, True, temperature, top_p, seed=0 if seed is None else seed)


def answer_last_turn(
    manager: ModelManager,
    state: ChatState,
    k: int,
    sampling: SamplingConfig,
    mode: RunMode = "sequential",
    stop_event: Any = None,
    method: str = "vtw",
    eta: float | None = None,
) -> Iterator[tuple[ChatState, dict[str, str]]]:
    """Answer the last turn on both sides; yields the state and the metrics' Markdown as tokens stream.

    The accelerated side runs `method` (vtw_core.engine.methods: "vtw" uses the slider's K, "fastv:R" FastV from
    layer K keeping 1 - R, "schedule:NAME" a saved schedule). With sampling, both sides get the same seed.
    `stop_event` is anything with `is_set()`; a side that has not started when it is set is "skipped".
    """
    if not state.turns:
        raise InputError("ask a question first")
    k = check_k(k, manager.info.num_layers)
    accelerated = accelerated_method(method, k, manager.info.num_layers)
    videos = chat_videos(manager, state)  # decoded once, before the state changes: both sides see the same frames
    settings = TurnSettings(method, k, manager.info.num_layers, eta)
    state.k_used, state.settings = k, settings
    state.results = {side: None for side in SIDES}
    state.first = run_order(state.runs)[0]
    order = run_order(state.runs) if mode == "sequential" else SIDES
    state.runs += 1
    requests = {
        side: {**side_request(state, side, accelerated, videos), "sampling": sampling, "stop_event": stop_event}
        for side in order
    }
    _open_answers(state, "waiting", lambda side: footer(side, settings, None, "waiting"))
    events = manager.race(requests) if mode == "race" else _one_after_the_other(manager, requests, stop_event)
    for side, event in events:
        status = "running" if not event.finished else _finished(event.stats.finish_reason)
        stats = event.stats.to_dict()
        state.answers[side][-1] = event.text
        state.status[side][-1] = status
        state.footers[side][-1] = footer(side, settings, stats, status)
        state.results[side] = {"text": event.text, "token_ids": event.token_ids, "stats": stats}
        if event.finished:
            _record_timing(state, side, stats)
        yield state, counters(state, mode)
    for side in SIDES:  # a side that never started (Stop pressed during the other) says so
        if state.status[side][-1] in ("waiting", "running"):
            state.status[side][-1] = "skipped" if state.results[side] is None else "stopped"
            state.footers[side][-1] = footer(side, settings, (state.results[side] or {}).get("stats"), "skipped")
    yield state, counters(state, mode)


def _finished(reason: str | None) -> str:
    return "stopped" if reason == "stopped" else "done"


def _record_timing(state: ChatState, side: str, stats: dict[str, Any]) -> None:
    turn = len(state.turns)
    label = "baseline" if side == "baseline" else "accelerated"
    for name, key in (("TTFT", "ttft_s"), ("total", "total_s")):
        if stats.get(key) is not None:
            state.timings.append({"turn": turn, "series": f"{label} {name}", "seconds": stats[key]})


def _one_after_the_other(
    manager: ModelManager, requests: dict[str, dict[str, Any]], stop_event: Any
) -> Iterator[tuple[str, Any]]:
    for side, request in requests.items():
        if stop_event is not None and stop_event.is_set():
            return  # Stop pressed during the first side: the second one is skipped
        for event in manager.stream(**request):
            yield side, event


def compare_once(manager: ModelManager, image_path: str, question: str, k: int, max_new_tokens: int) -> dict[str, Any]:
    """The `/compare` API: one greedy question about one image, baseline then VTW, as plain JSON.

    Every parameter is checked before the baseline runs, so a bad K costs nothing.
    """
    k = check_k(k, manager.info.num_layers)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    messages = [user_message(question, num_images=1)]
    image = load_image(image_path)
    output: dict[str, Any] = {}
    for side, side_k in (("baseline", None), ("vtw", k)):
        result = manager.generate(messages, [image], k=side_k, sampling=sampling)
        output[side] = {"text": result.text, "token_ids": result.token_ids, "stats": result.stats.to_dict()}
    output["vtw"] = {"k": k, **output["vtw"]}
    return output


def warm_up(manager: ModelManager, k: int, image_path: str | Path) -> None:
    """One short, untimed answer on each path (baseline and VTW at K), so no side pays first-call costs.

    The first call of a path allocates buffers, loads kernels and fills caches; without this, the first
    turn's numbers would measure setup, not the method.
    """
    if manager.processor is None:
        return  # random weights: nothing to chat with
    messages = [user_message("What is in the picture?", num_images=1)]
    image = load_image(image_path)
    for side_k in (None, check_k(k, manager.info.num_layers)):
        manager.generate(messages, [image], k=side_k, sampling=SamplingConfig(max_new_tokens=4))
