"""Every GPU check of the fast paths in one run, one table: meant for a lent H100/H200, under 8 minutes.

    python scripts/gpu_check.py                  # CUDA: LLaVA-1.5-7B and LLaVA-NeXT-7B shapes, bf16, sdpa
    python scripts/gpu_check.py --dry-run        # CPU: tiny random models, the same code paths, seconds

Not yet run on a GPU. Estimated from the README's H100 figures: per shape 64 generations of 64 tokens (16
settings x a warm-up and 3 repeats, ~90 s), the decode steps per engine (~20 s) plus the equivalence checks and
loading (~30 s): about 5 minutes for both shapes. `--shapes LLaVA-1.5-7B` halves it; `--repeats 2` cuts the timing
part by a quarter.

What it prints:
1. the device, library versions, and the memory bandwidth it measures (a large device-to-device copy);
2. optional kernels: flash-attn (2, 3, 4), Liger Kernel, FlashInfer, each "ok <version>" or its import error;
3. equivalence: each fast path against the plain one, on the baseline and VTW at K = 16 (K = 2 in the dry
   run): the largest |logit difference| over the prefill and the first teacher-forced decode steps, relative
   to the logits' scale, and how many of the first greedy tokens agree (random weights give flat
   distributions, so near-ties can flip a token in bf16; the logits are the firmer check);
4. decode steps alone (`bench --decode-engines`): ms per step of the plain, static (eager) and graph engines
   on the baseline and VTW at K = 16, after an untimed first step (it builds the buffers or captures the graph)
   and without the generation loop's sampling and bookkeeping, and each engine's time over plain's per repeat
   (the dry run: plain and static);
5. one table: for each shape (random weights from vtw_core/configs, one synthetic image: 576 + 62 and
   2,928 + 62 tokens), each path (prefill engine x decode engine) and baseline / VTW at K = 8, 16, 24:
   TTFT median [min-max], its ratio to the path's baseline next to the prefill FLOPs ratio (the issue's
   target: TTFT ratio at most 1.1x the FLOPs ratio), decode ms/token, decode efficiency (the time to read
   the weights once at the measured bandwidth over the measured step), peak memory and its ratio (the paper's
   Table 4: 0.65x).

Paths on CUDA: plain/plain (the layer loops), plain/graph (today's `engine="auto"`), graph/graph (prefill and
decode captured). In the dry run, where CUDA graphs do not exist, bucketed/static stands in for graph/graph
(the same fixed-shape code, run eagerly). Runs go through `vtw_core.benchmarks.bench.run_bench`: an untimed warm-up of
every setting, then interleaved repeats, timed with CUDA events.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # vtw_core from this checkout, installed or not

from vtw_core.benchmarks.bench import BenchRow, run_bench, synthetic_inputs, weight_bytes  # noqa: E402
from vtw_core.benchmarks.decode_engines import format_decode_engines, run_decode_engines  # noqa: E402
from vtw_core.engine.decoder import withdrawal_selector  # noqa: E402
from vtw_core.engine.embed import embed_prompt  # noqa: E402
from vtw_core.engine.fast_prefill import capture_failures, fast_prefill  # noqa: E402
from vtw_core.generation.generate import _decoder_for, generate_tokens  # noqa: E402
from vtw_core.generation.manager import ModelManager  # noqa: E402
from vtw_core.generation.types import SamplingConfig  # noqa: E402
from vtw_core.testing.tiny import tiny_config  # noqa: E402

PROBES = {  # what to import to know a kernel library is usable, by the name people install it under
    "flash-attn 2": "flash_attn",
    "flash-attn 3": "flash_attn_interface",
    "flash-attn 4 (CUTE DSL)": "flash_attn.cute",
    "liger-kernel": "liger_kernel.transformers",
    "flashinfer": "flashinfer",
}


def probe_kernels() -> list[str]:
    lines = []
    for name, module in PROBES.items():
        try:
            imported = importlib.import_module(module)
            root = sys.modules[module.split(".")[0]]
            lines.append(f"  {name}: ok {getattr(imported, '__version__', getattr(root, '__version__', '?'))}")
        except Exception as error:  # ImportError, or a wheel built for another CUDA/torch raising at import
            lines.append(f"  {name}: missing ({type(error).__name__}: {str(error).splitlines()[0][:160]})")
    return lines


def measure_bandwidth(device: torch.device, megabytes: int) -> float:
    """GB/s of a device-to-device copy (read + write), median of 5 after a warm-up."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = []
    for attempt in range(6):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            target.copy_(source)
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1e3
        else:
            began = time.perf_counter()
            target.copy_(source)
            elapsed = time.perf_counter() - began
        if attempt:
            seconds.append(elapsed)
    return 2 * source.numel() / statistics.median(seconds) / 1e9


SHAPES = {  # name -> (shipped config, synthetic image size): 576 + 62 and 2,928 + 62 prompt tokens
    "LLaVA-1.5-7B": ("llava-1.5-7b", None),
    "LLaVA-NeXT-7B": ("llava-v1.6-vicuna-7b", (672, 672)),
}


def load_shapes(dry_run: bool, names: list[str]) -> Iterator[tuple[str, ModelManager, dict[str, torch.Tensor]]]:
    """(name, manager, synthetic one-image prompt) per shape, one model at a time (two 7B models need not fit)."""
    if dry_run:
        for family, image_size in (("llava", None), ("llava_next", (40, 72))):
            torch.manual_seed(0)
            model = AutoModelForImageTextToText.from_config(tiny_config(family, num_layers=4), dtype=torch.float32,
                                                            attn_implementation="sdpa")  # fmt: skip
            manager = ModelManager(model, None, f"tiny {family}", random_weights=True)
            yield f"tiny {family}", manager, synthetic_inputs(manager.model, image_size=image_size)
        return
    for name in names:
        config, image_size = SHAPES[name]
        manager = ModelManager.load(config, device="cuda", dtype="bfloat16", attention="sdpa", random_weights=True)
        yield name, manager, synthetic_inputs(manager.model, image_size=image_size)
        del manager
        torch.cuda.empty_cache()  # the caller dropped its references before asking for the next shape


@torch.no_grad()
def forced_logits(model, inputs, k, prefill_engine: str, decode_engine: str, tokens: list[int]) -> torch.Tensor:
    """Logits (steps, vocab) of the prefill and of decode steps fed `tokens` (teacher forcing), on one path."""
    num_layers = model.config.get_text_config().num_hidden_layers
    prompt = embed_prompt(model, inputs)
    logits, state, _ = fast_prefill(model, prompt, withdrawal_selector(k, num_layers), engine=prefill_engine)
    decode = _decoder_for(model, state, decode_engine, len(tokens) + 1, None)
    steps = [logits[0].clone()]
    for token in tokens:
        steps.append(decode(torch.tensor([token], device=logits.device))[0].clone())
    return torch.stack(steps)


def greedy(model, inputs, k, prefill_engine: str, decode_engine: str, count: int) -> list[int]:
    columns = generate_tokens(model, inputs, k=k, sampling=SamplingConfig(max_new_tokens=count),
                              engine=decode_engine, prefill_engine=prefill_engine)  # fmt: skip
    return [int(column[0]) for column in columns]


def equivalence(model, inputs, ks, paths, steps: int, count: int) -> list[str]:
    lines = []
    for k in ks:
        reference_tokens = greedy(model, inputs, k, "plain", "plain", count)
        reference = forced_logits(model, inputs, k, "plain", "plain", reference_tokens[:steps])
        scale = float(reference.abs().max())
        for prefill_engine, decode_engine in paths[1:]:
            logits = forced_logits(model, inputs, k, prefill_engine, decode_engine, reference_tokens[:steps])
            worst = float((logits - reference).abs().max())
            tokens = greedy(model, inputs, k, prefill_engine, decode_engine, count)
            same = sum(a == b for a, b in zip(tokens, reference_tokens, strict=True))
            label = "baseline" if k is None else f"VTW K={k}"
            lines.append(f"  {prefill_engine}/{decode_engine} vs plain/plain, {label}: max |logit diff| {worst:.4g} "
                         f"over {steps + 1} positions ({worst / scale:.2%} of the logit scale {scale:.3g}); "
                         f"greedy tokens {same}/{count} equal")  # fmt: skip
    return lines


def spread(values: list[float], scale: float, digits: int) -> str:
    low, mid, high = (v * scale for v in (min(values), statistics.median(values), max(values)))
    return f"{mid:.{digits}f} [{low:.{digits}f}-{high:.{digits}f}]"


def table_lines(name: str, rows: list[BenchRow], requested: list[tuple[str, str]], floor_ms: float) -> list[str]:
    """Rows in run_bench's order; `requested[i]` is row i's (prefill, decode) engines, each group's baseline first."""
    lines = []
    base = rows[0]
    for row, (prefill, decode) in zip(rows, requested, strict=True):
        if row.label == "baseline":
            base = row
        ttft_ratio, flops_ratio = row.ttft_s / base.ttft_s, row.prefill_flops / base.prefill_flops
        peak = f"{row.peak_memory_bytes / 2**20:.0f}" if row.peak_memory_bytes is not None else "CPU"
        peak_ratio = f"{row.peak_memory_bytes / base.peak_memory_bytes:.2f}" if row.peak_memory_bytes else "-"
        ran = (row.prefill_engine, row.engine)
        path = f"{prefill}/{decode}" + ("" if ran == (prefill, decode) else f" (ran {ran[0]}/{ran[1]})")
        efficiency = f"{floor_ms / row.decode_ms_per_token:.0%}" if row.new_tokens > 1 else "-"
        lines.append(
            f"| {name} | {path} | {row.label} | {row.prompt_tokens} | {row.new_tokens} "
            f"| {spread(row.ttft_samples_s, 1e3, 1)} | {ttft_ratio:.2f} | {flops_ratio:.2f} "
            f"| {ttft_ratio / flops_ratio:.2f} | {spread(row.decode_samples_ms, 1, 2)} | {efficiency} | {peak} "
            f"| {peak_ratio} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny random models, CPU stand-ins for graphs")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="default 8 16 24 (dry run: 1 2 3)")
    parser.add_argument("--new-tokens", type=int, nargs="+", default=None, help="default 64 (dry run: 4)")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (dry run: 2)")
    parser.add_argument("--equivalence-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (the dry run: 1)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry-run on CPU")
    torch.set_num_threads(args.threads or (1 if dry else torch.get_num_threads()))
    ks = args.ks or ([1, 2, 3] if dry else [8, 16, 24])
    new_tokens = args.new_tokens or ([4] if dry else [64])
    repeats = args.repeats or (2 if dry else 3)
    # Every prefill engine with every decode engine: plain/plain, fast prefill alone, fast decode alone (today's
    # engine="auto" on CUDA), both. The dry run's fixed-shape stand-ins for graphs: bucketed prefill, static decode.
    fast_prefill_engine, fast_decode_engine = ("bucketed", "static") if dry else ("graph", "graph")
    paths = [(p, d) for d in ("plain", fast_decode_engine) for p in ("plain", fast_prefill_engine)]
    decode_engines = ["plain", "static"] if dry else ["plain", "static", "graph"]  # timed step by step
    device = torch.device("cpu" if dry else "cuda")
    import transformers

    name = "CPU (dry run)" if dry else torch.cuda.get_device_name()
    bandwidth = measure_bandwidth(device, 64 if dry else 2048)
    print(f"{name}; torch {torch.__version__}, transformers {transformers.__version__}, CUDA {torch.version.cuda}; "
          f"measured copy bandwidth {bandwidth:.0f} GB/s")  # fmt: skip
    print("Optional kernels:")
    print("\n".join(probe_kernels()))
    header = (
        "| model | prefill/decode | setting | prompt tokens | new tokens | TTFT ms | TTFT ratio | FLOPs ratio "
        "| TTFT/FLOPs | decode ms/token | % of bw | peak MB | peak ratio |"
    )
    table = [header, "|" + "---|" * (header.count("|") - 1)]
    for shape, manager, inputs in load_shapes(dry, args.shapes):
        model = manager.model
        weights = weight_bytes(model)
        floor_ms = weights / (bandwidth * 1e9) * 1e3
        print(f"\n{manager.info.describe()}: weights {weights / 1e9:.2f} GB, decode floor {floor_ms:.3f} ms/token")
        middle = ks[len(ks) // 2]
        try:  # one run on a lent machine: a failure in one part must not cost the rest of the table
            print("Equivalence:")
            print("\n".join(equivalence(model, inputs, [None, middle], paths, 4, args.equivalence_tokens)), flush=True)
        except Exception:
            traceback.print_exc()
        try:
            text = model.config.get_text_config()
            results = run_decode_engines(model, inputs, [middle], decode_engines, new_tokens[0], repeats)
            print(f"Decode steps alone (no sampling or bookkeeping), {new_tokens[0]} per run, median [min-max] of "
                  f"{repeats} interleaved runs; each engine over plain per run:")  # fmt: skip
            shape_name = f"{text.hidden_size} wide, {text.num_hidden_layers} layers"
            print(format_decode_engines(results, shape_name), flush=True)
        except Exception:
            traceback.print_exc()
        try:
            decodes, prefills = tuple(dict.fromkeys(d for _, d in paths)), tuple(dict.fromkeys(p for p, _ in paths))
            rows = run_bench(manager, ks, new_tokens=new_tokens, repeats=repeats, inputs=inputs, engines=decodes,
                             prefill_engines=prefills)  # fmt: skip
            requested = [(p, d) for d in decodes for p in prefills for _ in new_tokens for _ in range(len(ks) + 1)]
            table += table_lines(shape, rows, requested, floor_ms)
        except Exception:
            traceback.print_exc()
        for key, error in capture_failures(model).items():
            print(f"prefill graph capture failed for {key}: {error}")
        print(f"(shape done at {time.perf_counter() - started:.0f} s)", flush=True)
        del manager, model, inputs
    print(f"\nOne table (median [min-max] of {repeats} interleaved runs after a warm-up; % of bw: weights / "
          "measured bandwidth / decode step; the paper's peak ratio: 0.65x; prefill graphs hold their memory pool "
          "from capture on, outside the per-run peak):")  # fmt: skip
    print("\n".join(table))
    print(f"\nTotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
