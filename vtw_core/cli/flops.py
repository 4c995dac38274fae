"""`flops`: the analytic FLOPs of the baseline and of VTW at K, from a model's config alone (no weights)."""

from __future__ import annotations

import argparse
from typing import Any

from vtw_core.analysis.units import format_flops
from vtw_core.cli.args import add_json_option, print_json
from vtw_core.errors import VTWError
from vtw_core.models.defaults import require_model


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("flops", help="analytic FLOPs of baseline vs VTW from the config alone")
    parser.add_argument("--model", help="hub id, folder with config.json, or a shipped config name")
    parser.add_argument("--vision-tokens", type=int, required=True)
    parser.add_argument("--text-tokens", type=int, required=True)
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--new-tokens", type=int, default=0)
    add_json_option(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> None:
    from transformers import AutoConfig

    from vtw_core.engine.flops import request_flops
    from vtw_core.generation.manager import resolve_source

    source = require_model(args.model)
    try:
        config = AutoConfig.from_pretrained(resolve_source(source))
    except (OSError, ValueError) as error:
        raise VTWError(f"cannot load a model config from {source!r}: {error}") from error
    result = request_flops(config, args.vision_tokens, args.text_tokens, args.k, args.new_tokens)
    if args.json:
        print_json(result)
        return
    print(f"{result['num_layers']} layers, {args.vision_tokens} vision + {args.text_tokens} text tokens, K={args.k}")
    for side in ("baseline", "vtw"):
        figures = result[side]
        print(
            f"  {side:8s} prefill {format_flops(figures['prefill_flops'])}, "
            f"decode {format_flops(figures['decode_flops'])}, total {format_flops(figures['total_flops'])}"
        )
    print(f"  VTW / baseline: prefill {result['prefill_ratio']:.3f}, total {result['total_ratio']:.3f}")
