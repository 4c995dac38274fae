"""Where does the last token look? Per layer, the share of its attention (mean over heads) that goes to the
system prompt, the vision tokens, the instruction and the output so far: the paper's Figures 4 and 5.

The model keeps its fast attention kernel (sdpa, flash): nothing switches to eager. The engine's observer
keeps, for every layer, the input row of the token of interest; after the layer has run, its query is
recomputed from that row (the layer's own norm, q projection and rotary function) and scored against the
keys already in the cache. That is one (heads x tokens) product per layer, not a full attention matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch import nn

from vtw_core.engine.decoder import DecodeState, TokenState, decode_step, prefill, withdrawal_selector
from vtw_core.engine.embed import embed_prompt
from vtw_core.engine.query_attention import query_attention
from vtw_core.models.families import num_decoder_layers
from vtw_core.models.prompts import Message, build_model_inputs, eos_token_ids_of

SEGMENTS = ("system", "vision", "instruction", "output")
SYSTEM, VISION, INSTRUCTION, OUTPUT = range(4)


@dataclass
class AttentionReport:
    num_layers: int
    k: int | None
    prompt: list[dict[str, float]]  # per layer: the last prompt token's shares
    generated: list[list[dict[str, float]]] = field(default_factory=list)  # per new token, per layer
    token_ids: list[int] = field(default_factory=list)
    segment_tokens: dict[str, int] = field(default_factory=dict)  # prompt tokens per segment

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_layers": self.num_layers,
            "k": self.k,
            "segments": list(SEGMENTS),
            "segment_tokens": self.segment_tokens,
            "prompt": self.prompt,
            "generated": self.generated,
            "token_ids": self.token_ids,
        }


def prompt_segments(vision_mask: torch.Tensor) -> torch.Tensor:
    """Segment of every prompt token (seq,): text before the first vision token is the system part."""
    labels = torch.full(vision_mask.shape, INSTRUCTION, dtype=torch.long, device=vision_mask.device)
    if bool(vision_mask.any()):
        first_vision = int(vision_mask.nonzero()[0])
        labels[:first_vision] = SYSTEM
        labels[vision_mask] = VISION
    return labels


def _layer_shares(
    model: nn.Module, state: DecodeState, layer_idx: int, hidden_row: torch.Tensor, position_row: torch.Tensor,
    labels: torch.Tensor,
) -> dict[str, float]:  # fmt: skip
    group = state.groups[state.group_of_layer[layer_idx]]
    keys = state.cache.layers[layer_idx].keys
    valid = group.valid[:, : keys.shape[2]]
    probabilities = query_attention(model, layer_idx, hidden_row, position_row, keys, valid)[0, 0]  # batch 1
    prompt_slots = group.prompt_index.shape[1]
    slot_labels = torch.full((keys.shape[2],), OUTPUT, dtype=torch.long, device=keys.device)
    slot_labels[:prompt_slots] = labels[group.prompt_index[0]]
    shares = torch.zeros(len(SEGMENTS), device=keys.device).index_add_(0, slot_labels, probabilities)
    return dict(zip(SEGMENTS, shares.tolist(), strict=True))


@torch.inference_mode()
def analyze_attention(
    model: nn.Module,
    processor: Any,
    messages: list[Message],
    images: list[Image.Image],
    *,
    k: int | None = None,
    max_new_tokens: int = 16,
) -> AttentionReport:
    """Attention shares for the prompt's last token and each greedily generated token, per layer."""
    num_layers = num_decoder_layers(model.config)
    selector = withdrawal_selector(k, num_layers)
    inputs = build_model_inputs(processor, [messages], [images], model.device, model.dtype)
    prompt = embed_prompt(model, inputs)
    labels = prompt_segments(prompt.vision_mask[0])
    rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep_last_row(layer_idx: int, hidden_states: torch.Tensor, tokens: TokenState) -> None:
        rows[layer_idx] = (hidden_states[:, -1:], tokens.position_ids[..., -1:])

    logits, state = prefill(model, prompt, selector, observer=keep_last_row)
    report = AttentionReport(
        num_layers,
        k,
        prompt=[_layer_shares(model, state, i, *rows[i], labels) for i in range(num_layers)],
        segment_tokens={name: int((labels == index).sum()) for index, name in enumerate(SEGMENTS)},
    )
    eos_ids = eos_token_ids_of(model, processor)
    for _ in range(max_new_tokens):
        token = logits.argmax(-1)
        report.token_ids.append(int(token[0]))
        if int(token[0]) in eos_ids:
            break
        step_rows: dict[int, torch.Tensor] = {}
        logits = decode_step(model, state, token[:, None], observer=step_rows.__setitem__)
        report.generated.append(
            [_layer_shares(model, state, i, step_rows[i], _last_position(state, i), labels) for i in range(num_layers)]
        )
    return report


def _last_position(state: DecodeState, layer_idx: int) -> torch.Tensor:
    """Position ids of the token a decode step just fed to this layer: (batch, 1) or (3, batch, 1)."""
    return (state.groups[state.group_of_layer[layer_idx]].next_position - 1)[..., None]
