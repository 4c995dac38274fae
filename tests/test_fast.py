"""The fast decode path (preallocated per-layer buffers) against the plain path, on CPU without graph capture."""

from __future__ import annotations

import pytest
import torch
from test_engine import FAMILIES, NUM_LAYERS, build_model, left_pad, prompt_inputs

from vtw_core.engine.decoder import decode_step, prefill, withdrawal_selector
from vtw_core.engine.embed import embed_prompt
from vtw_core.engine.fast_decode import fast_state_from_prefill, static_decode_step
from vtw_core.errors import InputError
from vtw_core.generation.generate import auto_engine, generate_tokens
from vtw_core.generation.types import GenerationStats, SamplingConfig


def tokens(model, inputs, k, engine, sampling=SamplingConfig(max_new_tokens=10)):
    stats = GenerationStats(k=k, num_layers=NUM_LAYERS)
    steps = generate_tokens(model, inputs, k=k, sampling=sampling, engine=engine, stats=stats)
    return torch.stack(list(steps), 1).tolist(), stats


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_static_equals_plain(family, attention):
    model = build_model(family, attention)
    inputs = prompt_inputs(model, family)
    for k in (None, 0, 1, 3):
        plain, plain_stats = tokens(model, inputs, k, "plain")
        static, static_stats = tokens(model, inputs, k, "static")
        assert static == plain, (family, attention, k)
        assert (plain_stats.engine, static_stats.engine) == ("plain", "static")
        assert static_stats.decode_flops == plain_stats.decode_flops
        assert static_stats.kv_cache_bytes == plain_stats.kv_cache_bytes  # the tokens held, not the room reserved


def test_static_logits_match_step_by_step():
    model = build_model("qwen2_vl")
    inputs = prompt_inputs(model, "qwen2_vl")
    prompt = embed_prompt(model, inputs)
    logits, plain_state = prefill(model, prompt, withdrawal_selector(2, NUM_LAYERS))
    _, copied = prefill(model, prompt, withdrawal_selector(2, NUM_LAYERS))
    fast = fast_state_from_prefill(copied, max_new_tokens=6)
    # The eager step attends over the written slots only; with much more room reserved, its logits are the same.
    _, copied = prefill(model, prompt, withdrawal_selector(2, NUM_LAYERS))
    trimmed = fast_state_from_prefill(copied, max_new_tokens=200)
    for _ in range(5):
        token = logits.argmax(-1)
        logits = decode_step(model, plain_state, token[:, None])
        fast.input_ids.copy_(token[:, None])
        trimmed.input_ids.copy_(token[:, None])
        torch.testing.assert_close(static_decode_step(model, fast), logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(static_decode_step(model, trimmed, trim=True), logits, rtol=1e-4, atol=1e-5)
    assert trimmed.next_slot == [prompt.inputs_embeds.shape[1] + 5, int((~prompt.vision_mask).sum()) + 5]
    # Buffers are sized per layer: the full prompt below K, only its text from K on, plus the new tokens.
    lengths = [buffer.shape[2] for buffer in fast.cache.keys]
    assert lengths[:2] == [prompt.inputs_embeds.shape[1] + 6] * 2
    assert lengths[2:] == [int((~prompt.vision_mask).sum()) + 6] * 2


def test_static_buffers_hold_the_prompt_then_zeros_even_over_dirty_memory():
    """The new tokens' slots are masked, but a NaN there would still poison attention's sum: they must start as
    zeros however the memory was left (the buffers are allocated empty, and only that tail is zeroed)."""
    model = build_model("llava")
    prompt = embed_prompt(model, prompt_inputs(model, "llava"))
    for _ in range(3):
        _, state = prefill(model, prompt, withdrawal_selector(2, NUM_LAYERS))
        shapes = [(layer.keys.shape[0], layer.keys.shape[1], layer.keys.shape[2] + 7, layer.keys.shape[3])
                  for layer in state.cache.layers]  # fmt: skip
        dirty = [torch.full(shape, float("nan"), dtype=state.cache.layers[0].keys.dtype) for shape in shapes * 2]
        del dirty  # freed: the allocator may hand the same NaN-filled memory to the buffers
        fast = fast_state_from_prefill(state, max_new_tokens=7)
        for layer, keys, values in zip(state.cache.layers, fast.cache.keys, fast.cache.values, strict=True):
            cached = layer.keys.shape[2]
            assert torch.equal(keys[:, :, :cached], layer.keys) and torch.equal(values[:, :, :cached], layer.values)
            assert not keys[:, :, cached:].any() and not values[:, :, cached:].any()
            assert keys.shape[2] == values.shape[2] == cached + 7


def test_static_left_padded_batch_and_sampling():
    model = build_model("llava")
    rows = [torch.tensor([1, 30, 31, 32, 33, 34, 35]), torch.tensor([1, 40, 41])]
    ids, mask = left_pad(rows)
    batch = {"input_ids": ids, "attention_mask": mask}
    for k in (None, 1):
        assert tokens(model, batch, k, "static")[0] == tokens(model, batch, k, "plain")[0]
    sampling = SamplingConfig(max_new_tokens=12, do_sample=True, temperature=1.2, top_p=0.9, seed=4)
    inputs = prompt_inputs(model, "llava")
    assert tokens(model, inputs, 2, "static", sampling)[0] == tokens(model, inputs, 2, "plain", sampling)[0]


def test_engine_choice():
    model = build_model("llava")
    inputs = prompt_inputs(model, "llava")
    assert tokens(model, inputs, 2, "auto")[1].engine == "static"  # CPU: measured faster than plain (docs/engines.md)
    assert (
        auto_engine(torch.device("cuda"), "sdpa") == "graph" and auto_engine(torch.device("cpu"), "eager") == "static"
    )
    assert auto_engine(torch.device("cuda"), "flash_attention_2") == "plain"  # the static step builds 4-D masks
    assert auto_engine(torch.device("mps"), "sdpa") == "plain"  # not measured
    with pytest.raises(InputError, match="needs a CUDA device"):
        tokens(model, inputs, 2, "graph")
    with pytest.raises(InputError, match="engine must be"):
        tokens(model, inputs, 2, "turbo")


def test_static_step_records_no_autograd_graph():
    """Generation calls the static step outside any no_grad block; it must not record autograd graphs."""
    model = build_model("llava")
    assert any(parameter.requires_grad for parameter in model.parameters())
    _, state = prefill(model, embed_prompt(model, prompt_inputs(model, "llava")), withdrawal_selector(1, NUM_LAYERS))
    fast = fast_state_from_prefill(state, max_new_tokens=2)
    logits = static_decode_step(model, fast)
    assert not logits.requires_grad
    assert not any(buffer.requires_grad for buffer in (*fast.cache.keys, *fast.cache.values))


def test_engine_runs_in_inference_mode_and_its_outputs_stay_usable_outside():
    """Prefill and decode run under torch.inference_mode (less per-operator work than no_grad); the caches they
    return are inference tensors, the static buffers copied from them outside that mode are ordinary tensors,
    and the in-place step updates work on them and agree with the plain step."""
    model = build_model("llava")
    inputs = prompt_inputs(model, "llava")
    _, state = prefill(model, embed_prompt(model, inputs), withdrawal_selector(1, NUM_LAYERS))
    assert not torch.is_inference_mode_enabled()
    assert all(layer.keys.is_inference() for layer in state.cache.layers)
    fast = fast_state_from_prefill(state, max_new_tokens=3)
    assert not any(buffer.is_inference() for buffer in (*fast.cache.keys, fast.groups[0].valid, fast.write_index[0]))
    _, plain_state = prefill(model, embed_prompt(model, inputs), withdrawal_selector(1, NUM_LAYERS))
    for token in (5, 7):
        fast.input_ids.fill_(token)
        static = static_decode_step(model, fast, trim=True)
        plain = decode_step(model, plain_state, torch.tensor([[token]]))
        torch.testing.assert_close(static, plain)
