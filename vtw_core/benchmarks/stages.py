"""Where the time to the first token goes, stage by stage, for the baseline and VTW at one K; as a table.

A FLOPs ratio predicts a TTFT ratio only if every stage runs at the same FLOP rate. This splits one prompt's
path to its first token into the stages VTW changes differently and times each with the same clock as `bench`
(every setting once untimed, then interleaved A B A B ...; medians):

- vision: the vision tower, projector and embedding merge (`embed_prompt`), the same work on both sides;
- layers 0..K-1: the layers that see every token (for VTW also the withdrawal itself, before layer K);
- layers K..N-1: the rest, with the final norm, the LM head and the greedy first token; under VTW these run
  on the text tokens alone, so here a layer's fixed costs (calling it, reading its weights) are what is left.

Each stage's FLOPs come from the analytic model (`vtw_core.engine.flops`). "excess ms" is a stage's time beyond what
its FLOPs would take at the baseline's average rate (baseline FLOPs / baseline TTFT); over VTW's stages it adds
up to VTW's TTFT minus (end-to-end FLOPs ratio x the baseline's TTFT), the gap between the two ratios.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch
from torch import nn

from vtw_core.benchmarks.bench import DeviceClock, interleaved_order, median_spread
from vtw_core.engine import flops
from vtw_core.engine.decoder import check_k, prefill, withdrawal_selector
from vtw_core.engine.embed import embed_prompt
from vtw_core.errors import InputError

STAGES = ("vision", "layers 0..K-1", "layers K..N-1")


@dataclass
class StageTimes:
    """One setting's per-stage seconds over the timed runs, and each stage's FLOPs."""

    label: str
    k: int | None
    num_layers: int
    seconds: dict[str, list[float]]  # stage -> one value per timed run
    flops: dict[str, int]  # stage -> FLOPs of one run

    def median_ms(self, stage: str) -> float:
        return statistics.median(self.seconds[stage]) * 1e3

    def total_ms(self) -> float:
        """Median of each run's whole time to the first token (not the sum of the stage medians)."""
        return statistics.median(sum(run) for run in zip(*self.seconds.values(), strict=True)) * 1e3

    def total_flops(self) -> int:
        return sum(self.flops.values())


@torch.inference_mode()
def _staged_run(model: nn.Module, inputs: dict[str, torch.Tensor], k: int | None, split: int) -> tuple[list, dict]:
    """One prompt to its first token; seconds per stage and FLOPs per stage. `split` is the K whose layers
    divide the two decoder stages (for the baseline too, so its stages line up with VTW's)."""
    clock = DeviceClock(model.device)

    def mark_layer(layer_idx: int, hidden_states: torch.Tensor, tokens) -> None:
        if layer_idx == split:  # after the withdrawal (VTW), before layer `split` runs
            clock.mark()

    num_layers = model.config.get_text_config().num_hidden_layers
    clock.mark()
    prompt = embed_prompt(model, inputs)
    clock.mark()
    logits, state = prefill(model, prompt, withdrawal_selector(k, num_layers), observer=mark_layer)
    logits.argmax(-1)
    clock.mark()
    vision, shallow, deep = clock.seconds_since_first()
    dims = flops.DecoderDims.from_config(model.config)
    tokens = [int(count[0]) for count in state.prompt_tokens_per_layer]
    stage_flops = {
        "vision": flops.request_vision_flops(model.config, inputs),
        "layers 0..K-1": sum(flops.decoder_layer_flops(dims, n, n) for n in tokens[:split]),
        "layers K..N-1": sum(flops.decoder_layer_flops(dims, n, n) for n in tokens[split:])
        + flops.lm_head_flops(dims, 1),
    }
    return [vision, shallow - vision, deep - shallow], stage_flops


def run_stages(model: nn.Module, inputs: dict[str, torch.Tensor], k: int, repeats: int) -> list[StageTimes]:
    """The baseline and VTW at `k` on one prompt (batch 1): per-stage times of `repeats` interleaved runs."""
    if repeats < 1:
        raise InputError(f"repeats must be at least 1, got {repeats}")
    if inputs["input_ids"].shape[0] != 1:
        raise InputError("the stage breakdown times one prompt at a time (batch 1)")
    num_layers = model.config.get_text_config().num_hidden_layers
    k = check_k(k, num_layers)
    if not 0 < k < num_layers:
        raise InputError(f"the breakdown needs 0 < K < {num_layers} (layers on both sides of the withdrawal)")
    settings = [("baseline", None), (f"VTW K={k}", k)]
    results = [
        StageTimes(label, setting_k, num_layers, {stage: [] for stage in STAGES}, {}) for label, setting_k in settings
    ]
    for position, index in enumerate(interleaved_order(len(settings), repeats)):
        seconds, stage_flops = _staged_run(model, inputs, settings[index][1], k)
        results[index].flops = stage_flops
        if position >= len(settings):  # the first pass is the warm-up
            for stage, value in zip(STAGES, seconds, strict=True):
                results[index].seconds[stage].append(value)
    return results


def format_stages(baseline: StageTimes, vtw: StageTimes) -> str:
    """A Markdown table of the stages, then the TTFT ratio against the FLOPs ratio and where the gap sits."""
    rate = baseline.total_flops() / baseline.total_ms()  # FLOPs per ms, the baseline's average
    lines = [
        "| stage | baseline ms | VTW ms | time ratio | baseline GFLOPs | VTW GFLOPs | FLOPs ratio "
        "| baseline GFLOP/s | VTW GFLOP/s | VTW excess ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for stage in STAGES:
        base_ms, vtw_ms = baseline.median_ms(stage), vtw.median_ms(stage)
        base_flops, vtw_flops = baseline.flops[stage], vtw.flops[stage]
        name = stage.replace("K-1", str(vtw.k - 1)).replace("K..N-1", f"{vtw.k}..{vtw.num_layers - 1}")
        lines.append(
            f"| {name} | {median_spread(baseline.seconds[stage], 1e3, 1)} "
            f"| {median_spread(vtw.seconds[stage], 1e3, 1)} "
            f"| {vtw_ms / base_ms:.2f} | {base_flops / 1e9:.3f} | {vtw_flops / 1e9:.3f} "
            f"| {vtw_flops / base_flops:.3f} | {base_flops / base_ms / 1e6:.1f} | {vtw_flops / vtw_ms / 1e6:.1f} "
            f"| {vtw_ms - vtw_flops / rate:+.1f} |"
        )
    time_ratio = vtw.total_ms() / baseline.total_ms()
    flops_ratio = vtw.total_flops() / baseline.total_flops()
    lines.append(
        f"| time to first token | {baseline.total_ms():.1f} | {vtw.total_ms():.1f} | {time_ratio:.2f} "
        f"| {baseline.total_flops() / 1e9:.3f} | {vtw.total_flops() / 1e9:.3f} | {flops_ratio:.3f} "
        f"| {rate / 1e6:.1f} | {vtw.total_flops() / vtw.total_ms() / 1e6:.1f} "
        f"| {vtw.total_ms() - flops_ratio * baseline.total_ms():+.1f} |"
    )
    lines.append(
        f"\nTTFT ratio {time_ratio:.3f} = {time_ratio / flops_ratio:.2f}x the end-to-end FLOPs ratio {flops_ratio:.3f}."
    )
    return "\n".join(lines)
