"""Event handlers as plain functions (no Gradio objects), so they can be tested without a browser."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vtw_core.errors import VTWError
from vtw_core.generate import SamplingConfig
from vtw_core.images import load_image
from vtw_core.manager import ModelManager
from vtw_core.prompts import assistant_message, user_message

SIDES = ("baseline", "vtw")


@dataclass
class ChatState:
    """One browser session's conversation: the shared user turns and each side's own answers."""

    messages: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {side: [] for side in SIDES})
    image_paths: list[str] = field(default_factory=list)
    display: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {side: [] for side in SIDES})


def format_stats(stats: dict[str, Any] | None) -> str:
    """One side's counters as a short Markdown list."""
    if not stats:
        return "_no answer yet_"
    peak = stats.get("peak_memory_bytes")
    memory = f"{peak / 2**20:.1f} MB" if peak is not None else "CPU (not measured)"
    rate = stats.get("decode_tokens_per_s")
    return "\n".join(
        [
            f"- time to first token: **{stats['ttft_s']:.3f} s**" if stats.get("ttft_s") is not None else "- waiting…",
            f"- total: {stats['total_s']:.3f} s" if stats.get("total_s") is not None else "- total: …",
            f"- decode: {rate:.1f} tokens/s" if rate else "- decode: …",
            f"- prefill: {stats['prefill_flops'] / 1e12:.4f} TFLOPs · "
            f"decode: {stats['decode_flops'] / 1e12:.4f} TFLOPs",
            f"- KV cache: {stats['kv_cache_bytes'] / 2**20:.2f} MB · GPU peak: {memory}",
            f"- tokens: {stats['prompt_tokens']} prompt ({stats['vision_tokens']} vision), {stats['new_tokens']} new",
        ]
    )


def format_summary(baseline: dict[str, Any] | None, vtw: dict[str, Any] | None, same_text: bool | None) -> str:
    """VTW against the baseline as ratios, once both have answered."""
    if same_text is None or not baseline or not vtw:
        return "Both sides run one after the other on the same device, so each side's numbers are its own."

    def ratio(key: str) -> str:
        return f"{vtw[key] / baseline[key]:.2f}×" if baseline.get(key) and vtw.get(key) is not None else "–"

    verdict = "identical" if same_text else "different"
    return (
        f"**VTW / baseline** · TTFT {ratio('ttft_s')} · total time {ratio('total_s')} · "
        f"prefill FLOPs {ratio('prefill_flops')} · KV cache {ratio('kv_cache_bytes')} · answers **{verdict}**  \n"
        "Run one after the other on the same device: each side's numbers are its own, not contention."
    )


def compare(
    manager: ModelManager,
    state: ChatState,
    text: str,
    image_paths: list[str],
    k: int,
    max_new_tokens: int,
) -> Iterator[tuple[ChatState, dict[str, str]]]:
    """Answer one user turn on both sides, baseline first; yields the state and the counters as they stream."""
    images = [load_image(path) for path in image_paths]
    turn = user_message(text, num_images=len(images))
    all_images = [load_image(path) for path in state.image_paths] + images
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    results: dict[str, dict[str, Any] | None] = {side: None for side in SIDES}
    for side in SIDES:
        state.display[side].extend({"role": "user", "content": {"path": path}} for path in image_paths)
        state.display[side].append({"role": "user", "content": text.strip()})
        state.display[side].append({"role": "assistant", "content": ""})
    state.image_paths.extend(image_paths)
    for side in SIDES:
        messages = [*state.messages[side], turn]
        for event in manager.stream(messages, all_images, k=None if side == "baseline" else k, sampling=sampling):
            state.display[side][-1]["content"] = event.text
            results[side] = {"text": event.text, "token_ids": event.token_ids, "stats": event.stats.to_dict()}
            yield state, counters(results)
        state.messages[side] = [*messages, assistant_message(results[side]["text"])]


def counters(results: dict[str, dict[str, Any] | None]) -> dict[str, str]:
    """Markdown for each side's counters and the summary row."""
    baseline, vtw = results["baseline"], results["vtw"]
    same = None
    if baseline and vtw and vtw["stats"]["finish_reason"]:
        same = baseline["token_ids"] == vtw["token_ids"]
    return {
        "baseline": format_stats(baseline and baseline["stats"]),
        "vtw": format_stats(vtw and vtw["stats"]),
        "summary": format_summary(baseline and baseline["stats"], vtw and vtw["stats"], same),
    }


def error_message(error: Exception) -> str:
    if isinstance(error, VTWError):
        return str(error)
    return f"unexpected error: {type(error).__name__}: {error}"
