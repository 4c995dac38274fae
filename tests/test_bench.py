"""bench: the order runs go in (warm-up, then interleaved), medians/min/max of the timed runs, table and JSON."""

from __future__ import annotations

import math
import re
import statistics

import pytest
import torch
from test_cli import last_json, run_cli

from vtw_core.benchmarks import bench
from vtw_core.benchmarks.bench import DeviceClock, format_table, interleaved_order, run_bench
from vtw_core.generation.manager import ModelManager
from vtw_core.generation.types import GenerationStats


def test_interleaved_order():
    # Warm-up pass over every setting, then whole cycles: never two timed runs of one setting in a row.
    assert interleaved_order(3, 2) == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    assert interleaved_order(1, 3) == [0, 0, 0, 0]


def test_run_bench_interleaves_and_drops_the_warm_up(monkeypatch, tiny_model_path):
    manager = ModelManager.load(str(tiny_model_path("llava")), device="cpu")
    calls = []

    def fake_run(model, inputs, k, new_tokens, engine, schedule=None, prefill_engine="plain"):
        calls.append((engine, new_tokens, k))
        stats = GenerationStats(k=k, num_layers=4, engine=engine, new_tokens=new_tokens, prompt_tokens=20)
        stats.ttft_s = float(len(calls))  # every run a different, known value
        stats.total_s = stats.ttft_s + 0.5 * (new_tokens - 1)
        return stats

    monkeypatch.setattr(bench, "_timed_run", fake_run)
    rows = run_bench(manager, [1, 2], new_tokens=[3, 5], repeats=3, engines=("plain", "static"))
    settings = [(engine, count, k) for engine in ("plain", "static") for count in (3, 5) for k in (None, 1, 2)]
    assert calls == settings * 4  # one warm-up pass, then three interleaved cycles
    assert [(row.engine, row.new_tokens, row.k) for row in rows] == settings
    for index, row in enumerate(rows):
        timed = [float(index + 1 + cycle * len(settings)) for cycle in (1, 2, 3)]  # 1-based call numbers
        assert row.ttft_samples_s == timed and row.ttft_s == statistics.median(timed)
        assert row.decode_samples_ms == pytest.approx([500.0] * 3) and row.decode_ms_per_token == pytest.approx(500)
    with pytest.raises(Exception, match="repeats"):
        run_bench(manager, [1], repeats=0)


def test_table_ratios_are_per_engine_and_token_count():
    def row(engine, count, label, ttft, peak):
        return bench.BenchRow(label, None, engine, ttft, 2.0, ttft + 1, 500.0, 10, 20, 2**20, peak, 9, 4, count,
                              [ttft * 0.9, ttft, ttft * 1.2], [1.5, 2.0, 3.0], [ttft + 1], [peak])  # fmt: skip

    rows = [row("graph", 64, "baseline", 0.010, 100), row("graph", 64, "VTW K=1", 0.005, 65),
            row("graph", 256, "baseline", 0.020, 200), row("graph", 256, "VTW K=1", 0.015, 150)]  # fmt: skip
    table = format_table(rows, bandwidth_gb_s=1.0, weights=10**6).splitlines()
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in table if line.startswith("| graph")]
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    assert all(len(line) == len(header) for line in cells)
    column = {name: index for index, name in enumerate(header)}
    assert [line[column["TTFT ratio"]] for line in cells] == ["1.00", "0.50", "1.00", "0.75"]
    assert [line[column["peak ratio"]] for line in cells] == ["1.00", "0.65", "1.00", "0.75"]
    assert cells[0][column["TTFT ms"]] == "10.0 [9.0-12.0]"
    assert cells[0][column["decode ms/token"]] == "2.00 [1.50-3.00]"
    assert cells[0][column["% of bw"]] == "50%"  # floor 1 ms (1 MB at 1 GB/s) over 2 ms per token
    assert "0.65x" in table[-1]


def test_table_end_to_end_flops_and_decode_ratios():
    """The vision tower runs for both sides, so the FLOPs up to the first token fall less than the prefill's."""

    def row(label, prefill, decode_ms):
        return bench.BenchRow(label, None, "static", 0.01, decode_ms, 0.02, 1e3 / decode_ms, prefill, prefill, 0,
                              None, 9, 4, 8, [0.01], [decode_ms], [0.02], [], vision_flops=20)  # fmt: skip

    table = format_table([row("baseline", 80, 2.0), row("VTW K=1", 30, 1.5)]).splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    vtw = [cell.strip() for cell in table[-1].strip("|").split("|")]
    column = {name: index for index, name in enumerate(header)}
    assert vtw[column["FLOPs ratio"]] == "0.38"  # 30 / 80
    assert vtw[column["vision+prefill ratio"]] == "0.50"  # (20 + 30) / (20 + 80)
    assert vtw[column["decode ratio"]] == "0.75"


def test_device_clock_on_cpu():
    clock = DeviceClock(torch.device("cpu"))
    for _ in range(3):
        clock.mark()
    first, second = clock.seconds_since_first()
    assert 0 <= first <= second


def test_bench_cli_rows_and_json(capsys, tiny_model_path):
    code, out, _ = run_cli(
        capsys, "bench", "--model", str(tiny_model_path("llava")), "--k", "1", "--new-tokens", "2", "4",
        "--repeats", "2", "--threads", "1", "--engine", "plain", "static", "--json",
    )  # fmt: skip
    assert code == 0
    report = last_json(out)
    assert report["threads"] == 1 and report["repeats"] == 2 and report["paper_peak_memory_ratio"] == 0.65
    rows = report["rows"]
    assert [(row["engine"], row["new_tokens"], row["k"]) for row in rows] == [
        (engine, count, k) for engine in ("plain", "static") for count in (2, 4) for k in (None, 1)
    ]
    for row in rows:
        assert len(row["ttft_samples_s"]) == len(row["decode_samples_ms"]) == 2
        assert min(row["ttft_samples_s"]) <= row["ttft_s"] <= max(row["ttft_samples_s"])
        assert row["peak_memory_bytes"] is None  # CPU
    table = [line for line in out.splitlines() if line.startswith("| plain") or line.startswith("| static")]
    assert len(table) == len(rows)
    assert "2 interleaved runs after a warm-up" in out and "1 CPU thread" in out


def test_bench_on_the_default_model_times_an_easy_vqa_question_at_the_shipped_k(capsys):
    """With no --image and no --k, the default model is timed on a question of the kind it answers, at the K
    its vtw.json ships; the table's vision+prefill ratio counts the tower on both sides."""
    import json
    from pathlib import Path

    from vtw_core.models.defaults import DEFAULT_MODEL_DIR

    shipped = json.loads((Path(DEFAULT_MODEL_DIR) / "vtw.json").read_text())["k"]
    code, out, _ = run_cli(capsys, "bench", "--repeats", "1", "--new-tokens", "2", "--threads", "1", "--json")
    assert code == 0
    assert "input: easy-vqa test image 0.png, 'what is the red shape?'" in out
    rows = last_json(out)["rows"]
    assert [row["k"] for row in rows] == [None, shipped]
    assert rows[0]["vision_tokens"] == 576 and rows[0]["vision_flops"] > 0
    assert rows[1]["vision_flops"] == rows[0]["vision_flops"]
    vtw_line = next(line for line in out.splitlines() if f"VTW K={shipped}" in line)
    end_to_end = (rows[1]["vision_flops"] + rows[1]["prefill_flops"]) / (
        rows[0]["vision_flops"] + rows[0]["prefill_flops"]
    )
    assert f"| {end_to_end:.2f} |" in vtw_line


def test_time_interleaved_sets_up_untimed_and_drops_the_warm_up():
    calls = []

    def run(name):
        def set_up():
            calls.append(f"set up {name}")
            return lambda: calls.append(name)

        return set_up

    seconds = bench.time_interleaved(torch.device("cpu"), [run("a"), run("b")], repeats=2)
    assert calls == ["set up a", "a", "set up b", "b"] * 3  # a warm-up cycle, then two timed ones
    assert [len(values) for values in seconds] == [2, 2] and all(value >= 0 for row in seconds for value in row)
    with pytest.raises(Exception, match="repeats"):
        bench.time_interleaved(torch.device("cpu"), [run("a")], repeats=0)


def markdown_table(out: str, title: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows of the first Markdown table after the line starting with `title`."""
    lines = out.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(title)) + 1
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([cell.strip() for cell in line.strip("|").split("|")])
    header, separator, *rows = table
    assert set(separator) == {"---"} and rows and all(len(row) == len(header) for row in rows)
    return header, rows


def numbers(cell: str) -> list[float]:
    """Every number in a cell such as '1.25 [1.20-1.31]' or '5.5%'."""
    return [float(value) for value in re.findall(r"\d+(?:\.\d+)?(?:e[-+]?\d+)?", cell)]


def positive_finite(cell: str) -> bool:
    values = numbers(cell)
    return bool(values) and all(math.isfinite(value) and value > 0 for value in values)


def test_bench_cli_layers(capsys, tiny_model_path):
    code, out, _ = run_cli(
        capsys, "bench", "--model", str(tiny_model_path("llava")), "--k", "2", "--new-tokens", "2", "--repeats", "2",
        "--threads", "1", "--layers", "--json",
    )  # fmt: skip
    assert code == 0
    header, rows = markdown_table(out, "One decoder layer (layer 0; 64 wide, 4 layers) per call")
    assert header == ["input", "tokens", "ms", "share of the prompt call"]
    assert [row[0] for row in rows] == ["prompt", "text only", "one token"]
    prompt, text, one = (int(row[1]) for row in rows)
    assert prompt > text > one == 1
    assert all(positive_finite(row[2]) and positive_finite(row[3]) for row in rows) and rows[0][3] == "100.0%"
    assert re.search(r"fixed cost per layer call: [\d.]+ ms = [\d.]+% of a layer's prefill time", out)
    layers = last_json(out)["layers"]
    assert [(call["input"], call["tokens"], len(call["seconds"])) for call in layers] == [
        ("prompt", prompt, 2), ("text only", text, 2), ("one token", 1, 2),
    ]  # fmt: skip
    assert "decode_engines" not in last_json(out) and "Decode steps alone" not in out


def test_bench_cli_decode_engines(capsys, tiny_model_path):
    code, out, _ = run_cli(
        capsys, "bench", "--model", str(tiny_model_path("llava")), "--k", "1", "3", "--new-tokens", "3",
        "--repeats", "2", "--threads", "1", "--decode-engines", "--json",
    )  # fmt: skip
    assert code == 0
    header, rows = markdown_table(out, "Decode steps alone, 3 per run")
    assert header == [
        "shape", "prompt tokens", "max new tokens", "setting", "plain ms/step", "static ms/step", "static / plain",
    ]  # fmt: skip
    assert [row[3] for row in rows] == ["baseline", "VTW K=1", "VTW K=3"]
    assert all(row[0] == "64 wide, 4 layers" and row[2] == "5" and int(row[1]) > 0 for row in rows)
    assert all(positive_finite(cell) for row in rows for cell in row[4:])
    results = last_json(out)["decode_engines"]
    assert [result["k"] for result in results] == [None, 1, 3]
    assert all(len(result["ms_per_step"]["static"]) == 2 for result in results)
    code, out, _ = run_cli(
        capsys, "bench", "--model", str(tiny_model_path("llava")), "--k", "1", "--new-tokens", "2", "--repeats", "1",
        "--engine", "static", "auto", "plain", "--decode-engines",
    )  # fmt: skip
    header, _ = markdown_table(out, "Decode steps alone, 2 per run")  # auto is static on CPU: listed once
    assert header[4:] == ["static ms/step", "plain ms/step", "plain / static"]


def test_bench_cli_search_cost(capsys, tiny_model_path):
    code, out, _ = run_cli(
        capsys, "bench", "--model", str(tiny_model_path("llava", 8)), "--k", "2", "--new-tokens", "2",
        "--repeats", "2", "--threads", "1", "--search-cost", "--json",
    )  # fmt: skip
    assert code == 0
    header, rows = markdown_table(out, "K search cost on the")
    assert "(K in 5..7, 3 branches)" in out
    assert header == ["variant", "ms per sample", "baseline passes"]
    assert [row[0] for row in rows] == ["baseline pass", "K search", "naive K search"]
    assert all(positive_finite(row[1]) and positive_finite(row[2]) for row in rows)
    assert rows[0][2] == "1.00 [1.00-1.00]"
    cost = last_json(out)["search_cost"]
    assert cost["ks"] == [5, 6, 7] and all(len(values) == 2 for values in cost["seconds"].values())
