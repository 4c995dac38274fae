"""`schedule-search`: a per-layer vision-token schedule by G-Search or P-Sigmoid, for `--method schedule:FILE`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vtw_core.cli.args import (
    add_json_option,
    add_kl_over_option,
    add_model_options,
    calibration_samples,
    load_model,
    print_json,
    require_processor,
)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("schedule-search", help="G-Search or P-Sigmoid per-layer vision-token schedules")
    add_model_options(parser)
    parser.add_argument("--algorithm", choices=["gsearch", "psigmoid"], default="gsearch")
    parser.add_argument("--data", default="default", help="calibration JSONL, 'default', or 'easy-vqa' (train)")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--tolerance", type=float, default=0.003, help="G-Search: allowed mean-KL increase")
    parser.add_argument("--budget", type=float, default=0.5, help="P-Sigmoid: prefill FLOPs / baseline")
    parser.add_argument("--trials", type=int, default=30, help="P-Sigmoid: optimisation trials")
    parser.add_argument("--text-tokens", type=int, default=62, help="P-Sigmoid: text tokens for the FLOPs")
    add_kl_over_option(parser, help="score by KL at the last prompt position or over the baseline's reply")
    parser.add_argument("--out", help="write the schedule as JSON (for --method schedule:FILE)")
    add_json_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from vtw_core.analysis.schedule_search import g_search, kl_score, p_sigmoid

    manager = load_model(args)
    require_processor(manager, "the schedule search")
    model, num_layers = manager.model, manager.info.num_layers
    samples = calibration_samples(args.data, args.samples)
    with manager.lock:
        score = kl_score(model, manager.processor, samples, num_layers, over=args.kl_over)
        if args.algorithm == "gsearch":
            schedule, log = g_search(score, num_layers, tolerance=args.tolerance)
        else:
            vision = int(getattr(model.config, "image_seq_length", 0) or 576)
            schedule, log = p_sigmoid(score, model.config, num_layers, budget=args.budget, vision_tokens=vision,
                                      text_tokens=args.text_tokens, trials=args.trials)  # fmt: skip
    if args.out:
        Path(args.out).write_text(schedule.to_json() + "\n", encoding="utf-8")
    if args.json:
        print_json({"schedule": list(schedule.keep), "name": schedule.name, "evaluations": len(log)})
        return
    print(f"{schedule.name}: keep shares per layer {[round(x, 3) for x in schedule.keep]} ({len(log)} evaluations)")
