"""Which decode engine is faster on CPU: plain (torch.cat grows each layer's cache every step) or static
(preallocated buffers written in place, vtw_core.engine.fast_decode). `engine="auto"` picks from these measurements.

    python scripts/cpu_decode_engines.py --threads 1

Random weights (timing does not depend on their values), the decoder fed a synthetic prompt directly (the
vision tower's cost is the same for both engines). Per (shape, prompt length, K): one prefill, then each run
decodes `--new-tokens` tokens from a copy of its state. Engines run interleaved (plain static plain static ...)
after an untimed warm-up of each, with a fixed thread count; the table gives ms per decode step as the median
[min-max] over repeats, and the static/plain ratio per repeat (paired neighbours) as median [min-max].
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vtw_core.engine.decoder import DecodeState, prefill, withdrawal_selector
from vtw_core.engine.embed import PromptEmbeddings
from vtw_core.generation.generate import _decoder_for
from vtw_core.models.defaults import DEFAULT_MODEL_DIR
from vtw_core.testing.tiny import tiny_config

ENGINES = ("plain", "static")


def mid_config():
    """A LLaVA with a 1024-wide, 16-layer Llama decoder (~200 M parameters): big enough for memory traffic to matter."""
    config = tiny_config("llava", num_layers=16)
    config.text_config = LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    return config


def build(shape: str) -> torch.nn.Module:
    config = mid_config() if shape == "mid" else AutoConfig.from_pretrained(DEFAULT_MODEL_DIR)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


def synthetic_prompt(model: torch.nn.Module, prompt_tokens: int, text_tokens: int = 62) -> PromptEmbeddings:
    """Five text tokens, the vision tokens, then the rest of the text: LLaVA's layout."""
    hidden = model.config.get_text_config().hidden_size
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, prompt_tokens, hidden, generator=generator)
    vision = torch.zeros(1, prompt_tokens, dtype=torch.bool)
    vision[:, 5 : prompt_tokens - (text_tokens - 5)] = True
    positions = torch.arange(prompt_tokens)[None]
    return PromptEmbeddings(embeds, torch.ones(1, prompt_tokens, dtype=torch.bool), positions, vision)


@torch.no_grad()
def decode_ms(model: torch.nn.Module, state: DecodeState, first: torch.Tensor, engine: str, steps: int,
              max_new_tokens: int) -> float:  # fmt: skip
    """Milliseconds per decode step over `steps` greedy steps from a copy of `state` (the copy is not timed);
    the static buffers have room for `max_new_tokens` (a request's limit, often far above what it decodes)."""
    decode = _decoder_for(model, copy.deepcopy(state), engine, max(max_new_tokens, steps + 1), None)
    tokens = first
    start = time.perf_counter()
    for _ in range(steps):
        tokens = decode(tokens).argmax(-1)
    return (time.perf_counter() - start) / steps * 1e3


def spread(values: list[float], digits: int = 2) -> str:
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", nargs="+", default=["mid", "default"], choices=["mid", "default"])
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[638, 2942])
    parser.add_argument("--k", type=int, nargs="+", default=[], help="also measure VTW at these K")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=[0],
                        help="buffer room the static path reserves (default: just the decoded tokens)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), float32, sdpa; {args.new_tokens} "
          f"decode steps per run, {args.repeats} interleaved repeats after a warm-up")  # fmt: skip
    print("| shape | prompt tokens | max new tokens | setting | plain ms/step | static ms/step | static / plain |")
    print("|---|---|---|---|---|---|---|")
    for shape in args.shapes:
        model = build(shape)
        text = model.config.get_text_config()
        name = f"{shape} ({text.hidden_size} wide, {text.num_hidden_layers} layers)"
        for prompt_tokens in args.prompt_tokens:
            prompt = synthetic_prompt(model, prompt_tokens)
            for k, room in [(k, room) for k in [None, *args.k] for room in args.max_new_tokens]:
                logits, state = prefill(model, prompt, withdrawal_selector(k, text.num_hidden_layers))
                first = logits.argmax(-1)
                for engine in ENGINES:  # untimed warm-up: allocator, kernels, page faults
                    decode_ms(model, state, first, engine, 2, room)
                times: dict[str, list[float]] = {engine: [] for engine in ENGINES}
                for _ in range(args.repeats):
                    for engine in ENGINES:
                        times[engine].append(decode_ms(model, state, first, engine, args.new_tokens, room))
                ratios = [s / p for s, p in zip(times["static"], times["plain"], strict=True)]
                label = "baseline" if k is None else f"VTW K={k}"
                room = max(room, args.new_tokens + 1)
                cells = [
                    name,
                    prompt_tokens,
                    room,
                    label,
                    spread(times["plain"]),
                    spread(times["static"]),
                    spread(ratios),
                ]
                print("| " + " | ".join(str(cell) for cell in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
