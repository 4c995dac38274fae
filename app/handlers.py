"""Event handlers as plain functions (no Gradio objects), so they can be tested without a browser.

A chat is a list of user turns (text + image paths) and, per side, the answers given so far. Each side
sees its own earlier answers, as a user chatting with that model alone would. The two sides run one
after the other on the shared device (honest, uncontended numbers), or at once in "race" mode.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vtw_core.attention import analyze_attention
from vtw_core.calibration import load_calibration
from vtw_core.defaults import default_model
from vtw_core.errors import InputError, ResourceError, VTWError
from vtw_core.generate import SamplingConfig
from vtw_core.images import load_image
from vtw_core.manager import ModelManager
from vtw_core.methods import Method, parse_method
from vtw_core.prompts import Message, assistant_message, user_message
from vtw_core.search import CalibrationSample, Progress, check_eta, search_k
from vtw_core.validation import check_k, check_max_new_tokens, check_text
from vtw_core.videos import Video

logger = logging.getLogger("vtw_chat")
SIDES = ("baseline", "vtw")
RunMode = Literal["sequential", "race"]
NO_ANSWER = "_no answer yet_"
MAX_IMAGES_PER_TURN = 4


@dataclass
class Turn:
    text: str
    image_paths: list[str]


@dataclass
class ChatState:
    """One browser session's conversation. Plain data, so Gradio can copy it per session."""

    turns: list[Turn] = field(default_factory=list)
    answers: dict[str, list[str]] = field(default_factory=lambda: {side: [] for side in SIDES})
    results: dict[str, dict[str, Any] | None] = field(default_factory=lambda: {side: None for side in SIDES})
    k_used: int | None = None

    def display(self, side: str) -> list[dict[str, Any]]:
        """The side's chat as Gradio messages: each turn's images, its question, then the answer so far."""
        messages: list[dict[str, Any]] = []
        for index, turn in enumerate(self.turns):
            messages.extend({"role": "user", "content": {"path": path}} for path in turn.image_paths)
            messages.append({"role": "user", "content": turn.text})
            if index < len(self.answers[side]):
                messages.append({"role": "assistant", "content": self.answers[side][index] or "…"})
        return messages

    def conversation(self, side: str) -> tuple[list[Message], list[str]]:
        """The model's view of the chat for one side: messages ending with the last user turn, and image paths."""
        messages: list[Message] = []
        paths: list[str] = []
        for index, turn in enumerate(self.turns):
            messages.append(user_message(turn.text, num_images=len(turn.image_paths)))
            paths.extend(turn.image_paths)
            if index < len(self.turns) - 1:
                messages.append(assistant_message(self.answers[side][index]))
        return messages, paths


def check_image_path(path: str | Path, allowed_roots: list[Path]) -> Path:
    """The path, resolved, if it lies under one of the allowed folders (uploads, assets); else InputError."""
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(root.resolve()) for root in allowed_roots):
        raise InputError("images can only come from uploads or the bundled examples")
    return resolved


def add_turn(state: ChatState, text: str | None, image_paths: list[str], allowed_roots: list[Path]) -> ChatState:
    """Validate a new user turn (question and images) and append it; nothing changes if it is invalid."""
    if not (text or "").strip():
        raise InputError("please type a question")
    text = check_text(text)
    if len(image_paths) > MAX_IMAGES_PER_TURN:
        raise InputError(f"at most {MAX_IMAGES_PER_TURN} images per turn")
    paths = [str(check_image_path(path, allowed_roots)) for path in image_paths]
    for path in paths:
        load_image(path)  # a clear message now for non-images, corrupt files and decompression bombs
    if not paths and not any(turn.image_paths for turn in state.turns):
        raise InputError("please upload an image with your first question")
    state.turns.append(Turn(text, paths))
    return state


def drop_last_answers(state: ChatState) -> ChatState:
    """For Regenerate: forget the answers to the last turn (the turn itself stays)."""
    if not state.turns:
        raise InputError("nothing to regenerate yet")
    for side in SIDES:
        del state.answers[side][len(state.turns) - 1 :]
    return state


def undo_last_turn(state: ChatState) -> ChatState:
    """After a failed turn: remove it and any partial answers, so the chat stays consistent."""
    if state.turns:
        for side in SIDES:
            del state.answers[side][len(state.turns) - 1 :]
        state.turns.pop()
    return state


def answer_last_turn(
    manager: ModelManager,
    state: ChatState,
    k: int,
    sampling: SamplingConfig,
    mode: RunMode = "sequential",
    stop_event: threading.Event | None = None,
    method: str = "vtw",
) -> Iterator[tuple[ChatState, dict[str, str]]]:
    """Answer the last turn on both sides; yields the state and the counters' Markdown as tokens stream.

    The accelerated side runs `method` (vtw_core.methods: "vtw" uses the slider's K, "fastv:R" FastV from
    layer K keeping 1 - R, "schedule:FILE" a saved schedule). With sampling, both sides get the same seed.
    """
    if not state.turns:
        raise InputError("ask a question first")
    k = check_k(k, manager.info.num_layers)
    state.k_used = k
    state.results = {side: None for side in SIDES}
    accelerated = accelerated_method(method, k, manager.info.num_layers)
    requests = {}
    for side in SIDES:
        messages, paths = state.conversation(side)
        requests[side] = {
            "messages": messages,
            "images": [load_image(path) for path in paths],
            "k": None if side == "baseline" else accelerated.k,
            "schedule": None if side == "baseline" else accelerated.schedule,
            "sampling": sampling,
            "stop_event": stop_event,
        }
        state.answers[side].append("")
    events = manager.race(requests) if mode == "race" else _one_after_the_other(manager, requests, stop_event)
    for side, event in events:
        state.answers[side][-1] = event.text
        state.results[side] = {"text": event.text, "token_ids": event.token_ids, "stats": event.stats.to_dict()}
        yield state, counters(state.results, mode)


def accelerated_method(method: str, k: int, num_layers: int) -> Method:
    """The right pane's method: VTW at the slider's K, FastV at K with its ratio, or a schedule file."""
    if method == "vtw":
        return parse_method(f"vtw:{k}", num_layers)
    if method.startswith("fastv:"):
        return parse_method(f"fastv:{min(max(k, 1), num_layers - 1)}:{method.split(':', 1)[1]}", num_layers)
    return parse_method(method, num_layers)


def _one_after_the_other(
    manager: ModelManager, requests: dict[str, dict[str, Any]], stop_event: threading.Event | None
) -> Iterator[tuple[str, Any]]:
    for side, request in requests.items():
        if stop_event is not None and stop_event.is_set():
            return  # Stop pressed during the baseline: don't start VTW
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


def calibration_for(source: str, state: ChatState) -> list[CalibrationSample]:
    """The bundled calibration set, or the chat's last question with its images (source "turn")."""
    if source == "bundled":
        return load_calibration("default")
    if not state.turns:
        raise InputError("ask a question first, or search K on the bundled calibration set")
    paths = [path for turn in state.turns for path in turn.image_paths]
    return [CalibrationSample(state.turns[-1].text, [load_image(path) for path in paths])]


def search_k_result(
    manager: ModelManager, samples: list[CalibrationSample], eta: float, progress: Progress | None = None
) -> dict[str, Any]:
    """Algorithm 1 on the shared model, holding the device; plain JSON (k, eta, curve, ...)."""
    eta = check_eta(eta)
    if manager.processor is None:
        raise InputError("this model has no processor; it cannot run the K search")
    with manager.lock:
        result = search_k(manager.model, manager.processor, samples, eta=eta, progress=progress)
    return result.to_dict()


def describe_search(result: dict[str, Any], source: str) -> str:
    where = "the bundled calibration set" if source == "bundled" else "the current turn"
    if result["k"] is None:
        first = result["curve"][0]["k"] if result["curve"] else "-"
        return (
            f"No K from {first} to {result['num_layers'] - 1} keeps the mean KL under eta = {result['eta']:g} on "
            f"{where} ({result['samples']} sample(s)); the slider is unchanged."
        )
    kl = next(point["kl"] for point in result["curve"] if point["k"] == result["k"])
    return (
        f"**K = {result['k']}** of {result['num_layers']} layers: the first K whose mean KL ({kl:.2e}) is under "
        f"eta = {result['eta']:g} on {where} ({result['samples']} sample(s)). The slider moved to it."
    )


def attention_report(manager: ModelManager, state: ChatState, side: str, k: int, max_new_tokens: int = 16) -> dict:
    """Attention shares per layer for the chat's last turn, on the baseline or on VTW at K."""
    k = check_k(k, manager.info.num_layers)
    if not state.turns:
        raise InputError("ask a question first: the analysis runs on the current turn")
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


def format_stats(stats: dict[str, Any] | None) -> str:
    """One side's counters as a short Markdown list."""
    if not stats:
        return NO_ANSWER
    peak = stats.get("peak_memory_bytes")
    memory = f"{peak / 2**20:.1f} MB" if peak is not None else "CPU"
    rate = stats.get("decode_tokens_per_s")
    ttft = stats.get("ttft_s")
    total = stats.get("total_s")
    state = {"eos": "done", "length": "done (max tokens)", "stopped": "stopped"}.get(stats.get("finish_reason"), "…")
    return "\n".join(
        [
            f"- time to first token: **{ttft:.3f} s**" if ttft is not None else "- time to first token: …",
            f"- total time: {total:.3f} s ({state})" if total is not None else "- total time: …",
            f"- decode speed: {rate:.1f} tokens/s" if rate else "- decode speed: …",
            f"- prefill: {_flops(stats['prefill_flops'])} · decode: {_flops(stats['decode_flops'])} · "
            f"vision tower: {_flops(stats['vision_flops'])}",
            f"- KV cache: {stats['kv_cache_bytes'] / 2**20:.2f} MB · GPU peak: {memory}",
            f"- tokens: {stats['prompt_tokens']} prompt ({stats['vision_tokens']} vision), {stats['new_tokens']} new"
            f" · decode engine: {stats.get('engine', 'plain')}",
        ]
    )


def _flops(value: float) -> str:
    """TFLOPs for real models, GFLOPs for small ones (so the default model's numbers are not all zeros)."""
    return f"{value / 1e12:.3f} TFLOPs" if value >= 1e10 else f"{value / 1e9:.3f} GFLOPs"


def _ratio(vtw: dict[str, Any], baseline: dict[str, Any], key: str) -> str:
    value, reference = vtw.get(key), baseline.get(key)
    return f"{value / reference:.2f}×" if value is not None and reference else "–"


def format_summary(results: dict[str, dict[str, Any] | None], mode: RunMode = "sequential") -> str:
    """VTW against the baseline as ratios once both have answered, and how the two were run."""
    how = (
        "**Race mode**: both sides ran at the same time on one device, so their timings are *contended*."
        if mode == "race"
        else "The two sides run one after the other on the same device: each side's numbers are its own."
    )
    baseline, vtw = results.get("baseline"), results.get("vtw")
    if not baseline or not vtw or not vtw["stats"].get("finish_reason") or not baseline["stats"].get("finish_reason"):
        return how
    b, v = baseline["stats"], vtw["stats"]
    b_total = {"total_flops": b["prefill_flops"] + b["decode_flops"]}
    v_total = {"total_flops": v["prefill_flops"] + v["decode_flops"]}
    same = baseline["token_ids"] == vtw["token_ids"]
    verdict = "identical" if same else "different"
    memory = f" · GPU peak {_ratio(v, b, 'peak_memory_bytes')}" if b.get("peak_memory_bytes") else ""
    return (
        f"**VTW / baseline** · TTFT {_ratio(v, b, 'ttft_s')} · total time {_ratio(v, b, 'total_s')} · "
        f"prefill FLOPs {_ratio(v, b, 'prefill_flops')} · all FLOPs {_ratio(v_total, b_total, 'total_flops')} · "
        f"KV cache {_ratio(v, b, 'kv_cache_bytes')}{memory} · answers **{verdict}**  \n{how}"
    )


def counters(results: dict[str, dict[str, Any] | None], mode: RunMode = "sequential") -> dict[str, str]:
    """Markdown for each side's counters and the summary row."""
    return {
        "baseline": format_stats(results["baseline"] and results["baseline"]["stats"]),
        "vtw": format_stats(results["vtw"] and results["vtw"]["stats"]),
        "summary": format_summary(results, mode),
    }


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

    `num_frames` comes from the frame-count control; limits and messages are vtw_core.videos's, the same as the CLI's.
    """
    from vtw_core.videos import check_num_frames, read_video

    frames = check_num_frames(num_frames)
    resolved = Path(path).resolve()
    if not any(resolved.is_relative_to(root.resolve()) for root in allowed_roots):
        raise InputError("videos can only come from uploads or the bundled examples")
    return read_video(resolved, frames)


def format_video_stats(stats: dict[str, Any] | None) -> str:
    """The video counters of one side as a Markdown line ('' when the request had no video)."""
    if not stats or not stats.get("video_frames"):
        return ""
    return (
        f"- video: {stats['video_frames']} frames, {stats['video_tokens']} video tokens "
        f"({stats['vision_tokens_per_frame']:.1f} per frame)"
    )
