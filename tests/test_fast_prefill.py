"""The fixed-shape prefill (vtw_core.engine.fast_prefill) against the plain prefill; its bucketing and fallbacks."""

from __future__ import annotations

import pytest
import torch
from test_engine import FAMILIES, NUM_LAYERS, build_model, left_pad, prompt_inputs

from vtw_core.engine import fast_prefill as fp
from vtw_core.engine.decoder import prefill, withdrawal_selector
from vtw_core.engine.embed import embed_prompt
from vtw_core.engine.schedules import Schedule
from vtw_core.errors import InputError
from vtw_core.generation.generate import generate_tokens
from vtw_core.generation.types import GenerationStats, SamplingConfig


def generated(model, inputs, k, engine="plain", prefill_engine="plain", schedule=None, steps=8):
    stats = GenerationStats(k=k, num_layers=NUM_LAYERS)
    columns = generate_tokens(model, inputs, k=k, sampling=SamplingConfig(max_new_tokens=steps), stats=stats,
                              engine=engine, prefill_engine=prefill_engine, schedule=schedule)  # fmt: skip
    return torch.stack(list(columns), 1).tolist(), stats


def test_bucket_for_is_the_smallest_bucket_that_fits():
    for length in range(1, 5000, 7):
        fitting = [bucket for bucket in fp.PREFILL_BUCKETS if bucket >= length]
        assert fp.bucket_for(length) == (min(fitting) if fitting else None)
    assert (fp.bucket_for(638), fp.bucket_for(2990), fp.bucket_for(640), fp.bucket_for(641)) == (640, 3072, 640, 704)
    assert fp.bucket_for(9, buckets=(4, 16, 8)) == 16
    with pytest.raises(InputError):
        fp.bucket_for(0)


def test_kept_bucket():
    assert [fp.kept_bucket(kept, 640) for kept in (1, 32, 33, 62, 64, 65)] == [32, 32, 64, 64, 64, 96]
    assert fp.kept_bucket(100, 64) == 64  # never more slots than the prompt has


def test_padding_does_not_change_the_plain_prefill():
    """The premise of bucketing: left padding is masked out, so the valid tokens' logits do not move."""
    model = build_model("llava")
    prompt = embed_prompt(model, prompt_inputs(model, "llava"))
    padded = fp.pad_prompt(prompt, prompt.inputs_embeds.shape[1] + 13)
    assert padded.inputs_embeds.shape[1] == prompt.inputs_embeds.shape[1] + 13
    assert not bool(padded.attention_mask[:, :13].any()) and not bool(padded.vision_mask[:, :13].any())
    for k in (None, 2):
        reference, _ = prefill(model, prompt, withdrawal_selector(k, NUM_LAYERS))
        logits, _ = prefill(model, padded, withdrawal_selector(k, NUM_LAYERS))
        torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError):
        fp.pad_prompt(prompt, 2)


# Qwen3-VL adds vision features inside the layer loop: it falls back to the plain prefill (tested below).
@pytest.mark.parametrize("family", [family for family in FAMILIES if family != "qwen3_vl"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_bucketed_prefill_equals_plain(family, attention):
    model = build_model(family, attention)
    inputs = prompt_inputs(model, family)
    prompt = embed_prompt(model, inputs)
    for k in (None, 0, 1, 3):
        selector = withdrawal_selector(k, NUM_LAYERS)
        reference, plain_state = prefill(model, prompt, selector)
        logits, state, ran = fp.fast_prefill(model, prompt, selector, engine="bucketed")
        assert ran == "bucketed"
        torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)
        # Per layer, the valid keys are the plain prefill's keys (the plain cache holds no padding here).
        for layer_idx, (ours, theirs) in enumerate(zip(state.cache.layers, plain_state.cache.layers, strict=True)):
            valid = state.groups[state.group_of_layer[layer_idx]].valid[0]
            torch.testing.assert_close(ours.keys[:, :, valid], theirs.keys, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(ours.values[:, :, valid], theirs.values, rtol=1e-4, atol=1e-5)
        assert [int(count[0]) for count in state.prompt_tokens_per_layer] == [
            int(count[0]) for count in plain_state.prompt_tokens_per_layer
        ]
        for engine in ("plain", "static"):
            tokens, stats = generated(model, inputs, k, engine, "bucketed")
            assert tokens == generated(model, inputs, k)[0], (family, attention, k, engine)
            assert stats.prefill_engine == "bucketed"


def test_bucketed_prefill_on_a_left_padded_batch():
    model = build_model("llava")
    rows = [torch.tensor([1, 30, 31, 32, 33, 34, 35]), torch.tensor([1, 40, 41])]
    ids, mask = left_pad(rows)
    batch = {"input_ids": ids, "attention_mask": mask}
    for k in (None, 1):
        plain, plain_stats = generated(model, batch, k)
        bucketed, stats = generated(model, batch, k, "static", "bucketed")
        assert bucketed == plain and stats.prefill_flops == plain_stats.prefill_flops  # FLOPs of real tokens


def test_fallbacks_to_the_plain_prefill(monkeypatch):
    model = build_model("llava")
    inputs = prompt_inputs(model, "llava")
    prompt = embed_prompt(model, inputs)
    reference = generated(model, inputs, 2)[0]
    schedule = Schedule.fastv(1, 0.5, NUM_LAYERS)
    tokens, stats = generated(model, inputs, None, prefill_engine="bucketed", schedule=schedule)
    assert stats.prefill_engine == "plain (schedule)" and tokens == generated(model, inputs, None, schedule=schedule)[0]
    _, _, ran = fp.fast_prefill(model, prompt, withdrawal_selector(2, NUM_LAYERS), "rearrange", "bucketed")
    assert ran == "plain (rearranged positions)"
    tokens, stats = generated(model, inputs, 2, prefill_engine="graph")  # CPU: nothing to capture on
    assert stats.prefill_engine == "plain (no CUDA device)" and tokens == reference
    monkeypatch.setattr(fp, "PREFILL_BUCKETS", (8,))
    tokens, stats = generated(model, inputs, 2, prefill_engine="bucketed")
    assert stats.prefill_engine == "plain (prompt beyond the largest bucket)" and tokens == reference
    decoder_config = model.model.language_model.config
    monkeypatch.setattr(decoder_config, "_attn_implementation", "flash_attention_2")
    assert fp.fallback_reason(model, prompt, None, "original") == "flash attention"
    with pytest.raises(InputError, match="prefill engine"):
        fp.fast_prefill(model, prompt, engine="turbo")


def test_graph_cache_capture_failure_and_eviction(monkeypatch):
    """The per-model store of captured shapes, with a stand-in for the capture (CPU has no CUDA graphs)."""
    model = build_model("llava")
    prompt = embed_prompt(model, prompt_inputs(model, "llava"))
    built = []

    class FakeGraph:
        def __init__(self, model, example, k, kept_length, pool):
            built.append((example.inputs_embeds.shape[1], k))
            if k == 3:
                raise RuntimeError("capture failed")
            self.args = (model, k, kept_length)

        def __call__(self, padded):
            model, k, kept_length = self.args
            return fp.static_prefill(model, padded, k, kept_length)

    monkeypatch.setattr(fp, "GraphedPrefill", FakeGraph)
    monkeypatch.setattr(fp.torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(fp, "_can_capture", lambda prompt: True)
    monkeypatch.setattr(fp, "MAX_GRAPHS", 2)
    for k in (None, 1, None):  # the second baseline prompt replays the first capture
        logits, _, ran = fp.fast_prefill(model, prompt, withdrawal_selector(k, NUM_LAYERS), engine="graph")
        torch.testing.assert_close(logits, prefill(model, prompt, withdrawal_selector(k, NUM_LAYERS))[0],
                                   rtol=1e-4, atol=1e-5)  # fmt: skip
        assert ran == "graph"
    assert [k for _, k in built] == [None, 1]
    for _ in range(2):  # a failed shape falls back, and is not captured again
        _, _, ran = fp.fast_prefill(model, prompt, withdrawal_selector(3, NUM_LAYERS), engine="graph")
        assert ran == "plain (graph capture failed)"
    assert [k for _, k in built] == [None, 1, 3]
    assert list(fp.capture_failures(model).values()) == ["RuntimeError: capture failed"]
    # Least recently used goes first: K=1 (the baseline replayed after it).
    fp.fast_prefill(model, prompt, withdrawal_selector(2, NUM_LAYERS), engine="graph")
    fp.fast_prefill(model, prompt, None, engine="graph")  # still kept: replayed
    fp.fast_prefill(model, prompt, withdrawal_selector(1, NUM_LAYERS), engine="graph")  # evicted: captured again
    assert [k for _, k in built] == [None, 1, 3, 2, 1]


def test_prompts_with_per_layer_vision_additions_fall_back_to_the_plain_prefill():
    """Qwen3-VL's DeepStack adds vision features inside the layer loop, which only the plain prefill applies."""
    import dataclasses

    from vtw_core.engine.fast_prefill import fallback_reason

    model = build_model("llava")
    prompt = embed_prompt(model, prompt_inputs(model, "llava"))
    assert fallback_reason(model, prompt, None, "original") is None
    with_additions = dataclasses.replace(prompt, layer_additions=(torch.zeros_like(prompt.inputs_embeds),))
    assert "DeepStack" in fallback_reason(model, with_additions, None, "original")
