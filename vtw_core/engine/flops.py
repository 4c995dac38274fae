"""Analytic FLOPs of a multimodal LLM, from its config alone (no weights).

Conventions (those of `torch.utils.flop_counter.FlopCounterMode`, and of the VTW / FastV papers):
2 FLOPs per multiply-add; only matmuls count (linear layers, attention QK^T and AV, convolutions), never
norms, activations, softmax, biases or rotary embeddings; attention scores are counted over the full
query x key rectangle (no causal halving), which is what FlopCounterMode counts for sdpa.

Token counts are per decoder layer, so any schedule (VTW, FastV, G-Search) is one list of integers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vtw_core import validation
from vtw_core.errors import InputError, UnsupportedModelError
from vtw_core.models.families import SUPPORTED_FAMILIES, supported_families_text

# Families whose vision tower runs once per crop / tile / video frame (the rest take Qwen's grid_thw).
_PER_CROP_FAMILIES = (
    "llava",
    "llava_next",
    "llava_next_video",
    "video_llava",
    "llava_onevision",
    "internvl",
    "idefics3",
    "smolvlm",
)


# ---------------------------------------------------------------------------------------------------------
# Language model


@dataclass(frozen=True)
class DecoderDims:
    """The shapes of a decoder-only language model that its FLOPs depend on."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: Any) -> DecoderDims:
        """From a multimodal config (its text config is used) or a text config; GQA aware."""
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        try:
            hidden, heads = text.hidden_size, text.num_attention_heads
            dims = cls(
                hidden_size=hidden,
                intermediate_size=text.intermediate_size,
                num_layers=text.num_hidden_layers,
                num_heads=heads,
                # Older configs omit num_key_value_heads: plain multi-head attention.
                num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
                # Some models (Gemma, Qwen3) set head_dim apart from hidden / heads.
                head_dim=getattr(text, "head_dim", None) or hidden // heads,
                vocab_size=text.vocab_size,
            )
        except AttributeError as error:
            raise UnsupportedModelError(
                f"{type(text).__name__} does not describe a decoder this FLOPs model knows: {error}"
            ) from error
        return dims


def _layer_linear_flops(dims: DecoderDims, query_tokens: int) -> int:
    """q, k, v, o projections (GQA: k and v are narrower) and the gated MLP (gate, up, down)."""
    q_width = dims.num_heads * dims.head_dim
    kv_width = dims.num_kv_heads * dims.head_dim
    attention = dims.hidden_size * (2 * q_width + 2 * kv_width)  # q and o; k and v
    mlp = 3 * dims.hidden_size * dims.intermediate_size
    return 2 * query_tokens * (attention + mlp)


def _attention_flops(query_tokens: int, key_tokens: int, num_heads: int, head_dim: int) -> int:
    """QK^T and AV over the full rectangle; KV heads are broadcast to every query head, so GQA saves nothing here."""
    return 2 * 2 * query_tokens * key_tokens * num_heads * head_dim


def decoder_layer_flops(dims: DecoderDims, query_tokens: int, key_tokens: int) -> int:
    """One decoder layer run on `query_tokens` new tokens attending to `key_tokens` keys."""
    return _layer_linear_flops(dims, query_tokens) + _attention_flops(
        query_tokens, key_tokens, dims.num_heads, dims.head_dim
    )


def lm_head_flops(dims: DecoderDims, tokens: int) -> int:
    """The output projection to the vocabulary for `tokens` positions."""
    return 2 * tokens * dims.hidden_size * dims.vocab_size


def _check_schedule(dims: DecoderDims, tokens_per_layer: Sequence[int]) -> None:
    if len(tokens_per_layer) != dims.num_layers:
        raise InputError(
            f"tokens_per_layer has {len(tokens_per_layer)} entries but the model has {dims.num_layers} layers"
        )
    if any(count < 0 for count in tokens_per_layer):
        raise InputError(f"token counts must be >= 0, got {list(tokens_per_layer)}")


def prefill_flops(dims: DecoderDims, tokens_per_layer: Sequence[int], logits_tokens: int = 1) -> int:
    """Prefill where layer l processes tokens_per_layer[l] tokens (queries = keys), plus the LM head."""
    _check_schedule(dims, tokens_per_layer)
    layers = sum(decoder_layer_flops(dims, count, count) for count in tokens_per_layer)
    return layers + lm_head_flops(dims, logits_tokens)


def decode_flops(
    dims: DecoderDims, tokens_per_layer: Sequence[int], decode_steps: int, logits_tokens_per_step: int = 1
) -> int:
    """`decode_steps` one-token passes after a prefill whose layer l cached tokens_per_layer[l] tokens.

    Step s (from 0) attends to tokens_per_layer[l] + s + 1 keys in layer l (the cache plus itself).
    """
    _check_schedule(dims, tokens_per_layer)
    if decode_steps < 0:
        raise InputError(f"decode_steps must be >= 0, got {decode_steps}")
    # Attention is linear in the key count, so the steps sum in closed form:
    # sum_s (n + s + 1) = steps * n + steps * (steps + 1) / 2.
    keys = sum(decode_steps * count for count in tokens_per_layer)
    keys += dims.num_layers * decode_steps * (decode_steps + 1) // 2
    linear = decode_steps * dims.num_layers * _layer_linear_flops(dims, 1)
    attention = _attention_flops(1, keys, dims.num_heads, dims.head_dim)
    return linear + attention + decode_steps * lm_head_flops(dims, logits_tokens_per_step)


def vtw_tokens_per_layer(num_layers: int, vision_tokens: int, text_tokens: int, k: int | None) -> list[int]:
    """Tokens per layer under VTW: layers < k see vision + text, layers >= k text only.

    k None or k == num_layers is the baseline (every layer sees every token).
    """
    if vision_tokens < 0 or text_tokens < 0:
        raise InputError(f"token counts must be >= 0, got {vision_tokens} vision and {text_tokens} text")
    k = num_layers if k is None else validation.check_k(k, num_layers)
    return [vision_tokens + text_tokens] * k + [text_tokens] * (num_layers - k)


def request_flops(config: Any, vision_tokens: int, text_tokens: int, k: int | None, new_tokens: int = 0) -> dict:
    """Baseline vs VTW FLOPs of one request, language model only (the vision tower is not included).

    Prefill computes logits for the last token only, which gives the first new token; each further new
    token costs one decode step, so `new_tokens` new tokens take max(new_tokens - 1, 0) decode steps.
    """
    if new_tokens < 0:
        raise InputError(f"new_tokens must be >= 0, got {new_tokens}")
    if text_tokens < 1:
        # The next token is predicted from the last (text) token, which VTW never withdraws.
        raise InputError(f"a request needs at least one text token, got {text_tokens}")
    dims = DecoderDims.from_config(config)
    steps = max(new_tokens - 1, 0)

    def side(layer_k: int | None) -> dict[str, int]:
        schedule = vtw_tokens_per_layer(dims.num_layers, vision_tokens, text_tokens, layer_k)
        prefill = prefill_flops(dims, schedule)
        decode = decode_flops(dims, schedule, steps)
        return {"prefill_flops": prefill, "decode_flops": decode, "total_flops": prefill + decode}

    baseline, vtw = side(None), side(k)
    return {
        "num_layers": dims.num_layers,
        "vision_tokens": vision_tokens,
        "text_tokens": text_tokens,
        "k": k,
        "new_tokens": new_tokens,
        "baseline": baseline,
        "vtw": vtw,
        "prefill_ratio": vtw["prefill_flops"] / baseline["prefill_flops"],
        "total_ratio": vtw["total_flops"] / baseline["total_flops"],
    }


# ---------------------------------------------------------------------------------------------------------
# Vision tower and projector


def _vit_block_flops(tokens: int, hidden: int, mlp_flops_per_token: int, attention: int) -> int:
    """A pre-norm ViT block: fused or separate q, k, v, o projections, the MLP, and the given attention FLOPs."""
    return 2 * tokens * 4 * hidden * hidden + tokens * mlp_flops_per_token + attention


_VIT_TOWERS = ("clip_vision_model", "siglip_vision_model", "internvl_vision", "idefics3_vision", "smolvlm_vision")


def _vit_tower_flops(vision: Any) -> tuple[int, int]:
    """(FLOPs of one pass, output tokens) of a CLIP / SigLIP / InternViT tower on one crop.

    Patch embedding, then pre-norm blocks (q, k, v, o; fc1, fc2) over the patches plus CLS where the tower has one
    (CLIP, InternViT); SigLIP's attention-pooling head only where the config enables it.
    """
    if vision.model_type not in _VIT_TOWERS:
        raise UnsupportedModelError(
            f"vision tower {vision.model_type!r} is not supported for FLOPs; only CLIP (`clip_vision_model`), "
            "SigLIP (`siglip_vision_model`) and InternViT (`internvl_vision`)"
        )
    hidden = vision.hidden_size
    image_size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    patch_size = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
    patches = (image_size // patch_size) ** 2
    tokens = patches + (1 if vision.model_type in ("clip_vision_model", "internvl_vision") else 0)  # CLS
    patch_embed = 2 * patches * hidden * vision.num_channels * patch_size**2
    # HF runs every encoder layer even when a middle layer's hidden states are the ones selected.
    block = _vit_block_flops(tokens, hidden, 2 * 2 * hidden * vision.intermediate_size, 4 * tokens * tokens * hidden)
    tower = patch_embed + vision.num_hidden_layers * block
    if vision.model_type == "siglip_vision_model" and getattr(vision, "vision_use_head", True):
        # One probe query attends over every token: q on the probe, k and v on the tokens, out and the MLP on one.
        heads = vision.num_attention_heads
        tower += 2 * hidden * hidden * (2 + 2 * tokens) + _attention_flops(1, tokens, heads, hidden // heads)
        tower += 2 * 2 * hidden * vision.intermediate_size
    return tower, tokens


def _llava_projector_flops(config: Any, tokens: int) -> int:
    """LLaVA's two-layer projector on `tokens` features (several feature layers are concatenated first)."""
    feature_layers = config.vision_feature_layer
    num_feature_layers = 1 if isinstance(feature_layers, int) else len(feature_layers)
    text_hidden = config.get_text_config().hidden_size
    return 2 * tokens * (config.vision_config.hidden_size * num_feature_layers * text_hidden + text_hidden**2)


def _clip_llava_flops(config: Any, num_crops: int, video_frames: int = 0) -> int:
    """CLIP / SigLIP run once per crop and per video frame, then the two-layer projector on the selected tokens."""
    if config.vision_config.model_type == "internvl_vision":
        raise UnsupportedModelError("InternViT towers are counted by the internvl family only")
    tower, tokens = _vit_tower_flops(config.vision_config)
    patches = tokens - (0 if config.vision_config.model_type == "siglip_vision_model" else 1)
    selected = patches if config.vision_feature_select_strategy == "default" else tokens
    # LLaVA-NeXT's unpadding and image_newline, OneVision's bilinear pooling: slicing and interpolation, no matmuls.
    images = num_crops * (tower + _llava_projector_flops(config, selected))
    if not video_frames:
        return images
    family = config.model_type
    if family == "llava_next_video":  # frames are average-pooled before the projector
        side = int(patches**0.5) // config.spatial_pool_stride
        frame_tokens = side * side
    elif family == "video_llava":  # frames keep CLS: the video tower's features are not selected
        frame_tokens = tokens
    else:
        frame_tokens = selected
    return images + video_frames * (tower + _llava_projector_flops(config, frame_tokens))


def _idefics3_flops(config: Any, num_tiles: int) -> int:
    """Idefics3's SigLIP-style tower once per tile, then the connector: pixel shuffle (a reshape) and one linear."""
    tower, tokens = _vit_tower_flops(config.vision_config)
    width = config.vision_config.hidden_size * config.scale_factor**2
    connector = 2 * (tokens // config.scale_factor**2) * width * config.get_text_config().hidden_size
    return num_tiles * (tower + connector)


def _internvl_flops(config: Any, num_tiles: int) -> int:
    """InternViT once per tile, CLS dropped, pixel shuffle (a reshape), then the two-layer projector."""
    tower, tokens = _vit_tower_flops(config.vision_config)
    shuffled = int((tokens - 1) * config.downsample_ratio**2)
    width = int(config.vision_config.hidden_size / config.downsample_ratio**2)
    text_hidden = config.get_text_config().hidden_size
    return num_tiles * (tower + 2 * shuffled * (width * text_hidden + text_hidden**2))


def _window_lengths(t: int, h: int, w: int, vision: Any) -> list[int]:
    """Token counts of the attention windows of Qwen2.5-VL's windowed blocks, as HF computes them."""
    merge = vision.spatial_merge_size
    # Window side in merged units; windows tile each frame, the last row and column may be short.
    side = vision.window_size // merge // vision.patch_size
    if side < 1:  # HF divides by it too
        raise UnsupportedModelError(f"window_size {vision.window_size} is smaller than one merged patch")
    grid_h, grid_w = h // merge, w // merge
    rows = [min(side, grid_h - start) for start in range(0, grid_h, side)]
    cols = [min(side, grid_w - start) for start in range(0, grid_w, side)]
    return [r * c * merge * merge for _ in range(t) for r in rows for c in cols]


def _qwen3_vit_flops(config: Any, grid_thw: Sequence[tuple[int, int, int]]) -> int:
    """Qwen3-VL ViT: fc1/fc2 blocks with full attention per frame, the merger, and one DeepStack merger per
    deepstack layer (the same shapes). The learned position grid is interpolated elementwise: no matmul."""
    vision = config.vision_config
    hidden, head_dim = vision.hidden_size, vision.hidden_size // vision.num_heads
    grids = [tuple(int(x) for x in thw) for thw in grid_thw]
    patches = sum(t * h * w for t, h, w in grids)
    patch_embed = 2 * patches * hidden * vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    attention = sum(_attention_flops(h * w, h * w, vision.num_heads, head_dim) for t, h, w in grids for _ in range(t))
    blocks = vision.depth * _vit_block_flops(patches, hidden, 2 * 2 * hidden * vision.intermediate_size, attention)
    merged_width = hidden * vision.spatial_merge_size**2
    merged = patches // vision.spatial_merge_size**2
    merger = 2 * merged * merged_width * (merged_width + vision.out_hidden_size)
    return patch_embed + blocks + (1 + len(vision.deepstack_visual_indexes)) * merger


def _qwen_vit_flops(config: Any, grid_thw: Sequence[tuple[int, int, int]]) -> int:
    """Qwen2-VL / Qwen2.5-VL ViT on all images at once (attention within each image frame or window)."""
    vision = config.vision_config
    if config.model_type == "qwen3_vl":
        return _qwen3_vit_flops(config, grid_thw)
    qwen25 = config.model_type == "qwen2_5_vl"
    hidden = vision.hidden_size if qwen25 else vision.embed_dim
    out_hidden = vision.out_hidden_size if qwen25 else vision.hidden_size
    head_dim = hidden // vision.num_heads
    grids = [tuple(int(x) for x in thw) for thw in grid_thw]
    patches = sum(t * h * w for t, h, w in grids)

    patch_embed = 2 * patches * hidden * vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    if qwen25:
        mlp_per_token = 3 * 2 * hidden * vision.intermediate_size  # SwiGLU: gate, up, down
    else:
        mlp_per_token = 2 * 2 * hidden * int(hidden * vision.mlp_ratio)  # fc1, fc2

    def attention(lengths: list[int]) -> int:
        return sum(_attention_flops(n, n, vision.num_heads, head_dim) for n in lengths)

    # Full attention: each frame of each image is its own sequence (HF's cu_seqlens).
    full = attention([h * w for t, h, w in grids for _ in range(t)])
    windowed = attention([n for t, h, w in grids for n in _window_lengths(t, h, w, vision)]) if qwen25 else full
    full_blocks = set(vision.fullatt_block_indexes) if qwen25 else set(range(vision.depth))
    blocks = sum(
        _vit_block_flops(patches, hidden, mlp_per_token, full if index in full_blocks else windowed)
        for index in range(vision.depth)
    )

    # The merger concatenates spatial_merge_size^2 neighbours, then a two-layer MLP.
    merged_width = hidden * vision.spatial_merge_size**2
    merged = patches // vision.spatial_merge_size**2
    merger = 2 * merged * merged_width * (merged_width + out_hidden)
    return patch_embed + blocks + merger


def vision_flops(
    config: Any, *, num_crops: int = 0, grid_thw: Sequence[tuple[int, int, int]] = (), video_frames: int = 0
) -> int:
    """FLOPs of the vision tower and multimodal projector for a request's images and videos.

    LLaVA family, LLaVA-OneVision, Video-LLaVA: `num_crops` vision-tower passes for images (one per image for
    LLaVA-1.5 and Video-LLaVA; the anyres crops including the base image for LLaVA-NeXT(-Video) and OneVision,
    summed over images) and `video_frames` passes for video frames. InternVL: `num_crops` tiles (thumbnail
    included). Qwen2-VL / Qwen2.5-VL: `grid_thw`, one (t, h, w) patch grid per image or video, as the processor's
    image_grid_thw and video_grid_thw.
    """
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:  # every family the engine runs has its vision tower counted here
        names = supported_families_text()
        raise UnsupportedModelError(f"no vision FLOPs for model type {model_type!r}; supported families: {names}")
    if model_type in _PER_CROP_FAMILIES:
        if num_crops < 0 or video_frames < 0 or len(grid_thw):
            raise InputError(f"{model_type} takes num_crops >= 0 (got {num_crops}) and video_frames, not grid_thw")
        if video_frames and model_type in ("llava", "llava_next", "idefics3", "smolvlm"):
            raise InputError(f"{model_type} takes no video frames")
        if model_type == "internvl":  # a video frame is one more tile
            return _internvl_flops(config, num_crops + video_frames)
        if model_type in ("idefics3", "smolvlm"):
            return _idefics3_flops(config, num_crops)
        return _clip_llava_flops(config, num_crops, video_frames)
    if num_crops or video_frames:
        raise InputError(f"{model_type} takes grid_thw (one (t, h, w) per image or video), not num_crops")
    merge = config.vision_config.spatial_merge_size
    for t, h, w in grid_thw:
        if min(t, h, w) < 1 or h % merge or w % merge:
            raise InputError(f"grid (t, h, w) = {(t, h, w)} must be positive with h and w divisible by {merge}")
    return _qwen_vit_flops(config, grid_thw)


def request_vision_flops(config: Any, model_inputs: dict[str, Any]) -> int:
    """`vision_flops` for a processor batch: crops, tiles, frames and grids read from its tensors as the model does."""
    family = getattr(config, "model_type", None)
    if family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        grids = [
            tuple(row)
            for name in ("image_grid_thw", "video_grid_thw")
            if model_inputs.get(name) is not None
            for row in model_inputs[name].tolist()
        ]
        return vision_flops(config, grid_thw=grids) if grids else 0
    videos = model_inputs.get("pixel_values_videos")
    frames = int(videos.shape[0] * videos.shape[1]) if videos is not None else 0
    pixel_values = model_inputs.get("pixel_values")
    if pixel_values is None:
        pixel_values = model_inputs.get("pixel_values_images")  # Video-LLaVA's name for image pixels
    crops = 0
    image_sizes = model_inputs.get("image_sizes")
    if (
        pixel_values is not None
        and image_sizes is not None
        and family in ("llava_next", "llava_next_video", "llava_onevision")
    ):
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        sizes = image_sizes.tolist()
        # OneVision crops an image only when it is its prompt's single image; several images get their base view.
        per_prompt = model_inputs.get("batch_num_images")
        patching = (
            [True] * len(sizes) if per_prompt is None else [n == 1 for n in per_prompt.tolist() for _ in range(n)]
        )
        tile = config.vision_config.image_size
        crops = sum(
            image_size_to_num_patches(size, config.image_grid_pinpoints, tile) if crop else 1
            for size, crop in zip(sizes, patching, strict=True)
        )
    elif pixel_values is not None and family in ("idefics3", "smolvlm"):
        # (images, tiles, 3, h, w), padded with all-zero tiles that the model skips, as it does here.
        tiles = pixel_values.flatten(0, 1)
        crops = int((tiles.flatten(1) != 0).any(1).sum())
    elif pixel_values is not None:
        crops = int(pixel_values.shape[0])
    if not crops and not frames:
        return 0
    return vision_flops(config, num_crops=crops, video_frames=frames)


def flop_counter_formulas() -> dict:
    """Extra formulas for `FlopCounterMode(custom_mapping=...)`: count sdpa on CPU like on GPU.

    torch's CPU sdpa kernel (aten._scaled_dot_product_flash_attention_for_cpu) is missing from
    FlopCounterMode's registry, so without this it counts 0 FLOPs for attention on CPU.
    """
    import torch
    from torch.utils.flop_counter import sdpa_flop_count

    def cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    return {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa}
