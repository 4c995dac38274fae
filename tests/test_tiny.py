"""The tiny offline checkpoints load and run like real ones: processor expansion, generate, batching, determinism."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.utils import is_torchvision_available

from vtw_core.models.processors import load_processor
from vtw_core.models.prompts import count_image_items, processor_images
from vtw_core.testing import tiny, tokenizers
from vtw_core.testing.tiny import (
    QWEN_IDS,
    SUPPORTED_TINY_FAMILIES,
    VOCAB_SIZE,
    build_tiny_model,
    build_tiny_tokenizer,
    tiny_config,
)

PROCESSOR_CLASSES = {
    "llava": "LlavaProcessor",
    "llava_next": "LlavaNextProcessor",
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "llava_next_video": "LlavaNextVideoProcessor",
    "video_llava": "VideoLlavaProcessor",
    "llava_onevision": "LlavaOnevisionProcessor",
    "internvl": "InternVLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "idefics3": "Idefics3Processor",
    "smolvlm": "SmolVLMProcessor",
}
# Image tokens for the 64x64 sample image: llava 6x6 patches; llava_next 2x2 tiles of 4x4 (+4 newline tokens per
# row of 8) plus the 4x4 base image; qwen 64 px -> 70 px = 10x10 patches of 7 px, merged 2x2 -> 5x5.
# llava_next_video as llava_next; video_llava 4x4 patches without CLS; llava_onevision 2x2 tiles + base of 4x4 SigLIP
# patches (no CLS) with newlines; internvl 4 tiles + thumbnail of 2x2 pixel-shuffled tokens.
TOKENS_64X64 = {
    "llava": 36,
    "llava_next": 88,
    "qwen2_vl": 25,
    "qwen2_5_vl": 25,
    "llava_next_video": 88,
    "video_llava": 16,
    "llava_onevision": 88,
    "internvl": 20,
    "qwen3_vl": 16,  # 64 px: 8x8 patches of 8 px, merged 2x2
    "idefics3": 20,  # 2x2 tiles of 32 px and the global image, 4 tokens each
    "smolvlm": 20,  # as Idefics3
}


def user_turn(num_images: int, text: str) -> list[dict]:
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module", params=SUPPORTED_TINY_FAMILIES)
def loaded(request, tiny_model_path):
    family = request.param
    folder = tiny_model_path(family)
    processor = load_processor(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    return family, folder, processor, model.eval()


def run(processor, model, conversations: list[list[dict]], images: list[Image.Image], max_new_tokens: int = 8):
    texts = [processor.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
    per_prompt, start = [], 0
    for conversation in conversations:  # the images of each conversation, in order
        count = count_image_items(conversation)
        per_prompt.append(images[start : start + count])
        start += count
    inputs = processor(
        images=processor_images(processor, per_prompt),
        text=texts,
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answers = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return inputs, output, answers


def test_folder_is_a_complete_checkpoint(loaded):
    family, _, processor, model = loaded
    assert type(processor).__name__ == PROCESSOR_CLASSES[family]
    if not is_torchvision_available():
        # Video-LLaVA has a single image processor class, numpy / PIL backed.
        assert "Pil" in type(processor.image_processor).__name__ or family == "video_llava"
    config = model.config
    text_config = config.get_text_config()
    assert config.model_type == family
    if family in tiny.LLAMA_TOKENIZER_FAMILIES:
        assert text_config.model_type == "llama"
    assert text_config.vocab_size == len(processor.tokenizer) == VOCAB_SIZE
    heads = (text_config.num_attention_heads, text_config.num_key_value_heads)
    assert text_config.num_hidden_layers == 4 and heads == (4, 2)
    assert processor.tokenizer.convert_tokens_to_ids(processor.image_token) == config.image_token_id
    assert processor.tokenizer.pad_token_id is not None
    eos = model.generation_config.eos_token_id
    assert eos is not None
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        for name, token in [("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>")]:
            assert getattr(config, name) == QWEN_IDS[token] == processor.tokenizer.convert_tokens_to_ids(token)
        assert QWEN_IDS["<|im_end|>"] in eos


def test_stock_auto_processor_loads_llava_families(tiny_model_path):
    for family in ("llava", "llava_next"):
        assert type(AutoProcessor.from_pretrained(tiny_model_path(family))).__name__ == PROCESSOR_CLASSES[family]


def test_single_prompt_generates(loaded, sample_images):
    family, _, processor, model = loaded
    inputs, output, answers = run(processor, model, [user_turn(1, "What shape is this?")], sample_images[:1])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == TOKENS_64X64[family]
    assert output.shape[1] > inputs["input_ids"].shape[1]
    assert isinstance(answers[0], str)


def test_left_padded_batch_with_zero_one_and_two_images(loaded, sample_images):
    _, _, processor, model = loaded
    conversations = [user_turn(0, "Hello, who are you?"), user_turn(1, "What colour?"), user_turn(2, "Compare them.")]
    images = [sample_images[0], sample_images[1], sample_images[2]]
    inputs, output, answers = run(processor, model, conversations, images)
    mask = inputs["attention_mask"]
    assert bool(mask[:, -1].all()) and not bool(mask[:, 0].all())  # padded on the left
    image_tokens = (inputs["input_ids"] == model.config.image_token_id).sum(dim=1).tolist()
    assert image_tokens[0] == 0 and 0 < image_tokens[1] < image_tokens[2]
    assert output.shape[0] == 3 and len(answers) == 3


def test_two_images_in_one_prompt(loaded, sample_images):
    _, _, processor, model = loaded
    inputs, output, _ = run(processor, model, [user_turn(2, "Which is bigger?")], sample_images[1:])
    assert output.shape[0] == 1 and output.shape[1] > inputs["input_ids"].shape[1]


def test_eager_matches_sdpa(loaded, sample_images):
    _, folder, processor, model = loaded
    eager = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    text = processor.apply_chat_template(user_turn(1, "What shape?"), add_generation_prompt=True)
    inputs = processor(images=sample_images[2:], text=[text], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(eager.eval()(**inputs).logits, model(**inputs).logits, atol=1e-4, rtol=1e-4)


def test_llava_next_tokens_follow_aspect_ratio(tiny_model_path, sample_images):
    processor = load_processor(tiny_model_path("llava_next"))
    counts = []
    for image in sample_images:
        text = processor.apply_chat_template(user_turn(1, "Hi"), add_generation_prompt=True)
        inputs = processor(images=[image], text=[text], return_tensors="pt")
        counts.append(int((inputs["input_ids"] == processor.image_token_id).sum()))
    assert len(set(counts)) == len(counts), counts


def test_qwen2_5_vl_uses_several_attention_windows():
    vision = tiny_config("qwen2_5_vl").vision_config
    assert all(0 <= index < vision.depth for index in vision.fullatt_block_indexes)
    assert len(vision.fullatt_block_indexes) < vision.depth  # the other layers attend within windows
    grid = torch.tensor([[1, 8, 8]])  # a 56x56 image: 8x8 patches of 7 px
    try:
        from transformers.vision_utils import get_vision_window_index
    except ImportError:  # older transformers: the same arithmetic, by hand
        merged_side = 8 // vision.spatial_merge_size
        window_side = vision.window_size // vision.spatial_merge_size // vision.patch_size
        windows = ((merged_side + window_side - 1) // window_side) ** 2
    else:
        _, cu_window_seqlens = get_vision_window_index(
            grid, vision.spatial_merge_size, vision.window_size, vision.patch_size
        )
        windows = len(torch.unique_consecutive(torch.as_tensor(cu_window_seqlens))) - 1
    assert windows > 1


def test_chat_templates_match_the_real_formats(tiny_model_path):
    llava = load_processor(tiny_model_path("llava"))
    qwen = load_processor(tiny_model_path("qwen2_vl"))
    conversation = [
        *user_turn(1, "What shape?"),
        {"role": "assistant", "content": [{"type": "text", "text": "A circle."}]},
        {"role": "user", "content": "And the colour?"},
    ]
    assert llava.apply_chat_template(conversation, add_generation_prompt=True) == (
        "USER: <image>\nWhat shape? ASSISTANT: A circle. USER: And the colour? ASSISTANT:"
    )
    assert qwen.apply_chat_template(conversation, add_generation_prompt=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What shape?<|im_end|>\n"
        "<|im_start|>assistant\nA circle.<|im_end|>\n"
        "<|im_start|>user\nAnd the colour?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_tokenizer_encodes_any_text(family):
    tokenizer = build_tiny_tokenizer(family)
    text = "Why is the café's ☃ so 🙂? Ünïcode, digits 12345 & symbols {}[]|~"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    # Ordinary English costs sub-word pieces, not one piece per byte.
    common = "What color is the circle in the picture?"
    assert len(tokenizer(common, add_special_tokens=False)["input_ids"]) < len(common) // 2


def weights_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(folder / "model.safetensors").items()):
        digest.update(name.encode())
        digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("family", SUPPORTED_TINY_FAMILIES)
def test_same_seed_same_weights(family, tmp_path, tiny_model_path):
    first = build_tiny_model(family, tmp_path / "a", seed=0)
    torch.rand(3)  # unrelated RNG use in between must not matter
    # Retrain the tokenizers too (they are cached per process), so their determinism is checked as well.
    tokenizers._llama_vocab_and_merges.cache_clear()
    tokenizers._qwen_vocab_and_merges.cache_clear()
    second = build_tiny_model(family, tmp_path / "b", seed=0)
    other = build_tiny_model(family, tmp_path / "c", seed=1)
    assert weights_digest(first) == weights_digest(second) == weights_digest(tiny_model_path(family))
    assert weights_digest(other) != weights_digest(first)
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()
