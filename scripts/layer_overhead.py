"""How much of a decoder layer's prefill time is fixed cost (Python, dispatch), not arithmetic; print a table.

    python scripts/layer_overhead.py --threads 2 --repeats 50

One decoder layer of the model (default: the embedded default model) runs on a prompt-sized input (its real
vision tokens + a typical easy-vqa question's text) and on one token, interleaved, after a warm-up. The one-token
call is all overhead and almost no arithmetic, so its median over the full call's median is the share of a
layer's prefill time that no saving in FLOPs can remove. VTW's deep layers run on the text alone, where this
share is what is left, so it bounds how close the measured TTFT ratio can come to the FLOPs ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vtw_core.generation.manager import ModelManager
from vtw_core.models.defaults import require_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded default model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--text-tokens", type=int, default=20, help="text tokens besides the vision tokens")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    manager = ModelManager.load(require_model(args.model), device="cpu")
    config = manager.model.config
    language_model = manager.model.model.language_model
    layer = language_model.layers[0]
    width = config.get_text_config().hidden_size
    vision_tokens = config.image_seq_length
    shapes = {"prompt": vision_tokens + args.text_tokens, "text only": args.text_tokens, "one token": 1}
    inputs = {}
    for name, length in shapes.items():
        hidden = torch.randn(1, length, width)
        positions = torch.arange(length)[None]
        inputs[name] = (hidden, positions, language_model.rotary_emb(hidden, positions))
    times: dict[str, list[float]] = {name: [] for name in shapes}
    with torch.inference_mode():
        for repeat in range(args.repeats + 1):
            for name, (hidden, positions, rotary) in inputs.items():
                start = time.perf_counter()
                layer(hidden, position_ids=positions, position_embeddings=rotary)
                if repeat:  # the first pass is the warm-up
                    times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"{manager.info.source}: one decoder layer (width {width}), {args.threads} thread(s), "
          f"median [min-max] of {args.repeats} interleaved runs")  # fmt: skip
    print("| input | tokens | ms | share of the prompt call |")
    print("|---|---|---|---|")
    for name, length in shapes.items():
        low, high = min(times[name]) * 1e3, max(times[name]) * 1e3
        share = median[name] / median["prompt"]
        print(f"| {name} | {length} | {median[name] * 1e3:.3f} [{low:.3f}-{high:.3f}] | {share:.1%} |")
    print(f"\nfixed cost per layer call: {median['one token'] * 1e3:.3f} ms = "
          f"{median['one token'] / median['prompt']:.1%} of a layer's prefill time")  # fmt: skip


if __name__ == "__main__":
    main()
