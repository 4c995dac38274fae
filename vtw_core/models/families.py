"""Which multimodal families the engine runs, and where their parts live.

Every supported family is a stock transformers `*ForConditionalGeneration` whose `.model` holds a vision
tower and a text decoder (`language_model`; `text_model` in Idefics3 / SmolVLM) with `embed_tokens`, `layers`,
`norm`, `rotary_emb`, and whose prompt marks each vision embedding (image or video frame) with a placeholder
token id named in the config. A family the engine cannot run by VTW's definition is refused with the reason.
"""

from __future__ import annotations

from torch import nn

from vtw_core.errors import UnsupportedModelError

# model_type -> human name, for messages and the README.
SUPPORTED_FAMILIES: dict[str, str] = {
    "llava": "LLaVA-1.5",
    "llava_next": "LLaVA-NeXT",
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "llava_next_video": "LLaVA-NeXT-Video",
    "video_llava": "Video-LLaVA",
    "llava_onevision": "LLaVA-OneVision",
    "internvl": "InternVL",
    "qwen3_vl": "Qwen3-VL",
    "idefics3": "Idefics3",
    "smolvlm": "SmolVLM",
}

# Families whose processor takes videos (their vision tokens are image and video placeholders alike; InternVL marks
# video frames with its image token).
VIDEO_FAMILIES = frozenset(
    {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_next_video", "video_llava", "llava_onevision", "internvl"}
)

# model_type -> why VTW cannot run it exactly on the stock layers today.
REFUSED_FAMILIES: dict[str, str] = {
    "gemma3": (
        "Gemma 3 is not supported: every Gemma 3 checkpoint interleaves sliding-window layers (their own rotary "
        "table, a window counted in sequence slots) with global ones, and its image tokens attend bidirectionally "
        "within each image; the engine keeps one causal mask and one rotary table per layer group, and after "
        "withdrawal a window over the packed text slots would no longer be the stock window, so K = N would not "
        "be the stock model"
    ),
    "qwen3_vl_moe": (
        "Qwen3-VL-MoE is not supported yet: its mixture-of-experts decoder has no tests here and no FLOPs model"
    ),
}

# Where the text decoder lives inside `model.model`, where it is not `language_model`.
DECODER_ATTRIBUTE: dict[str, str] = {"idefics3": "text_model", "smolvlm": "text_model"}

# Families whose rotary embedding takes (3, batch, seq) multimodal positions.
MROPE_FAMILIES = frozenset({"qwen2_vl", "qwen2_5_vl", "qwen3_vl"})

# Families whose stock decoder adds vision features into the outputs of its first layers at the vision positions
# (Qwen3-VL's DeepStack); embed.py hands them to the engine as per-layer additions.
DEEPSTACK_FAMILIES = frozenset({"qwen3_vl"})


def supported_families_text() -> str:
    return ", ".join(f"{name} (`{model_type}`)" for model_type, name in SUPPORTED_FAMILIES.items())


def model_family(config) -> str:
    """The config's model_type if the engine supports it, else a clear UnsupportedModelError."""
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED_FAMILIES:
        raise UnsupportedModelError(f"{REFUSED_FAMILIES[model_type]}; supported families: {supported_families_text()}")
    if model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported families: {supported_families_text()}"
        )
    text_config = config.get_text_config()
    layer_types = getattr(text_config, "layer_types", None) or []
    if any(layer_type != "full_attention" for layer_type in layer_types):
        raise UnsupportedModelError(
            f"{SUPPORTED_FAMILIES[model_type]} checkpoints with sliding-window layers are not supported "
            "(the engine keeps a full KV cache per layer)"
        )
    return model_type


def vision_token_ids(config) -> tuple[int, ...]:
    """Placeholder ids that mark vision embeddings in the prompt (images, and videos where the family has them)."""
    ids = []
    for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value not in ids:
            ids.append(value)
    if not ids:
        raise UnsupportedModelError(f"config of {config.model_type!r} names no image token id")
    return tuple(ids)


def language_model(model: nn.Module) -> nn.Module:
    """The text decoder (embed_tokens, layers, norm, rotary_emb) inside a conditional-generation model."""
    family = model_family(model.config)
    decoder = getattr(model.model, DECODER_ATTRIBUTE.get(family, "language_model"))
    for part in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(decoder, part):
            raise UnsupportedModelError(f"{type(decoder).__name__} has no `{part}`; cannot run it layer by layer")
    return decoder


def num_decoder_layers(config) -> int:
    return config.get_text_config().num_hidden_layers
