"""Decode steps alone on each decode engine, paired per repeat, as a table (`bench --decode-engines`).

`bench` times whole generations, so its decode column includes sampling, bookkeeping and each request's one-off
costs. Here, per setting (baseline and VTW at each K), one prefill; then each run takes a copy of its decode state
and one decode step (both untimed: the step builds the static buffers or captures the CUDA graph), and times
`steps` more greedy steps. Engines run interleaved (plain static plain static ...) after a warm-up of each; the
table gives ms per decode step as median [min-max] over the repeats, and each engine's time over the first engine's
time per repeat (paired neighbours) as median [min-max]. `engine="auto"` picks from measurements like these.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from vtw_core.benchmarks.bench import median_spread, time_interleaved
from vtw_core.engine.decoder import DecodeState, attention_implementation, prefill, withdrawal_selector
from vtw_core.engine.embed import embed_prompt
from vtw_core.errors import InputError
from vtw_core.generation.generate import _decoder_for, auto_engine
from vtw_core.models.families import language_model


@dataclass
class DecodeEngineTimes:
    """One setting's ms per decode step on each engine, one value per timed repeat."""

    label: str
    k: int | None
    prompt_tokens: int
    max_new_tokens: int  # the room the static buffers reserve: the prefill's token, the untimed step, the timed ones
    ms_per_step: dict[str, list[float]]


def decode_engines(model: nn.Module, requested: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The engines to compare: `requested` ("auto" resolved, duplicates dropped), or by default plain and
    static, and the CUDA graph where it can run (CUDA, sdpa or eager attention)."""
    device, attention = model.device, attention_implementation(language_model(model))
    if not requested or list(requested) == ["auto"]:
        graph = device.type == "cuda" and attention in ("sdpa", "eager")
        return ["plain", "static", *(["graph"] if graph else [])]
    return list(dict.fromkeys(auto_engine(device, attention) if name == "auto" else name for name in requested))


def _decode_run(model: nn.Module, state: DecodeState, first: torch.Tensor, engine: str, steps: int):
    """Set up (untimed): a decoder on a copy of `state` and its first step; returns the timed part, `steps` more
    greedy decode steps."""
    decode = _decoder_for(model, copy.deepcopy(state), engine, steps + 2, None)
    second = decode(first).argmax(-1)

    def run() -> None:
        tokens = second
        for _ in range(steps):
            tokens = decode(tokens).argmax(-1)

    return run


@torch.no_grad()  # as generation runs the engines (the CUDA graph is captured outside inference mode)
def run_decode_engines(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    ks: list[int],
    engines: list[str],
    steps: int,
    repeats: int,
) -> list[DecodeEngineTimes]:
    """The baseline and VTW at each K: ms per decode step of `steps` steps on each engine, `repeats` runs each."""
    if steps < 1:
        raise InputError(f"the decode timing needs at least one decode step, got {steps}")
    num_layers = model.config.get_text_config().num_hidden_layers
    prompt = embed_prompt(model, inputs)
    results = []
    for k in [None, *ks]:
        logits, state = prefill(model, prompt, withdrawal_selector(k, num_layers))
        first = logits.argmax(-1)
        runs = [partial(_decode_run, model, state, first, engine, steps) for engine in engines]
        seconds = time_interleaved(model.device, runs, repeats)
        label = "baseline" if k is None else f"VTW K={k}"
        ms = {
            engine: [value / steps * 1e3 for value in values] for engine, values in zip(engines, seconds, strict=True)
        }
        results.append(DecodeEngineTimes(label, k, prompt.inputs_embeds.shape[1], steps + 2, ms))
    return results


def format_decode_engines(results: list[DecodeEngineTimes], shape: str) -> str:
    """A Markdown table: a row per setting, ms per step per engine, then each engine over the first, paired."""
    engines = list(results[0].ms_per_step)
    reference = engines[0]
    columns = [f"{engine} ms/step" for engine in engines] + [f"{engine} / {reference}" for engine in engines[1:]]
    lines = [
        "| shape | prompt tokens | max new tokens | setting | " + " | ".join(columns) + " |",
        "|" + "---|" * (4 + len(columns)),
    ]
    for result in results:
        times = result.ms_per_step
        cells = [shape, str(result.prompt_tokens), str(result.max_new_tokens), result.label]
        cells += [median_spread(times[engine], 1, 2) for engine in engines]
        for engine in engines[1:]:
            ratios = [mine / base for mine, base in zip(times[engine], times[reference], strict=True)]
            cells.append(median_spread(ratios, 1, 2))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
