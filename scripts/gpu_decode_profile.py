"""Where a decode step's time goes on a GPU: the captured graph alone, the eager static step, the plain step,
and the whole generation loop per token (graph + sampling + bookkeeping).

    python scripts/gpu_decode_profile.py --model llava-1.5-7b --k 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vtw_core.benchmarks.bench import synthetic_inputs, weight_bytes
from vtw_core.engine.decoder import decode_step, prefill, withdrawal_selector
from vtw_core.engine.embed import embed_prompt
from vtw_core.engine.fast_decode import GraphedDecodeStep, fast_state_from_prefill, static_decode_step
from vtw_core.generation.generate import SamplingConfig, generate_tokens
from vtw_core.generation.manager import ModelManager


def timed(function, repeats: int) -> float:
    """Milliseconds per call, measured with CUDA events after a warm-up call."""
    function()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        function()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llava-1.5-7b")
    parser.add_argument("--k", type=int, default=16)
    args = parser.parse_args()
    manager = ModelManager.load(args.model, random_weights=True)
    model = manager.model
    inputs = synthetic_inputs(model)
    num_layers = manager.info.num_layers
    print(f"{manager.info.describe()}; weights {weight_bytes(model) / 1e9:.1f} GB")
    for k in (None, args.k):
        prompt = embed_prompt(model, inputs)
        logits, state = prefill(model, prompt, withdrawal_selector(k, num_layers))
        token = logits.argmax(-1)[:, None]
        plain_ms = timed(lambda s=state, t=token: decode_step(model, s, t), 20)
        _, state = prefill(model, prompt, withdrawal_selector(k, num_layers))
        fast = fast_state_from_prefill(state, 200)
        fast.input_ids.copy_(token)
        eager_ms = timed(lambda f=fast: static_decode_step(model, f), 20)
        _, state = prefill(model, prompt, withdrawal_selector(k, num_layers))
        fast = fast_state_from_prefill(state, 200)
        fast.input_ids.copy_(token)
        graphed = GraphedDecodeStep(model, fast)
        graph_ms = timed(graphed.graph.replay, 100)
        steps = generate_tokens(model, inputs, k=k, sampling=SamplingConfig(max_new_tokens=65), engine="graph")
        next(steps)
        torch.cuda.synchronize()
        started = time.perf_counter()
        count = sum(1 for _ in steps)
        torch.cuda.synchronize()
        loop_ms = (time.perf_counter() - started) / count * 1e3
        label = "baseline" if k is None else f"VTW K={k}"
        print(f"{label}: plain step {plain_ms:.2f} ms · eager static step {eager_ms:.2f} ms · graph replay "
              f"{graph_ms:.2f} ms · generation loop with graph {loop_ms:.2f} ms/token")  # fmt: skip


if __name__ == "__main__":
    main()
