"""The default model's architecture: a stock `LlavaForConditionalGeneration` with LLaVA-1.5's proportions.

A CLIP vision tower over 72x72 images cut into 3x3 patches, so 576 vision tokens per image (a 24x24 grid; CLS
dropped by the "default" feature strategy), a two-layer GELU projector and a 16-layer Llama decoder of width 256.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlamaTokenizer, LlavaConfig, LlavaForConditionalGeneration

from vtw_core.testing.tokenizers import LLAVA_IMAGE_TOKEN

IMAGE_SIZE = 72
PATCH_SIZE = 3
VISION_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 576, a 24x24 grid as in LLaVA-1.5

# Sizes of the shipped model (v3, and v4, its chat fine-tune): LLaVA-1.5's proportions, so that VTW's saving
# shows on a CPU. The decoder is wide enough that a layer's arithmetic outweighs the fixed cost of calling it
# (v2, 128 wide, was not).
HIDDEN = 256
LAYERS = 16
HEADS = 4
VISION_HEADS = 2  # heads of 32: 16-wide heads ran the tower at half the decoder's FLOP rate on CPU
VISION_HIDDEN = 64
VISION_LAYERS = 3


def build_config(
    tokenizer: LlamaTokenizer,
    *,
    layers: int = LAYERS,
    hidden: int = HIDDEN,
    vision_hidden: int = VISION_HIDDEN,
    vision_layers: int = VISION_LAYERS,
    vision_heads: int = VISION_HEADS,
) -> LlavaConfig:
    image_id = tokenizer.convert_tokens_to_ids(LLAVA_IMAGE_TOKEN)
    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=vision_hidden,
            intermediate_size=4 * vision_hidden,
            num_hidden_layers=vision_layers,
            num_attention_heads=vision_heads,
            image_size=IMAGE_SIZE,
            patch_size=PATCH_SIZE,
            projection_dim=vision_hidden,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=HEADS,
            num_key_value_heads=HEADS,
            max_position_embeddings=1024,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        ),
        image_token_id=image_id,
        image_seq_length=VISION_TOKENS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def vision_features(model: LlavaForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """(batch, VISION_TOKENS, hidden): what LLaVA puts at the image tokens (last tower layer, CLS dropped,
    projected), as `LlavaModel.get_image_features` computes it for this config."""
    tower_out = model.model.vision_tower(pixel_values=pixel_values, output_hidden_states=True)
    return model.model.multi_modal_projector(tower_out.hidden_states[-1][:, 1:])
