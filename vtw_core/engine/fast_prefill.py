"""The fast prefill path: prompts padded to a length bucket, so one CUDA graph per shape serves many prompts.

The plain prefill (engine.prefill) launches some twenty kernels per layer from Python and syncs on a few
token counts; at 638 tokens on an H100 that launch time, not the math, sets the time to first token, so VTW's
smaller deep layers do not show. Here a prefill has fixed shapes, known before it runs:

- the prompt is left-padded to the smallest bucket that holds it (`PREFILL_BUCKETS`); the engine's batches
  are left-padded anyway: padding is masked out as a key everywhere, and its own rows are never read;
- under VTW the deep layers (K..N-1) keep the text tokens, whose count is bucketed too (`KEPT_MULTIPLE`): the
  extra slots hold withdrawn tokens marked invalid, so they are masked out like padding;
- every layer gets the exact additive mask (causal and valid keys), never "no mask", and no Python branch
  reads a tensor's value, so the whole pass can be captured as one CUDA graph per
  (batch, bucket, kept bucket, K, dtype) and replayed with new inputs copied into its input buffers.

`prefill_engine="bucketed"` runs that pass eagerly (any device: it is what the tests compare with the plain
prefill), `"graph"` captures it on CUDA, checks the replay against the eager pass and keeps the graph for
later prompts. Whatever the pass cannot do falls back to the plain prefill, with the reason in the engine
name: FastV-style schedules, `position_mode="rearrange"`, flash attention (it takes 2-D masks only), prompts
longer than the largest bucket, and a graph that cannot be captured or disagrees with the eager pass.
The result is an ordinary `DecodeState`, so every decode engine works after it.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from vtw_core.engine.decoder import (
    DecodeState,
    LayerGroup,
    PositionMode,
    TokenSelector,
    Withdrawal,
    _logits,
    _run_layer,
    additive_mask,
    attention_implementation,
    kept_order,
    prefill,
    withdrawn_keep,
)
from vtw_core.engine.embed import PromptEmbeddings
from vtw_core.errors import InputError
from vtw_core.models.families import language_model, num_decoder_layers

PrefillEngine = Literal["plain", "bucketed", "graph"]
PREFILL_ENGINES = ("plain", "bucketed", "graph")
# Prompt-length buckets, at most ~10% padding where VTW matters: every 64 tokens up to 1,024 (LLaVA-1.5's
# 576 + 62 fall in 640), then every 256 up to 4,096 (LLaVA-NeXT's 2,928 + 62 in 3,072).
PREFILL_BUCKETS = (*range(64, 1025, 64), *range(1280, 4097, 256))
KEPT_MULTIPLE = 32  # the deep layers' token count rounds up to this
MAX_GRAPHS = 8  # captured shapes kept per model (each holds its activations and KV outputs in a shared pool)


def bucket_for(length: int, buckets: tuple[int, ...] | None = None) -> int | None:
    """The smallest bucket (default: PREFILL_BUCKETS) that holds `length` tokens; None beyond the largest."""
    if length < 1:
        raise InputError(f"a prompt has at least one token, got {length}")
    return next((bucket for bucket in sorted(buckets or PREFILL_BUCKETS) if bucket >= length), None)


def kept_bucket(kept: int, bucket: int) -> int:
    """Slots for the deep layers' tokens: `kept` rounded up to KEPT_MULTIPLE, at most the prompt bucket."""
    return min(-(-kept // KEPT_MULTIPLE) * KEPT_MULTIPLE, bucket)


def pad_prompt(prompt: PromptEmbeddings, length: int) -> PromptEmbeddings:
    """Left-pad a prompt to `length` tokens: zero embeddings, invalid, not vision, position 0."""
    batch, current, hidden = prompt.inputs_embeds.shape
    pad = length - current
    if pad < 0:
        raise InputError(f"cannot pad a {current}-token prompt to {length} tokens")
    if pad == 0:
        return prompt
    embeds = prompt.inputs_embeds.new_zeros(batch, pad, hidden)
    flags = prompt.attention_mask.new_zeros(batch, pad)
    positions = prompt.position_ids.new_zeros((*prompt.position_ids.shape[:-1], pad))
    return PromptEmbeddings(
        inputs_embeds=torch.cat([embeds, prompt.inputs_embeds], dim=1),
        attention_mask=torch.cat([flags, prompt.attention_mask.bool()], dim=1),
        position_ids=torch.cat([positions, prompt.position_ids], dim=-1),
        vision_mask=torch.cat([flags.bool(), prompt.vision_mask], dim=1),
    )


def exact_mask(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask (batch, 1, tokens, tokens) for causal attention over valid keys, without a host sync."""
    index = torch.arange(valid.shape[1], device=valid.device)
    return additive_mask(valid[:, None, :] & (index[None, :] <= index[:, None])[None], dtype)


class RecordingCache:
    """A prefill's keys and values: each layer's `update` is its only one, so it keeps and returns them."""

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_: Any, **__: Any):
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states
        return key_states, value_states


@dataclass
class PrefillOutputs:
    """What a fixed-shape prefill leaves: logits and, per layer, keys/values; per group its token layout."""

    logits: torch.Tensor  # (batch, vocab) float32
    keys: list[torch.Tensor]  # per layer (batch, kv_heads, tokens of its group, head_dim)
    values: list[torch.Tensor]
    valid: list[torch.Tensor]  # per group (batch, tokens)
    positions: list[torch.Tensor]  # per group (batch, tokens) or (3, batch, tokens)
    prompt_index: list[torch.Tensor]  # per group (batch, tokens)
    first_layers: list[int]  # per group


@torch.inference_mode()
def static_prefill(model: nn.Module, prompt: PromptEmbeddings, k: int | None, kept_length: int) -> PrefillOutputs:
    """VTW at K (None: the baseline) over an already padded prompt, every shape fixed by the inputs' shapes,
    `k` and `kept_length` (the deep layers' slots); no operation waits for a tensor's value."""
    decoder = language_model(model)
    num_layers = len(decoder.layers)
    hidden_states = prompt.inputs_embeds
    batch, length, _ = hidden_states.shape
    valid, vision, positions = prompt.attention_mask.bool(), prompt.vision_mask, prompt.position_ids
    prompt_index = torch.arange(length, device=hidden_states.device).expand(batch, -1)
    cache = RecordingCache(num_layers)
    groups: list[LayerGroup] = []
    outputs = PrefillOutputs(hidden_states, [], [], [], [], [], [])
    for layer_idx, layer in enumerate(decoder.layers):
        withdraw = k is not None and layer_idx == k
        if withdraw:
            keep = withdrawn_keep(valid, vision)
            order = kept_order(keep, kept_length)
            hidden_states = hidden_states.gather(1, order[..., None].expand(-1, -1, hidden_states.shape[-1]))
            valid, prompt_index = keep.gather(1, order), prompt_index.gather(1, order)
            if positions.ndim == 3:
                positions = positions.gather(2, order[None].expand(positions.shape[0], -1, -1))
            else:
                positions = positions.gather(1, order)
        if withdraw or not groups:
            mask = exact_mask(valid, hidden_states.dtype)
            groups.append(LayerGroup(layer_idx, valid, positions[..., -1] + 1, mask,
                                     decoder.rotary_emb(hidden_states, positions), prompt_index))  # fmt: skip
            outputs.valid.append(valid)
            outputs.positions.append(positions)
            outputs.prompt_index.append(prompt_index)
            outputs.first_layers.append(layer_idx)
        hidden_states = _run_layer(layer, hidden_states, groups[-1], cache)
    outputs.logits = _logits(model, decoder, hidden_states)
    outputs.keys, outputs.values = list(cache.keys), list(cache.values)
    return outputs


def hold_in_cache(cache: DynamicCache, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Make `keys` and `values` a plain layer's cache as they are. (`update` concatenates them onto an empty tensor:
    one more copy of the whole prompt's cache, 6 ms of the default model's 190 at one thread.) Layers of another
    kind (sliding windows) go through their own `update`."""
    cache.update(keys[..., :0, :], values[..., :0, :], layer_idx)  # creates and initialises the layer, copies nothing
    layer = cache.layers[layer_idx]
    if type(layer) is DynamicLayer:
        layer.keys, layer.values = keys, values
    else:
        cache.update(keys, values, layer_idx)


def decode_state_from(model: nn.Module, outputs: PrefillOutputs, copy: bool) -> DecodeState:
    """The DecodeState `prefill` would return for these outputs (`copy`: own the tensors, e.g. graph outputs)."""
    decoder = language_model(model)
    own = (lambda tensor: tensor.clone()) if copy else (lambda tensor: tensor)
    cache = DynamicCache(config=decoder.config)
    for layer_idx, (key, value) in enumerate(zip(outputs.keys, outputs.values, strict=True)):
        hold_in_cache(cache, layer_idx, own(key), own(value))
    groups, group_of_layer, tokens_per_layer = [], [], []
    bounds = [*outputs.first_layers[1:], len(decoder.layers)]
    for index, (first, end) in enumerate(zip(outputs.first_layers, bounds, strict=True)):
        valid = own(outputs.valid[index])
        positions = outputs.positions[index]
        groups.append(
            LayerGroup(first, valid, own(positions[..., -1] + 1), prompt_index=own(outputs.prompt_index[index]))
        )
        group_of_layer += [index] * (end - first)
        tokens_per_layer += [valid.sum(1)] * (end - first)
    return DecodeState(cache, groups, group_of_layer, attention_implementation(decoder), tokens_per_layer)


def fallback_reason(model: nn.Module, prompt: PromptEmbeddings, selector: TokenSelector | None,
                    position_mode: PositionMode) -> str | None:  # fmt: skip
    """Why the bucketed pass cannot run this prefill (None: it can)."""
    if selector is not None and not isinstance(selector, Withdrawal):
        return "schedule"
    if position_mode != "original":
        return "rearranged positions"
    if attention_implementation(language_model(model)) not in ("sdpa", "eager"):
        return "flash attention"
    if bucket_for(prompt.inputs_embeds.shape[1]) is None:
        return "prompt beyond the largest bucket"
    if prompt.layer_additions:
        return "per-layer vision additions (Qwen3-VL DeepStack)"
    return None


def _shape(prompt: PromptEmbeddings, selector: TokenSelector | None) -> tuple[int, int, int | None]:
    """(bucket, kept slots, K) of this prompt; the kept count is the one host sync, before anything runs."""
    bucket = bucket_for(prompt.inputs_embeds.shape[1])
    assert bucket is not None
    k = selector.k if isinstance(selector, Withdrawal) else None
    if k is None:
        return bucket, bucket, None
    kept = withdrawn_keep(prompt.attention_mask.bool(), prompt.vision_mask)
    return bucket, kept_bucket(int(kept.sum(1).max()), bucket), k


class GraphedPrefill:
    """`static_prefill` for one shape captured as a CUDA graph; `__call__` copies a prompt in and replays it."""

    def __init__(self, model: nn.Module, example: PromptEmbeddings, k: int | None, kept_length: int,
                 pool: Any, atol: float = 1e-2):  # fmt: skip
        self.k, self.kept_length = k, kept_length  # not the model: the per-model store is keyed weakly by it
        self.inputs = PromptEmbeddings(*(tensor.clone() for tensor in (example.inputs_embeds, example.attention_mask,
                                       example.position_ids, example.vision_mask)))  # fmt: skip
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up on a side stream, as capture requires
                eager = static_prefill(model, self.inputs, k, kept_length).logits.clone()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = static_prefill(model, self.inputs, k, kept_length)
        self.graph.replay()
        if not torch.allclose(self.outputs.logits, eager, atol=atol, rtol=atol):
            raise RuntimeError("the captured prefill does not reproduce the eager one")

    def __call__(self, prompt: PromptEmbeddings) -> PrefillOutputs:
        for target, source in zip((self.inputs.inputs_embeds, self.inputs.attention_mask, self.inputs.position_ids,
                                   self.inputs.vision_mask), (prompt.inputs_embeds, prompt.attention_mask,
                                   prompt.position_ids, prompt.vision_mask), strict=True):  # fmt: skip
            target.copy_(source)
        self.graph.replay()
        return self.outputs


class _ModelGraphs:
    """A model's captured prefills, least recently used first, sharing one memory pool (replays never overlap:
    the model's lock serialises requests, and outputs are copied out before the next replay)."""

    def __init__(self):
        self.graphs: dict[tuple, GraphedPrefill] = {}
        self.failed: dict[tuple, str] = {}  # shape -> why its capture failed (not tried again)
        self.pool = torch.cuda.graph_pool_handle()


_GRAPHS: weakref.WeakKeyDictionary[nn.Module, _ModelGraphs] = weakref.WeakKeyDictionary()


def graphed_outputs(
    model: nn.Module, padded: PromptEmbeddings, k: int | None, kept_length: int
) -> PrefillOutputs | None:
    """Replay (capturing first if needed) the graph for this shape; None if it cannot be captured."""
    graphs = _GRAPHS.setdefault(model, _ModelGraphs())
    key = (tuple(padded.inputs_embeds.shape), tuple(padded.position_ids.shape), kept_length, k,
           padded.inputs_embeds.dtype, padded.inputs_embeds.device)  # fmt: skip
    if key in graphs.failed:
        return None
    graph = graphs.graphs.pop(key, None)
    if graph is None:
        try:
            graph = GraphedPrefill(model, padded, k, kept_length, graphs.pool)
        except Exception as error:  # capture failed (an op that syncs with the host, ...) or disagreed
            graphs.failed[key] = f"{type(error).__name__}: {error}"
            return None
        if len(graphs.graphs) >= MAX_GRAPHS:
            graphs.graphs.pop(next(iter(graphs.graphs)))
    graphs.graphs[key] = graph  # re-inserted: most recently used last
    return graph(padded)


def _can_capture(prompt: PromptEmbeddings) -> bool:
    return prompt.inputs_embeds.is_cuda


def capture_failures(model: nn.Module) -> dict[tuple, str]:
    """Shapes whose prefill graph could not be captured for this model, with the error (for diagnostics)."""
    graphs = _GRAPHS.get(model)
    return dict(graphs.failed) if graphs is not None else {}


def fast_prefill(
    model: nn.Module,
    prompt: PromptEmbeddings,
    selector: TokenSelector | None = None,
    position_mode: PositionMode = "original",
    engine: PrefillEngine = "bucketed",
) -> tuple[torch.Tensor, DecodeState, str]:
    """Prefill on `engine`; returns logits (batch, vocab), the decode state, and the engine that actually ran
    ("plain (reason)" when it fell back)."""
    if engine not in PREFILL_ENGINES:
        raise InputError(f"prefill engine must be one of {', '.join(PREFILL_ENGINES)}; got {engine!r}")
    if engine == "plain":
        return (*prefill(model, prompt, selector, position_mode), "plain")
    if isinstance(selector, Withdrawal) and selector.k >= num_decoder_layers(model.config):
        selector = None
    reason = fallback_reason(model, prompt, selector, position_mode)
    if reason is None and engine == "graph" and not _can_capture(prompt):
        reason = "no CUDA device"
    if reason is not None:
        return (*prefill(model, prompt, selector, position_mode), f"plain ({reason})")
    bucket, kept_length, k = _shape(prompt, selector)
    padded = pad_prompt(prompt, bucket)
    if engine == "graph":
        outputs = graphed_outputs(model, padded, k, kept_length)
        if outputs is not None:
            return outputs.logits.clone(), decode_state_from(model, outputs, copy=True), "graph"
        return (*prefill(model, prompt, selector, position_mode), "plain (graph capture failed)")
    outputs = static_prefill(model, padded, k, kept_length)
    return outputs.logits, decode_state_from(model, outputs, copy=False), "bucketed"
