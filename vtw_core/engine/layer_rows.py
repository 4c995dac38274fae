"""A decoder layer run for the outputs of some tokens only, its keys and values still from every token.

Two layers of a prefill have outputs that go nowhere for most tokens. Layer K-1 is the last one the vision tokens
pass through: its keys and values of every token are cached and attended, but its outputs at the vision tokens are
withdrawn at K. The last layer's outputs matter at the last prompt position only (the next-token logits; every
layer's keys and values are cached from its input). So for those two layers the queries, the attention, the output
projection and the MLP run for the tokens that go on, and only the norm and the key and value projections for all:
VTW at K = 5 skips most of one of its five full layers, the baseline most of its last one (the default model at two
threads: VTW's first token 0.94x, a batch of eight 0.92x; the baseline's 0.95x and 0.96x).

The layer's own modules compute it (norms, projections, MLP, the model's rotary function), with torch's sdpa over an
explicit mask (a query sees the valid keys up to its own position): the same arithmetic as the stock layer, up to the
kernels' summation order for fewer rows (tests: greedy tokens equal, logits within the compiled engine's bound).
Only layers whose forward is the plain pre-norm block below are taken (LAYERS_WITH_ROWS); others run whole.
"""

from __future__ import annotations

import torch
from torch import nn

from vtw_core.engine.decoder import additive_mask, attention_mask_for
from vtw_core.engine.query_attention import rotate

# Decoder layers whose forward is: h = x + o_proj(attention(q, k, v of input_layernorm(x))); h + mlp(norm(h)), with
# q, k, v plain projections (biases allowed) and the family's apply_rotary_pos_emb.
LAYERS_WITH_ROWS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"})


def computes_rows(layer: nn.Module) -> bool:
    """Whether `layer_rows` can run this decoder layer."""
    return type(layer).__name__ in LAYERS_WITH_ROWS


def layer_rows(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    rows: torch.Tensor | None,
    rows_rotary: tuple[torch.Tensor, torch.Tensor],
    rows_mask: torch.Tensor | None,
    cache: object,
) -> torch.Tensor:
    """The layer's output at `rows` (batch, rows, hidden), its keys and values of every token put in `cache`.

    hidden_states: (batch, tokens, hidden); rotary: cos and sin of every token (batch, tokens, head_dim); rows:
    (batch, rows) token indices, or None for the last token alone; rows_rotary: the rows' cos and sin; rows_mask:
    additive (batch, 1, rows, tokens), each row's valid keys up to its own position (None: every key, for the last
    token of unpadded prompts)."""
    attention = layer.self_attn
    batch, length, width = hidden_states.shape
    head_dim = attention.head_dim
    last = rows is None
    residual = hidden_states[:, -1:] if last else hidden_states.gather(1, rows[..., None].expand(-1, -1, width))
    count = residual.shape[1]
    # The rows are normalized again rather than picked from `normed` (the norm is per token: the same values), so
    # that the key and value projections are the only readers of `normed` (inductor groups them into one GEMM).
    normed, normed_rows = layer.input_layernorm(hidden_states), layer.input_layernorm(residual)
    keys = attention.k_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)
    values = attention.v_proj(normed).view(batch, length, -1, head_dim).transpose(1, 2)
    queries = attention.q_proj(normed_rows).view(batch, count, -1, head_dim).transpose(1, 2)
    keys = rotate(attention, keys, *rotary)
    queries = rotate(attention, queries, *rows_rotary)
    keys, values = cache.update(keys, values, attention.layer_idx)
    attended = torch.nn.functional.scaled_dot_product_attention(
        queries, keys, values, attn_mask=rows_mask, scale=attention.scaling,
        enable_gqa=queries.shape[1] != keys.shape[1],
    )  # fmt: skip
    hidden_rows = residual + attention.o_proj(attended.transpose(1, 2).reshape(batch, count, -1))
    return hidden_rows + layer.mlp(layer.post_attention_layernorm(hidden_rows))


def rows_mask(valid: torch.Tensor, rows: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive mask (batch, 1, rows, tokens) for `layer_rows`: a row sees the valid keys up to its own index (rows
    None: the last token, which sees every valid key; None when there is no padding). A row that sees no valid
    key (a padding slot) sees them all, as the decoder's masks do, so its output stays finite."""
    if rows is None:  # the decoder's mask for one query at the end
        return attention_mask_for(valid, 1, "sdpa", dtype)
    index = torch.arange(valid.shape[1], device=valid.device)
    return additive_mask(valid[:, None, :] & (index[None, None, :] <= rows[:, :, None]), dtype)
