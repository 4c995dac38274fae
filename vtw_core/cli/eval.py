"""`eval`: VQA accuracy, time and prefill FLOPs of the baseline, of VTW at K (or the searched K) and of methods."""

from __future__ import annotations

import argparse
from typing import Any

from vtw_core.analysis.units import format_flops
from vtw_core.cli.args import (
    add_json_option,
    add_kl_over_option,
    add_model_options,
    eta_from_args,
    load_model,
    parse_methods,
    print_json,
    progress_bar,
    require_processor,
    save_plot,
)
from vtw_core.errors import VTWError


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("eval", help="VQA accuracy, time and FLOPs of the baseline and of VTW")
    add_model_options(parser)
    parser.add_argument("--data", default="easy-vqa", help="easy-vqa, or a JSONL of {image, question, answer}")
    parser.add_argument("--split", default="test", choices=["train", "test"], help="easy-vqa split")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--k", default=None, help="K, or 'auto' (K search on 20 train-split samples)")
    parser.add_argument("--eta", type=float, help="KL threshold for --k auto (default: the model's)")
    add_kl_over_option(parser, help="--k auto: KL at the last prompt position (the paper) or over the baseline's reply")
    parser.add_argument("--all-k", action="store_true", help="also the accuracy at every K from 0 to N-1")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--no-shared-prefill", dest="shared_prefill", action="store_false",
        help="run every question's prefill in full (default: the questions about one image share its prefix)",
    )  # fmt: skip
    parser.add_argument(
        "--method", action="append", default=[],
        help="also evaluate a method (repeatable): vtw:K, vtw:auto, fastv:K:R, schedule:FILE",
    )  # fmt: skip
    parser.add_argument("--plot", help="save accuracy against prefill TFLOPs (a point per setting) to this PNG")
    parser.add_argument("--plot-k", help="with --all-k: save accuracy (and KL, with --k auto) against K to this PNG")
    add_json_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from vtw_core.benchmarks.evaluate import auto_k, evaluate_side, load_items

    if args.plot_k and not args.all_k:
        raise VTWError("--plot-k needs --all-k")
    items = load_items(args.data, args.split, args.limit)
    manager = load_model(args)
    require_processor(manager, "evaluation")
    model, processor = manager.model, manager.processor
    num_layers = manager.info.num_layers
    report: dict = {"num_layers": num_layers, "data": args.data, "split": args.split, "questions": len(items)}

    def side(label: str, k: int | None, schedule=None):
        """One setting over every question, with a progress bar (none under --json)."""
        with progress_bar(len(items), label, "q", quiet=args.json, leave=False) as progress:
            return evaluate_side(model, processor, items, k, schedule=schedule, batch_size=args.batch_size,
                                 share_image_prefill=args.shared_prefill, progress=progress)  # fmt: skip

    def vtw_side(side_k: int | None):
        return side("baseline" if side_k is None else f"VTW K={side_k}", side_k)

    with manager.lock:
        k = args.k
        if k == "auto":
            eta, report["eta_source"] = eta_from_args(args, manager)
            search = auto_k(model, processor, eta=eta, over=args.kl_over)
            report["kl_curve"] = search.to_dict()["curve"]
            report["eta"] = eta
            if search.k is None:
                raise VTWError(f"no K meets eta = {eta:g} on the train calibration samples")
            k = search.k
        elif k is not None:
            k = int(k)
        report["baseline"] = vtw_side(None).to_dict()
        if k is not None:
            report["vtw"] = vtw_side(k).to_dict()
        if args.all_k:
            report["accuracy_per_k"] = [{"k": i, **vtw_side(i).to_dict()} for i in range(num_layers)]
        if args.method:
            methods = parse_methods(args.method, num_layers, auto_k=k if isinstance(k, int) else None)
            report["methods"] = [
                {"spec": spec, "label": method.label, **side(method.label, method.k, method.schedule).to_dict()}
                for spec, method in zip(args.method, methods, strict=True)
            ]
    save_plot(args.plot, "tradeoff_figure", report)
    if args.plot_k:
        save_plot(args.plot_k, "k_curve_figure", report)
    if args.json:
        print_json(report)
        return
    print(f"{manager.info.describe()}; {args.data} {args.split}: {len(items)} questions")
    rows = [("baseline", report["baseline"])] + ([(f"VTW K={k}", report["vtw"])] if "vtw" in report else [])
    rows += [(f"VTW K={row['k']}", row) for row in report.get("accuracy_per_k", [])]
    rows += [(row["label"], row) for row in report.get("methods", [])]
    print("| setting | accuracy | time s | prefill FLOPs/question | FLOPs ratio |")
    print("|---|---|---|---|---|")
    for label, row in rows:
        ratio = row["prefill_flops"] / report["baseline"]["prefill_flops"]
        print(f"| {label} | {row['accuracy']:.4f} | {row['time_s']:.1f} | {format_flops(row['prefill_flops'])} "
              f"| {ratio:.3f} |")  # fmt: skip
