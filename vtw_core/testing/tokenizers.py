"""The tiny families' tokenizers: BPE models trained in code on a short built-in corpus, in the real layouts.

Llama layout: <unk>/<s>/</s>, 256 byte-fallback pieces, trained pieces, then the family's vision tokens and
<pad>. Qwen2 layout: byte-level BPE followed by the ChatML / vision special tokens, then the family's own. Either
way any text encodes without unknown tokens, and every family has exactly VOCAB_SIZE tokens.
"""

from __future__ import annotations

import json
from functools import cache

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaTokenizer, Qwen2Tokenizer

from vtw_core.testing.sizes import IDEFICS3_FAMILIES, LLAMA_TOKENIZER_FAMILIES, VOCAB_SIZE, check_family

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


def llama_family_ids(family: str) -> dict[str, int]:
    """Special token -> id of a Llama-layout tiny family's own tokens, which follow the trained pieces."""
    if family in IDEFICS3_FAMILIES:
        return IDEFICS3_IDS
    if family in ("llava", "llava_next"):
        return {LLAVA_IMAGE_TOKEN: LLAVA_IMAGE_TOKEN_ID, LLAVA_PAD_TOKEN: LLAVA_PAD_TOKEN_ID}
    return LLAVA_VIDEO_IDS


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


def _llama_layout(vocab_and_merges: tuple[dict[str, int], list], specials: list[str]) -> LlamaTokenizer:
    """A LlamaTokenizer over trained pieces, then `specials` and <pad>, numbered in that order after the pieces."""
    vocab, merges = vocab_and_merges
    tokenizer = LlamaTokenizer(
        vocab=dict(vocab), merges=list(merges), add_bos_token=True, legacy=False, padding_side="left"
    )
    # One call each, in this order, so the specials come first and <pad> last, as in llava-hf.
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.add_special_tokens({"pad_token": LLAVA_PAD_TOKEN})
    return tokenizer


def llava_tokenizer(
    lines: tuple[str, ...] | None = None, base_size: int = VOCAB_SIZE - 2, exact: bool = True
) -> LlamaTokenizer:
    """A Llama BPE tokenizer (byte fallback) trained on `lines`, then <image> and <pad>, in llava-hf's layout."""
    # <image> = base_size, <pad> = base_size + 1 as in llava-hf.
    return _llama_layout(_llama_vocab_and_merges(base_size, lines, exact), [LLAVA_IMAGE_TOKEN])


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
    check_family(family)
    if family in LLAMA_TOKENIZER_FAMILIES:
        expected = {**llama_family_ids(family), "</s>": LLAMA_EOS_ID}
        specials = [token for token in expected if token not in (LLAVA_PAD_TOKEN, "</s>")]
        tokenizer = _llama_layout(_llama_vocab_and_merges(VOCAB_SIZE - len(specials) - 1), specials)
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
