"""Timings a user can trust: the warm-up covers a first turn's exact path, freed memory stays for the next turn,
single runs are labelled and never marked better, and the turn-timing script compares turns with bench."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import gradio as gr
import pytest

from app import benchmark, metrics, search, turns
from app.media import EXAMPLES, example_files
from app.session import ChatState, TurnSettings
from vtw_core.generation.manager import ModelManager
from vtw_core.generation.types import SamplingConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def manager(tiny_model_path):
    return ModelManager.load(str(tiny_model_path("llava")), device="cpu")


def test_warm_up_runs_a_first_turns_exact_path_both_sides_in_both_orders(manager, monkeypatch):
    examples = example_files(False)
    passes = []
    original = manager.stream

    def recording(messages, images, **options):
        for event in original(messages, images, **options):
            yield event
        passes.append((options["k"], event.stats.prompt_tokens, options["sampling"].max_new_tokens))

    monkeypatch.setattr(manager, "stream", recording)
    ran = turns.warm_up(manager, 2, examples)
    sides = ("baseline", "vtw", "vtw", "baseline")
    assert ran == [(side, prompt) for side, (_, prompt, _) in zip(sides, passes, strict=True)]
    assert [k for k, *_ in passes] == [None, 2, 2, None]  # both sides, each first once
    assert all(tokens > 1 for *_, tokens in passes)  # past the first token: the decode engine runs too
    # The same prompt, hence the same shapes, as the first turn a visitor sends with the first example.
    image, question = examples[0]
    state = turns.add_turn(ChatState(), question, [str(image)], [EXAMPLES])
    *_, (state, _) = turns.answer_last_turn(manager, state, 2, SamplingConfig(max_new_tokens=2))
    assert {prompt for _, prompt, _ in passes} == {state.results["baseline"]["stats"]["prompt_tokens"]}


def test_the_page_warms_up_on_its_first_example(manager, monkeypatch):
    from app.ui import page

    calls = []
    monkeypatch.setattr(page, "warm_up_on_device", lambda *args: calls.append(args))
    page.build_demo(manager)
    assert calls and calls[0][2] == example_files(False) and calls[0][1] == manager.info.num_layers // 2


FAULTS = """
import resource, sys, threading
if sys.argv[1] == "retain":
    from vtw_core.runtime import retain_freed_memory
    assert retain_freed_memory()
faults = []
def touch(record):
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    block = bytearray(64 << 20)  # a turn's buffers
    for offset in range(0, len(block), 4096):
        block[offset] = 1
    if record:
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
for record in (False, True):  # one side, then the other, each on a thread of its own as Gradio runs them
    thread = threading.Thread(target=touch, args=(record,))
    thread.start()
    thread.join()
print(faults[0])
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_freed_memory_stays_for_the_side_that_runs_next():
    """Without `retain_freed_memory`, the second thread takes 64 MB of fresh pages (page faults the first side
    of a turn pays and the second does not); with it, the memory the first freed."""
    faults = {}
    for mode in ("default", "retain"):
        done = subprocess.run([sys.executable, "-c", FAULTS, mode], cwd=ROOT, capture_output=True, text=True,
                              check=True)  # fmt: skip
        faults[mode] = int(done.stdout.strip())
    assert faults["default"] > 8000 and faults["retain"] < 1000, faults


STATS = {"ttft_s": 0.3, "total_s": 0.5, "prefill_flops": 10e9, "decode_flops": 10e6, "vision_flops": 1e6,
         "kv_cache_bytes": 100e6, "peak_memory_bytes": None, "finish_reason": "eos", "prompt_tokens": 9,
         "vision_tokens": 5, "new_tokens": 12, "decode_tokens_per_s": 40.0, "engine": "static"}  # fmt: skip


def test_a_turns_timings_are_one_run_and_never_marked_better():
    fast = {**STATS, "ttft_s": 0.1, "total_s": 0.2, "decode_tokens_per_s": 90.0, "prefill_flops": 3e9}
    results = {"baseline": {"stats": STATS, "token_ids": [1]}, "vtw": {"stats": fast, "token_ids": [1]}}
    table = metrics.metrics_table(results, "VTW K=5")
    lines = table.splitlines()
    assert lines.index("| *timings, 1 run* | | | |") < lines.index("| time to first token | 300 ms | 100 ms | 0.33× |")
    for name in ("time to first token", "total time", "decode tokens/s"):
        assert "✓" not in next(line for line in lines if line.startswith(f"| {name} |")), name
    assert "**3.00 GFLOPs** ✓" in table and "**" not in next(line for line in lines if "total time" in line)
    assert "| decode tokens/s | 40.0 | 90.0 | 2.25× |" in table  # 11 tokens decoded after the first: shown


def test_decode_rate_needs_enough_decoded_tokens():
    few = {**STATS, "new_tokens": metrics.MIN_DECODED_TOKENS}  # one short: the first token is not decoded
    rows = {row["name"]: row for row in metrics.metrics_rows({"baseline": {"stats": STATS}, "vtw": {"stats": few}})}
    decode = rows["decode tokens/s"]
    assert decode["baseline"] == "40.0" and decode["vtw"] == f"– ({metrics.MIN_DECODED_TOKENS - 1} decoded)"
    assert decode["ratio"] is None and decode["better"] is None


def spread(median: float, low: float, high: float) -> dict[str, float]:
    return {"median": median, "min": low, "max": high, "n": 5}


def test_a_benchmark_marks_a_side_only_beyond_the_noise():
    # K = N: the same work on both sides; the medians differ by chance and the ranges overlap.
    same = {"repeats": 5, "label": "VTW K=16", "sides": {
        "baseline": {"ttft_s": spread(0.31, 0.22, 0.40)}, "vtw": {"ttft_s": spread(0.23, 0.21, 0.35)}}}  # fmt: skip
    assert "✓" not in benchmark.describe_benchmark(same).split("\n", 1)[1]
    apart = {"repeats": 5, "label": "VTW K=5", "sides": {
        "baseline": {"ttft_s": spread(0.31, 0.29, 0.33), "decode_tokens_per_s": spread(50, 45, 52)},
        "vtw": {"ttft_s": spread(0.12, 0.11, 0.14), "decode_tokens_per_s": spread(60, 58, 66)}}}  # fmt: skip
    text = benchmark.describe_benchmark(apart)
    assert "| time to first token | 310 ms (290 ms–330 ms) | **120 ms (110 ms–140 ms)** ✓ |" in text
    assert "**60.0 (58.0–66.0)** ✓" in text  # more tokens per second is better
    assert benchmark.separated_better(spread(1, 1, 2), spread(2, 2, 3), higher_is_better=False) is None  # touching


def test_the_timing_chart_counts_whole_turns_from_zero_and_names_the_method(manager):
    state = ChatState()
    for k, text in ((2, "What?"), (3, "And?")):
        turns.add_turn(state, text, [str(EXAMPLES / "chelsea.jpg")] if k == 2 else [], [EXAMPLES])
        list(turns.answer_last_turn(manager, state, k, SamplingConfig(max_new_tokens=2)))
    rows = benchmark.timing_rows(state)
    assert {row["turn"] for row in rows} == {"1", "2"}  # text: the axis shows whole turns only
    assert {row["series"] for row in rows} == {"baseline TTFT", "baseline total", "VTW K=2 TTFT", "VTW K=2 total",
                                               "VTW K=3 TTFT", "VTW K=3 total"}  # fmt: skip
    from app.ui.layout import benchmark_panel

    with gr.Blocks():
        plot = benchmark_panel().timing_plot
    assert plot.y_lim == [0, None] and plot.sort[:3] == ["1", "2", "3"]


def test_footer_names_eta_only_for_a_k_the_sessions_search_chose():
    found = search.Searched(7, 0.01)  # this session's search chose K = 7 at eta 0.01
    assert search.searched_eta(7, found) == 0.01
    assert search.searched_eta(6, found) is None  # the slider moved by hand since
    assert search.searched_eta(7, None) is None  # K = 7 set by hand: another session's search says nothing here
    chosen = TurnSettings("vtw", 7, 12, search.searched_eta(7, found))
    by_hand = TurnSettings("vtw", 6, 12, search.searched_eta(6, found))
    assert metrics.footer("vtw", chosen, None, "done").endswith("K searched at eta 0.01")
    assert "eta" not in metrics.footer("vtw", by_hand, None, "done")
    assert "eta" not in metrics.footer("vtw", TurnSettings("fastv:0.5", 7, 12, 0.01), None, "done")  # not VTW


def test_the_timing_chart_keeps_the_settings_each_run_had(manager):
    """The series label is recorded with each timing: a Regenerate at another K never relabels the first run."""
    state = turns.add_turn(ChatState(), "What?", [str(EXAMPLES / "chelsea.jpg")], [EXAMPLES])
    list(turns.answer_last_turn(manager, state, 2, SamplingConfig(max_new_tokens=2)))
    turns.drop_last_answers(state)  # Regenerate, now at K = 3
    list(turns.answer_last_turn(manager, state, 3, SamplingConfig(max_new_tokens=2), method="fastv:0.5"))
    assert [row["series"] for row in state.timings] == [
        "baseline TTFT", "baseline total", "VTW K=2 TTFT", "VTW K=2 total",  # the first run: baseline first
        "FastV K=3 R=0.5 TTFT", "FastV K=3 R=0.5 total", "baseline TTFT", "baseline total"]  # fmt: skip
    assert {row["series"] for row in benchmark.timing_rows(state)} == {
        "baseline TTFT", "baseline total", "VTW K=2 TTFT", "VTW K=2 total", "FastV K=3 R=0.5 TTFT",
        "FastV K=3 R=0.5 total"}  # fmt: skip
    assert {row["turn"] for row in benchmark.timing_rows(state)} == {"1"}


def test_the_summary_says_nothing_before_a_side_has_answered():
    assert metrics.format_summary({"baseline": None, "vtw": None}) == ""
    assert metrics.format_summary({}, "race") == ""
    assert metrics.counters()["summary"] == ""  # the page on load: no "the baseline ran first"
    answered = {"baseline": {"token_ids": [1], "stats": {"finish_reason": None}}, "vtw": None}
    assert "the baseline ran first" in metrics.format_summary(answered)  # once a side answers, the order shows
    from app.ui.layout import metrics_area

    with gr.Blocks():
        assert metrics_area().summary.value == ""


def test_the_search_result_says_what_its_floor_and_the_slider_did():
    result = {"k": 5, "eta": 0.003, "num_layers": 16, "samples": 20, "over": "prompt",
              "curve": [{"k": 5, "kl": 1e-4}, {"k": 6, "kl": 1e-5}]}  # fmt: skip
    text = search.describe_search(result, "easy-vqa", previous_k=5)
    assert "**K = 5**, the smallest K the search tries" in text and "already there" in text and "moved" not in text
    later = {**result, "k": 6, "curve": [{"k": 5, "kl": 1.0}, {"k": 6, "kl": 1e-5}]}
    text = search.describe_search(later, "bundled", previous_k=5)
    assert "the first K whose" in text and "smallest" not in text and "moved from 5 to it" in text


def test_schedules_have_short_labels_and_say_where_they_come_from():
    from app.ui.layout import method_choices, method_info

    labels = dict((value, label) for label, value in method_choices())
    assert labels["schedule:easyvqa-gsearch"] == "G-Search" and all(len(label) <= 16 for label in labels.values())
    assert method_info("schedule:easyvqa-gsearch") == "G-Search on easy-vqa, tol. 0.003"
    assert method_info("schedule:easyvqa-psigmoid-30").startswith("P-Sigmoid on easy-vqa, budget 0.3")
    assert method_info("vtw") and method_info("fastv")


def test_the_turn_timing_script_compares_turns_with_bench(served_app, tmp_path):
    _, url = served_app
    bench = tmp_path / "bench.json"
    rows = [{"label": "baseline", "k": None, "ttft_s": 0.2}, {"label": "VTW K=4", "k": 4, "ttft_s": 0.1}]
    bench.write_text("bench table\n" + json.dumps({"rows": rows}), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "scripts/app_ttft.py", "--url", url, "--sessions", "2", "--turns", "2", "--pause", "0",
         "--think", "0", "--max-new-tokens", "2", "--bench-json", str(bench)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    assert "2 fresh sessions x 2 turns" in out and out.count("session 2 turn") == 2
    table = [line for line in out.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(table) == 2 and all(line.count("|") == 7 and "| 0.50 |" in line for line in table)
    assert "Turn 1's median ratio is" in out and "bench's" in out
