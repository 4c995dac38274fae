"""What the page's sections and events share: the loaded model's context, its device calls, and small helpers.

The device calls are the only places the page runs the model; each is wrapped for ZeroGPU (`app.gpu.on_gpu`)
and takes and returns plain values, since on a ZeroGPU Space it runs in another process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.context import LocalContext

from app import attention, benchmark, search, turns
from app.errors import error_message, log_failure, logger
from app.gpu import on_gpu
from app.media import ASSETS, example_files, is_default_model, takes_video
from app.search import SearchSettings
from app.session import ChatState, DeviceActivity, Sessions
from vtw_core.generation.manager import ModelInfo, ModelManager
from vtw_core.validation import check_float

# Event options: private events stay off the API page; device work queues behind one device-wide slot.
PRIVATE: dict[str, Any] = {"api_visibility": "private"}
ON_DEVICE: dict[str, Any] = {"concurrency_limit": 1, "concurrency_id": "device"}
MAX_NEW_TOKENS = 1024  # the slider's top where the model's context leaves more (or cannot be counted here)
FULL_BELOW = 8  # fewer new tokens than this left: the conversation counts as full


@dataclass(frozen=True)
class DeviceCalls:
    """The model's work for the page, each call wrapped for ZeroGPU."""

    stream_answers: Callable[..., Any]
    compare: Callable[..., dict[str, Any]]
    search: Callable[..., dict[str, Any]]
    benchmark: Callable[..., dict[str, Any]]
    attention: Callable[..., dict[str, Any]]


def device_calls(manager: ModelManager) -> DeviceCalls:
    @on_gpu
    def stream_answers(chat: ChatState, k: int, params: Any, mode: str, stop: Any, method: str, eta: Any):
        # Only plain values cross this boundary (ZeroGPU runs it in another process).
        yield from turns.answer_last_turn(manager, chat, k, params, mode, stop, method, eta)

    @on_gpu
    def compare_on_device(image: str, question: str, k: int, max_new_tokens: int) -> dict[str, Any]:
        return turns.compare_once(manager, image, question, k, max_new_tokens)

    @on_gpu
    def search_on_device(samples: list, eta: float, progress: Any = None, over: str = "prompt", stop: Any = None):
        return search.search_k_result(manager, samples, eta, progress, over, stop)

    @on_gpu
    def benchmark_on_device(chat: ChatState, k: int, method: str, repeats: Any, tokens: Any, stop: Any):
        return benchmark.benchmark_turn(manager, chat, k, method, repeats, tokens, stop)

    @on_gpu
    def attention_on_device(chat: ChatState, side: str, k: int) -> dict[str, Any]:
        return attention.attention_report(manager, chat, side, k)

    return DeviceCalls(stream_answers, compare_on_device, search_on_device, benchmark_on_device, attention_on_device)


@on_gpu
def warm_up_on_device(manager: ModelManager, k: int, examples: list[tuple[Path, str]]) -> None:
    """The untimed passes of `turns.warm_up` on the page's first example; a failure only costs the first
    turn's timings, never the page."""
    try:
        turns.warm_up(manager, k, examples)
    except Exception as error:
        logger.warning("warm-up skipped: %s", error_message(error))


@dataclass(frozen=True)
class PageContext:
    """The loaded model as the page sees it, and the per-process state every session's events share."""

    manager: ModelManager
    info: ModelInfo
    default_k: int
    default_model: bool
    search: SearchSettings
    allowed_roots: list[Path]
    sessions: Sessions
    activity: DeviceActivity
    with_video: bool  # the video input exists only where the model answers about videos
    device: DeviceCalls
    sample_image: Path | None  # stands for the image of a first question when the room for it is counted

    @classmethod
    def create(cls, manager: ModelManager) -> PageContext:
        info = manager.info
        default = is_default_model(manager)
        examples = example_files(default)
        activity = DeviceActivity(whose=current_session)
        return cls(
            manager=manager,
            info=info,
            default_k=info.searched_k or max(1, info.num_layers // 2),
            default_model=default,
            search=search.search_settings(manager),
            allowed_roots=[Path(gr.utils.get_upload_folder()), ASSETS],
            sessions=Sessions(device_idle_s=activity.idle_for),
            activity=activity,
            with_video=takes_video(manager),
            device=device_calls(manager),
            sample_image=examples[0][0] if examples else None,
        )

    def queued_note(self, what: str = "your request") -> str:
        """The status line when a request is sent: running at once, or waiting behind what holds the device."""
        running = self.activity.describe()
        if not running:
            return f"{what[0].upper()}{what[1:]} is running…"
        return f"Queued: {what} waits for the device (running now: {running})."

    def room(self, chat: ChatState) -> int | None:
        """The most new tokens the chat's next question can take (see `turns.next_turn_room`); None: unknown."""
        try:
            return turns.next_turn_room(self.manager, chat, self.sample_image)
        except Exception as error:  # the slider keeps its range; the turn itself is checked on send
            log_failure(error, "context room")
            return None

    def token_limits(self, chat: ChatState, value: Any) -> tuple[Any, bool]:
        """The max-new-tokens slider for the chat's next turn (its top: the room the context leaves), and
        whether the conversation is full. A full one offers the room of a new conversation (a new image, or
        Clear, starts one); the turn itself is checked when it is sent.
        """
        room = self.room(chat)
        full = room is not None and room < FULL_BELOW and bool(chat.turns)
        if full:
            room = self.room(ChatState())
        if room is None:
            return gr.skip(), full
        top = max(1, min(MAX_NEW_TOKENS, room))
        current = int(value) if isinstance(value, (int, float)) and value >= 1 else top
        return gr.Slider(maximum=top, value=min(current, top)), full


def current_session() -> str | None:
    """The session of the request being handled (Gradio sets it for each event); None outside one."""
    request = LocalContext.request.get(None)
    return getattr(request, "session_hash", None)


def method_of(choice: str, ratio: Any) -> str:
    """The method control's value as the handlers name it: "vtw", "fastv:R" or "schedule:NAME"."""
    return f"fastv:{check_float(ratio, 'FastV R', 0, 1):g}" if choice == "fastv" else choice


def render(chat: ChatState, shown: dict[str, str], note: str) -> tuple:
    """The outputs of the chat area (`Page.chat_outputs`): state, both panes, metrics, summary and status line.

    The summary (which side ran first, identical or not) stays empty until a side has answered.
    """
    summary = shown["summary"] if any(chat.results.values()) else ""
    return chat, chat.display("baseline"), chat.display("vtw"), shown["metrics"], summary, note
