"""What the page says about the answers: the metrics table, the summary line, the footers and labels, the header.

All of it is Markdown built from the stats each side's answer carries. The better of two finished exact values
(FLOPs, bytes) is marked with a ✓; a turn's timings are one run each, within the machine's noise, so they are
labelled as such and never marked (see TIMING_NOTE; *Benchmark this turn* repeats them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.media import is_default_model
from app.session import SIDES, ChatState, RunMode, TurnSettings
from vtw_core.analysis.units import format_bytes, format_flops, format_per_frame, format_ratio, format_seconds
from vtw_core.errors import InputError
from vtw_core.generation.manager import ModelManager
from vtw_core.validation import check_float, check_k

TIMING_NOTE = (
    "Timings are one run each, and noisy: on a shared CPU other work moves them by tens of percent, so they get "
    "no ✓ (*Benchmark this turn* gives medians over repeated runs); FLOPs, KV cache and token counts are exact."
)
TIMINGS = ("ttft_s", "total_s", "decode_tokens_per_s")  # measured once per turn: noisy, never marked better
MIN_DECODED_TOKENS = 8  # decode tokens/s is shown once this many tokens were decoded after the first


def rate(value: float | None) -> str:
    """A tokens-per-second value with one decimal, or "–"."""
    return "–" if value is None else f"{value:.1f}"


# (name, stats key, formatter, True when higher is better)
METRICS: list[tuple[str, str, Callable[[Any], str], bool]] = [
    ("time to first token", "ttft_s", format_seconds, False),
    ("total time", "total_s", format_seconds, False),
    ("decode tokens/s", "decode_tokens_per_s", rate, True),
    ("prefill FLOPs", "prefill_flops", format_flops, False),
    ("decode FLOPs", "decode_flops", format_flops, False),
    ("vision tower FLOPs", "vision_flops", format_flops, False),
    ("KV cache", "kv_cache_bytes", format_bytes, False),
    ("peak GPU memory", "peak_memory_bytes", format_bytes, False),
]


def metrics_rows(results: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    """One row per metric: the formatted value of each side, the accelerated/baseline ratio and the better side.

    Timings (`TIMINGS`) are single runs: they get a ratio but no better side. Decode tokens/s needs at least
    `MIN_DECODED_TOKENS` decoded tokens on a side, else it is not shown (one token's rate is noise).
    """
    stats = {side: (results.get(side) or {}).get("stats") or {} for side in SIDES}
    rows = []
    for name, key, show, higher_is_better in METRICS:
        values = {side: stats[side].get(key) for side in SIDES}
        if key == "peak_memory_bytes" and stats["baseline"] and values["baseline"] is None:
            cells = {side: "not measured on CPU" if stats[side] else "–" for side in SIDES}
        else:
            cells = {side: "–" if values[side] is None else show(values[side]) for side in SIDES}
        if key == "decode_tokens_per_s":
            for side in SIDES:
                decoded = (stats[side].get("new_tokens") or 0) - 1
                if stats[side] and decoded < MIN_DECODED_TOKENS:
                    values[side], cells[side] = None, f"– ({max(decoded, 0)} decoded)"
        ratio = better = None
        if values["baseline"] and values["vtw"] is not None and _complete(stats):
            ratio = values["vtw"] / values["baseline"]
            if ratio != 1 and key not in TIMINGS:
                better = "vtw" if (ratio > 1) == higher_is_better else "baseline"
        rows.append({"name": name, **cells, "ratio": ratio, "better": better, "runs": 1 if key in TIMINGS else None})
    return rows


def _complete(stats: dict[str, dict[str, Any]]) -> bool:
    """Ratios only once both sides have finished: a half-streamed total time compares nothing."""
    return all(stats[side].get("finish_reason") for side in SIDES)


def metrics_table(results: dict[str, dict[str, Any] | None], label: str = "accelerated") -> str:
    """The compact comparison: rows are metrics, columns baseline, the accelerated side and their ratio.

    The timings come first under a row saying they are one run each (no ✓); then the exact counts, where the
    better of two finished values is bold with a ✓.
    """
    lines = [f"| | baseline | {label} | {label.split(' ')[0]} / baseline |", "|---|---:|---:|---:|"]
    lines.append("| *timings, 1 run* | | | |")
    for row in metrics_rows(results):
        if row["name"] == "prefill FLOPs":
            lines.append("| *exact counts* | | | |")
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
    """How the two sides ran (order, race) and, once both have answered, whether the answers are identical.

    Empty until a side has answered: before the first turn (or after Clear) nothing ran, so no order is claimed.
    """
    if not any(results.get(side) for side in SIDES):
        return ""
    if mode == "race":
        how = "**Race mode**: both sides ran at the same time on one device, so their timings are *contended*."
    else:
        first_name = "the baseline" if first == "baseline" else label
        how = f"One side after the other on the same device; {first_name} ran first this turn (it alternates)."
    baseline, vtw = results.get("baseline"), results.get("vtw")
    if not baseline or not vtw or not _complete({side: results[side]["stats"] for side in SIDES}):
        return how
    return f"{compare_answers(baseline['token_ids'], vtw['token_ids'])} · {how}"


def compare_answers(baseline: list[int], accelerated: list[int]) -> str:
    """Whether two greedy answers agree: identical token for token, or the token from which they differ."""
    if baseline == accelerated:
        return "Answers **identical** token for token"
    first = next((i for i, (a, b) in enumerate(zip(baseline, accelerated, strict=False)) if a != b), None)
    if first is None:  # one answer is the other's beginning: it ended earlier
        first = min(len(baseline), len(accelerated))
        return f"Answers **different** from token {first + 1} on: one ended after {first} token(s), the other went on"
    if first == 0:
        return "Answers **different** from the first token"
    return f"Answers **different** from token {first + 1} on (the tokens before it are identical)"


def counters(chat: ChatState | None = None, mode: RunMode = "sequential") -> dict[str, str]:
    """Markdown for the metrics table and the summary line of the chat's last turn (empty ones without a chat)."""
    chat = chat if chat is not None else ChatState()
    label = chat.settings.label() if chat.settings else "accelerated"
    return {
        "metrics": metrics_table(chat.results, label),
        "summary": format_summary(chat.results, mode, label, chat.first),
    }


def header(manager: ModelManager) -> str:
    info = manager.info
    weights = " · ⚠️ random weights: answers are noise, mechanics and counters are real" if info.random_weights else ""
    name = f"`{info.source}`"
    if is_default_model(manager):
        name = "the embedded default model (a small LLaVA trained on easy-vqa: coloured shapes)"
    return (
        f"**Model** {name} ({info.family}, {info.num_layers} decoder layers) · **device** {info.device} · "
        f"**dtype** {info.dtype} · **attention** {info.attention}{weights}"
    )


def footer(side: str, settings: TurnSettings, stats: dict[str, Any] | None, status: str) -> str:
    """One line under an answer: the method, K, R or schedule, the decode engine and eta that produced it."""
    engine = f"engine {stats.get('engine', 'plain')}" if stats else "engine –"
    if side == "baseline":
        parts = [f"baseline (all {settings.num_layers} layers)", engine]
    else:
        parts = [settings.spoken(), engine]
        # eta only where the session's K search chose this K; a K set by hand (or FastV, a schedule) has none.
        if settings.method == "vtw" and settings.eta is not None:
            parts.append(f"K searched at eta {settings.eta:g}")
    if status not in ("done", "running"):
        parts.append(status)
    return " · ".join(parts)


def pane_label(method: str, k: Any, ratio: Any, num_layers: int) -> str:
    """The accelerated pane's title: the settings the *next* turn will use, labelled as such."""
    try:
        k = check_k(k, num_layers)
        ratio = check_float(ratio, "FastV R", 0, 1)
    except InputError:
        return "Accelerated (next turn: fix the settings)"
    spec = f"fastv:{ratio:g}" if method == "fastv" else method
    return f"next turn: {TurnSettings(spec, k, num_layers).spoken()}"
