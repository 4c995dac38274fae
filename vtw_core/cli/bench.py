"""`bench`: latency, FLOPs and memory of the baseline, VTW at several K and other methods, timed interleaved; and on
request the same prompt's stages, decoder layer calls, decode steps per engine and K search cost."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from vtw_core.cli.args import add_json_option, add_model_options, load_model, parse_methods, print_json
from vtw_core.errors import VTWError
from vtw_core.models.defaults import default_model


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser("bench", help="latency, FLOPs and memory of baseline vs VTW at several K")
    add_model_options(parser)
    parser.add_argument("--random-weights", action="store_true", help="build the architecture from its config only")
    parser.add_argument(
        "--k", type=int, nargs="*", default=None,
        help="one or more K to compare with the baseline (default: the model's searched K from vtw.json, else N/2)",
    )  # fmt: skip
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[64], help="one or more, e.g. 64 256")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per setting, interleaved across settings")
    parser.add_argument(
        "--image",
        help="a real image (needs a processor); default: the first easy-vqa test question on the embedded default "
        "model, else a synthetic prompt",
    )
    parser.add_argument("--prompt", default=None, help="with --image (default: 'Describe the image in detail.')")
    parser.add_argument(
        "--synthetic-image-size", type=int, nargs=2, metavar=("H", "W"),
        help="synthetic prompt for an image of this size (LLaVA-NeXT 672 672: the paper's 2880 vision tokens)",
    )  # fmt: skip
    parser.add_argument("--text-tokens", type=int, default=62, help="text tokens of the synthetic prompt")
    parser.add_argument(
        "--video-frames", type=int, help="synthetic prompt for a video of this many frames (Video-LLaVA-7B, 8: 2056)"
    )
    parser.add_argument(
        "--engine", nargs="+", default=["auto"], choices=["auto", "plain", "static", "compiled", "tuned", "graph"],
        help="decode engines to compare (auto: CUDA graph on CUDA, static on CPU, compiled or tuned with the prefill "
             "engine of that name)",
    )  # fmt: skip
    parser.add_argument(
        "--prefill-engine", nargs="+", default=["plain"], choices=["plain", "bucketed", "graph", "compiled", "tuned"],
        help="prefill engines to compare (bucketed: fixed shapes; graph: those captured as CUDA graphs; compiled: "
             "torch.compile; tuned: compiled, with matmul templates on frozen weights, CPU)",
    )  # fmt: skip
    parser.add_argument("--bandwidth-gb-s", type=float, help="device memory bandwidth, for the decode floor column")
    parser.add_argument("--method", action="append", default=[], help="also bench fastv:K:R or schedule:FILE")
    parser.add_argument(
        "--stages", action="store_true",
        help="then time the first K's path to the first token stage by stage (vision, layers before K, after K)",
    )  # fmt: skip
    parser.add_argument(
        "--layers",
        action="store_true",
        help="then time one decoder layer on the prompt, on its text tokens alone and on one token (the fixed cost "
        "of a layer call, which no saving in FLOPs removes)",
    )
    parser.add_argument(
        "--decode-engines",
        action="store_true",
        help="then time decode steps alone (no sampling or bookkeeping) on each --engine, default plain and static "
        "(and graph on CUDA), paired per repeat; --new-tokens steps per run",
    )
    parser.add_argument(
        "--search-cost",
        action="store_true",
        help="then time the K search (search-k, and search-k --naive) on the prompt, in baseline passes",
    )
    add_json_option(parser)
    parser.set_defaults(handler=run)


def _inputs(args: argparse.Namespace, manager: Any) -> dict | None:
    """The prompt --video-frames, --synthetic-image-size or --image ask for (the embedded default model: an easy-vqa
    test question); None: run_bench's synthetic one-image prompt."""
    from vtw_core.models.images import load_image
    from vtw_core.models.prompts import build_model_inputs, user_message

    if args.video_frames:
        from vtw_core.benchmarks.bench import synthetic_video_inputs

        return synthetic_video_inputs(manager.model, frames=args.video_frames, text_tokens=args.text_tokens)
    if args.synthetic_image_size:
        from vtw_core.benchmarks.bench import synthetic_inputs

        height, width = args.synthetic_image_size
        return synthetic_inputs(manager.model, text_tokens=args.text_tokens, image_size=(height, width))
    if args.image or (manager.info.source == default_model() and manager.processor is not None):
        if manager.processor is None:
            raise VTWError("--image needs a model with a processor (not --random-weights)")
        image_path, prompt = args.image, args.prompt or "Describe the image in detail."
        if not image_path:  # the embedded model knows easy-vqa only: time a question of the kind it answers
            from vtw_core.training.easyvqa import load_split

            first = load_split("test")[0]
            image_path, prompt = first.image, args.prompt or first.question
            print(f"input: easy-vqa test image {Path(first.image).name}, {prompt!r}")
        image = load_image(image_path)
        messages = [user_message(prompt, num_images=1)]
        model = manager.model
        return build_model_inputs(manager.processor, [messages], [[image]], model.device, model.dtype)
    return None


def run(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    import torch

    from vtw_core.benchmarks.bench import PAPER_PEAK_MEMORY_RATIO, format_table, run_bench, weight_bytes

    manager = load_model(args, random_weights=args.random_weights)
    inputs = _inputs(args, manager)
    methods = parse_methods(args.method, manager.info.num_layers)
    ks = args.k
    if ks is None:
        searched = manager.info.searched_k
        ks = [searched if searched is not None else manager.info.num_layers // 2]
    rows = run_bench(manager, ks, new_tokens=args.new_tokens, repeats=args.repeats, inputs=inputs,
                     engines=tuple(args.engine), methods=methods,
                     prefill_engines=tuple(args.prefill_engine))  # fmt: skip
    print(manager.info.describe())
    counts = ", ".join(str(count) for count in args.new_tokens)
    print(
        f"{rows[0].prompt_tokens} prompt tokens ({rows[0].vision_tokens} vision), {counts} new tokens, "
        f"{torch.get_num_threads()} CPU thread(s); median [min-max] of {args.repeats} interleaved runs after a warm-up"
    )
    print(format_table(rows, args.bandwidth_gb_s, weight_bytes(manager.model)))
    payload = {
        "model": manager.info.describe(),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "bandwidth_gb_s": args.bandwidth_gb_s,
        "weight_bytes": weight_bytes(manager.model),
        "paper_peak_memory_ratio": PAPER_PEAK_MEMORY_RATIO,
        "rows": [asdict(row) for row in rows],
        "stages": None,
    }
    if args.stages or args.layers or args.decode_engines or args.search_cost:
        from vtw_core.benchmarks.bench import synthetic_inputs

        payload.update(_sections(args, manager.model, inputs or synthetic_inputs(manager.model), ks))
    if args.json:
        print_json(payload)


def _sections(args: argparse.Namespace, model: Any, inputs: dict, ks: list[int]) -> dict[str, Any]:
    """The sections asked for after the main table, each printed; their JSON keys."""
    from dataclasses import asdict

    payload: dict[str, Any] = {}
    repeats = f"median [min-max] of {args.repeats} interleaved runs after a warm-up"
    if args.stages:
        from vtw_core.benchmarks.stages import format_stages, run_stages

        stages = run_stages(model, inputs, ks[0], args.repeats)
        print(f"\nStage by stage at K = {ks[0]}: {repeats}")
        print(format_stages(*stages))
        payload["stages"] = [asdict(times) for times in stages]
    text = model.config.get_text_config()
    shape = f"{text.hidden_size} wide, {text.num_hidden_layers} layers"
    if args.layers:
        from vtw_core.benchmarks.layer_calls import format_layer_calls, run_layer_calls

        calls = run_layer_calls(model, inputs, args.repeats)
        print(f"\nOne decoder layer (layer 0; {shape}) per call: {repeats}")
        print(format_layer_calls(calls))
        payload["layers"] = [asdict(call) for call in calls]
    if args.decode_engines:
        from vtw_core.benchmarks.decode_engines import decode_engines, format_decode_engines, run_decode_engines

        engines = decode_engines(model, args.engine)
        payload["decode_engines"] = []
        for steps in args.new_tokens:
            results = run_decode_engines(model, inputs, ks, engines, steps, args.repeats)
            print(f"\nDecode steps alone, {steps} per run: ms per step and paired ratios, {repeats}")
            print(format_decode_engines(results, shape))
            payload["decode_engines"] += [asdict(result) for result in results]
    if args.search_cost:
        from vtw_core.benchmarks.search_cost import format_search_cost, run_search_cost

        cost = run_search_cost(model, inputs, args.repeats)
        span = f"K in {cost.ks[0]}..{cost.ks[-1]}" if cost.ks else "no K"
        print(f"\nK search cost on the {cost.prompt_tokens}-token prompt ({span}, {len(cost.ks)} branches): {repeats}")
        print(format_search_cost(cost))
        payload["search_cost"] = asdict(cost)
    return payload
