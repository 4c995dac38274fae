"""Per-sample cost records: the analytic baseline equals what an unchanged run measures on the same prompts."""

from __future__ import annotations

import pytest

from vtw_core.generation.generate import generate_batch
from vtw_core.generation.manager import ModelManager
from vtw_core.generation.types import GenerationStats, SamplingConfig
from vtw_core.integrations.cost import sample_costs, summarize
from vtw_core.models.prompts import user_message


def _run(manager: ModelManager, images, k: int | None, new_tokens: int) -> tuple[GenerationStats, list[list[int]]]:
    conversations = [[user_message("What is it?", 1)], [user_message("Which colour is the big shape?", 1)]]
    stats = GenerationStats(k=k, num_layers=manager.info.num_layers)
    sampling = SamplingConfig(max_new_tokens=new_tokens)
    ids = generate_batch(manager.model, manager.processor, conversations, [[image] for image in images[:2]],
                         k=k, sampling=sampling, stats=stats)  # fmt: skip
    return stats, ids


def test_baseline_side_matches_an_unchanged_run(tiny_model_path, sample_images):
    manager = ModelManager.load(str(tiny_model_path("llava", 6)), device="cpu")
    baseline_stats, baseline_ids = _run(manager, sample_images, None, new_tokens=1)
    vtw_stats, vtw_ids = _run(manager, sample_images, 2, new_tokens=1)
    baseline = sample_costs(baseline_stats, manager.model.config, [len(ids) for ids in baseline_ids])
    vtw = sample_costs(vtw_stats, manager.model.config, [len(ids) for ids in vtw_ids])
    for measured, analytic in zip(baseline, vtw, strict=True):
        assert analytic.baseline_prefill_flops == measured.prefill_flops
        assert analytic.prefill_flops < analytic.baseline_prefill_flops
        assert analytic.ttft_s == vtw_stats.ttft_s > 0
    summary = summarize(vtw)
    assert summary["samples"] == 2
    expected = sum(cost.prefill_flops for cost in vtw) / sum(cost.prefill_flops for cost in baseline)
    assert summary["prefill_flops_ratio"] == pytest.approx(expected)


def test_decode_cost_counts_each_token_after_the_first(tiny_model_path, sample_images):
    manager = ModelManager.load(str(tiny_model_path("llava", 6)), device="cpu")
    stats, ids = _run(manager, sample_images, None, new_tokens=4)
    for cost, row_ids in zip(sample_costs(stats, manager.model.config, [len(i) for i in ids]), ids, strict=True):
        assert cost.new_tokens == len(row_ids)
        assert cost.decode_flops == cost.baseline_decode_flops  # the unchanged model: both sides agree
    assert sum(cost.decode_flops for cost in sample_costs(stats, manager.model.config, [len(i) for i in ids])) == (
        stats.decode_flops
    )
