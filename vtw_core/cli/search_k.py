"""`search-k`: choose K with the paper's KL criterion (Algorithm 1) on calibration samples."""

from __future__ import annotations

import argparse
from typing import Any

from vtw_core.analysis.units import format_kl
from vtw_core.cli.args import (
    add_json_option,
    add_kl_over_option,
    add_model_options,
    calibration_samples,
    eta_from_args,
    load_model,
    print_json,
    progress_bar,
    require_processor,
    save_plot,
)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("search-k", help="choose K with the paper's KL criterion (Algorithm 1)")
    add_model_options(parser)
    parser.add_argument("--data", default="default",
                        help="JSONL of {image, question}, 'default' (bundled) or 'easy-vqa' (train split)")  # fmt: skip
    parser.add_argument("--eta", type=float, help="KL threshold (default: the model's, from the official evaluation)")
    parser.add_argument("--start", type=int, default=5, help="first K to try (default 5)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N samples")
    parser.add_argument("--naive", action="store_true", help="one full VTW pass per K (slow; for checking)")
    add_kl_over_option(parser, help="KL at the last prompt position (the paper) or over the baseline's reply")
    parser.add_argument("--plot", help="save the KL-vs-K curve to this PNG")
    add_json_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from vtw_core.analysis.k_search import search_k

    samples = calibration_samples(args.data, args.limit)
    manager = load_model(args)
    require_processor(manager, "the K search")
    eta, eta_source = eta_from_args(args, manager)
    with progress_bar(len(samples), "K search", "sample", quiet=args.json) as progress, manager.lock:
        result = search_k(
            manager.model,
            manager.processor,
            samples,
            eta=eta,
            start=args.start,
            progress=progress,
            naive=args.naive,
            over=args.kl_over,
        )
    payload = result.to_dict()
    save_plot(args.plot, "kl_curve_figure", payload)
    if args.json:
        print_json({"k": payload["k"], "eta": eta, "eta_source": eta_source, "curve": payload["curve"]})
        return
    print(f"{manager.info.describe()}, {len(samples)} calibration samples, eta {eta:g} ({eta_source})")
    for point in payload["curve"]:
        mark = "  <- K" if point["k"] == payload["k"] else ""
        print(f"  K={point['k']:3d}  KL={format_kl(point['kl'])}{mark}")
    print(f"K = {payload['k']}" if payload["k"] is not None else f"no K from {args.start} meets eta = {eta:g}")
