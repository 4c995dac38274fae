"""Per-sample cost of an evaluation (FLOPs, time to first token) and its summary against the baseline.

The baseline's FLOPs are computed analytically for the same token counts (every layer sees every prompt
token), so one run gives both sides and their ratio; no second, unmodified run is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from vtw_core.engine import flops
from vtw_core.generation.types import GenerationStats


@dataclass
class SampleCost:
    prompt_tokens: int
    vision_tokens: int
    new_tokens: int  # generated tokens, or the scored continuation's tokens
    prefill_flops: int  # language model, under the method
    decode_flops: int
    baseline_prefill_flops: int  # the unchanged model on the same tokens
    baseline_decode_flops: int
    ttft_s: float | None  # from the batch's arrival to its first token; the rows of a batch share it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_costs(stats: GenerationStats, config: Any, new_tokens: Sequence[int]) -> list[SampleCost]:
    """One `SampleCost` per row of a batch whose `stats` the engine filled; `new_tokens` per row."""
    dims = flops.DecoderDims.from_config(config)
    costs = []
    for row, produced in enumerate(new_tokens):
        prompt_tokens = stats.prompt_tokens_per_row[row]
        unchanged = [prompt_tokens] * dims.num_layers
        costs.append(
            SampleCost(
                prompt_tokens=prompt_tokens,
                vision_tokens=stats.vision_tokens_per_row[row],
                new_tokens=produced,
                prefill_flops=stats.prefill_flops_per_row[row],
                decode_flops=stats.decode_flops_per_row[row],
                baseline_prefill_flops=flops.prefill_flops(dims, unchanged),
                # Each new token after the first one costs a decode step (the first comes from prefill).
                baseline_decode_flops=flops.decode_flops(dims, unchanged, max(produced - 1, 0)),
                ttft_s=stats.ttft_s,
            )
        )
    return costs


def summarize(costs: Sequence[SampleCost]) -> dict[str, float]:
    """Means per sample and the FLOPs ratios against the baseline (ratios of the totals, as `vtw_core eval`)."""
    if not costs:
        return {}
    count = len(costs)
    prefill = sum(cost.prefill_flops for cost in costs)
    decode = sum(cost.decode_flops for cost in costs)
    baseline_prefill = sum(cost.baseline_prefill_flops for cost in costs)
    baseline_decode = sum(cost.baseline_decode_flops for cost in costs)
    timed = [cost.ttft_s for cost in costs if cost.ttft_s is not None]
    summary = {
        "samples": count,
        "prefill_flops_mean": prefill / count,
        "decode_flops_mean": decode / count,
        "baseline_prefill_flops_mean": baseline_prefill / count,
        "baseline_decode_flops_mean": baseline_decode / count,
        "prefill_flops_ratio": prefill / baseline_prefill,
        "flops_ratio": (prefill + decode) / (baseline_prefill + baseline_decode),
    }
    if timed:  # scoring (loglikelihood) has no first token
        summary["ttft_s_mean"] = sum(timed) / len(timed)
    return summary
