"""The fixed cost of calling a decoder layer, as a table (`bench --layers`).

One decoder layer runs on three inputs cut from one prompt, interleaved after a warm-up: the whole prompt, its text
tokens alone (what VTW's layers from K on see) and its last token. The one-token call is nearly all fixed cost
(calling the layer, dispatching its kernels, reading its weights) and almost no arithmetic, so its median over the
prompt call's median is the share of a layer's prefill time that no saving in FLOPs can remove. Under VTW the deep
layers run on the text alone, where this share is what is left, so it bounds how close the measured TTFT ratio can
come to the FLOPs ratio.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from vtw_core.benchmarks.bench import median_spread, no_setup, time_interleaved
from vtw_core.engine.decoder import LayerGroup, _run_layer, attention_implementation, attention_mask_for
from vtw_core.engine.embed import embed_prompt
from vtw_core.errors import InputError
from vtw_core.models.families import language_model

INPUTS = ("prompt", "text only", "one token")


@dataclass
class LayerCallTimes:
    """One input's seconds per layer call over the timed runs."""

    input: str
    tokens: int
    seconds: list[float]

    def median_ms(self) -> float:
        return statistics.median(self.seconds) * 1e3


@torch.inference_mode()
def run_layer_calls(
    model: nn.Module, inputs: dict[str, torch.Tensor], repeats: int, layer_idx: int = 0
) -> list[LayerCallTimes]:
    """Layer `layer_idx` on the prompt, on its text tokens and on its last token (batch 1), `repeats` runs each."""
    prompt = embed_prompt(model, inputs)
    if prompt.batch_size != 1:
        raise InputError("the layer timing calls one prompt at a time (batch 1)")
    decoder = language_model(model)
    implementation = attention_implementation(decoder)
    length = prompt.inputs_embeds.shape[1]
    text = prompt.attention_mask[0] & ~prompt.vision_mask[0]
    text[-1] = True  # VTW keeps the last prompt token whatever it is
    picks = {
        "prompt": torch.arange(length, device=text.device),
        "text only": text.nonzero().squeeze(1),
        "one token": torch.tensor([length - 1], device=text.device),
    }
    layer, calls = decoder.layers[layer_idx], []
    for index in picks.values():
        hidden = prompt.inputs_embeds[:, index]
        positions = prompt.position_ids[..., index]  # (1, tokens), or (3, 1, tokens) for multimodal rope
        valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        mask = attention_mask_for(valid, valid.shape[1], implementation, hidden.dtype)
        group = LayerGroup(0, valid, positions[..., -1] + 1, mask, decoder.rotary_emb(hidden, positions))
        calls.append(no_setup(partial(_run_layer, layer, hidden, group, None)))
    seconds = time_interleaved(model.device, calls, repeats)
    return [
        LayerCallTimes(name, len(index), values) for (name, index), values in zip(picks.items(), seconds, strict=True)
    ]


def format_layer_calls(calls: list[LayerCallTimes]) -> str:
    """A Markdown table of the three calls, then the one-token call's share: the fixed cost per layer call."""
    median = {call.input: call.median_ms() for call in calls}
    lines = ["| input | tokens | ms | share of the prompt call |", "|---|---|---|---|"]
    for call in calls:
        share = median[call.input] / median["prompt"]
        lines.append(f"| {call.input} | {call.tokens} | {median_spread(call.seconds, 1e3, 3)} | {share:.1%} |")
    lines.append(
        f"\nfixed cost per layer call: {median['one token']:.3f} ms = "
        f"{median['one token'] / median['prompt']:.1%} of a layer's prefill time"
    )
    return "\n".join(lines)
