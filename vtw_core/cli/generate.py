"""`generate`: answer a question about images (and videos), streaming the text; stats on stderr."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vtw_core.analysis.units import format_bytes, format_flops, format_per_frame
from vtw_core.cli.args import (
    add_image_option,
    add_json_option,
    add_model_options,
    add_sampling_options,
    add_video_options,
    load_images,
    load_model,
    load_videos,
    parse_methods,
    print_json,
    sampling_config,
)
from vtw_core.errors import VTWError


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("generate", help="answer a question about images, streaming the text")
    add_model_options(parser)
    add_image_option(parser)
    add_video_options(parser)
    parser.add_argument("--prompt", required=True, help="the question")
    parser.add_argument("--k", type=int, default=None, help="withdraw vision tokens after K layers (none: baseline)")
    parser.add_argument("--method", help="instead of --k: baseline, vtw:K, fastv:K:R or schedule:FILE")
    parser.add_argument("--position-mode", choices=["original", "rearrange"], default="original")
    add_sampling_options(parser)
    add_json_option(parser, help="print one JSON object as the last line")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from vtw_core.models.prompts import user_message

    images = load_images(args.image)
    videos = load_videos(args.video, args.frames)
    messages = [user_message(args.prompt, num_images=len(images), num_videos=len(videos))]
    sampling = sampling_config(args)
    manager = load_model(args)
    k, schedule = args.k, None
    if args.method:
        if args.k is not None:
            raise VTWError("pass --k (VTW) or --method, not both")
        (method,) = parse_methods([args.method], manager.info.num_layers)
        k, schedule = method.k, method.schedule
    last = None
    options = {"k": k, "schedule": schedule, "position_mode": args.position_mode, "sampling": sampling}
    for event in manager.stream(messages, images, videos=videos, **options):
        if not args.json:
            print(event.text_delta, end="", flush=True)
        last = event
    assert last is not None
    if args.json:
        print_json({"text": last.text, "token_ids": last.token_ids, "stats": last.stats.to_dict()})
        return
    print()
    stats = last.stats
    side = args.method or ("baseline" if args.k is None else f"VTW K={args.k}")
    print(
        f"[{side}] ttft {stats.ttft_s:.3f}s, total {stats.total_s:.3f}s, "
        f"{stats.new_tokens} new tokens, prefill {format_flops(stats.prefill_flops)}, "
        f"KV cache {format_bytes(stats.kv_cache_bytes)}",
        file=sys.stderr,
    )
    if stats.video_frames:
        print(
            f"[{side}] {stats.video_frames} video frames, "
            f"{format_per_frame(stats.vision_tokens_per_frame)} vision tokens per frame",
            file=sys.stderr,
        )
