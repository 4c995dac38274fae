"""`python -m vtw_core`: generate, flops, bench, search-k, attention, eval and serve from the command line.

Every command that prints a result with `--json` prints exactly one JSON object, as the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from vtw_core.analysis.units import format_bytes, format_flops, format_kl, format_per_frame
from vtw_core.errors import VTWError
from vtw_core.models.defaults import default_model, require_model


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id or local folder (default: the embedded default model)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    parser.add_argument(
        "--attention", default="auto", help="auto (flash-attn if installed on CUDA, else sdpa), sdpa, eager, ..."
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")


def _load(args: argparse.Namespace, random_weights: bool = False):
    from vtw_core.generation.manager import ModelManager

    return ModelManager.load(
        require_model(args.model),
        device=args.device,
        dtype=args.dtype,
        attention=args.attention,
        trust_remote_code=args.trust_remote_code,
        random_weights=random_weights,
    )


def _print_json(payload: dict[str, Any]) -> None:
    print(json.dumps(payload, ensure_ascii=False))


def cmd_generate(args: argparse.Namespace) -> None:
    from vtw_core.generation.generate import SamplingConfig
    from vtw_core.models.images import load_image
    from vtw_core.models.prompts import user_message

    images = [load_image(path) for path in args.image]
    if args.video:
        from vtw_core.models.videos import read_video

        videos = [read_video(path, args.frames) for path in args.video]
    else:
        videos = []
    messages = [user_message(args.prompt, num_images=len(images), num_videos=len(videos))]
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    manager = _load(args)
    last = None
    k, schedule = args.k, None
    if args.method:
        from vtw_core.engine.methods import parse_method

        if args.k is not None:
            raise VTWError("pass --k (VTW) or --method, not both")
        method = parse_method(args.method, manager.info.num_layers)
        k, schedule = method.k, method.schedule
    options = {"k": k, "schedule": schedule, "position_mode": args.position_mode, "sampling": sampling}
    for event in manager.stream(messages, images, videos=videos, **options):
        if not args.json:
            print(event.text_delta, end="", flush=True)
        last = event
    assert last is not None
    if args.json:
        _print_json({"text": last.text, "token_ids": last.token_ids, "stats": last.stats.to_dict()})
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


def cmd_flops(args: argparse.Namespace) -> None:
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
        _print_json(result)
        return
    print(f"{result['num_layers']} layers, {args.vision_tokens} vision + {args.text_tokens} text tokens, K={args.k}")
    for side in ("baseline", "vtw"):
        figures = result[side]
        print(
            f"  {side:8s} prefill {format_flops(figures['prefill_flops'])}, "
            f"decode {format_flops(figures['decode_flops'])}, total {format_flops(figures['total_flops'])}"
        )
    print(f"  VTW / baseline: prefill {result['prefill_ratio']:.3f}, total {result['total_ratio']:.3f}")


def cmd_bench(args: argparse.Namespace) -> None:
    from dataclasses import asdict

    import torch

    from vtw_core.benchmarks.bench import PAPER_PEAK_MEMORY_RATIO, format_table, run_bench, weight_bytes
    from vtw_core.models.images import load_image
    from vtw_core.models.prompts import build_model_inputs, user_message

    if args.threads is not None:
        if args.threads < 1:
            raise VTWError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)  # before loading: a fixed count for every timed run
    manager = _load(args, random_weights=args.random_weights)
    inputs = None
    if args.video_frames:
        from vtw_core.benchmarks.bench import synthetic_video_inputs

        inputs = synthetic_video_inputs(manager.model, frames=args.video_frames, text_tokens=args.text_tokens)
    elif args.synthetic_image_size:
        from vtw_core.benchmarks.bench import synthetic_inputs

        height, width = args.synthetic_image_size
        inputs = synthetic_inputs(manager.model, text_tokens=args.text_tokens, image_size=(height, width))
    elif args.image or (manager.info.source == default_model() and manager.processor is not None):
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
        inputs = build_model_inputs(manager.processor, [messages], [[image]], model.device, model.dtype)
    from vtw_core.engine.methods import parse_method

    methods = tuple(parse_method(spec, manager.info.num_layers) for spec in args.method)
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
    stages = None
    if args.stages:
        from vtw_core.benchmarks.bench import synthetic_inputs
        from vtw_core.benchmarks.stages import format_stages, run_stages

        stages = run_stages(manager.model, inputs or synthetic_inputs(manager.model), ks[0], args.repeats)
        print(f"\nStage by stage at K = {ks[0]}: median [min-max] of {args.repeats} interleaved runs after a warm-up")
        print(format_stages(*stages))
    if args.json:
        _print_json(
            {
                "model": manager.info.describe(),
                "threads": torch.get_num_threads(),
                "repeats": args.repeats,
                "bandwidth_gb_s": args.bandwidth_gb_s,
                "weight_bytes": weight_bytes(manager.model),
                "paper_peak_memory_ratio": PAPER_PEAK_MEMORY_RATIO,
                "rows": [asdict(row) for row in rows],
                "stages": [asdict(times) for times in stages] if stages else None,
            }
        )


def _calibration_samples(data: str, limit: int | None) -> list:
    """Samples for the K and schedule searches: easy-vqa's *train* split (20 by default), or a calibration JSONL."""
    if data == "easy-vqa":
        from vtw_core.benchmarks.evaluate import train_calibration

        return train_calibration(limit or 20)
    from vtw_core.analysis.calibration import load_calibration

    return load_calibration(data, limit=limit)


def cmd_search_k(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from vtw_core.analysis.k_search import search_k

    samples = _calibration_samples(args.data, args.limit)
    manager = _load(args)
    if manager.processor is None:
        raise VTWError("the K search needs a model with a processor")
    eta, eta_source = _eta(args, manager)
    with tqdm(total=len(samples), desc="K search", unit="sample", disable=args.json) as bar, manager.lock:
        result = search_k(
            manager.model,
            manager.processor,
            samples,
            eta=eta,
            start=args.start,
            progress=lambda done, total: bar.update(done - bar.n),
            naive=args.naive,
            over=args.kl_over,
        )
    payload = result.to_dict()
    if args.plot:
        from vtw_core.analysis.plots import kl_curve_figure

        kl_curve_figure(payload).savefig(args.plot, dpi=150)
    if args.json:
        _print_json({"k": payload["k"], "eta": eta, "eta_source": eta_source, "curve": payload["curve"]})
        return
    print(f"{manager.info.describe()}, {len(samples)} calibration samples, eta {eta:g} ({eta_source})")
    for point in payload["curve"]:
        mark = "  <- K" if point["k"] == payload["k"] else ""
        print(f"  K={point['k']:3d}  KL={format_kl(point['kl'])}{mark}")
    print(f"K = {payload['k']}" if payload["k"] is not None else f"no K from {args.start} meets eta = {eta:g}")


def _eta(args: argparse.Namespace, manager) -> tuple[float, str]:
    """--eta if given, else the model's own (the official evaluation's value per checkpoint), and its source."""
    from vtw_core.analysis.k_search import check_eta, default_eta

    if args.eta is not None:
        return check_eta(args.eta), "--eta"
    return default_eta(manager.info.source)


def cmd_attention(args: argparse.Namespace) -> None:
    from vtw_core.analysis.attention import analyze_attention
    from vtw_core.models.images import load_image
    from vtw_core.models.prompts import user_message

    images = [load_image(path) for path in args.image]
    messages = [user_message(args.prompt, num_images=len(images))]
    manager = _load(args)
    if manager.processor is None:
        raise VTWError("the attention analysis needs a model with a processor")
    with manager.lock:
        report = analyze_attention(
            manager.model, manager.processor, messages, images, k=args.k, max_new_tokens=args.max_new_tokens
        ).to_dict()
    if args.plot:
        from vtw_core.analysis.plots import attention_figure

        attention_figure(report).savefig(args.plot, dpi=150)
    if args.json:
        _print_json(report)
        return
    print(f"{manager.info.describe()}; prompt tokens per segment: {report['segment_tokens']}")
    print("layer  " + "  ".join(f"{name:>11s}" for name in report["segments"]) + "   (last prompt token)")
    for layer, shares in enumerate(report["prompt"]):
        print(f"{layer:5d}  " + "  ".join(f"{shares[name]:11.3f}" for name in report["segments"]))


def cmd_eval(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    from vtw_core.benchmarks.evaluate import auto_k, evaluate_side, load_items

    if args.plot_k and not args.all_k:
        raise VTWError("--plot-k needs --all-k")
    items = load_items(args.data, args.split, args.limit)
    manager = _load(args)
    if manager.processor is None:
        raise VTWError("evaluation needs a model with a processor")
    model, processor = manager.model, manager.processor
    num_layers = manager.info.num_layers
    report: dict = {"num_layers": num_layers, "data": args.data, "split": args.split, "questions": len(items)}
    with manager.lock:
        k = args.k
        if k == "auto":
            eta, report["eta_source"] = _eta(args, manager)
            search = auto_k(model, processor, eta=eta, over=args.kl_over)
            report["kl_curve"] = search.to_dict()["curve"]
            report["eta"] = eta
            if search.k is None:
                raise VTWError(f"no K meets eta = {eta:g} on the train calibration samples")
            k = search.k
        elif k is not None:
            k = int(k)

        def run(side_k):
            label = "baseline" if side_k is None else f"VTW K={side_k}"
            with tqdm(total=len(items), desc=label, unit="q", disable=args.json, leave=False) as bar:
                return evaluate_side(model, processor, items, side_k, batch_size=args.batch_size,
                                     share_image_prefill=args.shared_prefill,
                                     progress=lambda done, total: bar.update(done - bar.n))  # fmt: skip

        baseline = run(None)
        report["baseline"] = baseline.to_dict()
        if k is not None:
            report["vtw"] = run(k).to_dict()
        if args.all_k:
            report["accuracy_per_k"] = [{"k": i, **run(i).to_dict()} for i in range(num_layers)]
        if args.method:
            from vtw_core.engine.methods import parse_method

            report["methods"] = []
            for spec in args.method:
                method = parse_method(spec, num_layers, auto_k=k if isinstance(k, int) else None)
                with tqdm(total=len(items), desc=method.label, unit="q", disable=args.json, leave=False) as bar:
                    result = evaluate_side(model, processor, items, method.k, schedule=method.schedule,
                                           batch_size=args.batch_size, share_image_prefill=args.shared_prefill,
                                           progress=lambda done, total: bar.update(done - bar.n))  # fmt: skip
                report["methods"].append({"spec": spec, "label": method.label, **result.to_dict()})
    if args.plot:
        from vtw_core.analysis.plots import tradeoff_figure

        tradeoff_figure(report).savefig(args.plot, dpi=150)
    if args.plot_k:
        from vtw_core.analysis.plots import k_curve_figure

        k_curve_figure(report).savefig(args.plot_k, dpi=150)
    if args.json:
        _print_json(report)
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


def cmd_schedule_search(args: argparse.Namespace) -> None:
    from vtw_core.analysis.schedule_search import g_search, kl_score, p_sigmoid

    manager = _load(args)
    if manager.processor is None:
        raise VTWError("the schedule search needs a model with a processor")
    model, num_layers = manager.model, manager.info.num_layers
    samples = _calibration_samples(args.data, args.samples)
    with manager.lock:
        score = kl_score(model, manager.processor, samples, num_layers, over=args.kl_over)
        if args.algorithm == "gsearch":
            schedule, log = g_search(score, num_layers, tolerance=args.tolerance)
        else:
            vision = int(getattr(model.config, "image_seq_length", 0) or 576)
            schedule, log = p_sigmoid(score, model.config, num_layers, budget=args.budget, vision_tokens=vision,
                                      text_tokens=args.text_tokens, trials=args.trials)  # fmt: skip
    if args.out:
        from pathlib import Path

        Path(args.out).write_text(schedule.to_json() + "\n", encoding="utf-8")
    if args.json:
        _print_json({"schedule": list(schedule.keep), "name": schedule.name, "evaluations": len(log)})
        return
    print(f"{schedule.name}: keep shares per layer {[round(x, 3) for x in schedule.keep]} ({len(log)} evaluations)")


def cmd_serve(args: argparse.Namespace) -> None:
    from vtw_core.serve.standalone import serve

    serve(_load(args), host=args.host, port=args.port, model_id=args.served_model_name, method=args.method,
          max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms, max_queue=args.max_queue,
          allow_remote_images=args.allow_remote_images)  # fmt: skip


def _add_serve_parser(commands: Any) -> None:
    serve = commands.add_parser("serve", help="an OpenAI-compatible server (/v1/chat/completions, /v1/models)")
    _add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", help="the id clients pass as `model` (default: from --model)")
    serve.add_argument("--method", default="default",
                       help="method when a request names none: default (vtw:auto where the checkpoint ships a K, "
                            "else baseline), baseline, vtw:K, fastv:K:R, schedule:NAME")  # fmt: skip
    serve.add_argument("--max-batch-size", type=int, default=8, help="requests per engine call (1: no batching)")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests")
    serve.add_argument("--max-queue", type=int, default=64, help="waiting requests before answering 503")
    serve.add_argument("--allow-remote-images", action="store_true",
                       help="also read http(s) image URLs (the server then fetches what clients name)")  # fmt: skip
    serve.set_defaults(handler=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vtw_core", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="answer a question about images, streaming the text")
    _add_model_options(generate)
    generate.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    generate.add_argument("--video", action="append", default=[], help="video file (repeat for several)")
    generate.add_argument("--frames", type=int, default=8, help="frames sampled evenly from each video (1..64)")
    generate.add_argument("--prompt", required=True, help="the question")
    generate.add_argument("--k", type=int, default=None, help="withdraw vision tokens after K layers (none: baseline)")
    generate.add_argument("--method", help="instead of --k: baseline, vtw:K, fastv:K:R or schedule:FILE")
    generate.add_argument("--position-mode", choices=["original", "rearrange"], default="original")
    generate.add_argument("--max-new-tokens", type=int, default=128)
    generate.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=float, default=1.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int, default=0)
    generate.add_argument("--seed", type=int, default=None)
    generate.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    generate.set_defaults(handler=cmd_generate)

    flops = commands.add_parser("flops", help="analytic FLOPs of baseline vs VTW from the config alone")
    flops.add_argument("--model", help="hub id, folder with config.json, or a shipped config name")
    flops.add_argument("--vision-tokens", type=int, required=True)
    flops.add_argument("--text-tokens", type=int, required=True)
    flops.add_argument("--k", type=int, required=True)
    flops.add_argument("--new-tokens", type=int, default=0)
    flops.add_argument("--json", action="store_true")
    flops.set_defaults(handler=cmd_flops)

    bench = commands.add_parser("bench", help="latency, FLOPs and memory of baseline vs VTW at several K")
    _add_model_options(bench)
    bench.add_argument("--random-weights", action="store_true", help="build the architecture from its config only")
    bench.add_argument(
        "--k", type=int, nargs="*", default=None,
        help="one or more K to compare with the baseline (default: the model's searched K from vtw.json, else N/2)",
    )  # fmt: skip
    bench.add_argument("--new-tokens", type=int, nargs="+", default=[64], help="one or more, e.g. 64 256")
    bench.add_argument("--repeats", type=int, default=7, help="timed runs per setting, interleaved across settings")
    bench.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    bench.add_argument(
        "--image",
        help="a real image (needs a processor); default: the first easy-vqa test question on the embedded default "
        "model, else a synthetic prompt",
    )
    bench.add_argument("--prompt", default=None, help="with --image (default: 'Describe the image in detail.')")
    bench.add_argument(
        "--synthetic-image-size", type=int, nargs=2, metavar=("H", "W"),
        help="synthetic prompt for an image of this size (LLaVA-NeXT 672 672: the paper's 2880 vision tokens)",
    )  # fmt: skip
    bench.add_argument("--text-tokens", type=int, default=62, help="text tokens of the synthetic prompt")
    bench.add_argument(
        "--video-frames", type=int, help="synthetic prompt for a video of this many frames (Video-LLaVA-7B, 8: 2056)"
    )
    bench.add_argument(
        "--engine", nargs="+", default=["auto"], choices=["auto", "plain", "static", "graph"],
        help="decode engines to compare (auto: CUDA graph on CUDA, static on CPU)",
    )  # fmt: skip
    bench.add_argument(
        "--prefill-engine", nargs="+", default=["plain"], choices=["plain", "bucketed", "graph"],
        help="prefill engines to compare (bucketed: fixed shapes; graph: those captured as CUDA graphs)",
    )  # fmt: skip
    bench.add_argument("--bandwidth-gb-s", type=float, help="device memory bandwidth, for the decode floor column")
    bench.add_argument("--method", action="append", default=[], help="also bench fastv:K:R or schedule:FILE")
    bench.add_argument(
        "--stages", action="store_true",
        help="then time the first K's path to the first token stage by stage (vision, layers before K, after K)",
    )  # fmt: skip
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(handler=cmd_bench)
    search = commands.add_parser("search-k", help="choose K with the paper's KL criterion (Algorithm 1)")
    _add_model_options(search)
    search.add_argument("--data", default="default",
                        help="JSONL of {image, question}, 'default' (bundled) or 'easy-vqa' (train split)")  # fmt: skip
    search.add_argument("--eta", type=float, help="KL threshold (default: the model's, from the official evaluation)")
    search.add_argument("--start", type=int, default=5, help="first K to try (default 5)")
    search.add_argument("--limit", type=int, default=None, help="use only the first N samples")
    search.add_argument("--naive", action="store_true", help="one full VTW pass per K (slow; for checking)")
    search.add_argument("--kl-over", choices=["prompt", "reply"], default="prompt",
                        help="KL at the last prompt position (the paper) or over the baseline's reply")  # fmt: skip
    search.add_argument("--plot", help="save the KL-vs-K curve to this PNG")
    search.add_argument("--json", action="store_true")
    search.set_defaults(handler=cmd_search_k)

    attention = commands.add_parser("attention", help="per-layer attention shares of the last token (Fig. 4/5)")
    _add_model_options(attention)
    attention.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    attention.add_argument("--prompt", required=True)
    attention.add_argument("--k", type=int, default=None, help="analyse VTW at K (default: the baseline)")
    attention.add_argument("--max-new-tokens", type=int, default=16)
    attention.add_argument("--plot", help="save the stacked per-layer shares to this PNG")
    attention.add_argument("--json", action="store_true")
    attention.set_defaults(handler=cmd_attention)
    schedules = commands.add_parser("schedule-search", help="G-Search or P-Sigmoid per-layer vision-token schedules")
    _add_model_options(schedules)
    schedules.add_argument("--algorithm", choices=["gsearch", "psigmoid"], default="gsearch")
    schedules.add_argument("--data", default="default", help="calibration JSONL, 'default', or 'easy-vqa' (train)")
    schedules.add_argument("--samples", type=int, default=20)
    schedules.add_argument("--tolerance", type=float, default=0.003, help="G-Search: allowed mean-KL increase")
    schedules.add_argument("--budget", type=float, default=0.5, help="P-Sigmoid: prefill FLOPs / baseline")
    schedules.add_argument("--trials", type=int, default=30, help="P-Sigmoid: optimisation trials")
    schedules.add_argument("--text-tokens", type=int, default=62, help="P-Sigmoid: text tokens for the FLOPs")
    schedules.add_argument("--kl-over", choices=["prompt", "reply"], default="prompt",
                           help="score by KL at the last prompt position or over the baseline's reply")  # fmt: skip
    schedules.add_argument("--out", help="write the schedule as JSON (for --method schedule:FILE)")
    schedules.add_argument("--json", action="store_true")
    schedules.set_defaults(handler=cmd_schedule_search)

    evaluate = commands.add_parser("eval", help="VQA accuracy, time and FLOPs of the baseline and of VTW")
    _add_model_options(evaluate)
    evaluate.add_argument("--data", default="easy-vqa", help="easy-vqa, or a JSONL of {image, question, answer}")
    evaluate.add_argument("--split", default="test", choices=["train", "test"], help="easy-vqa split")
    evaluate.add_argument("--limit", type=int, default=None, help="only the first N questions")
    evaluate.add_argument("--k", default=None, help="K, or 'auto' (K search on 20 train-split samples)")
    evaluate.add_argument("--eta", type=float, help="KL threshold for --k auto (default: the model's)")
    evaluate.add_argument(
        "--kl-over", choices=["prompt", "reply"], default="prompt",
        help="--k auto: KL at the last prompt position (the paper) or over the baseline's reply",
    )  # fmt: skip
    evaluate.add_argument("--all-k", action="store_true", help="also the accuracy at every K from 0 to N-1")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument(
        "--no-shared-prefill", dest="shared_prefill", action="store_false",
        help="run every question's prefill in full (default: the questions about one image share its prefix)",
    )  # fmt: skip
    evaluate.add_argument(
        "--method", action="append", default=[],
        help="also evaluate a method (repeatable): vtw:K, vtw:auto, fastv:K:R, schedule:FILE",
    )  # fmt: skip
    evaluate.add_argument("--plot", help="save accuracy against prefill TFLOPs (a point per setting) to this PNG")
    evaluate.add_argument("--plot-k", help="with --all-k: save accuracy (and KL, with --k auto) against K to this PNG")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(handler=cmd_eval)
    _add_serve_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except VTWError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
