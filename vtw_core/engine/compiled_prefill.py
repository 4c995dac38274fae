"""The compiled prefill: the layer loop traced once by torch.compile (inductor), for the CPU.

On a CPU the plain prefill spends about a sixth of its time outside the matmuls and the attention kernel: the
RMSNorms, the rotary embedding and SwiGLU run as some twenty small operators per layer, each one pass over the
activations in memory. Compiled, inductor fuses them into a few loops per layer; the matmuls and attention stay
on the same library kernels. Same layers, same arithmetic order per element: logits agree with the plain prefill
to a few ulps (tests: greedy tokens equal, logits within 1e-4).

The pass is the plain one restricted to what can be traced without reading a tensor's value: VTW's withdrawal at K,
whose kept tokens, rotary cos and sin and attention masks are computed before the pass and handed to it. One
prompt, or a batch of equal ones, attends without a mask (causally, as the plain prefill's sdpa call does); a
left-padded batch takes the plain prefill's masks. The sequence length is a symbolic size, so prompts of any length
share a compiled graph per K (one for a single prompt, one for equal rows and one for padded rows of a batch; each
compiles at its first use, ~15-50 s on two cores, and `ModelManager.warm_up` runs them before a server listens).
Layer K-1 and the last layer compute their outputs only at the tokens that go on, the kept ones and the last
(engine.layer_rows), where the layers are the plain pre-norm block with sdpa. Anything else falls back to the plain
prefill, with the reason in the engine's name: schedules (FastV, G-Search), rearranged positions, flash attention,
multimodal rotary positions (Qwen2-VL's 3-D ids) and per-layer vision additions (Qwen3-VL).
"""

from __future__ import annotations

import torch
from torch import nn

from vtw_core.engine.decoder import (
    DecodeState,
    LayerGroup,
    PositionMode,
    TokenSelector,
    Withdrawal,
    _logits,
    _run_layer,
    attention_implementation,
    attention_mask_for,
    kept_order,
    prefill,
    withdrawn_keep,
)
from vtw_core.engine.embed import PromptEmbeddings
from vtw_core.engine.fast_prefill import PrefillOutputs, RecordingCache, decode_state_from
from vtw_core.engine.layer_rows import computes_rows, layer_rows, rows_mask
from vtw_core.engine.per_model import per_model
from vtw_core.engine.tuned_kernels import run_tuned, tuned
from vtw_core.models.families import language_model, num_decoder_layers


def _layer_loop(
    model: nn.Module,
    hidden_states: torch.Tensor,
    full: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
    deep: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
    k: int | None,
    kept: torch.Tensor | None,
    row_masks: tuple[torch.Tensor | None, torch.Tensor | None] | None = None,
    start: int = 0,
    stop: int | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Logits and every layer's keys and values for a left-padded batch of prompts (batch, tokens, hidden).

    `full`: the rotary cos and sin (batch, tokens, head_dim) and the attention mask (None: causal, no padding) of
    the layers before `k`; at layer `k` the tokens `kept` (batch, kept tokens: indices into the prompt) go on,
    with `deep`'s cos, sin and mask. `row_masks` (layer_rows' masks of the kept tokens in layer K-1 and of the last
    token in the last layer; None: every layer runs whole): those two layers compute their outputs at those tokens
    only (engine.layer_rows). `start` and `stop`: run layers start..stop-1 only, from `hidden_states`, their input
    (their keys and values filled in, the others None); short of the last layer, the result is the hidden states
    instead of the logits."""
    decoder = language_model(model)
    cache = RecordingCache(len(decoder.layers))
    last = len(decoder.layers) - 1
    stop = len(decoder.layers) if stop is None else stop
    group = None
    for layer_idx in range(start, stop):
        layer = decoder.layers[layer_idx]
        if layer_idx == k:
            if row_masks is None or k == 0:  # else layer K-1 gave the kept tokens' outputs alone
                hidden_states = hidden_states.gather(1, kept[..., None].expand(-1, -1, hidden_states.shape[-1]))
            group = LayerGroup(layer_idx, None, None, deep[2], deep[:2], None)
        elif group is None:  # layer 0 (a run from K starts in the branch above)
            group = LayerGroup(layer_idx, None, None, full[2], full[:2], None)
        if row_masks is not None and k is not None and layer_idx == k - 1:
            hidden_states = layer_rows(layer, hidden_states, group.rotary, kept, deep[:2], row_masks[0], cache)
        elif row_masks is not None and layer_idx == last:
            cos, sin = group.rotary
            rows_rotary = (cos[:, -1:], sin[:, -1:])
            hidden_states = layer_rows(layer, hidden_states, group.rotary, None, rows_rotary, row_masks[1], cache)
        else:
            hidden_states = _run_layer(layer, hidden_states, group, cache)
    if stop <= last:
        return hidden_states, cache.keys, cache.values
    return _logits(model, decoder, hidden_states), cache.keys, cache.values


def _layers_before_k(model: nn.Module, hidden_states: torch.Tensor, full, deep, k: int, kept, row_masks):
    """`_layer_loop`'s layers 0..K-1: the hidden states layer K takes (before its withdrawal), keys and values."""
    return _layer_loop(model, hidden_states, full, deep, k, kept, row_masks, stop=k)


def _layers_from_k(model: nn.Module, hidden_states: torch.Tensor, full, deep, k: int, kept, row_masks):
    """`_layer_loop`'s layers K..N-1 from layer K's input: logits, keys and values."""
    return _layer_loop(model, hidden_states, full, deep, k, kept, row_masks, start=k)


# cpp_wrapper: the compiled graph calls its ~200 kernels from C++, not from a Python wrapper (0.96x the time at
# one thread on the default model, bitwise the same logits).
# Per model (engine.per_model): no guards on the model's modules before each call (0.13 against 0.42 ms).
_compiled_loop = per_model(_layer_loop, dynamic=True, options={"cpp_wrapper": True})
_tuned_loop = tuned(per_model(_layer_loop, dynamic=True, options={"cpp_wrapper": True}))  # graphs of its own
# A batch's prefill under VTW in two graphs: the layers before K over every prompt's tokens with the library's
# matmuls (thousands of rows), the layers from K over the kept tokens (a few dozen rows) with the tuned kernels,
# where the library reorders each weight at every call (compiled_prefill's note).
_compiled_before_k = per_model(_layers_before_k, dynamic=True, options={"cpp_wrapper": True})
_compiled_from_k = per_model(_layers_from_k, dynamic=True, options={"cpp_wrapper": True})
_tuned_from_k = tuned(per_model(_layers_from_k, dynamic=True, options={"cpp_wrapper": True}))


def fallback_reason(model: nn.Module, prompt: PromptEmbeddings, selector: TokenSelector | None,
                    position_mode: PositionMode) -> str | None:  # fmt: skip
    """Why the compiled pass cannot run this prefill (None: it can)."""
    if selector is not None and not isinstance(selector, Withdrawal):
        return "schedule"
    if position_mode != "original":
        return "rearranged positions"
    if attention_implementation(language_model(model)) not in ("sdpa", "eager"):
        return "flash attention"
    if prompt.position_ids.ndim != 2:
        return "multimodal rotary positions"
    if prompt.layer_additions:
        return "per-layer vision additions (Qwen3-VL DeepStack)"
    return None


def compiled_prefill(
    model: nn.Module,
    prompt: PromptEmbeddings,
    selector: TokenSelector | None = None,
    position_mode: PositionMode = "original",
    tuned_kernels: bool = False,
) -> tuple[torch.Tensor, DecodeState, str]:
    """Prefill through the compiled layer loop; returns logits (batch, vocab), the decode state and the engine that
    ran ("compiled", "tuned", or "plain (reason)" when it fell back). `tuned_kernels`: the loop's matmuls as
    inductor's CPU GEMM templates on frozen weights (engine.tuned_kernels) for a single prompt, and for a
    batch under VTW in its layers from K (its layers before K keep the library's matmuls); a baseline batch,
    another device or a model whose tuned graphs did not compile runs the plain compiled loop, and the name says
    so."""
    if isinstance(selector, Withdrawal) and selector.k >= num_decoder_layers(model.config):
        selector = None
    reason = fallback_reason(model, prompt, selector, position_mode)
    if reason is not None:
        return (*prefill(model, prompt, selector, position_mode), f"plain ({reason})")
    k = selector.k if isinstance(selector, Withdrawal) else None
    decoder = language_model(model)
    batch, length = prompt.attention_mask.shape
    valid = prompt.attention_mask.bool()
    # The layer groups, as the plain prefill forms them (engine.decoder.run_decoder and _pack_kept): every token
    # from layer 0; from K the tokens VTW keeps, right-aligned.
    groups = []  # (first layer, each slot's index in the prompt, valid slots)
    if k != 0:
        groups.append((0, torch.arange(length, device=valid.device).expand(batch, -1), valid))
    if k is not None:
        keep = withdrawn_keep(valid, prompt.vision_mask)
        order = kept_order(keep)
        groups.append((k, order, keep.gather(1, order)))
    positions = [prompt.position_ids.gather(1, slots) for _, slots, _ in groups]
    implementation, dtype = attention_implementation(decoder), prompt.inputs_embeds.dtype
    # Each group's rotary cos and sin are computed here, once: traced, inductor recomputes them inside every
    # layer's rotary kernel (a sine and a cosine per query and key element, 16 times over: ~7 ms of 190 at one
    # thread). The masks are None without padding (sdpa's causal path, as in the plain prefill).
    with torch.inference_mode():
        inputs = []
        for (_, _, ok), place in zip(groups, positions, strict=True):
            mask = attention_mask_for(ok, ok.shape[1], implementation, dtype)
            inputs.append((*decoder.rotary_emb(prompt.inputs_embeds, place), mask))
    # Compiled code cannot take inference tensors (the embeddings come from inference mode): normal copies.
    with torch.inference_mode(False), torch.no_grad():
        hidden_states = prompt.inputs_embeds.clone()
        inputs = [tuple(None if t is None else t.clone() for t in group) for group in inputs]
        full = inputs[0] if k != 0 else None
        deep, kept = (inputs[-1], groups[-1][1].clone()) if k is not None else (None, None)
        # Layer K-1 and the last layer compute outputs only where they are used (engine.layer_rows): their masks,
        # made here, outside inference mode, as the graph takes them.
        row_masks = None
        if implementation == "sdpa" and all(computes_rows(layer) for layer in decoder.layers):
            row_masks = (rows_mask(valid, kept, dtype) if k else None, rows_mask(groups[-1][2], None, dtype))
        arguments = (hidden_states, full, deep, k, kept, row_masks)
        # A batch's prefill keeps the library's matmuls: over several prompts' tokens (4,704 rows for eight of the
        # default model's) the templates took 1.2x their time; one prompt's 588 rows took 0.93x.
        ran = "compiled"
        if tuned_kernels and batch == 1:
            (logits, keys, values), ran_tuned = run_tuned(model, _tuned_loop, _compiled_loop, *arguments)
            ran = "tuned" if ran_tuned else "compiled (no tuned kernels for this device or model)"
        elif tuned_kernels and k is not None and 0 < k < len(decoder.layers):
            hidden_k, keys, values = _compiled_before_k(model, *arguments)
            (logits, keys_k, values_k), ran_tuned = run_tuned(
                model, _tuned_from_k, _compiled_from_k, hidden_k, *arguments[1:]
            )
            keys, values = keys[:k] + keys_k[k:], values[:k] + values_k[k:]
            ran = ("tuned (the library's matmuls before K for a batch's prefill)" if ran_tuned
                   else "compiled (no tuned kernels for this device or model)")  # fmt: skip
        else:
            logits, keys, values = _compiled_loop(model, *arguments)
            if tuned_kernels:
                ran = "tuned (the library's matmuls for a batch's prefill)"
    outputs = PrefillOutputs(
        logits, keys, values,
        valid=[ok for _, _, ok in groups],
        positions=positions,
        prompt_index=[slots for _, slots, _ in groups],
        first_layers=[first for first, _, _ in groups],
    )  # fmt: skip
    return logits, decode_state_from(model, outputs, copy=False), ran
