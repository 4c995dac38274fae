"""The tiny families and their sizes: the vocabulary, the decoder, and each family's vision geometry.

The configs (`configs`), tokenizers (`tokenizers`) and processors (`processors`) all read these numbers, so a
family's processor expands its image placeholders to exactly the number of features its model produces.
"""

from __future__ import annotations

SUPPORTED_TINY_FAMILIES = (
    "llava",
    "llava_next",
    "qwen2_vl",
    "qwen2_5_vl",
    "llava_next_video",
    "video_llava",
    "llava_onevision",
    "internvl",
    "qwen3_vl",
    "idefics3",
    "smolvlm",
)
# Families whose tokenizer is the Llama layout (the rest use the Qwen2 layout).
LLAMA_TOKENIZER_FAMILIES = ("llava", "llava_next", "llava_next_video", "video_llava", "idefics3", "smolvlm")
# SmolVLM's model and image tokens are Idefics3's.
IDEFICS3_FAMILIES = ("idefics3", "smolvlm")
# The three Qwen-VL families: ChatML template, Qwen2-VL-style image processor and M-RoPE decoder.
QWEN_VL_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def check_family(family: str) -> None:
    if family not in SUPPORTED_TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(SUPPORTED_TINY_FAMILIES)}")


# Every family has exactly this many tokens. It is kept in 401..500 on purpose: small enough for fast
# embeddings/LM heads, and `bench.synthetic_inputs` draws ordinary text ids from [1000 % vocab, vocab // 2),
# which is only a non-empty range for vocab sizes like these.
VOCAB_SIZE = 480

TEXT_HIDDEN = 64
TEXT_INTERMEDIATE = 128
TEXT_HEADS = 4
TEXT_KV_HEADS = 2  # GQA, as in the real checkpoints, so the engine's KV handling is exercised with repeats
MAX_POSITIONS = 4096

VISION_HIDDEN = 32
VISION_INTERMEDIATE = 64
VISION_LAYERS = 2
VISION_HEADS = 4

# LLaVA-1.5: one 48x48 tile, 8x8 patches -> 6*6 = 36 image tokens per image (the CLS token is dropped by the
# "default" feature strategy).
LLAVA_IMAGE_SIZE = 48
LLAVA_PATCH = 8

# LLaVA-NeXT: 32x32 tiles of 4x4 patches of 8 px (16 features per tile); anyres grids of up to 3 tiles in one
# direction, so the token count depends on the image's aspect ratio as in the real model.
LLAVA_NEXT_TILE = 32
LLAVA_NEXT_PATCH = 8
LLAVA_NEXT_PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]

# Qwen2-VL / Qwen2.5-VL: 7 px patches merged 2x2 -> one token per 14x14 px; images are resized to between
# 2x2 and 8x8 merged tokens (4..64 image tokens): 56x56 -> 16 tokens, 64x64 -> 70x70 -> 25 tokens.
QWEN_PATCH = 7
QWEN_MERGE = 2
QWEN_TEMPORAL_PATCH = 2
QWEN_MIN_PIXELS = (QWEN_PATCH * QWEN_MERGE * 2) ** 2
QWEN_MAX_PIXELS = (QWEN_PATCH * QWEN_MERGE * 8) ** 2
# Qwen2.5-VL window attention: windows of 28 px = 2x2 merged tokens, so any image of 56 px or more has several
# windows; vision layer 0 is windowed and layer 1 (in fullatt_block_indexes) attends over the whole image.
QWEN25_WINDOW = 28
QWEN25_FULLATT_BLOCKS = [1]
# Qwen3-VL: 8 px patches merged 2x2 -> one token per 16x16 px, learned positions on a 4x4 grid (interpolated), and
# DeepStack features from vision layers 0 and 1 added to the outputs of decoder layers 0 and 1.
QWEN3_PATCH = 8
QWEN3_MIN_PIXELS = (QWEN3_PATCH * QWEN_MERGE * 2) ** 2
QWEN3_MAX_PIXELS = (QWEN3_PATCH * QWEN_MERGE * 8) ** 2
QWEN3_DEEPSTACK = [0, 1]

# Video-LLaVA: one CLIP geometry for the image and the video tower: 32 px, 8 px patches -> 16 patches; images drop
# CLS (15+1 = 16 tokens), frames keep it (17 tokens per frame), as the stock processor counts them.
VIDEO_LLAVA_IMAGE_SIZE = 32
VIDEO_LLAVA_PATCH = 8

# LLaVA-OneVision: SigLIP (no CLS) on 32 px tiles of 8 px patches -> 16 tokens per tile, anyres up to 2x2 tiles;
# video frames are pooled 2x2 -> 4 tokens per frame, plus one newline token per video.
ONEVISION_TILE = 32
ONEVISION_PATCH = 8
ONEVISION_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]

# InternVL: 32 px tiles of 8 px patches, pixel-shuffled by 0.5 -> 4 tokens per tile; images are cut into up to
# 4 tiles plus a thumbnail, as InternVL3's dynamic tiling does with up to 12.
INTERNVL_TILE = 32
INTERNVL_PATCH = 8
INTERNVL_MAX_TILES = 4
INTERNVL_IMAGE_SEQ_LENGTH = (INTERNVL_TILE // INTERNVL_PATCH) ** 2 // 4

# Idefics3: 32 px tiles of 8 px patches, pixel-shuffled by 2 -> 4 tokens per tile; images up to 64 px a side are
# split into up to 2x2 tiles plus the whole image (the global tile), as the real model splits into 364 px tiles.
IDEFICS3_TILE = 32
IDEFICS3_PATCH = 8
IDEFICS3_SCALE = 2
IDEFICS3_IMAGE_SEQ_LEN = (IDEFICS3_TILE // IDEFICS3_PATCH) ** 2 // IDEFICS3_SCALE**2
