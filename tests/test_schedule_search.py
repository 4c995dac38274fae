"""G-Search and P-Sigmoid on a tiny model, scored by KL to the baseline."""

from __future__ import annotations

import itertools

import pytest

from vtw_core.analysis.k_search import CalibrationSample
from vtw_core.analysis.schedule_search import g_search, kl_score, p_sigmoid, schedule_prefill_flops, sigmoid_schedule
from vtw_core.engine.schedules import Schedule
from vtw_core.generation.manager import ModelManager

N = 6


@pytest.fixture(scope="module")
def scored(tiny_model_path, sample_images):
    manager = ModelManager.load(str(tiny_model_path("llava", N)), device="cpu")
    samples = [CalibrationSample("What is it?", [image]) for image in sample_images]
    return manager, kl_score(manager.model, manager.processor, samples, N)


def test_kl_score_is_zero_for_the_baseline_and_negative_otherwise(scored):
    _, score = scored
    assert score(Schedule((1.0,) * N)) == pytest.approx(0, abs=1e-7)
    assert score(Schedule.vtw(1, N)) < score(Schedule.vtw(4, N)) < 0


def test_g_search_is_greedy_minimal_and_within_tolerance(scored):
    _, score = scored
    baseline = score(Schedule((1.0,) * N))
    tolerance = 0.5 * -score(Schedule.vtw(3, N))
    schedule, log = g_search(score, N, tolerance=tolerance, grid=(0.0, 0.25, 0.5, 0.75, 1.0))
    keep = schedule.keep
    assert keep[0] == 1.0 and all(a >= b for a, b in itertools.pairwise(keep))
    assert score(schedule) >= baseline - tolerance
    assert keep[-1] < 1.0  # some tokens were cut on this random model
    # Minimal per layer: the next grid share below the chosen one, with the same shallower layers, failed.
    grid = (0.0, 0.25, 0.5, 0.75, 1.0)
    for layer in range(1, N):
        lower = [share for share in grid if share < keep[layer]]
        if lower:
            trial = keep[:layer] + (lower[-1],) * (N - layer)
            assert score(Schedule(tuple(trial))) < baseline - tolerance
    assert all(entry["score"] <= 0 for entry in log)


def test_p_sigmoid_respects_the_flops_budget(scored):
    manager, score = scored
    vision, text = 36, 20
    schedule, log = p_sigmoid(score, manager.model.config, N, budget=0.8, vision_tokens=vision, text_tokens=text,
                              trials=12)  # fmt: skip
    full = schedule_prefill_flops(manager.model.config, Schedule((1.0,) * N), vision, text)
    assert schedule_prefill_flops(manager.model.config, schedule, vision, text) <= 0.8 * full
    feasible = [entry for entry in log if entry["flops_ratio"] <= 0.8]
    assert feasible and score(schedule) == pytest.approx(max(entry["score"] for entry in feasible), abs=1e-6)


def test_sigmoid_shape():
    schedule = sigmoid_schedule(12, steepness=2.0, midpoint=6.0, floor=0.1)
    keep = schedule.keep
    assert keep[0] == 1.0 and keep[1] > 0.99 and keep[-1] == pytest.approx(0.1, abs=0.01)
    assert all(a >= b for a, b in itertools.pairwise(keep))
    assert keep[6] == pytest.approx(0.1 + 0.9 / 2)


def test_reply_kl_score(scored, sample_images):
    manager, _ = scored
    samples = [CalibrationSample("What is it?", [image]) for image in sample_images[:2]]
    score = kl_score(manager.model, manager.processor, samples, N, over="reply")
    assert score(Schedule((1.0,) * N)) == pytest.approx(0, abs=1e-7)
    assert score(Schedule.vtw(1, N)) < 0
