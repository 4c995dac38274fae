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
    parser.add_argument(
        "--turns", type=int, default=1,
        help="ask each image's questions as chats of this many turns, the model's own replies in the history, "
        "and report the accuracy per turn (default 1: every question alone)",
    )  # fmt: skip
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
    from vtw_core.benchmarks.evaluate import auto_k, conversations_of, evaluate_side, evaluate_turns, load_items

    if args.plot_k and not args.all_k:
        raise VTWError("--plot-k needs --all-k")
    if args.turns != 1 and (args.method or args.plot or args.plot_k):
        raise VTWError("--turns takes neither --method, --plot nor --plot-k")
    items = load_items(args.data, args.split, args.limit)
    conversations = conversations_of(items, args.turns) if args.turns != 1 else []
    if args.turns != 1 and not conversations:
        raise VTWError(f"no image has {args.turns} questions in the evaluated set")
    manager = load_model(args)
    require_processor(manager, "evaluation")
    model, processor = manager.model, manager.processor
    num_layers = manager.info.num_layers
    report: dict = {"num_layers": num_layers, "data": args.data, "split": args.split, "questions": len(items)}
    if args.turns != 1:
        report["turns"] = args.turns
        report["conversations"] = len(conversations)

    def side(label: str, k: int | None, schedule=None):
        """One setting over every question, with a progress bar (none under --json)."""
        with progress_bar(len(items), label, "q", quiet=args.json, leave=False) as progress:
            return evaluate_side(model, processor, items, k, schedule=schedule, batch_size=args.batch_size,
                                 share_image_prefill=args.shared_prefill, progress=progress)  # fmt: skip

    def chats(label: str, k: int | None) -> list[dict]:
        """Every conversation at one K, turn by turn: one result per turn."""
        with progress_bar(len(conversations), label, "chat", quiet=args.json, leave=False) as progress:
            results = evaluate_turns(model, processor, conversations, k, batch_size=args.batch_size,
                                     share_image_prefill=args.shared_prefill, progress=progress)  # fmt: skip
        return [{"turn": turn, **result.to_dict()} for turn, result in enumerate(results, start=1)]

    def vtw_side(side_k: int | None):
        label = "baseline" if side_k is None else f"VTW K={side_k}"
        return side(label, side_k).to_dict() if args.turns == 1 else chats(label, side_k)

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
        report["baseline"] = vtw_side(None)
        if k is not None:
            report["vtw"] = vtw_side(k)
        if args.all_k:
            report["accuracy_per_k"] = [
                {"k": i, **vtw_side(i)} if args.turns == 1 else {"k": i, "turns": vtw_side(i)}
                for i in range(num_layers)
            ]
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
    if args.turns != 1:
        _print_turns(report)
        return
    rows = [("baseline", report["baseline"])] + ([(f"VTW K={k}", report["vtw"])] if "vtw" in report else [])
    rows += [(f"VTW K={row['k']}", row) for row in report.get("accuracy_per_k", [])]
    rows += [(row["label"], row) for row in report.get("methods", [])]
    print("| setting | accuracy | time s | prefill FLOPs/question | FLOPs ratio |")
    print("|---|---|---|---|---|")
    for label, row in rows:
        ratio = row["prefill_flops"] / report["baseline"]["prefill_flops"]
        print(f"| {label} | {row['accuracy']:.4f} | {row['time_s']:.1f} | {format_flops(row['prefill_flops'])} "
              f"| {ratio:.3f} |")  # fmt: skip


def _print_turns(report: dict) -> None:
    print(f"{report['conversations']} conversations of {report['turns']} turns, the model's own replies in the history")
    rows = [("baseline", report["baseline"])]
    rows += [(report["vtw"][0]["method"], report["vtw"])] if "vtw" in report else []
    rows += [(f"VTW K={row['k']}", row["turns"]) for row in report.get("accuracy_per_k", [])]
    print("| setting | turn | accuracy | correct | time s | prefill FLOPs/question | FLOPs ratio |")
    print("|---|---|---|---|---|---|---|")
    for label, turns in rows:
        for row, base in zip(turns, report["baseline"], strict=True):
            ratio = row["prefill_flops"] / base["prefill_flops"]
            print(f"| {label} | {row['turn']} | {row['accuracy']:.4f} | {row['correct']}/{row['questions']} "
                  f"| {row['time_s']:.1f} | {format_flops(row['prefill_flops'])} | {ratio:.3f} |")  # fmt: skip
