"""`attention`: the per-layer attention shares of the last prompt token over the prompt's segments (Fig. 4/5)."""

from __future__ import annotations

import argparse
from typing import Any

from vtw_core.cli.args import (
    add_image_option,
    add_json_option,
    add_model_options,
    load_images,
    load_model,
    print_json,
    require_processor,
    save_plot,
)


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("attention", help="per-layer attention shares of the last token (Fig. 4/5)")
    add_model_options(parser)
    add_image_option(parser)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--k", type=int, default=None, help="analyse VTW at K (default: the baseline)")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--plot", help="save the stacked per-layer shares to this PNG")
    add_json_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from vtw_core.analysis.attention import analyze_attention
    from vtw_core.models.prompts import user_message

    images = load_images(args.image)
    messages = [user_message(args.prompt, num_images=len(images))]
    manager = load_model(args)
    require_processor(manager, "the attention analysis")
    with manager.lock:
        report = analyze_attention(
            manager.model, manager.processor, messages, images, k=args.k, max_new_tokens=args.max_new_tokens
        ).to_dict()
    save_plot(args.plot, "attention_figure", report)
    if args.json:
        print_json(report)
        return
    print(f"{manager.info.describe()}; prompt tokens per segment: {report['segment_tokens']}")
    print("layer  " + "  ".join(f"{name:>11s}" for name in report["segments"]) + "   (last prompt token)")
    for layer, shares in enumerate(report["prompt"]):
        print(f"{layer:5d}  " + "  ".join(f"{shares[name]:11.3f}" for name in report["segments"]))
