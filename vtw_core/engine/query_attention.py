"""Attention of a few query rows against a layer's cached keys, recomputed from the layer's own weights.

The model keeps its fast attention kernel (sdpa, flash), which never returns attention weights. FastV's
ranking and the attention analysis need the probabilities of a few rows only: each row's query is recomputed
from the layer's input (the layer's own norm, q projection and rotary function) and scored against the keys
already in the cache: one (heads x queries x keys) product per layer, not a full attention matrix.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from vtw_core.models.families import language_model


def rotate(attention: nn.Module, states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply rotary embedding to one tensor with the attention module's own function (it knows the family's
    variant)."""
    modeling = sys.modules[type(attention).__module__]
    return modeling.apply_rotary_pos_emb(states, states, cos, sin)[0]


def query_attention(
    model: nn.Module, layer_idx: int, hidden_rows: torch.Tensor, position_rows: torch.Tensor, keys: torch.Tensor,
    key_valid: torch.Tensor, query_slots: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    """Attention probabilities (batch, queries, keys), mean over heads, of some query rows against cached keys.

    hidden_rows: the layer's input at the query tokens (batch, queries, hidden); position_rows: their position
    ids (batch, queries) or (3, batch, queries); keys: the layer's cache (batch, kv_heads, keys, head_dim),
    rotary applied; key_valid: (batch, keys) bool; query_slots: each query's own slot in the cache (batch,
    queries), so it sees only keys up to it (causal); None: every valid key (the newest token).
    """
    decoder = language_model(model)
    layer = decoder.layers[layer_idx]
    attention = layer.self_attn
    batch, queries, _ = hidden_rows.shape
    head_dim = keys.shape[-1]
    normed = layer.input_layernorm(hidden_rows)
    query = attention.q_proj(normed).view(batch, queries, -1, head_dim).transpose(1, 2)  # (batch, heads, q, d)
    cos, sin = decoder.rotary_emb(normed, position_rows)
    query = rotate(attention, query, cos, sin)
    keys = keys.repeat_interleave(query.shape[1] // keys.shape[1], dim=1)  # grouped-query heads
    scores = (query.float() @ keys.float().transpose(-1, -2)) * attention.scaling  # (batch, heads, q, keys)
    allowed = key_valid[:, None, :].expand(-1, queries, -1)  # (batch, q, keys)
    if query_slots is not None:
        slots = torch.arange(keys.shape[2], device=keys.device)
        allowed = allowed & (slots[None, None, :] <= query_slots[:, :, None])
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return scores.softmax(-1).mean(1)
