"""What the fast K search costs, in baseline passes: one sample's `kl_per_k` over one plain prefill.

    python scripts/cpu_search_cost.py --threads 1

On the embedded default model (or --model), with calibration prompts from the bundled set. Variants, run
interleaved after an untimed warm-up of each, at a fixed thread count:
- baseline pass: `prefill` as generation runs it (keys and values stored);
- search, caches stored: the branches as they were before (every branch and the baseline keep a KV cache);
- search, no caches: `kl_per_k` now (no keys or values stored anywhere);
- naive search: one full VTW prefill per K plus the baseline (what the branches replace);
- branches batched: a variant not adopted (see its docstring).
Each cell: the variant's time over the baseline pass's time on the same sample and repeat, median [min-max].
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vtw_core.analysis.calibration import load_calibration
from vtw_core.analysis.k_search import DEFAULT_START, candidate_ks, kl_divergence, kl_per_k, kl_per_k_naive
from vtw_core.engine.decoder import (
    LayerGroup,
    Withdrawal,
    _logits,
    _pack_kept,
    _run_layer,
    attention_implementation,
    attention_mask_for,
    prefill,
    run_decoder,
)
from vtw_core.engine.embed import embed_prompt
from vtw_core.generation.manager import ModelManager
from vtw_core.models.defaults import require_model
from vtw_core.models.families import language_model
from vtw_core.models.prompts import build_model_inputs, user_message


@torch.no_grad()
def kl_per_k_with_caches(model, prompt, ks):
    """`kl_per_k` as it was: the baseline pass and every branch store their keys and values."""
    wanted, branch_logits = set(ks), {}

    def branch(layer_idx, hidden_states, tokens):
        if layer_idx in wanted:
            branch_logits[layer_idx] = run_decoder(
                model, hidden_states, tokens, first_layer=layer_idx, selector=Withdrawal(layer_idx)
            )[0]

    baseline_logits, _ = prefill(model, prompt, observer=branch)
    return torch.stack([kl_divergence(branch_logits[k], baseline_logits) for k in ks])


@torch.no_grad()
def kl_per_k_batched(model, prompt, ks):
    """Not adopted: the branches alive at a layer run it stacked along the batch (N - min K layer calls instead
    of one per branch and layer). Same math, but the larger matmuls round differently (KL off by ~4e-7, beyond
    the tolerance of the test that compares the search with one VTW pass per K)."""
    wanted, decoder = set(ks), language_model(model)
    implementation = attention_implementation(decoder)
    states, started, layout, groups = [], [], {}, {}

    def branch(layer_idx, hidden_states, tokens):
        if layer_idx in wanted:
            keep = tokens.valid & ~tokens.vision
            keep[:, -1] = True
            packed, kept = _pack_kept(hidden_states, tokens, keep, "original")
            layout.setdefault("valid", kept.valid)
            layout.setdefault("positions", kept.position_ids)
            states.append(packed)
            started.append(layer_idx)
        if states:
            stacked, count = torch.cat(states), len(states)
            if count not in groups:
                valid = layout["valid"].repeat(count, 1)
                positions = torch.cat([layout["positions"]] * count, dim=-2)
                mask = attention_mask_for(valid, valid.shape[1], implementation, stacked.dtype)
                groups[count] = LayerGroup(
                    0, valid, positions[..., -1] + 1, mask, decoder.rotary_emb(stacked, positions)
                )
            states[:] = _run_layer(decoder.layers[layer_idx], stacked, groups[count], None).split(
                hidden_states.shape[0]
            )

    baseline_logits, _ = prefill(model, prompt, observer=branch, use_cache=False)
    logits = dict(zip(started, _logits(model, decoder, torch.cat(states)).split(baseline_logits.shape[0]), strict=True))
    return torch.stack([kl_divergence(logits[k], baseline_logits) for k in ks])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--start", type=int, default=DEFAULT_START)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    manager = ModelManager.load(require_model(args.model), device="cpu")
    model = manager.model
    ks = candidate_ks(manager.info.num_layers, args.start)
    prompts = []
    for sample in load_calibration("default")[: args.samples]:
        messages = [user_message(sample.question, num_images=len(sample.images))]
        inputs = build_model_inputs(manager.processor, [messages], [sample.images], model.device, model.dtype)
        prompts.append(embed_prompt(model, inputs))
    variants = {
        "baseline pass": lambda prompt: prefill(model, prompt),
        "search, caches stored": lambda prompt: kl_per_k_with_caches(model, prompt, ks),
        "search, no caches": lambda prompt: kl_per_k(model, prompt, ks),
        "naive search": lambda prompt: kl_per_k_naive(model, prompt, ks),
        "search, branches batched (not adopted)": lambda prompt: kl_per_k_batched(model, prompt, ks),
    }
    torch.testing.assert_close(variants["search, caches stored"](prompts[0]), variants["search, no caches"](prompts[0]))
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(-1, args.repeats):  # repeat -1: the untimed warm-up
        for prompt in prompts:
            for name, run in variants.items():
                start = time.perf_counter()
                run(prompt)
                if repeat >= 0:
                    seconds[name].append(time.perf_counter() - start)
    base = seconds["baseline pass"]
    print(f"{manager.info.describe()}; {torch.get_num_threads()} thread(s); K in {ks[0]}..{ks[-1]} "
          f"({len(ks)} branches); {len(prompts)} prompts of {prompts[0].inputs_embeds.shape[1]}-"
          f"{max(p.inputs_embeds.shape[1] for p in prompts)} tokens x {args.repeats} interleaved repeats")  # fmt: skip
    print("| variant | ms per sample | baseline passes |")
    print("|---|---|---|")
    for name, values in seconds.items():
        ratios = [value / reference for value, reference in zip(values, base, strict=True)]
        ms = [value * 1e3 for value in values]
        print(f"| {name} | {statistics.median(ms):.2f} [{min(ms):.2f}-{max(ms):.2f}] "
              f"| {statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}] |")  # fmt: skip


if __name__ == "__main__":
    main()
