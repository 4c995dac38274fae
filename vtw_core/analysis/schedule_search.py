"""Searching per-layer vision-token schedules (arXiv 2412.00556, "Accelerating Multimodal LLMs by Searching
Optimal Vision Token Reduction"), rebuilt from the paper's description; no public code exists.

- G-Search (scenario I, no budget): from shallow to deep, give each layer the smallest keep share (never above
  the previous layer's) whose score stays within `tolerance` of the baseline's; deeper layers inherit it
  while the layer is being decided. Our choices where the paper is silent: candidate shares on a fixed grid
  (default steps of 0.1); a binary search over that grid per layer, which assumes the score does not get
  better as a layer keeps fewer tokens; layer 0 always keeps every token (nothing to rank by before it).
- P-Sigmoid (scenario II, a FLOPs budget): keep(l) = floor + (1 - floor) * sigmoid(-steepness * (l - midpoint))
  for l >= 1, keep(0) = 1; (steepness, midpoint, floor) maximise the score subject to prefill FLOPs <= budget
  x baseline. Tuned with Optuna's TPE sampler (a well-kept Bayesian optimisation library: sequential
  model-based search over a mixed box, seeded, no GPU or compiled extension needed); infeasible trials are
  scored below any feasible one.

A score is a function schedule -> float, higher is better: accuracy on a labelled set, or minus the mean
KL(P_schedule || P_baseline) at the last prompt position on unlabelled samples (`kl_score`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from vtw_core.analysis.k_search import CalibrationSample, greedy_reply, kl_divergence, reply_kl
from vtw_core.engine import flops
from vtw_core.engine.decoder import prefill
from vtw_core.engine.embed import PromptEmbeddings, embed_prompt
from vtw_core.engine.schedules import Schedule, ScheduleSelector
from vtw_core.errors import InputError
from vtw_core.models.prompts import build_model_inputs, user_message

Score = Callable[[Schedule], float]
DEFAULT_GRID = tuple(round(i / 10, 1) for i in range(11))  # 0.0, 0.1, ..., 1.0


def kl_score(
    model: nn.Module, processor: Any, samples: Sequence[CalibrationSample], num_layers: int, over: str = "prompt"
) -> Score:
    """-mean KL(P_schedule || P_baseline) at the last prompt position, or over the baseline's greedy reply
    (over="reply", as `search_k`); prompts are embedded once."""
    prompts: list[PromptEmbeddings] = []
    baselines: list[torch.Tensor] = []
    for sample in samples:
        messages = [user_message(sample.question, num_images=len(sample.images))]
        inputs = build_model_inputs(processor, [messages], [sample.images], model.device, model.dtype)
        prompt = embed_prompt(model, inputs)
        prompts.append(prompt)
        baselines.append(greedy_reply(model, processor, inputs) if over == "reply" else prefill(model, prompt)[0])

    def score(schedule: Schedule) -> float:
        total = 0.0
        for prompt, baseline in zip(prompts, baselines, strict=True):
            if over == "reply":
                total += float(
                    reply_kl(model, prompt, baseline, [lambda: ScheduleSelector(model, schedule, num_layers)])
                )
                continue
            logits, _ = prefill(model, prompt, ScheduleSelector(model, schedule, num_layers))
            total += float(kl_divergence(logits, baseline).mean())
        return -total / len(prompts)

    return score


def g_search(
    score: Score,
    num_layers: int,
    *,
    tolerance: float,
    grid: Sequence[float] = DEFAULT_GRID,
    ranking: str = "text",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[Schedule, list[dict[str, Any]]]:
    """The greedy layer-by-layer search; returns the schedule and a log of every evaluation."""
    grid = sorted(set(grid) | {0.0, 1.0})
    keep = [1.0] * num_layers
    baseline = score(Schedule(tuple(keep), ranking, "baseline"))
    floor = baseline - tolerance
    log: list[dict[str, Any]] = [{"layer": None, "keep": 1.0, "score": baseline}]
    for layer in range(1, num_layers):
        candidates = [share for share in grid if share <= keep[layer - 1]]
        low, high = 0, len(candidates) - 1  # candidates[high] (the previous share) is known to pass
        while low < high:
            middle = (low + high) // 2
            trial = keep[:layer] + [candidates[middle]] * (num_layers - layer)
            value = score(Schedule(tuple(trial), ranking))
            log.append({"layer": layer, "keep": candidates[middle], "score": value})
            if value >= floor:
                high = middle
            else:
                low = middle + 1
        keep[layer:] = [candidates[high]] * (num_layers - layer)
        if progress is not None:
            progress(layer, num_layers - 1)
    return Schedule(tuple(keep), ranking, f"gsearch-tol{tolerance:g}"), log


def sigmoid_schedule(num_layers: int, steepness: float, midpoint: float, floor: float, ranking: str = "text"):
    keep = [1.0] + [
        floor + (1 - floor) / (1 + math.exp(min(60.0, steepness * (layer - midpoint))))
        for layer in range(1, num_layers)
    ]
    # Rounding noise must not make a share grow with depth.
    for layer in range(1, num_layers):
        keep[layer] = min(keep[layer], keep[layer - 1])
    return Schedule(tuple(keep), ranking, f"psigmoid-s{steepness:.2f}-m{midpoint:.1f}-f{floor:.2f}")


def schedule_prefill_flops(config: Any, schedule: Schedule, vision_tokens: int, text_tokens: int) -> int:
    dims = flops.DecoderDims.from_config(config)
    return flops.prefill_flops(dims, [text_tokens + kept for kept in schedule.kept_counts(vision_tokens)])


def p_sigmoid(
    score: Score,
    config: Any,
    num_layers: int,
    *,
    budget: float,
    vision_tokens: int,
    text_tokens: int,
    trials: int = 30,
    seed: int = 0,
    ranking: str = "text",
) -> tuple[Schedule, list[dict[str, Any]]]:
    """Tune the sigmoid's parameters under a prefill-FLOPs budget (a share of the baseline's)."""
    import optuna

    if not 0 < budget <= 1:
        raise InputError(f"the FLOPs budget is a share of the baseline's, in (0, 1]; got {budget}")
    baseline_flops = schedule_prefill_flops(config, Schedule((1.0,) * num_layers), vision_tokens, text_tokens)
    log: list[dict[str, Any]] = []

    def objective(trial: optuna.Trial) -> float:
        schedule = sigmoid_schedule(
            num_layers,
            trial.suggest_float("steepness", 0.1, 10.0, log=True),
            trial.suggest_float("midpoint", 0.0, float(num_layers)),
            trial.suggest_float("floor", 0.0, 0.5),
            ranking,
        )
        ratio = schedule_prefill_flops(config, schedule, vision_tokens, text_tokens) / baseline_flops
        value = score(schedule) if ratio <= budget else -1e9 - ratio  # infeasible: worse than any feasible
        log.append({"keep": list(schedule.keep), "flops_ratio": ratio, "score": value, **trial.params})
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.optimize(objective, n_trials=trials)
    if study.best_value <= -1e9:
        raise InputError(f"no sigmoid schedule met the FLOPs budget {budget:g} in {trials} trials")
    best = study.best_params
    schedule = sigmoid_schedule(num_layers, best["steepness"], best["midpoint"], best["floor"], ranking)
    return Schedule(schedule.keep, ranking, f"psigmoid-budget{budget:g}"), log
