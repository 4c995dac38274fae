"""The fast decode path: preallocated per-layer KV buffers, and on CUDA the decode step as one CUDA graph.

The plain decode step (engine.decode_step) grows each layer's cache by concatenation and launches every
kernel from Python, which on a fast GPU costs more than the math. Here every tensor a decode step touches
has a fixed shape and address:

- each layer owns key/value buffers of (batch, kv_heads, capacity, head_dim), capacity = the tokens that
  layer cached at prefill (all of them below K, only the text from K on under VTW) + max new tokens;
- a step writes its key/value at a device-side index (`index_copy_`), marks that slot valid, and attends
  over the whole buffer with the unused slots masked out (they get exactly zero weight);
- the step's position ids and write index live in device tensors advanced in place;
- a batch row that ends leaves every buffer (`FastDecodeState.select_rows`, with the leading slots of padding no
  remaining row uses), so the rows that remain decode alone; a graph is then captured again for the smaller batch.

So one step can be captured once with `torch.cuda.graph` and replayed for every token, or traced once by
torch.compile (`compiled_decode_step`: on a CPU, inductor fuses each layer's norms, rotary and SwiGLU into a few
loops; the step attends over the whole buffer, so its shapes change only with the batch and the buffers' length,
both symbolic). Prefill stays on the
plain path (it runs once) and its caches are copied into the buffers. The math is the plain path's: on CPU
the tokens are identical (tests), and the graph is checked against the eager step before it is trusted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vtw_core.engine.decoder import (
    DecodeState,
    LayerGroup,
    _logits,
    _run_layer,
    attention_mask_for,
    select_group_rows,
)
from vtw_core.engine.per_model import per_model
from vtw_core.engine.tuned_kernels import run_tuned, tuned
from vtw_core.models.families import language_model


class StaticLayerCache:
    """Per-layer key/value buffers; `update` writes one step at the layer group's device-side index."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], write_index: list[torch.Tensor]):
        self.keys = keys
        self.values = values
        self.write_index = write_index  # per layer: a shared (1,) long tensor of its group
        # Per layer, how many leading slots a step attends over: None = the whole buffer (fixed shapes, for the
        # graph); an int = only the slots written so far (eager steps: no work on the still empty room).
        self.visible: list[int | None] = [None] * len(keys)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_: Any, **__: Any):
        index = self.write_index[layer_idx]
        self.keys[layer_idx].index_copy_(2, index, key_states.to(self.keys[layer_idx].dtype))
        self.values[layer_idx].index_copy_(2, index, value_states.to(self.values[layer_idx].dtype))
        limit = self.visible[layer_idx]
        if limit is None:
            return self.keys[layer_idx], self.values[layer_idx]
        return self.keys[layer_idx][:, :, :limit], self.values[layer_idx][:, :, :limit]  # views, no copy

    def kv_cache_bytes(self) -> int:
        """Bytes reserved by the buffers (they are allocated once, at their final size)."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass
class FastDecodeState:
    cache: StaticLayerCache
    groups: list[LayerGroup]  # valid: (batch, capacity), prompt tokens and the steps written so far
    write_index: list[torch.Tensor]  # per group: (1,) long, the slot the next step writes
    group_of_layer: list[int]
    input_ids: torch.Tensor  # (batch, 1): the token fed to the next step (a graph input)
    next_slot: list[int]  # per group: `write_index` on the host, for eager steps that attend over written slots only
    logits: torch.Tensor | None = None  # (batch, vocab): the last step's output (a graph output)

    def _step_tensors(self) -> list[torch.Tensor]:
        return [*self.write_index, *(t for g in self.groups for t in (g.valid, g.next_position))]

    def snapshot(self) -> tuple[list[torch.Tensor], list[int]]:
        return [t.clone() for t in self._step_tensors()], list(self.next_slot)

    def restore(self, saved: tuple[list[torch.Tensor], list[int]]) -> None:
        tensors, next_slot = saved
        for tensor, value in zip(self._step_tensors(), tensors, strict=True):
            tensor.copy_(value)
        self.next_slot = list(next_slot)

    def select_rows(self, rows: torch.Tensor) -> list[int]:
        """Keep only the batch rows `rows` (long indices, in that order) in every buffer, mask and position; the
        leading slots of left padding that no kept row uses leave the buffers too (the write indexes move back by
        as many). Returns each group's dropped leading slots. New tensors replace the old ones, so a CUDA graph
        captured on this state no longer applies: capture again."""
        starts = [select_group_rows(group, rows) for group in self.groups]
        for write_index, start in zip(self.write_index, starts, strict=True):
            write_index.sub_(start)  # in place: the group's layers share this tensor
        self.next_slot = [slot - start for slot, start in zip(self.next_slot, starts, strict=True)]
        for layer_idx, group_idx in enumerate(self.group_of_layer):
            start = starts[group_idx]
            self.cache.keys[layer_idx] = self.cache.keys[layer_idx][:, :, start:].index_select(0, rows)
            self.cache.values[layer_idx] = self.cache.values[layer_idx][:, :, start:].index_select(0, rows)
        self.input_ids = self.input_ids.index_select(0, rows)
        self.logits = None
        return starts


def fast_state_from_prefill(state: DecodeState, max_new_tokens: int) -> FastDecodeState:
    """Copy the prefill's per-layer caches into buffers with room for `max_new_tokens` more steps."""
    groups, write_index = [], []
    for group in state.groups:
        batch, cached = group.valid.shape
        valid = torch.zeros(batch, cached + max_new_tokens, dtype=torch.bool, device=group.valid.device)
        valid[:, :cached] = group.valid
        groups.append(LayerGroup(group.first_layer, valid, group.next_position.clone()))
        write_index.append(torch.tensor([cached], device=group.valid.device))
    keys, values, indexes = [], [], []
    for layer_idx, layer in enumerate(state.cache.layers):
        group = groups[state.group_of_layer[layer_idx]]
        batch, heads, cached, head_dim = layer.keys.shape
        shape = (batch, heads, group.valid.shape[1], head_dim)
        # Only the new tokens' slots start as zeros (masked out, but finite: a masked NaN would still poison the
        # attention's sum); the prompt's slots are overwritten at once, so zeroing them first was a wasted pass.
        key_buffer, value_buffer = layer.keys.new_empty(shape), layer.values.new_empty(shape)
        for buffer, prompt in ((key_buffer, layer.keys), (value_buffer, layer.values)):
            buffer[:, :, :cached] = prompt
            buffer[:, :, cached:].zero_()
        keys.append(key_buffer)
        values.append(value_buffer)
        indexes.append(write_index[state.group_of_layer[layer_idx]])
    batch = state.groups[0].valid.shape[0]
    input_ids = torch.zeros(batch, 1, dtype=torch.long, device=state.groups[0].valid.device)
    cache = StaticLayerCache(keys, values, indexes)
    next_slot = [group.valid.shape[1] for group in state.groups]
    return FastDecodeState(cache, groups, write_index, list(state.group_of_layer), input_ids, next_slot)


def _step_on_buffers(
    model: nn.Module,
    input_ids: torch.Tensor,
    valid: list[torch.Tensor],
    next_position: list[torch.Tensor],
    write_index: list[torch.Tensor],
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    group_of_layer: tuple[int, ...],
) -> torch.Tensor:
    """One fixed-shape step as a function of tensors only (what CUDA graph capture and torch.compile need): per
    group its valid slots (batch, capacity), next positions (batch,) and write index (1,), per layer its key and
    value buffers; all advanced in place. It attends over the whole buffer, the empty slots masked. Returns the
    logits (batch, vocab)."""
    decoder = language_model(model)
    hidden_states = decoder.embed_tokens(input_ids)
    blocked = torch.finfo(hidden_states.dtype).min
    groups = []
    for group_valid, position, index in zip(valid, next_position, write_index, strict=True):
        group_valid.index_fill_(1, index, True)
        mask = torch.zeros_like(group_valid, dtype=hidden_states.dtype).masked_fill(~group_valid, blocked)
        rotary = decoder.rotary_emb(hidden_states, position[..., None])
        groups.append(LayerGroup(0, None, None, mask[:, None, None, :], rotary, None))  # mask: (batch, 1, 1, capacity)
    cache = StaticLayerCache(list(keys), list(values), [write_index[group] for group in group_of_layer])
    for layer_idx, layer in enumerate(decoder.layers):
        hidden_states = _run_layer(layer, hidden_states, groups[group_of_layer[layer_idx]], cache)
    for index, position in zip(write_index, next_position, strict=True):
        index.add_(1)
        position.add_(1)
    return _logits(model, decoder, hidden_states)


def _step_inputs(state: FastDecodeState) -> tuple:
    """`_step_on_buffers`'s arguments after the model, from the state."""
    valid = [group.valid for group in state.groups]
    positions = [group.next_position for group in state.groups]
    return (state.input_ids, valid, positions, state.write_index, state.cache.keys, state.cache.values,
            tuple(state.group_of_layer))  # fmt: skip


@torch.inference_mode()  # generation calls it outside any grad-free block: without this it records autograd graphs
def static_decode_step(model: nn.Module, state: FastDecodeState, trim: bool = False) -> torch.Tensor:
    """One step on `state.input_ids`, in place on the buffers; returns (and keeps) the logits (batch, vocab).

    trim=False: `_step_on_buffers`, only fixed-shape tensor operations, no Python branch on a tensor value, so it
    can be captured; the step attends over the whole buffer (empty slots masked). trim=True (eager steps): it
    attends over the slots written so far only (views of the buffers, the host-side `next_slot` says how many), so
    a large max_new_tokens costs nothing per step. Both give the same logits: the empty slots get exactly zero
    weight.
    """
    if not trim:
        state.logits = _step_on_buffers(model, *_step_inputs(state))
        state.next_slot = [slot + 1 for slot in state.next_slot]
        return state.logits
    decoder = language_model(model)
    hidden_states = decoder.embed_tokens(state.input_ids)
    for group, write_index, slot in zip(state.groups, state.write_index, state.next_slot, strict=True):
        group.valid.index_fill_(1, write_index, True)
        # The plain step's mask, None without padding (the kernels' fastest path).
        group.attention_mask = attention_mask_for(group.valid[:, : slot + 1], 1, "eager", hidden_states.dtype)
        group.rotary = decoder.rotary_emb(hidden_states, group.next_position[..., None])
    for layer_idx, group_idx in enumerate(state.group_of_layer):
        state.cache.visible[layer_idx] = state.next_slot[group_idx] + 1
    for layer_idx, layer in enumerate(decoder.layers):
        hidden_states = _run_layer(layer, hidden_states, state.groups[state.group_of_layer[layer_idx]], state.cache)
    for group, write_index in zip(state.groups, state.write_index, strict=True):
        write_index.add_(1)
        group.next_position.add_(1)
    state.next_slot = [slot + 1 for slot in state.next_slot]
    state.logits = _logits(model, decoder, hidden_states)
    return state.logits


_compiled_step = per_model(_step_on_buffers, dynamic=True, options={"cpp_wrapper": True})  # engine.per_model
_tuned_step = tuned(per_model(_step_on_buffers, dynamic=True, options={"cpp_wrapper": True}))  # graphs of its own


def compiled_decode_step(model: nn.Module, state: FastDecodeState, tuned_kernels: bool = False) -> torch.Tensor:
    """One step on `state.input_ids` through the compiled `_step_on_buffers`; returns (and keeps) the logits.

    One graph per layer grouping (baseline, VTW at a K) and batch of one or more rows, compiled at its first use
    (~40 s on one core); the same tokens as the eager step (tests), logits within a few ulps. `tuned_kernels`:
    its matmuls as inductor's CPU GEMM templates on frozen weights (engine.tuned_kernels; the plain compiled step
    on another device or where they did not compile)."""
    # The step writes into the buffers: in inference mode if they were made in it, else without autograd.
    with torch.inference_mode() if state.input_ids.is_inference() else torch.no_grad():
        if tuned_kernels:
            state.logits, _ = run_tuned(model, _tuned_step, _compiled_step, *_step_inputs(state))
        else:
            state.logits = _compiled_step(model, *_step_inputs(state))
    state.next_slot = [slot + 1 for slot in state.next_slot]
    return state.logits


class GraphedDecodeStep:
    """`static_decode_step` captured once as a CUDA graph; `__call__` replays it for the next token.

    Before trusting the graph, the step runs eagerly (which also warms up kernels and the allocator), the
    state is rewound, the step is captured and replayed, and the two logits must agree; otherwise this
    raises and the caller keeps the eager step.
    """

    def __init__(self, model: nn.Module, state: FastDecodeState, atol: float = 1e-2):
        self.model, self.state = model, state
        saved = state.snapshot()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):  # warm-up, on a side stream as capture requires
                state.restore(saved)
                eager = static_decode_step(model, state).clone()
        torch.cuda.current_stream().wait_stream(stream)
        state.restore(saved)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.no_grad():
            static_decode_step(model, state)
        self.graph.replay()
        if not torch.allclose(state.logits.float(), eager.float(), atol=atol, rtol=atol):
            state.restore(saved)
            raise RuntimeError("the captured decode step does not reproduce the eager one")
        self.pending = True  # the check's replay already computed the first step

    def __call__(self) -> torch.Tensor:
        if self.pending:
            self.pending = False
        else:
            self.graph.replay()
        return self.state.logits
