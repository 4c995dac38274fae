"""The chat's turns: asking one, answering it on both sides, and taking it back (Regenerate, Stop, a failure).

The two sides run one after the other on the shared device (honest, uncontended numbers; the side that runs
first alternates from turn to turn), or at once in "race" mode. Every answer keeps a footer naming what
produced it. Also here: the untimed warm-up and the `/compare` API, the same answers outside a chat.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
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
from vtw_core.models.prompts import prompt_length, user_message
from vtw_core.models.videos import LIMITS, Video, check_num_frames
from vtw_core.validation import check_k, check_max_new_tokens, check_text


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
    state.results = {side: None for side in SIDES}  # the metrics speak of this turn now, not of the last one
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


def settle_last_turn(state: ChatState) -> ChatState:
    """A turn whose job is gone: answers still "waiting" become "skipped", those still streaming "stopped"."""
    for side in SIDES:
        if not state.still_answering(side):
            continue
        status = "stopped" if state.answers[side][-1] else "skipped"
        state.status[side][-1] = status
        stats = (state.results[side] or {}).get("stats")
        state.footers[side][-1] = footer(side, state.settings, stats, status) if state.settings else status
    return state


# --- The model's context: what a turn may hold, and the max new tokens the next one can take -----------------

# A question of a typical length, for the room the next turn will have (the real question is counted on send).
ROOM_QUESTION = "What colour is the shape in this picture, and where in the picture is it?"
NEW_CONVERSATION = (
    "**New image: a new conversation started.** The model's context ({limit} tokens) cannot hold the "
    "earlier turns and another image, so this image starts afresh."
)


class TooLong(InputError):
    """The turn does not fit the model's context; the message says what to do, and the page keeps the input."""


def context_limit(manager: Any) -> int | None:
    """The model's context in tokens; None where this process cannot tell (the server behind --backend-url)."""
    try:
        config = manager.model.config
    except InputError:
        return None
    return getattr(config.get_text_config(), "max_position_embeddings", None)


def prompt_tokens(manager: Any, state: ChatState) -> int | None:
    """Prompt tokens of the chat's last turn on the longer side (each side sees its own earlier answers).

    Counted as the engine will see it, by the model's own processor on the CPU before any device work
    (`vtw_core.models.prompts.prompt_length`); None where this process cannot count (no processor here).
    """
    try:
        processor = manager.processor
    except InputError:
        return None
    if processor is None:
        return None
    videos = state.videos()
    counts: dict[str, int] = {}
    conversations = {side: state.conversation(side) for side in SIDES}
    for side, (messages, paths) in conversations.items():
        if side != SIDES[0] and conversations[SIDES[0]] == (messages, paths):
            counts[side] = counts[SIDES[0]]  # the same history: the same count
            continue
        counts[side] = prompt_length(processor, messages, [load_image(path) for path in paths], videos)
    return max(counts.values())


def _too_long(prompt: int, limit: int, tokens: int, earlier_turns: bool, images: int) -> TooLong:
    left = limit - prompt
    if left >= 1:
        text = (
            f"with {tokens} new tokens this turn exceeds the model's context: the prompt has {prompt} of its {limit} "
            f"tokens, so lower max new tokens (Parameters) to {left} or less"
        )
        if earlier_turns:
            text += ", or press Clear to start over"
    elif earlier_turns:
        text = f"the conversation fills the model's context ({prompt} of {limit} tokens): press Clear to start over"
    elif images > 1:
        text = (
            f"{images} images take {prompt} tokens, more than the model's context of {limit}: send one image "
            "per conversation"
        )
    else:
        text = f"the question needs {prompt} tokens, more than the model's context of {limit}: shorten it"
    return TooLong(text + ". Your question is still in the box.")


def fit_new_turn(manager: Any, state: ChatState, max_new_tokens: Any) -> ChatState:
    """The chat to answer the turn just added in: `state` when it fits the model's context with
    `max_new_tokens`; a new conversation holding only the new turn (and a note saying so) when the turn brings
    an image the context cannot hold with the earlier turns; else TooLong, saying what to do (the turn stays).
    """
    limit = context_limit(manager)
    tokens = check_max_new_tokens(max_new_tokens)
    prompt = prompt_tokens(manager, state) if limit is not None else None
    if limit is None or prompt is None or prompt + tokens <= limit:
        return state
    turn, earlier = state.turns[-1], len(state.turns) > 1
    if earlier and (turn.image_paths or turn.video_paths):
        fresh = ChatState(turns=[turn], runs=state.runs, notice=NEW_CONVERSATION.format(limit=limit))
        prompt = prompt_tokens(manager, fresh) or 0
        if prompt + tokens <= limit:
            return fresh
        earlier = False  # the advice is for the image on its own: the earlier turns go either way
    raise _too_long(prompt, limit, tokens, earlier, len(turn.image_paths))


def check_room(manager: Any, state: ChatState, max_new_tokens: Any) -> None:
    """For Regenerate: TooLong unless the last turn and `max_new_tokens` fit the model's context."""
    limit = context_limit(manager)
    tokens = check_max_new_tokens(max_new_tokens)
    prompt = prompt_tokens(manager, state) if limit is not None and state.turns else None
    if limit is not None and prompt is not None and prompt + tokens > limit:
        raise _too_long(prompt, limit, tokens, len(state.turns) > 1, len(state.turns[-1].image_paths))


def next_turn_room(manager: Any, state: ChatState, sample_image: str | Path | None) -> int | None:
    """The most new tokens the next question can ask for: the context left after the chat so far and a
    question of a typical length (with `sample_image` when the chat has no image yet). None when unknown.

    It can be 0 or less: the conversation is full (a new image, or Clear, starts a new one).
    """
    limit = context_limit(manager)
    media = any(turn.image_paths or turn.video_paths for turn in state.turns)
    unanswered = any(len(state.answers[side]) < len(state.turns) for side in SIDES)
    if limit is None or unanswered or (not media and sample_image is None):
        return None
    question = Turn(ROOM_QUESTION, [] if media else [str(sample_image)])
    probe = replace(state, turns=[*state.turns, question], answers={side: list(state.answers[side]) for side in SIDES})
    prompt = prompt_tokens(manager, probe)
    return None if prompt is None else limit - prompt


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
    `stop_event` is anything with `is_set()`; a side that has not started when it is set is "skipped". `eta`
    is the eta of the session's K search that chose `k` (the footer names it), None for a K set by hand.
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
            _record_timing(state, side, stats, settings)
        yield state, counters(state, mode)
    for side in SIDES:  # a side that never started (Stop pressed during the other) says so
        if state.still_answering(side):
            state.status[side][-1] = "skipped" if state.results[side] is None else "stopped"
            state.footers[side][-1] = footer(side, settings, (state.results[side] or {}).get("stats"), "skipped")
    yield state, counters(state, mode)


def _finished(reason: str | None) -> str:
    return "stopped" if reason == "stopped" else "done"


def _record_timing(state: ChatState, side: str, stats: dict[str, Any], settings: TurnSettings) -> None:
    """A finished side's TTFT and total time for the timing chart, in series named as the side ran
    ("baseline TTFT", "VTW K=5 total"): a later turn, or Regenerate, at other settings never relabels them."""
    turn = len(state.turns)
    label = "baseline" if side == "baseline" else settings.label()
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


WARM_UP_TOKENS = 16  # new tokens per warm-up pass: past the first token, so the decode engine runs too
WARM_UP_QUESTION = "What is in the picture?"


def warm_up(
    manager: ModelManager,
    k: int,
    examples: str | Path | list[tuple[str | Path, str]],
    max_new_tokens: int = WARM_UP_TOKENS,
) -> list[tuple[str, int]]:
    """Untimed passes over exactly what a first turn runs, so that neither side pays first-call costs in it.

    The first pass of a path pays one-time costs (buffers and allocator pools grown, kernels chosen per
    shape, lazy initialisation); whichever side pays them in the first turn looks slower than it is. So the
    warm-up runs the first example (`examples`: the page's (image, question) pairs, or one image) as a turn
    sends it (same prompt, so the same shapes), on the chat's own path (`manager.stream` with the decode
    engine a turn uses, past the first token), both sides in both orders: baseline, VTW at K, VTW, baseline.
    Returns the passes run, as (side, prompt tokens).
    """
    try:
        if manager.processor is None:
            return []  # random weights: nothing to chat with
    except InputError:
        return []  # answers come from a server (--backend-url): it warms up its own device
    if isinstance(examples, (str, Path)):
        examples = [(examples, WARM_UP_QUESTION)]
    if not examples:
        return []
    image_path, question = examples[0]
    messages = [user_message(question, num_images=1)]
    k = check_k(k, manager.info.num_layers)
    sides = {"baseline": None, "vtw": k}
    passes = []
    for side in (*run_order(0), *run_order(1)):
        last = None
        for event in manager.stream(
            messages, [load_image(image_path)], k=sides[side], sampling=SamplingConfig(max_new_tokens=max_new_tokens)
        ):
            last = event
        passes.append((side, last.stats.prompt_tokens if last is not None else 0))
    return passes
