"""A decoder layer run for some tokens' outputs (vtw_core.engine.layer_rows): against the stock layer of each family it
takes, and the compiled prefill running layer K-1 and the last layer that way (its logits against the plain prefill's
are checked in test_compiled_prefill and test_tuned_kernels)."""

from __future__ import annotations

import importlib

import pytest
import torch
from test_engine import NUM_LAYERS, build_model, processor_inputs, sample_image

from vtw_core.engine import compiled_prefill as compiled
from vtw_core.engine import layer_rows as module
from vtw_core.engine.decoder import attention_mask_for, withdrawal_selector
from vtw_core.engine.embed import embed_prompt
from vtw_core.engine.fast_prefill import RecordingCache
from vtw_core.engine.layer_rows import computes_rows, layer_rows, rows_mask
from vtw_core.models.families import language_model

FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def stock_layer(family: str):
    """A stock decoder layer with grouped-query heads (and Qwen2's q, k, v biases), and its rotary embedding."""
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    prefix = FAMILIES[family]
    config = getattr(modeling, f"{prefix}Config")(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=1,
        vocab_size=32,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = getattr(modeling, f"{prefix}DecoderLayer")(config, layer_idx=0).eval()
    for parameter in layer.parameters():  # visible norms' weights and biases too, not their ones and zeros
        parameter.data.normal_(0, 0.2)
    return layer, getattr(modeling, f"{prefix}RotaryEmbedding")(config=config)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_the_rows_outputs_and_every_tokens_cache_equal_the_stock_layers(family):
    """Two prompts, the second left-padded by three: chosen rows (one of them a padding slot) and the last token."""
    layer, rotary_emb = stock_layer(family)
    assert computes_rows(layer)
    batch, length = 2, 10
    hidden = torch.randn(batch, length, 64)
    valid = torch.ones(batch, length, dtype=torch.bool)
    valid[1, :3] = False
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    cos, sin = rotary_emb(hidden, positions)
    stock_cache = RecordingCache(1)
    mask = attention_mask_for(valid, length, "sdpa", hidden.dtype)
    stock = layer(hidden, attention_mask=mask, position_embeddings=(cos, sin), use_cache=True, cache=stock_cache)
    stock = stock[0] if isinstance(stock, tuple) else stock

    rows = torch.tensor([[2, 5, 9], [1, 6, 9]])  # row 1's slot 1 is padding
    pick = rows[..., None].expand(-1, -1, cos.shape[-1])
    cache = RecordingCache(1)
    ours = layer_rows(layer, hidden, (cos, sin), rows, (cos.gather(1, pick), sin.gather(1, pick)),
                      rows_mask(valid, rows, hidden.dtype), cache)  # fmt: skip
    expected = stock.gather(1, rows[..., None].expand(-1, -1, 64))
    real = valid.gather(1, rows)
    assert (ours - expected)[real].abs().max() <= 1e-5 and bool(torch.isfinite(ours).all())
    assert torch.equal(cache.keys[0], stock_cache.keys[0]) and torch.equal(cache.values[0], stock_cache.values[0])

    last = layer_rows(layer, hidden, (cos, sin), None, (cos[:, -1:], sin[:, -1:]),
                      rows_mask(valid, None, hidden.dtype), RecordingCache(1))  # fmt: skip
    assert (last - stock[:, -1:]).abs().max() <= 1e-5
    unpadded = layer_rows(layer, hidden[:1], (cos[:1], sin[:1]), None, (cos[:1, -1:], sin[:1, -1:]),
                          rows_mask(valid[:1], None, hidden.dtype), RecordingCache(1))  # fmt: skip
    assert rows_mask(valid[:1], None, hidden.dtype) is None and (unpadded - stock[:1, -1:]).abs().max() <= 1e-5


def mlp_rows(model, inputs, k, monkeypatch) -> list[int]:
    """How many tokens each layer's MLP saw in the compiled prefill (its layer loop run eagerly to watch it)."""
    monkeypatch.setattr(compiled, "_compiled_loop", lambda model, *args: compiled._layer_loop(model, *args))
    seen: list[int] = []
    hooks = [layer.mlp.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[:2].numel()))
             for layer in language_model(model).layers]  # fmt: skip
    try:
        _, _, ran = compiled.compiled_prefill(model, embed_prompt(model, inputs), withdrawal_selector(k, NUM_LAYERS))
    finally:
        for hook in hooks:
            hook.remove()
    assert ran == "compiled"
    return seen


@pytest.mark.parametrize("k", [None, 2])
def test_the_compiled_prefill_runs_layer_k_minus_1_and_the_last_layer_for_the_tokens_that_go_on(k, monkeypatch):
    model = build_model("llava")
    inputs = processor_inputs("llava", [[sample_image()], [sample_image(seed=1)]])
    batch, length = inputs["input_ids"].shape
    kept = int((inputs["input_ids"] != model.config.image_token_index).sum(1).max())
    whole = [length] * (k or NUM_LAYERS) + [kept] * (NUM_LAYERS - (k or NUM_LAYERS))
    seen = mlp_rows(model, inputs, k, monkeypatch)
    expected = list(whole)
    if k is not None:
        expected[k - 1] = kept
    expected[-1] = 1
    assert seen == [batch * tokens for tokens in expected]

    monkeypatch.setattr(module, "LAYERS_WITH_ROWS", frozenset())  # a layer it does not know runs whole
    assert mlp_rows(model, inputs, k, monkeypatch) == [batch * tokens for tokens in whole]
