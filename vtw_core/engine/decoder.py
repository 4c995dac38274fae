"""The decoder loop: the stock model's own layers, run with a per-layer set of kept tokens.

Prefill walks the decoder layer by layer. Before each layer a `TokenSelector` may shrink the set of
tokens (never grow it); the kept tokens are packed to the right of a left-padded batch, keep their
position ids (or get consecutive ones with `position_mode="rearrange"`), and every deeper layer only
ever sees them, so its KV cache holds only them. Layers that share one token set form a `LayerGroup`:
one attention mask and one rotary embedding serve the whole group, in prefill and in every decode step.

Visual Tokens Withdrawal is the selector `Withdrawal(k)`: at layer k it drops every vision token.
A later per-layer schedule (FastV, G-Search) is another selector; nothing else changes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import nn
from transformers import DynamicCache

from vtw_core import validation
from vtw_core.engine.embed import PromptEmbeddings
from vtw_core.errors import InputError, UnsupportedModelError
from vtw_core.models.families import language_model

PositionMode = Literal["original", "rearrange"]
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")


@dataclass
class TokenState:
    """The tokens a range of layers processes: prompt order, left-padded, shape (batch, tokens)."""

    prompt_index: torch.Tensor  # index of each token in the full prompt (for ranking and analysis)
    valid: torch.Tensor  # bool, False on padding
    vision: torch.Tensor  # bool, True on vision tokens
    position_ids: torch.Tensor  # (batch, tokens) or (3, batch, tokens)


class TokenSelector(Protocol):
    """Decides, before each decoder layer, which tokens that layer and all deeper ones keep."""

    def keep(
        self, layer_idx: int, hidden_states: torch.Tensor, tokens: TokenState, cache: DynamicCache
    ) -> torch.Tensor | None:
        """A bool mask over `tokens` (a subset of `tokens.valid`), or None to keep the current set."""


@dataclass(frozen=True)
class Withdrawal:
    """Visual Tokens Withdrawal: layers 0..k-1 see every token, layers k.. see only non-vision tokens."""

    k: int

    def keep(
        self, layer_idx: int, hidden_states: torch.Tensor, tokens: TokenState, cache: DynamicCache
    ) -> torch.Tensor | None:
        return tokens.valid & ~tokens.vision if layer_idx == self.k else None


def check_k(k: int | None, num_layers: int) -> int | None:
    """K counts the layers that still see vision: 0 (none) .. num_layers (the unchanged model); None = baseline."""
    return None if k is None else validation.check_k(k, num_layers)


def withdrawal_selector(k: int | None, num_layers: int) -> TokenSelector | None:
    """The selector for VTW at K; None (the unchanged model) for K None or K = num_layers."""
    k = check_k(k, num_layers)
    return None if k is None or k >= num_layers else Withdrawal(k)


@dataclass
class LayerGroup:
    """Consecutive layers that share one token set: their cache layout, mask and rotary positions."""

    first_layer: int
    valid: torch.Tensor  # (batch, cached tokens) bool; grows by one column per decode step
    next_position: torch.Tensor  # (batch,) or (3, batch): position id of the next token in these layers
    attention_mask: torch.Tensor | None = None
    rotary: tuple[torch.Tensor, torch.Tensor] | None = None
    prompt_index: torch.Tensor | None = None  # (batch, cached prompt tokens): each slot's index in the prompt


@dataclass
class DecodeState:
    """Everything a decode step needs after prefill."""

    cache: DynamicCache | None  # None after a prefill run with use_cache=False (nothing to decode from)
    groups: list[LayerGroup]
    group_of_layer: list[int]
    attention_implementation: str
    prompt_tokens_per_layer: list[torch.Tensor] = field(default_factory=list)  # (batch,) real tokens per layer

    def kv_cache_bytes(self) -> int:
        """Bytes held by the real key and value tensors of every layer."""
        total = 0
        for layer in self.cache.layers if self.cache is not None else []:
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if tensor is not None:
                    total += tensor.numel() * tensor.element_size()
        return total

    def cache_lengths(self) -> list[int]:
        """Cached tokens per layer (including left padding)."""
        return [layer.get_seq_length() for layer in self.cache.layers] if self.cache is not None else []

    def select_rows(self, rows: torch.Tensor) -> list[int]:
        """Keep only the batch rows `rows` (long indices, in that order) in every group and every layer's cache;
        the columns of left padding that no kept row uses leave too. Returns each group's dropped leading columns.

        What a decode step rebuilds from these (masks, rotary embeddings) is cleared rather than sliced.
        """
        starts = [select_group_rows(group, rows) for group in self.groups]
        layers = self.cache.layers if self.cache is not None else []
        for layer, group_idx in zip(layers, self.group_of_layer[: len(layers)], strict=True):
            if getattr(layer, "keys", None) is not None and layer.keys.numel() > 0:
                layer.keys = layer.keys[:, :, starts[group_idx] :].index_select(0, rows)
                layer.values = layer.values[:, :, starts[group_idx] :].index_select(0, rows)
        self.prompt_tokens_per_layer = [count.index_select(0, rows) for count in self.prompt_tokens_per_layer]
        return starts


def select_group_rows(group: LayerGroup, rows: torch.Tensor) -> int:
    """`DecodeState.select_rows` for one layer group: its rows `rows`, without the leading columns of padding
    that none of them uses (their number is returned). Its mask and rotary embeddings are cleared."""
    valid = group.valid.index_select(0, rows)
    start = int(valid.any(0).int().argmax())  # every row has a real token (its last prompt token), so one exists
    group.valid = valid[:, start:].contiguous()
    group.next_position = group.next_position.index_select(-1, rows)
    if group.prompt_index is not None:
        group.prompt_index = group.prompt_index[:, start:].index_select(0, rows)
    group.attention_mask = group.rotary = None
    return start


def attention_mask_for(
    valid: torch.Tensor, query_length: int, implementation: str, dtype: torch.dtype
) -> torch.Tensor | None:
    """The mask a decoder layer expects for queries that are the last `query_length` of the valid keys.

    None where the kernel's own causal handling is exact (no padding; for sdpa, whose causal flag aligns queries
    with the first keys, also queries that are all the keys or one), which keeps sdpa and flash-attn on their
    fastest paths. Flash kernels take the 2-D padding mask; eager and sdpa an additive 4-D mask.
    """
    no_padding = bool(valid.all())
    if implementation.startswith("flash"):
        return None if no_padding else valid.to(torch.int32)
    if no_padding and (query_length == 1 or (implementation == "sdpa" and query_length == valid.shape[1])):
        return None
    key_length = valid.shape[1]
    key_index = torch.arange(key_length, device=valid.device)
    query_index = key_index[key_length - query_length :]
    allowed = valid[:, None, :] & (key_index[None, :] <= query_index[:, None])[None]  # (batch, q, k)
    return additive_mask(allowed, dtype)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask (batch, 1, queries, keys) sdpa and eager attention take for `allowed` (batch, queries, keys):
    0 where allowed, the dtype's lowest value elsewhere (finite, so a row with nothing allowed stays finite)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill(~allowed, torch.finfo(dtype).min)[:, None]


def withdrawn_keep(valid: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
    """The tokens VTW keeps from K (batch, tokens): each row's real non-vision tokens and its last prompt token,
    which yields the logits (as `run_decoder` keeps it for any selector)."""
    keep = valid & ~vision
    keep[:, -1] = True
    return keep


def kept_order(keep: torch.Tensor, kept_length: int | None = None) -> torch.Tensor:
    """Per row, the prompt indices (batch, kept_length) that right-align its `keep` tokens in prompt order, so the
    batch stays left-padded; `kept_length` defaults to the most tokens any row keeps (a read of the tensor)."""
    if kept_length is None:
        kept_length = int(keep.sum(1).max())
    # A stable sort of the keep flags puts dropped tokens first and kept ones last, each in prompt order.
    return torch.argsort(keep.long(), dim=1, stable=True)[:, -kept_length:]


def _pack_kept(
    hidden_states: torch.Tensor, tokens: TokenState, keep: torch.Tensor, position_mode: PositionMode
) -> tuple[torch.Tensor, TokenState]:
    """Keep the `keep` tokens of each row, right-aligned in prompt order (so the batch stays left-padded)."""
    order = kept_order(keep)
    valid = keep.gather(1, order)
    hidden_states = hidden_states.gather(1, order[..., None].expand(-1, -1, hidden_states.shape[-1]))
    if position_mode == "rearrange":
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        if tokens.position_ids.ndim == 3:
            positions = positions[None].expand(tokens.position_ids.shape[0], -1, -1)
    elif tokens.position_ids.ndim == 3:
        positions = tokens.position_ids.gather(2, order[None].expand(tokens.position_ids.shape[0], -1, -1))
    else:
        positions = tokens.position_ids.gather(1, order)
    return hidden_states, TokenState(
        prompt_index=tokens.prompt_index.gather(1, order),
        valid=valid,
        vision=tokens.vision.gather(1, order) & valid,
        position_ids=positions.contiguous(),
    )


_CACHE_ARGUMENTS: dict[type, str] = {}


@torch.compiler.assume_constant_result  # traced: called once, its answer a constant (no guard, no recompile)
def cache_argument(layer_class: type) -> str:
    """The decoder layer's name for the cache: `cache` in current transformers, `past_key_values` before it."""
    name = _CACHE_ARGUMENTS.get(layer_class)
    if name is None:
        parameters = inspect.signature(layer_class.forward).parameters
        name = _CACHE_ARGUMENTS[layer_class] = "cache" if "cache" in parameters else "past_key_values"
    return name


def _run_layer(
    layer: nn.Module, hidden_states: torch.Tensor, group: LayerGroup, cache: DynamicCache | None
) -> torch.Tensor:
    output = layer(
        hidden_states,
        attention_mask=group.attention_mask,
        position_embeddings=group.rotary,
        use_cache=cache is not None,
        **{cache_argument(type(layer)): cache},
    )
    return output[0] if isinstance(output, tuple) else output  # older releases return (hidden_states, ...)


def _logits(model: nn.Module, decoder: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Next-token logits (batch, vocab) in float32 from the last position only."""
    return model.lm_head(decoder.norm(hidden_states[:, -1:]))[:, -1].float()


def attention_implementation(decoder: nn.Module) -> str:
    implementation = decoder.config._attn_implementation
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"attention implementation {implementation!r} is not supported; use one of {ATTENTION_IMPLEMENTATIONS}"
        )
    return implementation


LayerObserver = Callable[[int, torch.Tensor, "TokenState"], None]


@torch.inference_mode()
def prefill(
    model: nn.Module,
    prompt: PromptEmbeddings,
    selector: TokenSelector | None = None,
    position_mode: PositionMode = "original",
    observer: LayerObserver | None = None,
    use_cache: bool = True,
) -> tuple[torch.Tensor, DecodeState]:
    """Run the prompt through every decoder layer; return next-token logits (batch, vocab) and decode state.

    `use_cache=False` stores no keys and values (the state cannot decode): for passes that only need logits.
    """
    batch_size, prompt_length, _ = prompt.inputs_embeds.shape
    tokens = TokenState(
        prompt_index=torch.arange(prompt_length, device=prompt.inputs_embeds.device).expand(batch_size, -1),
        valid=prompt.attention_mask,
        vision=prompt.vision_mask,
        position_ids=prompt.position_ids,
    )
    return run_decoder(model, prompt.inputs_embeds, tokens, selector=selector, position_mode=position_mode,
                       observer=observer, use_cache=use_cache, layer_additions=prompt.layer_additions)  # fmt: skip


@torch.inference_mode()
def run_decoder(
    model: nn.Module,
    hidden_states: torch.Tensor,
    tokens: TokenState,
    *,
    first_layer: int = 0,
    selector: TokenSelector | None = None,
    position_mode: PositionMode = "original",
    observer: LayerObserver | None = None,
    use_cache: bool = True,
    layer_additions: tuple[torch.Tensor, ...] = (),
) -> tuple[torch.Tensor, DecodeState]:
    """Run decoder layers `first_layer`.. on `hidden_states` (the input of that layer) and its tokens.

    `observer(layer_idx, hidden_states, tokens)` sees each layer's input after token selection; the K
    search uses it to branch off VTW passes from one baseline pass, the attention analysis to keep query rows.
    `use_cache=False` keeps no keys and values: the layers attend within the prompt and store nothing.
    `layer_additions[i]` (batch, prompt, hidden) is added to layer i's output on the tokens still kept
    (PromptEmbeddings.layer_additions: Qwen3-VL's DeepStack, zero outside vision positions).
    """
    if position_mode not in ("original", "rearrange"):
        raise InputError(f"position_mode must be 'original' or 'rearrange', got {position_mode!r}")
    decoder = language_model(model)
    implementation = attention_implementation(decoder)
    cache = DynamicCache(config=decoder.config) if use_cache else None
    groups: list[LayerGroup] = []
    group_of_layer: list[int] = [0] * first_layer  # layers before first_layer are not run and cache nothing
    tokens_per_layer: list[torch.Tensor] = [tokens.valid.sum(1)] * first_layer
    for layer_idx in range(first_layer, len(decoder.layers)):
        layer = decoder.layers[layer_idx]
        keep = selector.keep(layer_idx, hidden_states, tokens, cache) if selector is not None else None
        if keep is not None:
            keep = keep & tokens.valid
            # The last column is every row's last prompt token (left padding): it yields the logits, so it stays.
            keep[:, -1] = True
            hidden_states, tokens = _pack_kept(hidden_states, tokens, keep, position_mode)
        if keep is not None or not groups:
            groups.append(
                LayerGroup(
                    first_layer=layer_idx,
                    valid=tokens.valid,
                    next_position=tokens.position_ids[..., -1] + 1,
                    attention_mask=attention_mask_for(
                        tokens.valid, tokens.valid.shape[1], implementation, hidden_states.dtype
                    ),
                    rotary=decoder.rotary_emb(hidden_states, tokens.position_ids),
                    prompt_index=tokens.prompt_index,
                )
            )
        group_of_layer.append(len(groups) - 1)
        tokens_per_layer.append(tokens.valid.sum(1))
        # Selectors that rank tokens by attention (FastV, G-Search) note the layer's actual input here.
        if selector is not None and hasattr(selector, "observe"):
            selector.observe(layer_idx, hidden_states, tokens)
        if observer is not None:
            observer(layer_idx, hidden_states, tokens)
        hidden_states = _run_layer(layer, hidden_states, groups[-1], cache)
        if layer_idx < len(layer_additions):
            index = tokens.prompt_index[..., None].expand(-1, -1, hidden_states.shape[-1])
            hidden_states = hidden_states + layer_additions[layer_idx].gather(1, index)

    state = DecodeState(cache, groups, group_of_layer, implementation, tokens_per_layer)
    return _logits(model, decoder, hidden_states), state


@torch.inference_mode()
def decode_step(
    model: nn.Module,
    state: DecodeState,
    input_ids: torch.Tensor,
    observer: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Feed one new token per row (batch, 1) through every layer; return the next logits (batch, vocab).

    `observer(layer_idx, hidden_states)` sees each layer's input (batch, 1, hidden).
    """
    hidden_states = language_model(model).embed_tokens(input_ids)
    valid = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    return extend(model, state, hidden_states, valid, observer)


@torch.inference_mode()
def extend(
    model: nn.Module,
    state: DecodeState,
    inputs_embeds: torch.Tensor,
    valid: torch.Tensor,
    observer: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Feed new tokens (batch, length, hidden) behind every layer's cache; return the next logits (batch, vocab).

    `valid` (batch, length) is False on the chunk's left padding. Every layer sees all new tokens (nothing is
    withdrawn after prefill); their positions continue each row's own count. One token per row is a decode
    step; more are a prompt's continuation after a prefilled prefix (vtw_core.engine.shared_prefill).
    """
    decoder = language_model(model)
    offsets = (valid.long().cumsum(1) - 1).clamp(min=0)  # (batch, length): each new token's place in its row
    for group in state.groups:
        group.valid = torch.cat([group.valid, valid], dim=1)
        group.attention_mask = attention_mask_for(
            group.valid, valid.shape[1], state.attention_implementation, inputs_embeds.dtype
        )
        group.rotary = decoder.rotary_emb(inputs_embeds, group.next_position[..., None] + offsets)
        group.next_position = group.next_position + valid.sum(1)
    hidden_states = inputs_embeds
    for layer_idx, layer in enumerate(decoder.layers):
        if observer is not None:
            observer(layer_idx, hidden_states)
        hidden_states = _run_layer(layer, hidden_states, state.groups[state.group_of_layer[layer_idx]], state.cache)
    return _logits(model, decoder, hidden_states)
