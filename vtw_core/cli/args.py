"""The argument shapes several subcommands share, and what turns the parsed values into vtw_core objects.

Each `add_*` function adds plain arguments (no argparse groups, so `--help` lists them in the order added); each
other helper reads them back. Heavy modules (torch, transformers, tqdm, matplotlib) are imported inside the
helpers, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from vtw_core.errors import VTWError
from vtw_core.models.defaults import require_model

KL_OVER = ("prompt", "reply")


def port_number(text: str) -> int:
    """A TCP port, 1..65535, checked before a model loads (the app's --port too)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 1 and 65535, got {port}")
    return port


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= low."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more, got {value}")
        return value

    return parse


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Which model to load and how: --model, --device, --dtype, --attention, --trust-remote-code, --threads."""
    parser.add_argument("--model", help="hub id or local folder (default: the embedded default model)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16")
    parser.add_argument(
        "--attention", default="auto", help="auto (flash-attn if installed on CUDA, else sdpa), sdpa, eager, ..."
    )
    parser.add_argument("--trust-remote-code", action="store_true", help="allow the model's own Python code to run")
    parser.add_argument("--threads", type=at_least(1),
                        help="torch CPU threads in this process (default 1, or $VTW_THREADS; docs/engines.md, "
                             "Threads)")  # fmt: skip


def load_model(args: argparse.Namespace, random_weights: bool = False, prefill_engine: str = "plain"):
    """The ModelManager that `add_model_options`' arguments name (`prefill_engine`: its single answers')."""
    from vtw_core.generation.manager import ModelManager

    return ModelManager.load(
        require_model(args.model),
        device=args.device,
        dtype=args.dtype,
        attention=args.attention,
        trust_remote_code=args.trust_remote_code,
        random_weights=random_weights,
        prefill_engine=prefill_engine,
    )


def require_processor(manager: Any, what: str) -> None:
    """Refuse a model without a processor (random weights, a bare config) for `what`, which reads images."""
    if manager.processor is None:
        raise VTWError(f"{what} needs a model with a processor")


def add_image_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several)")


def add_video_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--video", action="append", default=[], help="video file (repeat for several)")
    parser.add_argument("--frames", type=int, default=8, help="frames sampled evenly from each video (1..64)")


def load_images(paths: list[str]) -> list:
    from vtw_core.models.images import load_image

    return [load_image(path) for path in paths]


def load_videos(paths: list[str], frames: int) -> list:
    if not paths:
        return []
    from vtw_core.models.videos import read_video

    return [read_video(path, frames) for path in paths]


def add_sampling_options(parser: argparse.ArgumentParser) -> None:
    """--max-new-tokens and the sampling settings that `sampling_config` reads."""
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)


def sampling_config(args: argparse.Namespace):
    """The SamplingConfig of `add_sampling_options`' arguments (checked on construction)."""
    from vtw_core.generation.types import SamplingConfig

    return SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        do_sample=args.sample,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )


def parse_methods(specs: list[str], num_layers: int, auto_k: int | None = None) -> tuple:
    """Every --method spec as a vtw_core.engine.methods.Method (`auto_k` stands in for vtw:auto)."""
    if not specs:
        return ()
    from vtw_core.engine.methods import parse_method

    return tuple(parse_method(spec, num_layers, auto_k=auto_k) for spec in specs)


def add_kl_over_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--kl-over", choices=list(KL_OVER), default="prompt", help=help)


def eta_from_args(args: argparse.Namespace, manager: Any) -> tuple[float, str]:
    """--eta if given, else the model's own (the official evaluation's value per checkpoint), and its source."""
    from vtw_core.analysis.k_search import check_eta, default_eta

    if args.eta is not None:
        return check_eta(args.eta), "--eta"
    return default_eta(manager.info.source)


def calibration_samples(data: str, limit: int | None) -> list:
    """Samples for the K and schedule searches: easy-vqa's *train* split (20 by default), or a calibration JSONL."""
    if data == "easy-vqa":
        from vtw_core.benchmarks.evaluate import train_calibration

        return train_calibration(limit or 20)
    from vtw_core.analysis.calibration import load_calibration

    return load_calibration(data, limit=limit)


@contextmanager
def progress_bar(total: int, desc: str, unit: str, quiet: bool, leave: bool = True) -> Iterator[Callable]:
    """A tqdm bar on stderr (none when `quiet`), as the `progress(done, total)` callback vtw_core's loops take."""
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit=unit, disable=quiet, leave=leave) as bar:
        yield lambda done, total: bar.update(done - bar.n)


def save_plot(path: str | None, figure: str, payload: dict) -> None:
    """When a path is given: vtw_core.analysis.plots' `figure` of the payload, saved there as a PNG."""
    if path:
        from vtw_core.analysis import plots

        getattr(plots, figure)(payload).savefig(path, dpi=150)


def add_json_option(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    parser.add_argument("--json", action="store_true", help=help)


def print_json(payload: dict[str, Any]) -> None:
    """The result as one JSON object on one line: every command's last line under --json."""
    print(json.dumps(payload, ensure_ascii=False))
