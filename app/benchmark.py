"""Timing: "Benchmark this turn" (both sides, repeated and interleaved, as medians) and the per-turn timing chart.

A single turn's timings on a shared machine are noisy; the benchmark repeats the last turn greedily, so only
the clock varies, and reports median, min and max per side. A side's median is marked better (✓) only when the
two sides' min–max ranges do not overlap: beyond the noise of the runs themselves.
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
    """The benchmark as a Markdown table: median (min–max) per side, and the ratio of the medians.

    The better median is bold with a ✓ only when the sides' min–max ranges do not overlap.
    """
    names = {"ttft_s": "time to first token", "total_s": "total time", "decode_tokens_per_s": "decode tokens/s"}
    baseline, accelerated = result["sides"]["baseline"], result["sides"]["vtw"]
    lines = [
        f"**{result['repeats']} runs per side, interleaved**: median (min–max), the ratio of the medians; ✓ where "
        "the ranges do not overlap",
        "",
        f"| | baseline | {result['label']} | ratio |",
        "|---|---|---|---|",
    ]
    for key, name in names.items():
        if key not in baseline or key not in accelerated:
            continue
        show = rate if key == "decode_tokens_per_s" else format_seconds
        better = separated_better(baseline[key], accelerated[key], higher_is_better=key == "decode_tokens_per_s")
        cells = []
        for side, spread in (("baseline", baseline), ("vtw", accelerated)):
            text = f"{show(spread[key]['median'])} ({show(spread[key]['min'])}–{show(spread[key]['max'])})"
            cells.append(f"**{text}** ✓" if better == side else text)
        ratio = accelerated[key]["median"] / baseline[key]["median"] if baseline[key]["median"] else None
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {format_ratio(ratio)} |")
    return "\n".join(lines)


def separated_better(baseline: dict[str, float], accelerated: dict[str, float], higher_is_better: bool) -> str | None:
    """The side whose whole min–max range beats the other's ("baseline" or "vtw"); None when they overlap."""
    if accelerated["max"] < baseline["min"]:
        lower = "vtw"
    elif baseline["max"] < accelerated["min"]:
        lower = "baseline"
    else:
        return None
    return ("baseline" if lower == "vtw" else "vtw") if higher_is_better else lower


def timing_rows(state: ChatState) -> list[dict[str, Any]]:
    """The chat so far for the timing chart: one row per turn, side and measure (TTFT, total).

    The turn is text ("1", "2", ...: the chart's axis shows whole turns only); each series names its side as the
    turn ran it ("baseline TTFT", "VTW K=5 TTFT"), recorded with the timing (`app.turns.answer_last_turn`).
    """
    return [{**row, "turn": str(row["turn"])} for row in state.timings]
