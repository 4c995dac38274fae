"""On a GPU: the CUDA-graph decode path against the plain path, bf16, random-weight models of real shape.

    python scripts/gpu_equivalence.py --model llava-1.5-7b --k 16 --tokens 32

Prints, for the baseline and for VTW at K, how many of the first N greedy tokens agree and the largest
logit difference at the first decode step. Random weights give flat distributions, so near-ties can flip a
token in bf16; the logits are the firmer check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vtw_core.benchmarks.bench import synthetic_inputs
from vtw_core.engine.decoder import decode_step, prefill, withdrawal_selector
from vtw_core.engine.embed import embed_prompt
from vtw_core.engine.fast_decode import GraphedDecodeStep, fast_state_from_prefill
from vtw_core.generation.generate import GenerationStats, SamplingConfig, generate_tokens
from vtw_core.generation.manager import ModelManager


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llava-1.5-7b")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--image-size", type=int, nargs=2, default=None)
    args = parser.parse_args()
    manager = ModelManager.load(args.model, random_weights=True)
    model = manager.model
    inputs = synthetic_inputs(model, image_size=tuple(args.image_size) if args.image_size else None)
    num_layers = manager.info.num_layers
    print(manager.info.describe())
    for k in (None, args.k):
        runs = {}
        for engine in ("plain", "graph"):
            stats = GenerationStats(k=k, num_layers=num_layers)
            steps = generate_tokens(model, inputs, k=k, sampling=SamplingConfig(max_new_tokens=args.tokens),
                                    stats=stats, engine=engine)  # fmt: skip
            runs[engine] = (torch.stack(list(steps), 1)[0].tolist(), stats.engine)
        same = sum(a == b for a, b in zip(runs["plain"][0], runs["graph"][0], strict=True))
        pairs = zip(runs["plain"][0], runs["graph"][0], strict=True)
        first_diff = next((i for i, (a, b) in enumerate(pairs) if a != b), None)
        # Logits of the first decode steps, same input tokens, both ways.
        prompt = embed_prompt(model, inputs)
        logits, plain_state = prefill(model, prompt, withdrawal_selector(k, num_layers))
        _, graph_state = prefill(model, prompt, withdrawal_selector(k, num_layers))
        fast = fast_state_from_prefill(graph_state, 8)
        token = logits.argmax(-1)
        fast.input_ids.copy_(token[:, None])
        graphed = GraphedDecodeStep(model, fast)
        worst = 0.0
        for step in range(4):
            reference = decode_step(model, plain_state, token[:, None])
            if step > 0:  # the graph's constructor already computed step 0 for the token set before it
                fast.input_ids.copy_(token[:, None])
            got = graphed()
            worst = max(worst, float((reference - got).abs().max()))
            token = reference.argmax(-1)
        scale = float(reference.abs().max())
        label = "baseline" if k is None else f"VTW K={k}"
        print(f"{label}: {same}/{args.tokens} greedy tokens equal (first difference at {first_diff}), "
              f"engines {runs['plain'][1]} / {runs['graph'][1]}; max |logit diff| over 4 steps {worst:.4f} "
              f"(logit scale {scale:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
