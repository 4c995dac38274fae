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

from app import attention, benchmark, search, turns
from app.errors import error_message, logger
from app.gpu import on_gpu
from app.media import ASSETS, is_default_model, takes_video
from app.search import SearchSettings
from app.session import ChatState, DeviceActivity, Sessions
from vtw_core.generation.manager import ModelInfo, ModelManager
from vtw_core.validation import check_float

# Event options: private events stay off the API page; device work queues behind one device-wide slot.
PRIVATE: dict[str, Any] = {"api_visibility": "private"}
ON_DEVICE: dict[str, Any] = {"concurrency_limit": 1, "concurrency_id": "device"}


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
def warm_up_on_device(manager: ModelManager, k: int, image: Path) -> None:
    """The untimed first pass of each path; a failure only costs the first turn's timings, never the page."""
    try:
        turns.warm_up(manager, k, image)
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

    @classmethod
    def create(cls, manager: ModelManager) -> PageContext:
        info = manager.info
        return cls(
            manager=manager,
            info=info,
            default_k=info.searched_k or max(1, info.num_layers // 2),
            default_model=is_default_model(manager),
            search=search.search_settings(manager),
            allowed_roots=[Path(gr.utils.get_upload_folder()), ASSETS],
            sessions=Sessions(),
            activity=DeviceActivity(),
            with_video=takes_video(manager),
            device=device_calls(manager),
        )

    def queued_note(self) -> str:
        """The status line while a request waits for the device, saying what holds it."""
        return f"Queued: waiting for the device ({self.activity.describe()})."


def method_of(choice: str, ratio: Any) -> str:
    """The method control's value as the handlers name it: "vtw", "fastv:R" or "schedule:NAME"."""
    return f"fastv:{check_float(ratio, 'FastV R', 0, 1):g}" if choice == "fastv" else choice


def render(chat: ChatState, shown: dict[str, str], note: str) -> tuple:
    """The outputs of the chat area (`ChatArea.outputs`): state, both panes, metrics, summary and status line."""
    return chat, chat.display("baseline"), chat.display("vtw"), shown["metrics"], shown["summary"], note
