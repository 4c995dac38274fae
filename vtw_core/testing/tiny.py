"""Tiny random-weight multimodal models with working processors, built fully offline.

What they are for: offline tests and CPU benchmarks of the engine. Each family gets a checkpoint folder laid
out like a hub checkpoint, with a real tokenizer, image processor, processor and chat template, so the whole
user path (chat template -> processor placeholder expansion -> vision tower -> decoder -> generate -> decode)
runs in a fraction of a second. The weights are random (seeded), so the answers are meaningless text; only
shapes, token bookkeeping and numerics matter.

    folder = build_tiny_model("llava", tmp_dir)
    processor = load_processor(folder)  # vtw_core.models.processors: AutoProcessor.from_pretrained(folder), see below
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")

Loading quirk: in transformers 5.x the processors of Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-NeXT-Video,
Video-LLaVA, LLaVA-OneVision, InternVL and SmolVLM include a video processor, and all stock video processors need
torchvision; without torchvision, `AutoProcessor.from_pretrained` fails for these families (for real hub
checkpoints too). `load_processor` tries AutoProcessor first and only then builds the same stock processor with
the frame-based video processor of vtw_core.models.videos (or none). LLaVA, LLaVA-NeXT and Idefics3 folders load with
plain AutoProcessor anywhere.

Nothing here touches the network: the tokenizers are BPE models trained in code on a short built-in corpus,
in the layout of the real families (Llama: <unk>/<s>/</s>, 256 byte-fallback pieces, pieces, then the family's
vision tokens and <pad>; Qwen2: byte-level BPE followed by the ChatML / vision special tokens, then the family's
own), so any text encodes without unknown tokens. Image processors are the PIL-backed ones (AutoImageProcessor
picks them when torchvision is missing).

This module is the public face; the parts live beside it: `sizes` (families, vocabulary and vision geometry),
`tokenizers`, `templates` (chat templates), `configs` (`tiny_config`, generation configs), `processors`
(`build_tiny_processor` and its saving) and `build` (`build_tiny_model`).
"""

from __future__ import annotations

from vtw_core.testing.build import build_tiny_model
from vtw_core.testing.configs import tiny_config
from vtw_core.testing.processors import build_tiny_processor
from vtw_core.testing.sizes import (
    IDEFICS3_FAMILIES,
    LLAMA_TOKENIZER_FAMILIES,
    QWEN_VL_FAMILIES,
    SUPPORTED_TINY_FAMILIES,
    VOCAB_SIZE,
)
from vtw_core.testing.templates import CHAT_TEMPLATES
from vtw_core.testing.tokenizers import (
    IDEFICS3_IDS,
    LLAMA_BOS_ID,
    LLAMA_EOS_ID,
    LLAVA_IMAGE_TOKEN,
    LLAVA_IMAGE_TOKEN_ID,
    LLAVA_PAD_TOKEN,
    LLAVA_PAD_TOKEN_ID,
    LLAVA_VIDEO_IDS,
    QWEN_IDS,
    VIDEO_TOKEN,
    build_tiny_tokenizer,
    llama_family_ids,
    llava_tokenizer,
    qwen_family_ids,
)

__all__ = [
    "CHAT_TEMPLATES",
    "IDEFICS3_FAMILIES",
    "IDEFICS3_IDS",
    "LLAMA_BOS_ID",
    "LLAMA_EOS_ID",
    "LLAMA_TOKENIZER_FAMILIES",
    "LLAVA_IMAGE_TOKEN",
    "LLAVA_IMAGE_TOKEN_ID",
    "LLAVA_PAD_TOKEN",
    "LLAVA_PAD_TOKEN_ID",
    "LLAVA_VIDEO_IDS",
    "QWEN_IDS",
    "QWEN_VL_FAMILIES",
    "SUPPORTED_TINY_FAMILIES",
    "VIDEO_TOKEN",
    "VOCAB_SIZE",
    "build_tiny_model",
    "build_tiny_processor",
    "build_tiny_tokenizer",
    "llama_family_ids",
    "llava_tokenizer",
    "qwen_family_ids",
    "tiny_config",
]
