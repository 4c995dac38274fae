"""Event handlers as plain functions (no Gradio objects), so they can be tested without a browser.

A chat is a list of user turns (text, image paths and video paths) and, per side, the answers given so far. Each side
sees its own earlier answers, as a user chatting with that model alone would. The two sides run one
after the other on the shared device (honest, uncontended numbers; the side that runs first alternates
from turn to turn), or at once in "race" mode. Every answer keeps a footer naming what produced it.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vtw_core.analysis.attention import analyze_attention
from vtw_core.analysis.calibration import load_calibration
from vtw_core.analysis.k_search import CalibrationSample, Progress, check_eta, search_k
from vtw_core.analysis.units import (
    format_bytes,
    format_flops,
    format_kl,
    format_per_frame,
    format_ratio,
    format_seconds,
)
from vtw_core.benchmarks.evaluate import train_calibration
from vtw_core.engine.methods import Method, parse_method
from vtw_core.errors import InputError, ResourceError, VTWError
from vtw_core.generation.generate import SamplingConfig
from vtw_core.generation.manager import ModelManager
from vtw_core.models.defaults import default_model
from vtw_core.models.families import SUPPORTED_FAMILIES, VIDEO_FAMILIES
from vtw_core.models.images import load_image
from vtw_core.models.prompts import Message, assistant_message, user_message
from vtw_core.models.videos import LIMITS, Video, check_num_frames, read_video
from vtw_core.validation import check_float, check_int, check_k, check_max_new_tokens, check_text

logger = logging.getLogger("vtw_chat")
SIDES = ("baseline", "vtw")
RunMode = Literal["sequential", "race"]
NO_ANSWER = "_no answer yet_"
SKIPPED = "_skipped: Stop was pressed before this side ran_"
WAITING = "_waiting for the device…_"
MAX_IMAGES_PER_TURN = 4
MAX_VIDEOS_PER_TURN = 1  # one upload box; a video is already hundreds to thousands of vision tokens
ASSETS = Path(__file__).resolve().parent.parent / "assets"
EXAMPLES = ASSETS / "examples"
TIMING_NOTE = (
    "Timings on a shared CPU are noisy (other work on the machine moves them by tens of percent; use "
    "*Benchmark this turn* for medians); FLOPs, KV cache and token counts are exact."
)


@dataclass
class Turn:
    text: str
    image_paths: list[str]
    video_paths: list[str] = field(default_factory=list)
    # Frames sampled from each of the turn's videos, fixed when the turn is asked: later turns and Regenerate
    # show the model the same frames, whatever the control says by then.
    num_frames: int = LIMITS.default_frames


@dataclass(frozen=True)
class TurnSettings:
    """What the accelerated side runs for one turn, recorded with its answer (so a label can never go stale)."""

    method: str  # "vtw", "fastv:R" or "schedule:NAME", as the method control gives it
    k: int
    num_layers: int
    eta: float | None = None  # the K search threshold on the page when the turn was asked

    def label(self) -> str:
        """Short name of the accelerated side: "VTW K=9", "FastV K=3 R=0.5", "schedule g-search"."""
        if self.method == "vtw":
            return f"VTW K={self.k}"
        if self.method.startswith("fastv:"):
            return f"FastV K={fastv_layer(self.k, self.num_layers)} R={float(self.method.split(':', 1)[1]):g}"
        return f"schedule {Path(self.method.split(':', 1)[1]).stem}"

    def spoken(self) -> str:
        """The label for people: "VTW K = 9", "FastV K = 3 · R = 0.5"."""
        return self.label().replace("K=", "K = ").replace(" R=", " · R = ")


def fastv_layer(k: int, num_layers: int) -> int:
    """FastV prunes after a layer 1..N-1: the slider's K, clamped (K = 0 or N has no FastV meaning)."""
    return min(max(k, 1), num_layers - 1)


def footer(side: str, settings: TurnSettings, stats: dict[str, Any] | None, status: str) -> str:
    """One line under an answer: the method, K, R or schedule, the decode engine and eta that produced it."""
    engine = f"engine {stats.get('engine', 'plain')}" if stats else "engine –"
    if side == "baseline":
        parts = [f"baseline (all {settings.num_layers} layers)", engine]
    else:
        parts = [settings.spoken(), engine]
        if settings.eta is not None and settings.method == "vtw":  # eta chooses VTW's K; FastV has no eta
            parts.append(f"eta {settings.eta:g}")
    if status not in ("done", "running"):
        parts.append(status)
    return " · ".join(parts)


@dataclass
class ChatState:
    """One browser session's conversation. Plain data, so Gradio can copy it per session."""

    turns: list[Turn] = field(default_factory=list)
    answers: dict[str, list[str]] = field(default_factory=lambda: {side: [] for side in SIDES})
    # Per answer: "waiting", "running", "done", "stopped" or "skipped", and the footer that names its settings.
    status: dict[str, list[str]] = field(default_factory=lambda: {side: [] for side in SIDES})
    footers: dict[str, list[str]] = field(default_factory=lambda: {side: [] for side in SIDES})
    results: dict[str, dict[str, Any] | None] = field(default_factory=lambda: {side: None for side in SIDES})
    settings: TurnSettings | None = None  # of the last answered turn
    k_used: int | None = None
    runs: int = 0  # turns answered so far: the side that runs first alternates with it
    first: str = "baseline"  # the side that ran first in the last turn
    timings: list[dict[str, Any]] = field(default_factory=list)  # one row per answered side: the timing chart

    def display(self, side: str) -> list[dict[str, Any]]:
        """The side's chat as Gradio messages: each turn's images, its question, then the answer and its footer."""
        messages: list[dict[str, Any]] = []
        for index, turn in enumerate(self.turns):
            media = [*turn.image_paths, *turn.video_paths]
            messages.extend({"role": "user", "content": {"path": path}} for path in media)
            messages.append({"role": "user", "content": turn.text})
            if index < len(self.answers[side]):
                messages.append({"role": "assistant", "content": self._answer_markdown(side, index)})
        return messages

    def _answer_markdown(self, side: str, index: int) -> str:
        status = self.status[side][index] if index < len(self.status[side]) else "done"
        text = self.answers[side][index]
        if status == "skipped":
            text = SKIPPED
        elif status == "waiting":
            text = WAITING
        elif not text:
            text = "…"
        note = self.footers[side][index] if index < len(self.footers[side]) else ""
        return f"{text}\n\n<sub>⚙ {note}</sub>" if note else text

    def conversation(self, side: str) -> tuple[list[Message], list[str]]:
        """The model's view of the chat for one side: messages ending with the last user turn, and image paths."""
        messages: list[Message] = []
        paths: list[str] = []
        for index, turn in enumerate(self.turns):
            messages.append(user_message(turn.text, num_images=len(turn.image_paths), num_videos=len(turn.video_paths)))
            paths.extend(turn.image_paths)
            if index < len(self.turns) - 1:
                messages.append(assistant_message(self.answers[side][index]))
        return messages, paths

    def has_video(self) -> bool:
        return any(turn.video_paths for turn in self.turns)

    def videos(self) -> list[Video]:
        """The chat's videos in prompt order, decoded with each turn's frame count (the same for both sides)."""
        return [read_video(path, turn.num_frames) for turn in self.turns for path in turn.video_paths]


class StopFlag:
    """`is_set()` for one request: true once Stop or Clear was pressed after the request was made."""

    def __init__(self, sessions: Sessions, session: str, ticket: int):
        self.sessions, self.session, self.ticket = sessions, session, ticket

    def is_set(self) -> bool:
        return self.sessions.stopped(self.session, self.ticket)


class Sessions:
    """Per browser session: request tickets, Stop and Clear, and whether a chat turn is in flight.

    A ticket is issued when the user acts, not when the queue starts the work, so a Stop pressed while the
    request still waits in the queue cancels it as well as a running one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._issued: dict[str, int] = {}
        self._stopped: dict[str, int] = {}
        self._cleared: dict[str, int] = {}
        self._busy: dict[str, int] = {}
        self._refused: set[str] = set()

    def refuse(self, session: str) -> None:
        """A question sent while a turn ran was refused (and kept in the box): say so when the turn ends."""
        with self._lock:
            self._refused.add(session)

    def take_refused(self, session: str) -> bool:
        with self._lock:
            refused = session in self._refused
            self._refused.discard(session)
            return refused

    def issue(self, session: str, turn: bool = False) -> int | None:
        """A new ticket; for a chat turn (`turn=True`) None while another turn of the session is in flight."""
        with self._lock:
            if turn and session in self._busy:
                return None
            ticket = self._issued[session] = self._issued.get(session, 0) + 1
            if turn:
                self._busy[session] = ticket
            return ticket

    def finish(self, session: str, ticket: int | None) -> None:
        with self._lock:
            if ticket is not None and self._busy.get(session) == ticket:
                del self._busy[session]

    def busy(self, session: str) -> bool:
        with self._lock:
            return session in self._busy

    def stop(self, session: str) -> None:
        """Cancel every request of the session made so far, running or queued."""
        with self._lock:
            self._stopped[session] = self._issued.get(session, 0)

    def clear(self, session: str) -> None:
        """Stop, and tell running turns that their chat is gone (they must not write to the page again)."""
        with self._lock:
            self._stopped[session] = self._cleared[session] = self._issued.get(session, 0)

    def stopped(self, session: str, ticket: int) -> bool:
        with self._lock:
            return ticket <= self._stopped.get(session, 0)

    def cleared(self, session: str, ticket: int) -> bool:
        with self._lock:
            return ticket <= self._cleared.get(session, 0)

    def flag(self, session: str, ticket: int) -> StopFlag:
        return StopFlag(self, session, ticket)


class DeviceActivity:
    """What holds the device now, for the page to say why a request waits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[int, tuple[str, float]] = {}
        self._next = 0

    @contextmanager
    def running(self, label: str) -> Iterator[None]:
        with self._lock:
            self._next += 1
            key = self._next
            self._running[key] = (label, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                self._running.pop(key, None)

    def describe(self) -> str:
        with self._lock:
            items = list(self._running.values())
        if not items:
            return "the device is free"
        now = time.monotonic()
        return "running now: " + ", ".join(f"{label} ({now - start:.0f} s)" for label, start in items)


def check_upload_path(path: str | Path, allowed_roots: list[Path], kind: str = "images") -> Path:
    """The path, resolved, if it lies under one of the allowed folders (uploads, assets); else InputError."""
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(root.resolve()) for root in allowed_roots):
        raise InputError(f"{kind} can only come from uploads or the bundled examples")
    return resolved


class VideoRefused(InputError):
    """The turn's video was refused (unreadable, too big or long, or the model takes none): the page drops it."""


def video_families_text() -> str:
    return ", ".join(f"{SUPPORTED_FAMILIES[family]} (`{family}`)" for family in sorted(VIDEO_FAMILIES))


def takes_video(manager: Any) -> bool:
    """Whether the loaded model answers about videos: its family's processor takes them, and it runs here
    (the server API behind `--backend-url` carries images only)."""
    return manager.info.family in VIDEO_FAMILIES and getattr(manager, "takes_video", True)


def check_takes_video(family: str) -> None:
    """Refuse a video for a family whose processor takes none, naming the families that do."""
    if family not in VIDEO_FAMILIES:
        name = SUPPORTED_FAMILIES.get(family, family)
        raise VideoRefused(f"this model ({name}) takes images only; videos work with {video_families_text()}")


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
    if len(image_paths) > MAX_IMAGES_PER_TURN:
        raise InputError(f"at most {MAX_IMAGES_PER_TURN} images per turn")
    paths = [str(check_upload_path(path, allowed_roots)) for path in image_paths]
    for path in paths:
        load_image(path)  # a clear message now for non-images, corrupt files and decompression bombs
    # The frame count matters only with a video (the control may sit at any value otherwise).
    frames = check_num_frames(num_frames) if video_paths else LIMITS.default_frames
    videos = _checked_videos(video_paths, frames, allowed_roots, family)
    if not paths and not videos and not any(turn.image_paths or turn.video_paths for turn in state.turns):
        media = "an image or a video" if family in VIDEO_FAMILIES else "an image"
        raise InputError(f"please upload {media} with your first question")
    state.turns.append(Turn(text, paths, videos, frames))
    return state


def _checked_videos(
    video_paths: list[str], num_frames: int, allowed_roots: list[Path], family: str | None
) -> list[str]:
    """The turn's video paths, resolved, once each decodes within the limits; VideoRefused says why not."""
    if not video_paths:
        return []
    if family is None:
        raise InputError("a video turn needs the model's family, to check that it takes video")
    check_takes_video(family)
    if len(video_paths) > MAX_VIDEOS_PER_TURN:
        raise VideoRefused(f"at most {MAX_VIDEOS_PER_TURN} video per turn")
    for path in video_paths:
        try:
            read_video_upload(path, num_frames, allowed_roots)
        except InputError as error:
            raise VideoRefused(str(error)) from error
    return [str(Path(path).resolve()) for path in video_paths]


def show_waiting(state: ChatState) -> ChatState:
    """Placeholders for the last turn while it waits for the device, so the question shows at once."""
    for side in SIDES:
        _trim(state, side, len(state.turns) - 1)
        state.answers[side].append("")
        state.status[side].append("waiting")
        state.footers[side].append("")
    return state


def _trim(state: ChatState, side: str, length: int) -> None:
    for per_answer in (state.answers, state.status, state.footers):
        del per_answer[side][length:]


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
    for side in SIDES:
        _trim(state, side, len(state.turns) - 1)
        state.answers[side].append("")
        state.status[side].append("skipped")
        state.footers[side].append(footer(side, settings, None, "skipped") if settings else "skipped")
    state.results = {side: None for side in SIDES}
    return state


def run_order(runs: int) -> tuple[str, str]:
    """Which side goes first on the device: the baseline on even turns, the accelerated side on odd ones.

    Whatever runs first can pay costs the second does not (caches, allocator, CPU frequency); alternating
    spreads them evenly over a conversation instead of always charging the baseline.
    """
    return SIDES if runs % 2 == 0 else (SIDES[1], SIDES[0])


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
    requests = {}
    for side in order:
        messages, paths = state.conversation(side)
        requests[side] = {
            "messages": messages,
            "images": [load_image(path) for path in paths],
            "k": None if side == "baseline" else accelerated.k,
            "schedule": None if side == "baseline" else accelerated.schedule,
            "sampling": sampling,
            "stop_event": stop_event,
        }
        if videos:  # only then: a backend that takes images only never sees the option
            requests[side]["videos"] = videos
    for side in SIDES:
        _trim(state, side, len(state.turns) - 1)
        state.answers[side].append("")
        state.status[side].append("waiting")
        state.footers[side].append(footer(side, settings, None, "waiting"))
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
        yield state, counters(state.results, mode, settings.label(), state.first)
    for side in SIDES:  # a side that never started (Stop pressed during the other) says so
        if state.status[side][-1] in ("waiting", "running"):
            state.status[side][-1] = "skipped" if state.results[side] is None else "stopped"
            state.footers[side][-1] = footer(side, settings, (state.results[side] or {}).get("stats"), "skipped")
    yield state, counters(state.results, mode, settings.label(), state.first)


def chat_videos(manager: ModelManager, state: ChatState) -> list[Video]:
    """The chat's videos for the model, after checking that the model takes video (before any model work)."""
    if not state.has_video():
        return []
    if not takes_video(manager):
        check_takes_video(manager.info.family)
        raise VideoRefused("this model is served through an API that takes images only")
    return state.videos()


def _finished(reason: str | None) -> str:
    return "stopped" if reason == "stopped" else "done"


def _record_timing(state: ChatState, side: str, stats: dict[str, Any]) -> None:
    turn = len(state.turns)
    label = "baseline" if side == "baseline" else "accelerated"
    for name, key in (("TTFT", "ttft_s"), ("total", "total_s")):
        if stats.get(key) is not None:
            state.timings.append({"turn": turn, "series": f"{label} {name}", "seconds": stats[key]})


def timing_rows(state: ChatState) -> list[dict[str, Any]]:
    """The chat so far for the timing chart: one row per turn, side and measure (TTFT, total)."""
    return list(state.timings)


def accelerated_method(method: str, k: int, num_layers: int) -> Method:
    """The right pane's method: VTW at the slider's K, FastV at K with its ratio, or a schedule file."""
    if method == "vtw":
        return parse_method(f"vtw:{k}", num_layers)
    if method.startswith("fastv:"):
        return parse_method(f"fastv:{fastv_layer(k, num_layers)}:{method.split(':', 1)[1]}", num_layers)
    return parse_method(method, num_layers)


def _one_after_the_other(
    manager: ModelManager, requests: dict[str, dict[str, Any]], stop_event: Any
) -> Iterator[tuple[str, Any]]:
    for side, request in requests.items():
        if stop_event is not None and stop_event.is_set():
            return  # Stop pressed during the first side: the second one is skipped
        for event in manager.stream(**request):
            yield side, event


def pane_label(method: str, k: Any, ratio: Any, num_layers: int) -> str:
    """The accelerated pane's title: the settings the *next* turn will use, labelled as such."""
    try:
        k = check_k(k, num_layers)
        ratio = check_float(ratio, "FastV R", 0, 1)
    except InputError:
        return "Accelerated (next turn: fix the settings)"
    spec = f"fastv:{ratio:g}" if method == "fastv" else method
    return f"next turn: {TurnSettings(spec, k, num_layers).spoken()}"


def benchmark_turn(
    manager: ModelManager,
    state: ChatState,
    k: int,
    method: str,
    repeats: int,
    max_new_tokens: int = 32,
    stop_event: Any = None,
) -> dict[str, Any]:
    """Both sides on the last turn, `repeats` times each, interleaved (B A, A B, ...): every time, and medians.

    Greedy, so every repetition produces the same tokens and only the clock varies. Interleaving, with the
    order alternating, spreads drifts of the machine (other load, CPU frequency) over both sides evenly.
    """
    if not state.turns:
        raise InputError("ask a question first: the benchmark runs on the current turn")
    repeats = check_int(repeats, "repetitions", 1, 50)
    k = check_k(k, manager.info.num_layers)
    accelerated = accelerated_method(method, k, manager.info.num_layers)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    videos = chat_videos(manager, state)
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in SIDES}
    for repeat in range(repeats):
        for side in run_order(repeat):
            if stop_event is not None and stop_event.is_set():
                raise Cancelled("the benchmark was stopped")
            messages, paths = state.conversation(side)
            result = manager.generate(
                messages,
                [load_image(path) for path in paths],
                k=None if side == "baseline" else accelerated.k,
                schedule=None if side == "baseline" else accelerated.schedule,
                sampling=sampling,
                **({"videos": videos} if videos else {}),
            )
            runs[side].append(result.stats.to_dict())
    label = TurnSettings(method, k, manager.info.num_layers).label()
    return {"repeats": repeats, "label": label, "sides": {side: _spread(runs[side]) for side in SIDES}}


def _spread(stats: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Median, min and max of each timing over the repetitions."""
    spread = {}
    for key in ("ttft_s", "total_s", "decode_tokens_per_s"):
        values = [row[key] for row in stats if row.get(key) is not None]
        if values:
            spread[key] = {"median": statistics.median(values), "min": min(values), "max": max(values),
                           "n": len(values)}  # fmt: skip
    return spread


def describe_benchmark(result: dict[str, Any]) -> str:
    """The benchmark as a Markdown table: median (min–max) per side, and the ratio of the medians."""
    names = {"ttft_s": "time to first token", "total_s": "total time", "decode_tokens_per_s": "decode tokens/s"}
    baseline, accelerated = result["sides"]["baseline"], result["sides"]["vtw"]
    lines = [
        f"**{result['repeats']} runs per side, interleaved**: median (min–max)",
        "",
        f"| | baseline | {result['label']} | ratio of medians |",
        "|---|---|---|---|",
    ]
    for key, name in names.items():
        if key not in baseline or key not in accelerated:
            continue
        show = _rate if key == "decode_tokens_per_s" else format_seconds
        cells = [
            f"{show(side[key]['median'])} ({show(side[key]['min'])}–{show(side[key]['max'])})"
            for side in (baseline, accelerated)
        ]
        ratio = accelerated[key]["median"] / baseline[key]["median"] if baseline[key]["median"] else None
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {format_ratio(ratio)} |")
    return "\n".join(lines)


def _rate(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


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


def is_default_model(manager: ModelManager) -> bool:
    return manager.info.source == default_model()


def example_files(default: bool) -> list[tuple[Path, str]]:
    """Examples that fit the model: easy-vqa pictures for the embedded default model, photos for real ones.

    The default model was trained only on coloured shapes; on photos its answers are nonsense.
    """
    pattern = "easyvqa-*.png" if default else "*.jpg"
    return [
        (path, EXAMPLE_QUESTIONS.get(path.stem, "What is in this picture?")) for path in sorted(EXAMPLES.glob(pattern))
    ]


EXAMPLE_QUESTIONS = {
    "easyvqa-0": "what is the red shape?",
    "easyvqa-1": "what is the color of the rectangle?",
    "easyvqa-2": "is there a rectangle?",
    "astronaut": "Who or what is in this picture?",
    "coffee": "What is on the table?",
    "chelsea": "What animal is this, and what colour is it?",
    "rocket": "What is happening in this photo?",
}


@dataclass(frozen=True)
class SearchSettings:
    """The K search's defaults for the loaded model, and one sentence saying why."""

    calibration: list[tuple[str, str]]  # (label, value) choices; the first is the default
    criterion: str  # "prompt" (the paper) or "reply"
    eta: float
    eta_source: str
    explanation: str


CRITERIA = [
    ("KL at the last prompt position (the paper)", "prompt"),
    ("KL over the reply (teacher-forced)", "reply"),
]


def search_settings(manager: ModelManager) -> SearchSettings:
    """easy-vqa train questions and the shipped criterion for the default model; bundled photos otherwise."""
    from vtw_core.analysis.k_search import default_eta

    turn = ("the current turn", "turn")
    shipped = _shipped_search(manager.info.source)
    if is_default_model(manager) and shipped:
        criterion = shipped.get("kl_over", "prompt")
        eta = float(shipped.get("kl_threshold", default_eta(manager.info.source)[0]))
        reason = (
            "its replies open with a word read off the image (the shape or its colour), so the next token at the "
            "last prompt position depends on the image"
            if criterion == "prompt"
            else "its replies open with words that follow from the question, so the last prompt position barely "
            "depends on the image"
        )
        why = (
            "The embedded default model was trained on easy-vqa, so it is calibrated on 20 easy-vqa train "
            f"questions with the criterion its shipped K = {shipped.get('k')} was chosen by "
            f"({dict((v, k) for k, v in CRITERIA)[criterion]}): {reason}."
        )
        return SearchSettings([("easy-vqa train questions (20)", "easy-vqa"), turn], criterion, eta,
                              "the shipped vtw.json", why)  # fmt: skip
    eta, source = default_eta(manager.info.source)
    why = (
        "A real checkpoint is calibrated on the 20 bundled photos with the paper's criterion, the KL of the next "
        "token at the last prompt position, as the official VTW code does."
    )
    return SearchSettings([("bundled photos (20)", "bundled"), turn], "prompt", eta, source, why)


def _shipped_search(source: str) -> dict[str, Any] | None:
    """The checkpoint's vtw.json (how its K was chosen), if it has a readable one."""
    try:
        return json.loads((Path(source) / "vtw.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def calibration_for(source: str, state: ChatState) -> list[CalibrationSample]:
    """The bundled photos, 20 easy-vqa train questions, or the chat's last question with its images ("turn")."""
    if source == "bundled":
        return load_calibration("default")
    if source == "easy-vqa":
        return train_calibration(20)
    if source != "turn":
        raise InputError(f"calibrate on 'bundled', 'easy-vqa' or 'turn', got {source!r}")
    if not state.turns:
        raise InputError("ask a question first, or search K on the calibration set")
    if state.has_video():
        raise InputError("the K search calibrates on images only; search on the calibration set instead")
    paths = [path for turn in state.turns for path in turn.image_paths]
    return [CalibrationSample(state.turns[-1].text, [load_image(path) for path in paths])]


class Cancelled(InputError):
    """Stop was pressed (or the page was closed) while a long action ran."""


def search_k_result(
    manager: ModelManager,
    samples: list[CalibrationSample],
    eta: float,
    progress: Progress | None = None,
    over: str = "prompt",
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Algorithm 1 on the shared model, holding the device; plain JSON (k, eta, curve, ...).

    `should_stop` is asked after every sample (the search's progress callback); when it says yes the search
    ends with `Cancelled` and the device is free again.
    """
    eta = check_eta(eta)
    if manager.processor is None:
        raise InputError("this model has no processor; it cannot run the K search")

    def report(done: int, total: int) -> None:
        if should_stop is not None and should_stop():
            raise Cancelled(f"the K search was stopped after {done} of {total} samples")
        if progress is not None:
            progress(done, total)

    with manager.lock:
        if should_stop is not None and should_stop():
            raise Cancelled("the K search was stopped before it started")
        result = search_k(manager.model, manager.processor, samples, eta=eta, progress=report, over=over)
    return {**result.to_dict(), "over": over}


def describe_search(result: dict[str, Any], source: str) -> str:
    where = {"bundled": "the bundled photos", "easy-vqa": "easy-vqa train questions"}.get(source, "the current turn")
    over = {"prompt": "KL at the last prompt position", "reply": "KL over the reply"}.get(result.get("over"), "KL")
    if result["k"] is None:
        first = result["curve"][0]["k"] if result["curve"] else "-"
        return (
            f"No K from {first} to {result['num_layers'] - 1} keeps the mean {over} under eta = {result['eta']:g} "
            f"on {where} ({result['samples']} sample(s)); the slider is unchanged."
        )
    kl = next(point["kl"] for point in result["curve"] if point["k"] == result["k"])
    return (
        f"**K = {result['k']}** of {result['num_layers']} layers: the first K whose mean {over} ({format_kl(kl)}) "
        f"is at most eta = {result['eta']:g} on {where} ({result['samples']} sample(s)). The slider moved to it."
    )


def attention_report(manager: ModelManager, state: ChatState, side: str, k: int, max_new_tokens: int = 16) -> dict:
    """Attention shares per layer for the chat's last turn, on the baseline or on VTW at K."""
    k = check_k(k, manager.info.num_layers)
    if not state.turns:
        raise InputError("ask a question first: the analysis runs on the current turn")
    if state.has_video():
        raise InputError("the attention analysis runs on images only; this chat has a video")
    messages, paths = state.conversation(side)
    with manager.lock:
        report = analyze_attention(
            manager.model,
            manager.processor,
            messages,
            [load_image(path) for path in paths],
            k=None if side == "baseline" else k,
            max_new_tokens=check_max_new_tokens(max_new_tokens),
        )
    return report.to_dict()


def describe_attention(report: dict[str, Any]) -> str:
    shares = report["prompt"]
    first, last = shares[0]["vision"], shares[-1]["vision"]
    middle = len(shares) // 2
    return (
        f"Vision tokens ({report['segment_tokens']['vision']} of the prompt) receive {first:.0%} of the last prompt "
        f"token's attention in layer 0, {shares[middle]['vision']:.0%} in layer {middle} and {last:.0%} in the last "
        "layer (mean over heads)."
    )


# (name, stats key, formatter, True when higher is better)
METRICS: list[tuple[str, str, Callable[[Any], str], bool]] = [
    ("time to first token", "ttft_s", format_seconds, False),
    ("total time", "total_s", format_seconds, False),
    ("decode tokens/s", "decode_tokens_per_s", _rate, True),
    ("prefill FLOPs", "prefill_flops", format_flops, False),
    ("decode FLOPs", "decode_flops", format_flops, False),
    ("vision tower FLOPs", "vision_flops", format_flops, False),
    ("KV cache", "kv_cache_bytes", format_bytes, False),
    ("peak GPU memory", "peak_memory_bytes", format_bytes, False),
]


def metrics_rows(results: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    """One row per metric: the formatted value of each side, the accelerated/baseline ratio and the better side."""
    stats = {side: (results.get(side) or {}).get("stats") or {} for side in SIDES}
    rows = []
    for name, key, show, higher_is_better in METRICS:
        values = {side: stats[side].get(key) for side in SIDES}
        if key == "peak_memory_bytes" and stats["baseline"] and values["baseline"] is None:
            cells = {side: "not measured on CPU" if stats[side] else "–" for side in SIDES}
        else:
            cells = {side: "–" if values[side] is None else show(values[side]) for side in SIDES}
        ratio = better = None
        if values["baseline"] and values["vtw"] is not None and _complete(stats):
            ratio = values["vtw"] / values["baseline"]
            if ratio != 1:
                better = "vtw" if (ratio > 1) == higher_is_better else "baseline"
        rows.append({"name": name, **cells, "ratio": ratio, "better": better})
    return rows


def _complete(stats: dict[str, dict[str, Any]]) -> bool:
    """Ratios only once both sides have finished: a half-streamed total time compares nothing."""
    return all(stats[side].get("finish_reason") for side in SIDES)


def metrics_table(results: dict[str, dict[str, Any] | None], label: str = "accelerated") -> str:
    """The compact comparison: rows are metrics, columns baseline, the accelerated side and their ratio.

    The better of two finished values is bold with a ✓; timings are marked too, but see TIMING_NOTE.
    """
    lines = [f"| | baseline | {label} | {label.split(' ')[0]} / baseline |", "|---|---:|---:|---:|"]
    for row in metrics_rows(results):
        cells = [f"**{row[side]}** ✓" if row["better"] == side else row[side] for side in SIDES]
        lines.append(f"| {row['name']} | {cells[0]} | {cells[1]} | {format_ratio(row['ratio'])} |")
    tokens = [_tokens((results.get(side) or {}).get("stats")) for side in SIDES]
    lines.append(f"| tokens: prompt (vision) + new | {tokens[0]} | {tokens[1]} | |")
    lines.extend(_video_rows(results))
    return "\n".join(lines)


def _video_rows(results: dict[str, dict[str, Any] | None]) -> list[str]:
    """Frames and vision tokens per frame of each side, when the turn had a video (no rows otherwise)."""
    stats = [(results.get(side) or {}).get("stats") or {} for side in SIDES]
    if not any(side.get("video_frames") for side in stats):
        return []
    frames = [str(side["video_frames"]) if side.get("video_frames") else "–" for side in stats]
    per_frame = [format_per_frame(side.get("vision_tokens_per_frame")) for side in stats]
    return [
        f"| video frames | {frames[0]} | {frames[1]} | |",
        f"| vision tokens per frame | {per_frame[0]} | {per_frame[1]} | |",
    ]


def _tokens(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "–"
    return f"{stats['prompt_tokens']} ({stats['vision_tokens']}) + {stats['new_tokens']}"


def format_summary(
    results: dict[str, dict[str, Any] | None],
    mode: RunMode = "sequential",
    label: str = "accelerated",
    first: str = "baseline",
) -> str:
    """How the two sides ran (order, race) and, once both have answered, whether the answers are identical."""
    if mode == "race":
        how = "**Race mode**: both sides ran at the same time on one device, so their timings are *contended*."
    else:
        first_name = "the baseline" if first == "baseline" else label
        how = f"One side after the other on the same device; {first_name} ran first this turn (it alternates)."
    baseline, vtw = results.get("baseline"), results.get("vtw")
    if not baseline or not vtw or not _complete({side: results[side]["stats"] for side in SIDES}):
        return how
    verdict = "identical" if baseline["token_ids"] == vtw["token_ids"] else "different"
    return f"Answers **{verdict}** token for token · {how}"


def counters(
    results: dict[str, dict[str, Any] | None],
    mode: RunMode = "sequential",
    label: str = "accelerated",
    first: str = "baseline",
) -> dict[str, str]:
    """Markdown for the metrics table and the summary line."""
    return {"metrics": metrics_table(results, label), "summary": format_summary(results, mode, label, first)}


def header(manager: ModelManager) -> str:
    info = manager.info
    weights = " · ⚠️ random weights: answers are noise, mechanics and counters are real" if info.random_weights else ""
    name = f"`{info.source}`"
    if info.source == default_model():
        name = "the embedded default model (a small LLaVA trained on easy-vqa: coloured shapes)"
    return (
        f"**Model** {name} ({info.family}, {info.num_layers} decoder layers) · **device** {info.device} · "
        f"**dtype** {info.dtype} · **attention** {info.attention}{weights}"
    )


def sampling_config(max_new_tokens: Any, sample: Any, temperature: Any, top_p: Any, seed: Any) -> SamplingConfig:
    """The parameters panel as a checked SamplingConfig; greedy unless sampling is on (then one seed for both)."""
    if not sample:  # greedy: the two answers are comparable token for token
        return SamplingConfig(max_new_tokens=max_new_tokens)
    return SamplingConfig(max_new_tokens, True, temperature, top_p, seed=0 if seed is None else seed)


# An absolute path (POSIX or Windows) inside a message: replaced by its file name before a user sees it.
ABSOLUTE_PATH = re.compile(r"(?<![\w.])(?:/|[A-Za-z]:\\)(?:[^\s'\"`:,;()]+[/\\])+([^\s'\"`:,;()/\\]*)")


def error_message(error: BaseException) -> str:
    """What the user reads when a request fails (no server paths); the app keeps serving."""
    if isinstance(error, ResourceError):
        text = f"Out of memory: {error}"
    elif isinstance(error, VTWError):
        text = str(error)
    else:
        text = f"Unexpected error ({type(error).__name__}): {error}"
    return ABSOLUTE_PATH.sub(lambda match: match[1] or "…", text)


def log_failure(error: BaseException, where: str) -> str:
    """One log line for a refused request (a traceback only for a real bug); returns the user's message."""
    message = error_message(error)
    if isinstance(error, VTWError):
        logger.warning("%s refused: %s", where, message)
    else:
        logger.error("%s failed", where, exc_info=error)
    return message


# --- Video uploads (handler side; the UI wiring, a gr.Video input with a frame-count control, is separate) -----


def read_video_upload(path: str | Path, num_frames: Any, allowed_roots: list[Path]) -> Video:
    """A video upload's sampled frames, if the file lies under an allowed folder and passes every video limit.

    `num_frames` comes from the frame-count control; limits and messages are those of vtw_core.models.videos,
    the same as the CLI's.
    """
    frames = check_num_frames(num_frames)
    return read_video(check_upload_path(path, allowed_roots, kind="videos"), frames)


def format_video_stats(stats: dict[str, Any] | None) -> str:
    """The video counters of one side as a Markdown line ('' when the request had no video)."""
    if not stats or not stats.get("video_frames"):
        return ""
    return (
        f"- video: {stats['video_frames']} frames, {stats['video_tokens']} video tokens "
        f"({format_per_frame(stats['vision_tokens_per_frame'])} per frame)"
    )
