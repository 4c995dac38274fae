"""Timing: "Benchmark this turn" (both sides, repeated and interleaved, as medians) and the per-turn timing chart.

A single turn's timings on a shared machine are noisy; the benchmark repeats the last turn greedily, so only
the clock varies, and reports median, min and max per side.
"""

from __future__ import annotations

import statistics
from typing import Any

from app.errors import Cancelled
from app.media import chat_videos
from app.metrics import rate
from app.session import SIDES, ChatState, TurnSettings
from app.turns import accelerated_method, run_order, side_request
from vtw_core.analysis.units import format_ratio, format_seconds
from vtw_core.errors import InputError
from vtw_core.generation.manager import ModelManager
from vtw_core.generation.types import SamplingConfig
from vtw_core.validation import check_int, check_k


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
            result = manager.generate(**side_request(state, side, accelerated, videos), sampling=sampling)
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
        show = rate if key == "decode_tokens_per_s" else format_seconds
        cells = [
            f"{show(side[key]['median'])} ({show(side[key]['min'])}–{show(side[key]['max'])})"
            for side in (baseline, accelerated)
        ]
        ratio = accelerated[key]["median"] / baseline[key]["median"] if baseline[key]["median"] else None
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {format_ratio(ratio)} |")
    return "\n".join(lines)


def timing_rows(state: ChatState) -> list[dict[str, Any]]:
    """The chat so far for the timing chart: one row per turn, side and measure (TTFT, total)."""
    return list(state.timings)
