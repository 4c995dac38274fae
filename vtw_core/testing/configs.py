"""The tiny families' model configs (`tiny_config`) and generation configs, with token ids that match
`build_tiny_tokenizer(family)` and vision geometry that matches `build_tiny_processor(family)`."""

from __future__ import annotations

from transformers import (
    CLIPVisionConfig,
    GenerationConfig,
    Idefics3Config,
    InternVLConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaNextConfig,
    LlavaNextVideoConfig,
    LlavaOnevisionConfig,
    PreTrainedConfig,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
    Qwen3VLConfig,
    SiglipVisionConfig,
    SmolVLMConfig,
    VideoLlavaConfig,
)

from vtw_core.testing.sizes import (
    IDEFICS3_FAMILIES,
    IDEFICS3_PATCH,
    IDEFICS3_SCALE,
    IDEFICS3_TILE,
    INTERNVL_IMAGE_SEQ_LENGTH,
    INTERNVL_PATCH,
    INTERNVL_TILE,
    LLAMA_TOKENIZER_FAMILIES,
    LLAVA_IMAGE_SIZE,
    LLAVA_NEXT_PATCH,
    LLAVA_NEXT_PINPOINTS,
    LLAVA_NEXT_TILE,
    LLAVA_PATCH,
    MAX_POSITIONS,
    ONEVISION_PATCH,
    ONEVISION_PINPOINTS,
    ONEVISION_TILE,
    QWEN3_DEEPSTACK,
    QWEN3_PATCH,
    QWEN25_FULLATT_BLOCKS,
    QWEN25_WINDOW,
    QWEN_MERGE,
    QWEN_PATCH,
    QWEN_TEMPORAL_PATCH,
    TEXT_HEADS,
    TEXT_HIDDEN,
    TEXT_INTERMEDIATE,
    TEXT_KV_HEADS,
    VIDEO_LLAVA_IMAGE_SIZE,
    VIDEO_LLAVA_PATCH,
    VISION_HEADS,
    VISION_HIDDEN,
    VISION_INTERMEDIATE,
    VISION_LAYERS,
    VOCAB_SIZE,
    check_family,
)
from vtw_core.testing.tokenizers import (
    IDEFICS3_IDS,
    LLAMA_BOS_ID,
    LLAMA_EOS_ID,
    LLAVA_IMAGE_TOKEN,
    LLAVA_PAD_TOKEN,
    VIDEO_TOKEN,
    llama_family_ids,
    qwen_family_ids,
)


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


def _vision_sizes() -> dict[str, int]:
    """The sizes every ViT-style tower (CLIP, SigLIP, InternViT, Idefics3's) shares."""
    return {
        "hidden_size": VISION_HIDDEN,
        "intermediate_size": VISION_INTERMEDIATE,
        "num_hidden_layers": VISION_LAYERS,
        "num_attention_heads": VISION_HEADS,
    }


def _qwen_vision_sizes(patch_size: int) -> dict[str, int]:
    """The sizes the Qwen-VL towers share (their widths are named differently per version)."""
    return {
        "depth": VISION_LAYERS,
        "num_heads": VISION_HEADS,
        "patch_size": patch_size,
        "spatial_merge_size": QWEN_MERGE,
        "temporal_patch_size": QWEN_TEMPORAL_PATCH,
    }


def _clip_vision_config(image_size: int, patch_size: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        **_vision_sizes(), image_size=image_size, patch_size=patch_size, projection_dim=VISION_HIDDEN
    )


def _llama_text_config(num_layers: int, pad_token_id: int) -> LlamaConfig:
    return LlamaConfig(
        **_text_sizes(num_layers),
        bos_token_id=LLAMA_BOS_ID,
        eos_token_id=LLAMA_EOS_ID,
        pad_token_id=pad_token_id,
        tie_word_embeddings=False,
    )


def _chatml_text_config(family: str, num_layers: int, **rope: object) -> dict:
    """A Qwen2-style decoder with the family's ChatML token ids; `rope` adds to the default rotary parameters."""
    ids = qwen_family_ids(family)
    return {
        **_text_sizes(num_layers),
        "rope_parameters": {"rope_type": "default", "rope_theta": 1_000_000.0, **rope},
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "tie_word_embeddings": False,
    }


def _qwen_vl_parts(family: str, num_layers: int) -> dict:
    """The Qwen-VL decoder (M-RoPE: head_dim 16 -> 8 rotary frequencies, split between the (temporal, height,
    width) position streams) and its vision token ids."""
    text = _chatml_text_config(family, num_layers, mrope_section=[2, 3, 3])
    ids = qwen_family_ids(family)
    return {
        "text_config": text,
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "tie_word_embeddings": False,
    }


def _llava_style_config(family: str, num_layers: int) -> PreTrainedConfig:
    """The CLIP + Llama families (LLaVA, LLaVA-NeXT, LLaVA-NeXT-Video, Video-LLaVA): CLS dropped ("default"),
    features from the second-to-last tower layer, a GELU projector."""
    ids = llama_family_ids(family)
    shared = {
        "text_config": _llama_text_config(num_layers, ids[LLAVA_PAD_TOKEN]),
        "image_token_id": ids[LLAVA_IMAGE_TOKEN],
        "vision_feature_select_strategy": "default",
        "vision_feature_layer": -2,
        "projector_hidden_act": "gelu",
        "pad_token_id": ids[LLAVA_PAD_TOKEN],
        "tie_word_embeddings": False,
    }
    if VIDEO_TOKEN in ids:
        shared["video_token_id"] = ids[VIDEO_TOKEN]
    if family == "llava":
        vision_config = _clip_vision_config(LLAVA_IMAGE_SIZE, LLAVA_PATCH)
        return LlavaConfig(
            vision_config=vision_config, image_seq_length=(LLAVA_IMAGE_SIZE // LLAVA_PATCH) ** 2, **shared
        )
    if family == "video_llava":
        patches = (VIDEO_LLAVA_IMAGE_SIZE // VIDEO_LLAVA_PATCH) ** 2
        return VideoLlavaConfig(
            vision_config=_clip_vision_config(VIDEO_LLAVA_IMAGE_SIZE, VIDEO_LLAVA_PATCH),
            image_seq_length=patches,
            video_seq_length=(patches + 1) * 8,
            **shared,
        )
    anyres = {
        "vision_config": _clip_vision_config(LLAVA_NEXT_TILE, LLAVA_NEXT_PATCH),
        "image_grid_pinpoints": LLAVA_NEXT_PINPOINTS,
        "image_seq_length": (LLAVA_NEXT_TILE // LLAVA_NEXT_PATCH) ** 2,
    }
    if family == "llava_next":
        return LlavaNextConfig(**anyres, **shared)
    return LlavaNextVideoConfig(
        **anyres,
        video_seq_length=(LLAVA_NEXT_TILE // LLAVA_NEXT_PATCH // 2) ** 2,  # frames are pooled 2x2
        spatial_pool_stride=2,
        **shared,
    )


def tiny_config(family: str, *, num_layers: int = 4) -> PreTrainedConfig:
    """The tiny model's config (no tokenizer or weights); token ids match `build_tiny_tokenizer(family)`."""
    check_family(family)
    if family in ("llava", "llava_next", "llava_next_video", "video_llava"):
        return _llava_style_config(family, num_layers)
    if family == "llava_onevision":
        ids = qwen_family_ids(family)
        return LlavaOnevisionConfig(
            vision_config=SiglipVisionConfig(
                **_vision_sizes(), image_size=ONEVISION_TILE, patch_size=ONEVISION_PATCH, vision_use_head=False
            ),
            text_config={"model_type": "qwen2", **_chatml_text_config(family, num_layers)},
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
                **_vision_sizes(),
                "image_size": [INTERNVL_TILE, INTERNVL_TILE],
                "patch_size": [INTERNVL_PATCH, INTERNVL_PATCH],
            },
            text_config={"model_type": "qwen2", **_chatml_text_config(family, num_layers)},
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
            vision_config={**_vision_sizes(), "image_size": IDEFICS3_TILE, "patch_size": IDEFICS3_PATCH},
            text_config=_llama_text_config(num_layers, pad),
            image_token_id=IDEFICS3_IDS["<image>"],
            scale_factor=IDEFICS3_SCALE,
            pad_token_id=pad,
            tie_word_embeddings=False,
        )
    parts = _qwen_vl_parts(family, num_layers)
    if family == "qwen3_vl":
        text = parts.pop("text_config")
        text["rope_parameters"]["mrope_interleaved"] = True
        return Qwen3VLConfig(
            text_config={**text, "head_dim": TEXT_HIDDEN // TEXT_HEADS},
            vision_config={
                **_qwen_vision_sizes(QWEN3_PATCH),
                "hidden_size": VISION_HIDDEN,
                "intermediate_size": VISION_INTERMEDIATE,
                "out_hidden_size": TEXT_HIDDEN,
                "num_position_embeddings": 16,
                "deepstack_visual_indexes": QWEN3_DEEPSTACK,
            },
            **parts,
        )
    if family == "qwen2_vl":
        return Qwen2VLConfig(
            vision_config={
                **_qwen_vision_sizes(QWEN_PATCH),
                "embed_dim": VISION_HIDDEN,
                "hidden_size": TEXT_HIDDEN,  # the merger's output width = the decoder's width
                "mlp_ratio": VISION_INTERMEDIATE // VISION_HIDDEN,
            },
            **parts,
        )
    return Qwen2_5_VLConfig(
        vision_config={
            **_qwen_vision_sizes(QWEN_PATCH),
            "hidden_size": VISION_HIDDEN,
            "intermediate_size": VISION_INTERMEDIATE,
            "out_hidden_size": TEXT_HIDDEN,
            "window_size": QWEN25_WINDOW,
            "fullatt_block_indexes": QWEN25_FULLATT_BLOCKS,
        },
        **parts,
    )


def generation_config(family: str) -> GenerationConfig:
    """Llama-layout models stop on </s> (Idefics3 and SmolVLM end a turn with <end_of_utterance> first); ChatML
    models on <|im_end|> (end of turn) or <|endoftext|>."""
    if family in LLAMA_TOKENIZER_FAMILIES:
        ids = llama_family_ids(family)
        eos = [ids["<end_of_utterance>"], LLAMA_EOS_ID] if family in IDEFICS3_FAMILIES else LLAMA_EOS_ID
        return GenerationConfig(bos_token_id=LLAMA_BOS_ID, eos_token_id=eos, pad_token_id=ids[LLAVA_PAD_TOKEN])
    ids = qwen_family_ids(family)
    return GenerationConfig(
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
    )
