"""The compiled prefill: the layer loop traced once by torch.compile (inductor), for the CPU.

On a CPU the plain prefill spends about a sixth of its time outside the matmuls and the attention kernel: the
RMSNorms, the rotary embedding and SwiGLU run as some twenty small operators per layer, each one pass over the
activations in memory. Compiled, inductor fuses them into a few loops per layer; the matmuls and attention stay
on the same library kernels. Same layers, same arithmetic order per element: logits agree with the plain prefill
to a few ulps (tests: greedy tokens equal, logits within 1e-4).

The pass is the plain one restricted to what can be traced without reading a tensor's value: one prompt without
padding (so every layer attends causally, as the plain prefill does with no mask) and VTW's withdrawal at K,
whose kept positions are computed before the pass and handed to it. The sequence length is a symbolic size, so
prompts of any length share one compiled graph per K (the first call compiles: ~20-40 s on two cores; later
lengths reuse it). Anything else falls back to the plain prefill, with the reason in the engine's name: batches
of several prompts, schedules (FastV, G-Search), rearranged positions, flash attention, multimodal rotary
positions (Qwen2-VL's 3-D ids) and per-layer vision additions (Qwen3-VL).
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
    prefill,
)
from vtw_core.engine.embed import PromptEmbeddings
from vtw_core.engine.fast_prefill import PrefillOutputs, RecordingCache, decode_state_from
from vtw_core.models.families import language_model, num_decoder_layers


def _layer_loop(
    model: nn.Module,
    hidden_states: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    k: int | None,
    kept: torch.Tensor,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Logits and every layer's keys and values for one unpadded prompt (1, tokens, hidden) and its rotary cos and
    sin (1, tokens, head_dim); at layer `k` only the positions `kept` (1-D, ascending) go on."""
    decoder = language_model(model)
    cache = RecordingCache(len(decoder.layers))
    group = None
    for layer_idx, layer in enumerate(decoder.layers):
        if layer_idx == k:
            hidden_states, rotary, group = hidden_states[:, kept], (rotary[0][:, kept], rotary[1][:, kept]), None
        if group is None:  # no mask: one unpadded prompt attends causally, as the plain prefill's sdpa call does
            group = LayerGroup(layer_idx, None, None, None, rotary, None)
        hidden_states = _run_layer(layer, hidden_states, group, cache)
    return _logits(model, decoder, hidden_states), cache.keys, cache.values


# cpp_wrapper: the compiled graph calls its ~200 kernels from C++, not from a Python wrapper (0.96x the time at
# one thread on the default model, bitwise the same logits).
_compiled_loop = torch.compile(_layer_loop, dynamic=True, options={"cpp_wrapper": True})


def fallback_reason(model: nn.Module, prompt: PromptEmbeddings, selector: TokenSelector | None,
                    position_mode: PositionMode) -> str | None:  # fmt: skip
    """Why the compiled pass cannot run this prefill (None: it can)."""
    if prompt.inputs_embeds.shape[0] != 1 or not bool(prompt.attention_mask.all()):
        return "several or padded prompts"
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
) -> tuple[torch.Tensor, DecodeState, str]:
    """Prefill through the compiled layer loop; returns logits (1, vocab), the decode state and the engine that
    ran ("compiled", or "plain (reason)" when it fell back)."""
    if isinstance(selector, Withdrawal) and selector.k >= num_decoder_layers(model.config):
        selector = None
    reason = fallback_reason(model, prompt, selector, position_mode)
    if reason is not None:
        return (*prefill(model, prompt, selector, position_mode), f"plain ({reason})")
    k = selector.k if isinstance(selector, Withdrawal) else None
    length = prompt.inputs_embeds.shape[1]
    keep = ~prompt.vision_mask[0]
    keep[-1] = True  # the last prompt token yields the logits (as in engine.decoder.run_decoder)
    kept = keep.nonzero()[:, 0]
    # Compiled code cannot take inference tensors (the embeddings come from inference mode): normal copies.
    # The rotary cos and sin are computed here, once: traced, inductor recomputes them inside every layer's
    # rotary kernel (a sine and a cosine per query and key element, 16 times over: ~7 ms of 190 at one thread).
    with torch.inference_mode():
        rotary = language_model(model).rotary_emb(prompt.inputs_embeds, prompt.position_ids)
    with torch.inference_mode(False), torch.no_grad():
        hidden_states, cos, sin, kept = (t.clone() for t in (prompt.inputs_embeds, *rotary, kept))
        logits, keys, values = _compiled_loop(model, hidden_states, (cos, sin), k, kept)
    # The decode state's layer groups: every token from layer 0, the kept ones from K (from 0 when K = 0).
    index = torch.arange(length, device=kept.device)[None]
    groups = [(0, index)] if k != 0 else []
    if k is not None:
        groups.append((k, index[:, kept]))
    outputs = PrefillOutputs(
        logits, keys, values,
        valid=[torch.ones_like(slots, dtype=torch.bool) for _, slots in groups],
        positions=[prompt.position_ids.gather(1, slots) for _, slots in groups],
        prompt_index=[slots for _, slots in groups],
        first_layers=[first for first, _ in groups],
    )  # fmt: skip
    return logits, decode_state_from(model, outputs, copy=False), "compiled"
