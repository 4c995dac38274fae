"""What the K search costs on one prompt, in baseline passes, as a table (`bench --search-cost`).

Three runs, interleaved after a warm-up of each: a baseline pass (`prefill` as generation runs it, keys and values
stored), the K search as `search-k` runs it (`kl_per_k`: one baseline pass that branches off a VTW pass at every
candidate K, nothing cached), and the naive search of `search-k --naive` (a full VTW prefill per K plus the
baseline's). Each cell: the run's time over the baseline pass's time in the same cycle, median [min-max].
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from vtw_core.analysis.k_search import DEFAULT_START, candidate_ks, kl_per_k, kl_per_k_naive
from vtw_core.benchmarks.bench import median_spread, no_setup, time_interleaved
from vtw_core.engine.decoder import prefill
from vtw_core.engine.embed import embed_prompt

VARIANTS = ("baseline pass", "K search", "naive K search")


@dataclass
class SearchCost:
    """Seconds of each variant over the timed runs, on one prompt, for the K search over `ks`."""

    ks: list[int]
    prompt_tokens: int
    seconds: dict[str, list[float]]


@torch.inference_mode()
def run_search_cost(
    model: nn.Module, inputs: dict[str, torch.Tensor], repeats: int, start: int = DEFAULT_START
) -> SearchCost:
    """A baseline pass, the K search from K = `start` and the naive search, `repeats` interleaved runs each."""
    num_layers = model.config.get_text_config().num_hidden_layers
    ks = candidate_ks(num_layers, start)
    prompt = embed_prompt(model, inputs)  # once, untimed: the same for every variant
    runs = [
        partial(prefill, model, prompt),
        partial(kl_per_k, model, prompt, ks),
        partial(kl_per_k_naive, model, prompt, ks),
    ]
    seconds = time_interleaved(model.device, [no_setup(run) for run in runs], repeats)
    return SearchCost(ks, prompt.inputs_embeds.shape[1], dict(zip(VARIANTS, seconds, strict=True)))


def format_search_cost(cost: SearchCost) -> str:
    """A Markdown table: each variant's ms on the prompt and its cost in baseline passes."""
    base = cost.seconds["baseline pass"]
    lines = ["| variant | ms per sample | baseline passes |", "|---|---|---|"]
    for name, values in cost.seconds.items():
        ratios = [value / reference for value, reference in zip(values, base, strict=True)]
        lines.append(f"| {name} | {median_spread(values, 1e3, 2)} | {median_spread(ratios, 1, 2)} |")
    return "\n".join(lines)
