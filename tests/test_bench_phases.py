"""bench --stages: the time to the first token split into vision / layers before K / layers from K."""

from __future__ import annotations

import pytest
import torch
from test_cli import last_json, run_cli

from vtw_core.benchmarks import stages as bench_phases
from vtw_core.benchmarks.bench import synthetic_inputs
from vtw_core.benchmarks.stages import STAGES, StageTimes, format_stages, run_stages
from vtw_core.errors import InputError
from vtw_core.generation.generate import generate_tokens
from vtw_core.generation.manager import ModelManager
from vtw_core.generation.types import GenerationStats, SamplingConfig


@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    model = ModelManager.load(str(tiny_model_path("llava")), device="cpu").model
    return model, synthetic_inputs(model, text_tokens=9)


def test_stage_flops_add_up_to_what_generation_accounts(tiny):
    """Each stage's FLOPs come from the per-layer token counts of the real pass; their sum must equal the
    vision + prefill FLOPs that generation reports for the same setting, and only the deep stage shrinks."""
    model, inputs = tiny
    baseline, vtw = run_stages(model, inputs, k=2, repeats=2)
    for times in (baseline, vtw):
        stats = GenerationStats(k=times.k, num_layers=4)
        for _ in generate_tokens(model, inputs, k=times.k, sampling=SamplingConfig(max_new_tokens=1), stats=stats):
            pass
        assert times.total_flops() == stats.vision_flops + stats.prefill_flops
        assert all(len(times.seconds[stage]) == 2 and min(times.seconds[stage]) > 0 for stage in STAGES)
    assert baseline.flops["vision"] == vtw.flops["vision"] > 0
    assert baseline.flops["layers 0..K-1"] == vtw.flops["layers 0..K-1"]
    assert vtw.flops["layers K..N-1"] < baseline.flops["layers K..N-1"]


def test_runs_are_interleaved_after_a_warm_up(monkeypatch, tiny):
    model, inputs = tiny
    calls = []

    def fake_run(model, inputs, k, split):
        calls.append(k)
        value = float(len(calls))  # every run different and known
        return [value, 10 * value, 100 * value], dict.fromkeys(STAGES, 1)

    monkeypatch.setattr(bench_phases, "_staged_run", fake_run)
    baseline, vtw = run_stages(model, inputs, k=3, repeats=3)
    assert calls == [None, 3] * 4
    assert baseline.seconds["vision"] == [3.0, 5.0, 7.0] and vtw.seconds["vision"] == [4.0, 6.0, 8.0]
    assert vtw.median_ms("layers K..N-1") == 600_000.0
    assert baseline.total_ms() == 111 * 5.0 * 1e3  # median of the runs' sums


def test_excess_column_splits_the_gap_between_the_ratios():
    """Baseline: 100 FLOPs in 100 ms (1 FLOP/ms). VTW: 10 + 20 + 10 FLOPs in 20 + 20 + 20 ms, so its stages
    take 10, 0 and 10 ms more than those FLOPs at the baseline's rate: 20 ms = 60 - 0.4 x 100."""
    baseline = StageTimes("baseline", None, 8, dict(zip(STAGES, ([0.01], [0.02], [0.07]), strict=True)),
                          dict(zip(STAGES, (10, 20, 70), strict=True)))  # fmt: skip
    vtw = StageTimes("VTW K=2", 2, 8, dict(zip(STAGES, ([0.02], [0.02], [0.02]), strict=True)),
                     dict(zip(STAGES, (10, 20, 10), strict=True)))  # fmt: skip
    table = format_stages(baseline, vtw).splitlines()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")] for line in table[2:6]}
    assert list(rows) == ["vision", "layers 0..1", "layers 2..7", "time to first token"]
    assert [rows[name][-1] for name in rows] == ["+10.0", "+0.0", "+10.0", "+20.0"]
    assert rows["layers 2..7"][3] == "0.29" and rows["layers 2..7"][6] == "0.143"  # time and FLOPs ratios
    assert table[-1] == "TTFT ratio 0.600 = 1.50x the end-to-end FLOPs ratio 0.400."


def test_refuses_what_it_cannot_split(tiny):
    model, inputs = tiny
    for k in (0, 4):
        with pytest.raises(InputError, match="0 < K < 4"):
            run_stages(model, inputs, k=k, repeats=1)
    with pytest.raises(InputError, match="repeats"):
        run_stages(model, inputs, k=2, repeats=0)
    batch = {name: torch.cat([value, value]) for name, value in inputs.items()}
    with pytest.raises(InputError, match="batch 1"):
        run_stages(model, batch, k=2, repeats=1)


def test_bench_cli_prints_the_stages(capsys, tiny_model_path):
    code, out, _ = run_cli(
        capsys, "bench", "--model", str(tiny_model_path("llava")), "--k", "1", "--new-tokens", "2",
        "--repeats", "2", "--threads", "1", "--stages", "--json",
    )  # fmt: skip
    assert code == 0
    assert "Stage by stage at K = 1" in out and "| layers 1..3 |" in out
    stages = last_json(out)["stages"]
    assert [times["k"] for times in stages] == [None, 1]
    assert all(len(times["seconds"]["vision"]) == 2 for times in stages)
