"""Tiny random-weight multimodal models with working processors, built fully offline.

What they are for: offline tests and CPU benchmarks of the engine. Each family gets a checkpoint folder laid
out like a hub checkpoint, with a real tokenizer, image processor, processor and chat template, so the whole
user path (chat template -> processor placeholder expansion -> vision tower -> decoder -> generate -> decode)
runs in a fraction of a second. The weights are random (seeded), so the answers are meaningless text; only
shapes, token bookkeeping and numerics matter.

    folder = build_tiny_model("llava", tmp_dir)
    processor = load_processor(folder)  # = AutoProcessor.from_pretrained(folder), see below
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
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    GenerationConfig,
    Idefics3Config,
    Idefics3Processor,
    InternVLConfig,
    LlamaConfig,
    LlamaTokenizer,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextProcessor,
    LlavaNextVideoConfig,
    LlavaOnevisionConfig,
    LlavaProcessor,
    PreTrainedConfig,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen3VLConfig,
    SiglipVisionConfig,
    SmolVLMConfig,
    VideoLlavaConfig,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil
from transformers.models.video_llava.image_processing_video_llava import VideoLlavaImageProcessor

from vtw_core.models.processors import (  # noqa: F401  (load_processor: re-exported for the tests' fixtures)
    PROCESSOR_CLASSES,
    image_only_qwen_processor,
    load_processor,
    processor_without_torchvision,
)
from vtw_core.models.videos import frame_video_processor

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

# --- Sizes ---------------------------------------------------------------------------------------------------

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

# --- Tokenizers ----------------------------------------------------------------------------------------------

# Llama layout: <unk>=0, <s>=1, </s>=2, <0x00>..<0xFF>=3..258 (byte fallback: any character encodes, nothing
# is ever unknown), trained pieces, then the two tokens llava-hf appends: <image> and <pad>.
LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]
LLAMA_BYTES = [f"<0x{i:02X}>" for i in range(256)]
LLAVA_IMAGE_TOKEN = "<image>"
LLAVA_PAD_TOKEN = "<pad>"
LLAVA_IMAGE_TOKEN_ID = VOCAB_SIZE - 2
LLAVA_PAD_TOKEN_ID = VOCAB_SIZE - 1
LLAMA_BOS_ID, LLAMA_EOS_ID = 1, 2

# Qwen2 layout: byte-level BPE (256 byte symbols + merges), then the special tokens in the real order.
QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_IDS = {token: VOCAB_SIZE - len(QWEN_SPECIALS) + i for i, token in enumerate(QWEN_SPECIALS)}

VIDEO_TOKEN = "<video>"
# Video-LLaVA / LLaVA-NeXT-Video (Llama): <image>, <video> and <pad> after the trained pieces.
LLAVA_VIDEO_IDS = {LLAVA_IMAGE_TOKEN: VOCAB_SIZE - 3, VIDEO_TOKEN: VOCAB_SIZE - 2, LLAVA_PAD_TOKEN: VOCAB_SIZE - 1}
# Idefics3 (Llama): its image markers and end-of-turn token, then <pad>, after the trained pieces.
IDEFICS3_SPECIALS = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
IDEFICS3_IDS = {token: VOCAB_SIZE - 5 + i for i, token in enumerate([*IDEFICS3_SPECIALS, LLAVA_PAD_TOKEN])}
# Qwen2-text families append their own vision tokens after Qwen's specials, as their hub tokenizers do.
QWEN_EXTRA_SPECIALS: dict[str, list[str]] = {
    "qwen2_vl": [],
    "qwen2_5_vl": [],
    "qwen3_vl": [],
    "llava_onevision": [LLAVA_IMAGE_TOKEN, VIDEO_TOKEN],
    "internvl": ["<img>", "</img>", "<IMG_CONTEXT>", VIDEO_TOKEN],
}


def qwen_family_ids(family: str) -> dict[str, int]:
    """Special token -> id of a Qwen2-text tiny family: Qwen's specials, then the family's own, at the end."""
    tokens = QWEN_SPECIALS + QWEN_EXTRA_SPECIALS[family]
    return {token: VOCAB_SIZE - len(tokens) + i for i, token in enumerate(tokens)}


# A short, fixed English corpus: enough repeated sub-words for a couple of hundred BPE merges, so ordinary
# questions tokenize into a realistic number of pieces rather than one piece per byte.
CORPUS = """\
What is in this image? Describe the image in detail. What shape is shown in the picture?
What color is the circle? What color is the square? What color is the triangle? What color is the star?
There is a red circle in the middle of the image. There is a blue square on the left side of the picture.
A green triangle is next to a yellow star. The background is white and the shapes are bright.
How many shapes are there in the image? There are two shapes: a circle and a square.
Is the circle bigger than the square? The circle is bigger than the square, and the square is smaller.
Where is the triangle? The triangle is at the top of the picture, above the circle and below the star.
Please answer the question with a single word. Please answer the question in one short sentence.
Compare the first image with the second image. The first picture shows a cat and the second shows a dog.
The cat is sitting on a mat near the window. The dog is running in the park with a ball.
Can you tell me what the person is doing? The person is reading a book at the table in the kitchen.
What time of day is it? It is morning, the sun is shining and the sky is blue with a few white clouds.
What is written on the sign? The sign says stop. The car is waiting at the red light on the street.
Explain what you see, then describe the colors, the objects and the people in the scene.
The image shows a small house with a red roof, a green garden, a tall tree and a blue door.
Thank you for the answer. You are a helpful assistant. Answer the user's question about the image.
Is there anything unusual in this photo? No, everything looks normal and the scene is quiet and calm.
Which object is closest to the camera? The ball is closest to the camera and the house is far away.
Count the red circles, the blue squares and the green triangles, then give the total number.
The left half of the picture is dark and the right half of the picture is light.
Read the text in the image and tell me what it means. The text is a short message about the weather.
What animal is this? This animal is a brown horse standing in a field of tall yellow grass.
Why is the man smiling? The man is smiling because his friends are laughing at a funny story.
Which of these two images is brighter? The second image is brighter than the first image.
Give me a short caption for this photo. A child playing with a orange ball on the beach near the water.
Is it raining in the picture? Yes, it is raining and the people are holding umbrellas on the street.
What are the main objects on the table? There is a cup of coffee, a plate of bread and an apple.
Describe the position of each shape: the circle is on the right, the square is below the triangle.
"""


def _merges_of(tokenizer: Tokenizer) -> list[tuple[str, str]]:
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    # Older tokenizers versions serialize merges as "a b" strings, newer ones as [a, b] pairs.
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in merges]


def _train_bpe(
    tokenizer: Tokenizer,
    trainer: trainers.BpeTrainer,
    expected_size: int,
    lines: tuple[str, ...] | None = None,
    exact: bool = True,
) -> None:
    # One sequence per line, so no piece spans a line break: "\n" stays a single byte token, as in the real ones.
    tokenizer.train_from_iterator(lines or CORPUS.splitlines(), trainer=trainer)
    if exact and tokenizer.get_vocab_size() != expected_size:
        raise RuntimeError(f"tiny BPE reached {tokenizer.get_vocab_size()} pieces, expected {expected_size}")


@cache
def _llama_vocab_and_merges(
    base_size: int = VOCAB_SIZE - 2, lines: tuple[str, ...] | None = None, exact: bool = True
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    # base_size: <image> and <pad> come after the trained vocabulary, as in llava-hf; with exact=False it is an
    # upper bound (training stops when the corpus has no more pairs to merge).
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    # Train on ▁-prefixed words (split=True) so that no merge crosses a word boundary, as in Llama's
    # sentencepiece model; LlamaTokenizer itself then runs Metaspace without splitting.
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=base_size, special_tokens=LLAMA_SPECIALS + LLAMA_BYTES, min_frequency=2, show_progress=False
    )
    _train_bpe(bpe, trainer, base_size, lines, exact)
    return bpe.get_vocab(), _merges_of(bpe)


def llava_tokenizer(
    lines: tuple[str, ...] | None = None, base_size: int = VOCAB_SIZE - 2, exact: bool = True
) -> LlamaTokenizer:
    """A Llama BPE tokenizer (byte fallback) trained on `lines`, then <image> and <pad>, in llava-hf's layout."""
    vocab, merges = _llama_vocab_and_merges(base_size, lines, exact)
    tokenizer = LlamaTokenizer(
        vocab=dict(vocab), merges=list(merges), add_bos_token=True, legacy=False, padding_side="left"
    )
    # One call each, in this order, so the ids are <image> = base_size, <pad> = base_size + 1 as in llava-hf.
    tokenizer.add_special_tokens({"additional_special_tokens": [LLAVA_IMAGE_TOKEN]})
    tokenizer.add_special_tokens({"pad_token": LLAVA_PAD_TOKEN})
    return tokenizer


@cache
def _qwen_vocab_and_merges(base_size: int = VOCAB_SIZE - len(QWEN_SPECIALS)) -> tuple[dict[str, int], list]:
    bpe = Tokenizer(models.BPE())
    # Qwen2's own pre-tokenizer (regex split + byte-level), taken from an empty Qwen2Tokenizer so the trained
    # merges match how Qwen2Tokenizer will split text.
    bpe.pre_tokenizer = Qwen2Tokenizer()._tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=base_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    _train_bpe(bpe, trainer, base_size)
    return bpe.get_vocab(), _merges_of(bpe)


def build_tiny_tokenizer(family: str) -> LlamaTokenizer | Qwen2Tokenizer:
    """The family's real tokenizer class over a tiny vocabulary of exactly VOCAB_SIZE tokens.

    Left padding is saved as the default (as in llava-hf's tokenizer config): batched generation with a
    decoder-only model needs the prompts right-aligned.
    """
    _check_family(family)
    if family in ("llava", "llava_next"):
        tokenizer = llava_tokenizer()
        expected = {LLAVA_IMAGE_TOKEN: LLAVA_IMAGE_TOKEN_ID, LLAVA_PAD_TOKEN: LLAVA_PAD_TOKEN_ID, "</s>": 2}
    elif family in IDEFICS3_FAMILIES:
        vocab, merges = _llama_vocab_and_merges(VOCAB_SIZE - len(IDEFICS3_IDS))
        tokenizer = LlamaTokenizer(
            vocab=dict(vocab), merges=list(merges), add_bos_token=True, legacy=False, padding_side="left"
        )
        tokenizer.add_special_tokens({"additional_special_tokens": IDEFICS3_SPECIALS})
        tokenizer.add_special_tokens({"pad_token": LLAVA_PAD_TOKEN})
        expected = {**IDEFICS3_IDS, "</s>": 2}
    elif family in LLAMA_TOKENIZER_FAMILIES:
        vocab, merges = _llama_vocab_and_merges(VOCAB_SIZE - 3)
        tokenizer = LlamaTokenizer(
            vocab=dict(vocab), merges=list(merges), add_bos_token=True, legacy=False, padding_side="left"
        )
        # One call each, in this order, so the ids are those of LLAVA_VIDEO_IDS.
        tokenizer.add_special_tokens({"additional_special_tokens": [LLAVA_IMAGE_TOKEN, VIDEO_TOKEN]})
        tokenizer.add_special_tokens({"pad_token": LLAVA_PAD_TOKEN})
        expected = {**LLAVA_VIDEO_IDS, "</s>": 2}
    else:
        expected = qwen_family_ids(family)
        vocab, merges = _qwen_vocab_and_merges(VOCAB_SIZE - len(expected))
        extra = {}
        if family == "internvl":  # InternVLProcessor reads its tokens from these tokenizer attributes
            extra["extra_special_tokens"] = {
                "start_image_token": "<img>",
                "end_image_token": "</img>",
                "context_image_token": "<IMG_CONTEXT>",
                "video_token": VIDEO_TOKEN,
            }
        # The special tokens go into the vocabulary with their fixed ids up front: registering them afterwards
        # would number them in registration order (eos and pad first), not in Qwen's order.
        tokenizer = Qwen2Tokenizer(
            vocab={**vocab, **expected},
            merges=list(merges),
            unk_token=None,
            bos_token=None,
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            padding_side="left",
            **extra,
        )
        tokenizer.add_special_tokens({"additional_special_tokens": list(expected)})
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in expected}
    if ids != expected or len(tokenizer) != VOCAB_SIZE:
        raise RuntimeError(f"tiny {family} tokenizer layout is off: {ids}, {len(tokenizer)} tokens")
    return tokenizer


# --- Chat templates ------------------------------------------------------------------------------------------

# llava-hf/llava-1.5-7b-hf's template ("USER: <image>\n{text} ASSISTANT:"; images of a turn first, then its
# text), extended to accept plain-string content.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}"
    "{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Qwen/Qwen2-VL-7B-Instruct's ChatML template (also used by Qwen2.5-VL), verbatim.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _user_assistant_template(image: str, video: str) -> str:
    """LLaVA's USER/ASSISTANT format with image and video items (Video-LLaVA and LLaVA-NeXT-Video use the same)."""
    return (
        "{% for message in messages %}"
        "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
        "{% if message['content'] is string %}{{ message['content'] + ' ' }}"
        "{% else %}"
        "{% for content in message['content'] %}"
        f"{{% if content['type'] == 'image' %}}{{{{ '{image}' }}}}"
        f"{{% elif content['type'] == 'video' %}}{{{{ '{video}' }}}}{{% endif %}}"
        "{% endfor %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{{ content['text'] + ' ' }}"
        "{% endfor %}"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )


def _chatml_template(image: str, video: str) -> str:
    """ChatML (LLaVA-OneVision, InternVL): each turn's images and videos first, then its text."""
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for content in message['content'] %}"
        f"{{% if content['type'] == 'image' %}}{{{{ '{image}' }}}}"
        f"{{% elif content['type'] == 'video' %}}{{{{ '{video}' }}}}{{% endif %}}"
        "{% endfor %}"
        "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


# Idefics3's "User:<image>question<end_of_utterance>\nAssistant:" turns.
IDEFICS3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

CHAT_TEMPLATES = {
    "idefics3": IDEFICS3_CHAT_TEMPLATE,
    "smolvlm": IDEFICS3_CHAT_TEMPLATE,
    "llava_next_video": _user_assistant_template("<image>\\n", "<video>\\n"),
    "video_llava": _user_assistant_template("<image>\\n", "<video>\\n"),
    "llava_onevision": _chatml_template("<image>\\n", "<video>\\n"),
    "internvl": _chatml_template("<IMG_CONTEXT>\\n", "<video>\\n"),
}

# --- Configs -------------------------------------------------------------------------------------------------


def _check_family(family: str) -> None:
    if family not in SUPPORTED_TINY_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(SUPPORTED_TINY_FAMILIES)}")


def _text_sizes(num_layers: int) -> dict[str, int]:
    return {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": TEXT_HIDDEN,
        "intermediate_size": TEXT_INTERMEDIATE,
        "num_hidden_layers": num_layers,
        "num_attention_heads": TEXT_HEADS,
        "num_key_value_heads": TEXT_KV_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
    }


def _clip_vision_config(image_size: int, patch_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=VISION_INTERMEDIATE,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=VISION_HIDDEN,
    )


def _llama_text_config(num_layers: int, pad_token_id: int = LLAVA_PAD_TOKEN_ID) -> LlamaConfig:
    return LlamaConfig(
        **_text_sizes(num_layers),
        bos_token_id=LLAMA_BOS_ID,
        eos_token_id=LLAMA_EOS_ID,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )


def _qwen_text_config(num_layers: int) -> dict:
    # head_dim 16 -> 8 rotary frequencies, split between the (temporal, height, width) position streams.
    return {
        **_text_sizes(num_layers),
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]},
        "bos_token_id": QWEN_IDS["<|endoftext|>"],
        "eos_token_id": QWEN_IDS["<|im_end|>"],
        "pad_token_id": QWEN_IDS["<|endoftext|>"],
        "tie_word_embeddings": False,
    }


def _qwen2_text_config(family: str, num_layers: int) -> dict:
    """A plain Qwen2 decoder (LLaVA-OneVision, InternVL) with the family's token ids."""
    ids = qwen_family_ids(family)
    return {
        "model_type": "qwen2",
        **_text_sizes(num_layers),
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": False,
    }


def _qwen_token_ids() -> dict[str, int]:
    return {
        "image_token_id": QWEN_IDS["<|image_pad|>"],
        "video_token_id": QWEN_IDS["<|video_pad|>"],
        "vision_start_token_id": QWEN_IDS["<|vision_start|>"],
        "vision_end_token_id": QWEN_IDS["<|vision_end|>"],
    }


def tiny_config(family: str, *, num_layers: int = 4) -> PreTrainedConfig:
    """The tiny model's config (no tokenizer or weights); token ids match `build_tiny_tokenizer(family)`."""
    _check_family(family)
    if family == "llava":
        return LlavaConfig(
            vision_config=_clip_vision_config(LLAVA_IMAGE_SIZE, LLAVA_PATCH),
            text_config=_llama_text_config(num_layers),
            image_token_id=LLAVA_IMAGE_TOKEN_ID,
            image_seq_length=(LLAVA_IMAGE_SIZE // LLAVA_PATCH) ** 2,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            projector_hidden_act="gelu",
            pad_token_id=LLAVA_PAD_TOKEN_ID,
            tie_word_embeddings=False,
        )
    if family == "llava_next":
        return LlavaNextConfig(
            vision_config=_clip_vision_config(LLAVA_NEXT_TILE, LLAVA_NEXT_PATCH),
            text_config=_llama_text_config(num_layers),
            image_token_id=LLAVA_IMAGE_TOKEN_ID,
            image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
            image_seq_length=(LLAVA_NEXT_TILE // LLAVA_NEXT_PATCH) ** 2,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            projector_hidden_act="gelu",
            pad_token_id=LLAVA_PAD_TOKEN_ID,
            tie_word_embeddings=False,
        )
    if family == "llava_next_video":
        return LlavaNextVideoConfig(
            vision_config=_clip_vision_config(LLAVA_NEXT_TILE, LLAVA_NEXT_PATCH),
            text_config=_llama_text_config(num_layers, LLAVA_VIDEO_IDS[LLAVA_PAD_TOKEN]),
            image_token_id=LLAVA_VIDEO_IDS[LLAVA_IMAGE_TOKEN],
            video_token_id=LLAVA_VIDEO_IDS[VIDEO_TOKEN],
            image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
            image_seq_length=(LLAVA_NEXT_TILE // LLAVA_NEXT_PATCH) ** 2,
            video_seq_length=(LLAVA_NEXT_TILE // LLAVA_NEXT_PATCH // 2) ** 2,  # frames are pooled 2x2
            spatial_pool_stride=2,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            projector_hidden_act="gelu",
            pad_token_id=LLAVA_VIDEO_IDS[LLAVA_PAD_TOKEN],
            tie_word_embeddings=False,
        )
    if family == "video_llava":
        patches = (VIDEO_LLAVA_IMAGE_SIZE // VIDEO_LLAVA_PATCH) ** 2
        return VideoLlavaConfig(
            vision_config=_clip_vision_config(VIDEO_LLAVA_IMAGE_SIZE, VIDEO_LLAVA_PATCH),
            text_config=_llama_text_config(num_layers, LLAVA_VIDEO_IDS[LLAVA_PAD_TOKEN]),
            image_token_id=LLAVA_VIDEO_IDS[LLAVA_IMAGE_TOKEN],
            video_token_id=LLAVA_VIDEO_IDS[VIDEO_TOKEN],
            image_seq_length=patches,
            video_seq_length=(patches + 1) * 8,
            vision_feature_select_strategy="default",
            vision_feature_layer=-2,
            projector_hidden_act="gelu",
            pad_token_id=LLAVA_VIDEO_IDS[LLAVA_PAD_TOKEN],
            tie_word_embeddings=False,
        )
    if family == "llava_onevision":
        ids = qwen_family_ids(family)
        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(
                hidden_size=VISION_HIDDEN,
                intermediate_size=VISION_INTERMEDIATE,
                num_hidden_layers=VISION_LAYERS,
                num_attention_heads=VISION_HEADS,
                image_size=ONEVISION_TILE,
                patch_size=ONEVISION_PATCH,
                vision_use_head=False,
            ),
            text_config=_qwen2_text_config(family, num_layers),
            image_token_id=ids[LLAVA_IMAGE_TOKEN],
            video_token_id=ids[VIDEO_TOKEN],
            image_grid_pinpoints=ONEVISION_PINPOINTS,
            vision_aspect_ratio="anyres_max_9",
            vision_feature_select_strategy="full",
            vision_feature_layer=-1,
            projector_hidden_act="gelu",
            tie_word_embeddings=False,
        )
    if family == "internvl":
        return InternVLConfig(
            vision_config={
                "hidden_size": VISION_HIDDEN,
                "intermediate_size": VISION_INTERMEDIATE,
                "num_hidden_layers": VISION_LAYERS,
                "num_attention_heads": VISION_HEADS,
                "image_size": [INTERNVL_TILE, INTERNVL_TILE],
                "patch_size": [INTERNVL_PATCH, INTERNVL_PATCH],
            },
            text_config=_qwen2_text_config(family, num_layers),
            image_token_id=qwen_family_ids(family)["<IMG_CONTEXT>"],
            image_seq_length=INTERNVL_IMAGE_SEQ_LENGTH,
            downsample_ratio=0.5,
            vision_feature_layer=-1,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )
    if family in IDEFICS3_FAMILIES:
        pad = IDEFICS3_IDS[LLAVA_PAD_TOKEN]
        config_class = Idefics3Config if family == "idefics3" else SmolVLMConfig
        return config_class(
            vision_config={
                "hidden_size": VISION_HIDDEN,
                "intermediate_size": VISION_INTERMEDIATE,
                "num_hidden_layers": VISION_LAYERS,
                "num_attention_heads": VISION_HEADS,
                "image_size": IDEFICS3_TILE,
                "patch_size": IDEFICS3_PATCH,
            },
            text_config=_llama_text_config(num_layers, pad),
            image_token_id=IDEFICS3_IDS["<image>"],
            scale_factor=IDEFICS3_SCALE,
            pad_token_id=pad,
            tie_word_embeddings=False,
        )
    if family == "qwen3_vl":
        text = _qwen_text_config(num_layers)
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
        return Qwen3VLConfig(
            text_config={**text, "head_dim": TEXT_HIDDEN // TEXT_HEADS},
            vision_config={
                "depth": VISION_LAYERS,
                "hidden_size": VISION_HIDDEN,
                "intermediate_size": VISION_INTERMEDIATE,
                "num_heads": VISION_HEADS,
                "out_hidden_size": TEXT_HIDDEN,
                "patch_size": QWEN3_PATCH,
                "spatial_merge_size": QWEN_MERGE,
                "temporal_patch_size": QWEN_TEMPORAL_PATCH,
                "num_position_embeddings": 16,
                "deepstack_visual_indexes": QWEN3_DEEPSTACK,
            },
            **_qwen_token_ids(),
            tie_word_embeddings=False,
        )
    if family == "qwen2_vl":
        return Qwen2VLConfig(
            text_config=_qwen_text_config(num_layers),
            vision_config={
                "depth": VISION_LAYERS,
                "embed_dim": VISION_HIDDEN,
                "hidden_size": TEXT_HIDDEN,  # the merger's output width = the decoder's width
                "mlp_ratio": VISION_INTERMEDIATE // VISION_HIDDEN,
                "num_heads": VISION_HEADS,
                "patch_size": QWEN_PATCH,
                "spatial_merge_size": QWEN_MERGE,
                "temporal_patch_size": QWEN_TEMPORAL_PATCH,
            },
            **_qwen_token_ids(),
            tie_word_embeddings=False,
        )
    return Qwen2_5_VLConfig(
        text_config=_qwen_text_config(num_layers),
        vision_config={
            "depth": VISION_LAYERS,
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": VISION_INTERMEDIATE,
            "out_hidden_size": TEXT_HIDDEN,
            "num_heads": VISION_HEADS,
            "patch_size": QWEN_PATCH,
            "spatial_merge_size": QWEN_MERGE,
            "temporal_patch_size": QWEN_TEMPORAL_PATCH,
            "window_size": QWEN25_WINDOW,
            "fullatt_block_indexes": QWEN25_FULLATT_BLOCKS,
        },
        **_qwen_token_ids(),
        tie_word_embeddings=False,
    )


def _generation_config(family: str) -> GenerationConfig:
    if family in ("llava", "llava_next"):
        return GenerationConfig(bos_token_id=LLAMA_BOS_ID, eos_token_id=LLAMA_EOS_ID, pad_token_id=LLAVA_PAD_TOKEN_ID)
    if family in IDEFICS3_FAMILIES:  # ends a turn with <end_of_utterance>
        eos = [IDEFICS3_IDS["<end_of_utterance>"], LLAMA_EOS_ID]
        return GenerationConfig(bos_token_id=LLAMA_BOS_ID, eos_token_id=eos, pad_token_id=IDEFICS3_IDS[LLAVA_PAD_TOKEN])
    if family in LLAMA_TOKENIZER_FAMILIES:
        pad = LLAVA_VIDEO_IDS[LLAVA_PAD_TOKEN]
        return GenerationConfig(bos_token_id=LLAMA_BOS_ID, eos_token_id=LLAMA_EOS_ID, pad_token_id=pad)
    # ChatML models stop on <|im_end|> (end of turn) or <|endoftext|>.
    ids = qwen_family_ids(family)
    return GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )


# --- Processors ----------------------------------------------------------------------------------------------

QWEN_PROCESSOR_CLASSES = {family: PROCESSOR_CLASSES[family] for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")}


def _qwen_image_processor(family: str = "qwen2_vl") -> Qwen2VLImageProcessorPil:
    qwen3 = family == "qwen3_vl"
    # Qwen3-VL normalises with mean = std = 0.5 (its hub preprocessor config); Qwen2(.5)-VL with CLIP's.
    normalisation = {"image_mean": [0.5] * 3, "image_std": [0.5] * 3} if qwen3 else {}
    return Qwen2VLImageProcessorPil(
        **normalisation,
        patch_size=QWEN3_PATCH if qwen3 else QWEN_PATCH,
        merge_size=QWEN_MERGE,
        temporal_patch_size=QWEN_TEMPORAL_PATCH,
        min_pixels=QWEN3_MIN_PIXELS if qwen3 else QWEN_MIN_PIXELS,
        max_pixels=QWEN3_MAX_PIXELS if qwen3 else QWEN_MAX_PIXELS,
    )


def _video_processor_dict(family: str) -> dict:
    # Saved so that, where torchvision is installed, stock AutoProcessor builds the family's video processor with
    # the tiny geometry instead of the real model's. It cannot be instantiated here without torchvision, hence a
    # plain dict of the video processor's init kwargs.
    if family == "qwen3_vl":
        return {
            "video_processor_type": "Qwen3VLVideoProcessor",
            "patch_size": QWEN3_PATCH,
            "merge_size": QWEN_MERGE,
            "temporal_patch_size": QWEN_TEMPORAL_PATCH,
            # Qwen3-VL's video budget covers all frames: room for 8 frames at the image cap.
            "size": {"shortest_edge": QWEN3_MIN_PIXELS, "longest_edge": 8 * QWEN3_MAX_PIXELS},
            "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3,
        }
    if family in QWEN_PROCESSOR_CLASSES:
        return {
            "video_processor_type": "Qwen2VLVideoProcessor",
            "patch_size": QWEN_PATCH,
            "merge_size": QWEN_MERGE,
            "temporal_patch_size": QWEN_TEMPORAL_PATCH,
            "size": {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
        }
    if family == "llava_next_video":
        size = {
            "size": {"shortest_edge": LLAVA_NEXT_TILE},
            "crop_size": {"height": LLAVA_NEXT_TILE, "width": LLAVA_NEXT_TILE},
        }
        return {"video_processor_type": "LlavaNextVideoVideoProcessor", **size}
    if family == "video_llava":
        side = VIDEO_LLAVA_IMAGE_SIZE
        size = {"size": {"shortest_edge": side}, "crop_size": {"height": side, "width": side}}
        return {"video_processor_type": "VideoLlavaVideoProcessor", **size}
    if family == "llava_onevision":
        return {
            "video_processor_type": "LlavaOnevisionVideoProcessor",
            "size": {"height": ONEVISION_TILE, "width": ONEVISION_TILE},
        }
    return {"video_processor_type": "InternVLVideoProcessor", "size": {"height": INTERNVL_TILE, "width": INTERNVL_TILE}}


def build_tiny_processor(family: str) -> ProcessorMixin:
    """Tokenizer + PIL image processor + processor, sized so placeholders expand to the model's feature count."""
    tokenizer = build_tiny_tokenizer(family)
    if family == "llava":
        image_processor = CLIPImageProcessorPil(
            size={"shortest_edge": LLAVA_IMAGE_SIZE}, crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE}
        )
        # num_additional_image_tokens=1: CLIP's CLS token, which the "default" strategy then drops again.
        return LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=LLAVA_PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=LLAVA_CHAT_TEMPLATE,
        )
    if family == "idefics3":
        image_processor = Idefics3ImageProcessorPil(
            size={"longest_edge": 2 * IDEFICS3_TILE}, max_image_size={"longest_edge": IDEFICS3_TILE}
        )
        return Idefics3Processor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            image_seq_len=IDEFICS3_IMAGE_SEQ_LEN,
            chat_template=IDEFICS3_CHAT_TEMPLATE,
        )
    if family == "llava_next":
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": LLAVA_NEXT_TILE},
            crop_size={"height": LLAVA_NEXT_TILE, "width": LLAVA_NEXT_TILE},
            image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        )
        return LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=LLAVA_NEXT_PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
            chat_template=LLAVA_CHAT_TEMPLATE,
        )
    # The rest are built with the frame-based video processor (vtw_core.models.videos) even where torchvision exists, so
    # the same processor runs on every machine; the saved folder names the family's stock video processor.
    processor_class = PROCESSOR_CLASSES[family]
    if family in QWEN_PROCESSOR_CLASSES:
        image_processor = _qwen_image_processor(family)
        return processor_without_torchvision(
            processor_class,
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=frame_video_processor(family, _video_processor_dict(family), image_processor),
            chat_template=QWEN_CHAT_TEMPLATE,
        )
    parts = {"tokenizer": tokenizer, "chat_template": CHAT_TEMPLATES[family]}
    if family == "llava_next_video":
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": LLAVA_NEXT_TILE},
            crop_size={"height": LLAVA_NEXT_TILE, "width": LLAVA_NEXT_TILE},
            image_grid_pinpoints=LLAVA_NEXT_PINPOINTS,
        )
        options = {"patch_size": LLAVA_NEXT_PATCH, "vision_feature_select_strategy": "default"}
        options["num_additional_image_tokens"] = 1
    elif family == "video_llava":
        side = VIDEO_LLAVA_IMAGE_SIZE
        image_processor = VideoLlavaImageProcessor(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        )
        options = {"patch_size": VIDEO_LLAVA_PATCH, "vision_feature_select_strategy": "default"}
        options["num_additional_image_tokens"] = 1
    elif family == "smolvlm":
        image_processor = SmolVLMImageProcessorPil(
            size={"longest_edge": 2 * IDEFICS3_TILE}, max_image_size={"longest_edge": IDEFICS3_TILE}
        )
        options = {"image_seq_len": IDEFICS3_IMAGE_SEQ_LEN}
    elif family == "llava_onevision":
        image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": ONEVISION_TILE, "width": ONEVISION_TILE}, image_grid_pinpoints=ONEVISION_PINPOINTS
        )
        options = {
            "num_image_tokens": (ONEVISION_TILE // ONEVISION_PATCH) ** 2,
            "vision_feature_select_strategy": "full",
            "vision_aspect_ratio": "anyres_max_9",
        }
    else:
        image_processor = GotOcr2ImageProcessorPil(
            size={"height": INTERNVL_TILE, "width": INTERNVL_TILE},
            crop_to_patches=True,
            max_patches=INTERNVL_MAX_TILES,
        )
        options = {"image_seq_length": INTERNVL_IMAGE_SEQ_LENGTH}
    video_processor = frame_video_processor(family, _video_processor_dict(family), image_processor)
    return processor_without_torchvision(
        processor_class, image_processor=image_processor, video_processor=video_processor, **parts, **options
    )


def _save_processor(family: str, processor: ProcessorMixin, folder: Path) -> None:
    if family not in PROCESSOR_CLASSES:
        processor.save_pretrained(folder)
        return
    # ProcessorMixin.save_pretrained cannot save a processor without its video part, so write the same v5 layout
    # by hand: tokenizer files, chat_template.jinja, and processor_config.json with the nested sub-processors and
    # the processor's own options.
    processor.tokenizer.save_pretrained(folder)
    (folder / "chat_template.jinja").write_text(processor.chat_template, encoding="utf-8")
    options = {
        key: value
        for key, value in processor.to_dict().items()
        if key not in ("image_processor", "tokenizer", "video_processor", "chat_template", "processor_class")
        and isinstance(value, (int, float, str, bool, list))
    }
    processor_config = {
        "processor_class": type(processor).__name__,
        **options,
        "image_processor": processor.image_processor.to_dict(),
        "video_processor": _video_processor_dict(family),
    }
    (folder / "processor_config.json").write_text(json.dumps(processor_config, indent=2, sort_keys=True) + "\n")


# --- Models --------------------------------------------------------------------------------------------------


def build_tiny_model(family: str, folder: str | Path, *, num_layers: int = 4, seed: int = 0) -> Path:
    """Build and save a tiny random-weight checkpoint (config, weights, generation config, processor) to folder.

    The same (family, num_layers, seed) always gives bit-identical weights, and the global torch RNG is left
    untouched.
    """
    _check_family(family)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_config(family, num_layers=num_layers)
    with torch.random.fork_rng(devices=[]):  # seed the init only; callers' random streams stay as they were
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config = _generation_config(family)
    model.save_pretrained(folder)
    _save_processor(family, build_tiny_processor(family), folder)
    return folder
