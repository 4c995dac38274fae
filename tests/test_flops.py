"""Analytic FLOPs (vtw_core.engine.flops) against FlopCounterMode on real forward passes and against the VTW paper.

Every comparison is between the formula and something measured or published: FlopCounterMode around stock
transformers modules (tiny random models on CPU, or the real configs on the meta device, where only shapes
exist and nothing is computed), or the paper's Table 2 figures.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaNextConfig,
    Qwen2_5_VLConfig,
    Qwen2VLConfig,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
from transformers.vision_utils import get_vision_position_ids

from vtw_core.engine import flops
from vtw_core.errors import InputError, UnsupportedModelError
from vtw_core.models.configs import shipped_config_names, shipped_config_path
from vtw_core.models.families import language_model

ATTENTIONS = ["sdpa", "eager"]


# ---------------------------------------------------------------------------------------------------------
# Measuring


def measure(fn: Callable[[], object]) -> int:
    """Total FLOPs FlopCounterMode counts while fn runs."""
    # The extra formula makes CPU sdpa count like GPU sdpa (torch leaves the CPU kernel out of its registry).
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=flops.flop_counter_formulas()) as counter:
        fn()
    return counter.get_total_flops()


def tiny_llama(head_dim: int | None = None, attention: str = "sdpa", layers: int = 3) -> LlamaForCausalLM:
    """Hidden 64, GQA (4 query heads, 2 KV heads); head_dim may differ from hidden / heads."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        vocab_size=101,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM._from_config(config, attn_implementation=attention).eval()


def run_schedule(model: torch.nn.Module, schedule: list[int], steps: int) -> tuple[int, int]:
    """Run the decoder layers ourselves, layer l on schedule[l] tokens, then `steps` decode steps.

    Like VTW, each layer keeps the last schedule[l] tokens of the layer before (the withdrawn ones come first)
    and caches only those. Returns measured (prefill, decode) FLOPs: layers, final norm and LM head on the
    last token. The rotary cos / sin tables are inputs here (HF builds them elementwise: no matmul).
    """
    decoder = model.model.language_model if hasattr(model.model, "language_model") else model.model
    text = model.config.get_text_config()
    device = model.lm_head.weight.device
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    total = schedule[0] + steps
    # Values do not matter for counting; zeros also work on the meta device, where nothing is computed.
    cos = sin = torch.zeros(1, total, head_dim, device=device)
    cache = DynamicCache(config=text)

    def prefill() -> None:
        hidden = torch.randn(1, schedule[0], text.hidden_size, device=device)
        for layer, keep in zip(decoder.layers, schedule, strict=True):
            hidden = hidden[:, hidden.shape[1] - keep :]
            start = schedule[0] - keep
            positions = (cos[:, start : schedule[0]], sin[:, start : schedule[0]])
            hidden = layer(hidden, past_key_values=cache, use_cache=True, position_embeddings=positions)
        model.lm_head(decoder.norm(hidden[:, -1:]))

    def decode() -> None:
        for step in range(steps):
            hidden = torch.randn(1, 1, text.hidden_size, device=device)
            at = schedule[0] + step
            positions = (cos[:, at : at + 1], sin[:, at : at + 1])
            for layer in decoder.layers:
                hidden = layer(hidden, past_key_values=cache, use_cache=True, position_embeddings=positions)
            model.lm_head(decoder.norm(hidden))

    prefill_measured = measure(prefill)
    decode_measured = measure(decode)
    for layer_idx, keep in enumerate(schedule):  # the cache really holds the per-layer token counts
        assert cache.get_seq_length(layer_idx) == keep + steps
    return prefill_measured, decode_measured


def meta_model(name: str, attention: str = "sdpa") -> torch.nn.Module:
    """A shipped config's full model on the meta device: real shapes, no memory, no compute."""
    config = AutoConfig.from_pretrained(shipped_config_path(name))
    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config, attn_implementation=attention)


# ---------------------------------------------------------------------------------------------------------
# Paper figures (Table 2: LLaVA-1.5 on MME's average input, 576 vision + 62 text tokens... and 13B at K=20)


@pytest.fixture(scope="module")
def llava7b_config():
    return AutoConfig.from_pretrained(shipped_config_path("llava-1.5-7b"))


@pytest.mark.parametrize(
    ("name", "k", "baseline_tflops", "vtw_tflops"),
    [("llava-1.5-7b", 16, 8.48, 4.68), ("llava-1.5-13b", 20, 16.50, 9.10)],
)
def test_paper_table2_prefill_tflops(name: str, k: int, baseline_tflops: float, vtw_tflops: float) -> None:
    config = AutoConfig.from_pretrained(shipped_config_path(name))
    result = flops.request_flops(config, vision_tokens=576, text_tokens=62, k=k)
    assert result["baseline"]["prefill_flops"] / 1e12 == pytest.approx(baseline_tflops, rel=0.02)
    assert result["vtw"]["prefill_flops"] / 1e12 == pytest.approx(vtw_tflops, rel=0.02)
    assert result["prefill_ratio"] == pytest.approx(vtw_tflops / baseline_tflops, rel=0.02)


def test_early_withdrawal_ratio_is_about_the_text_share(llava7b_config) -> None:
    # Cost is nearly linear in tokens at this length, so K=2 costs about 2/32 of the baseline plus the
    # remaining 30 layers at the text share 62/638; attention's quadratic term only lowers it a little.
    result = flops.request_flops(llava7b_config, vision_tokens=576, text_tokens=62, k=2)
    linear_estimate = 2 / 32 + 30 / 32 * 62 / 638
    assert result["prefill_ratio"] == pytest.approx(linear_estimate, abs=0.01)
    assert result["prefill_ratio"] < linear_estimate


def test_paper_schedule_measured_on_the_real_7b_config() -> None:
    # The LLaVA-1.5-7B decoder at full size on the meta device: FlopCounterMode counts every matmul the stock
    # layers run for the paper's K=16 schedule, with no weights and no compute.
    model = meta_model("llava-1.5-7b")
    dims = flops.DecoderDims.from_config(model.config)
    schedule = flops.vtw_tokens_per_layer(dims.num_layers, 576, 62, 16)
    prefill, decode = run_schedule(model, schedule, steps=3)
    assert prefill == flops.prefill_flops(dims, schedule)
    assert decode == flops.decode_flops(dims, schedule, 3)
    assert prefill / 1e12 == pytest.approx(4.68, rel=0.02)


# ---------------------------------------------------------------------------------------------------------
# Language model: FlopCounterMode on tiny random models


@pytest.mark.parametrize(("head_dim", "attention"), [(None, "sdpa"), (None, "eager"), (24, "sdpa"), (24, "eager")])
def test_prefill_matches_flop_counter(head_dim: int | None, attention: str) -> None:
    model = tiny_llama(head_dim, attention)
    dims = flops.DecoderDims.from_config(model.config)
    assert (dims.num_heads, dims.num_kv_heads, dims.head_dim) == (4, 2, head_dim or 16)
    tokens = 13
    input_ids = torch.randint(0, 101, (1, tokens))
    measured = measure(lambda: model(input_ids, logits_to_keep=1, use_cache=False))
    assert measured == flops.prefill_flops(dims, [tokens] * dims.num_layers, logits_tokens=1)


def test_prefill_logits_on_every_token() -> None:
    model = tiny_llama()
    dims = flops.DecoderDims.from_config(model.config)
    measured = measure(lambda: model(torch.randint(0, 101, (1, 9)), logits_to_keep=0, use_cache=False))
    assert measured == flops.prefill_flops(dims, [9] * dims.num_layers, logits_tokens=9)


def test_sdpa_is_counted_like_eager() -> None:
    input_ids = torch.randint(0, 101, (1, 11))
    models = {attention: tiny_llama(24, attention) for attention in ATTENTIONS}
    measured = {
        attention: measure(lambda m=model: m(input_ids, logits_to_keep=1)) for attention, model in models.items()
    }
    assert measured["sdpa"] == measured["eager"]
    assert measured["sdpa"] == flops.prefill_flops(flops.DecoderDims.from_config(models["sdpa"].config), [11] * 3)


@pytest.mark.parametrize(("head_dim", "attention"), [(None, "sdpa"), (24, "eager")])
def test_decode_steps_match_flop_counter(head_dim: int | None, attention: str) -> None:
    model = tiny_llama(head_dim, attention)
    dims = flops.DecoderDims.from_config(model.config)
    prompt, steps = 10, 5
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        logits = model(torch.randint(0, 101, (1, prompt)), past_key_values=cache, use_cache=True).logits

    def decode() -> None:
        next_ids = logits[:, -1:].argmax(-1)
        for _ in range(steps):
            out = model(next_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            next_ids = out.logits[:, -1:].argmax(-1)

    measured = measure(decode)
    assert cache.get_seq_length() == prompt + steps
    assert measured == flops.decode_flops(dims, [prompt] * dims.num_layers, steps)


def test_generate_matches_request_flops() -> None:
    # Stock generate(): the prefill yields the first new token, each further one costs a decode step.
    model = tiny_llama(24)
    model.generation_config.eos_token_id = None
    prompt, new_tokens = 12, 4
    input_ids = torch.randint(0, 101, (1, prompt))
    measured = measure(
        lambda: model.generate(input_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    )
    result = flops.request_flops(model.config, vision_tokens=0, text_tokens=prompt, k=None, new_tokens=new_tokens)
    assert measured == result["baseline"]["total_flops"]


@pytest.mark.parametrize(("head_dim", "attention"), [(None, "sdpa"), (24, "sdpa"), (24, "eager")])
@pytest.mark.parametrize("k", [0, 2, 4])
def test_vtw_layer_schedule_matches_flop_counter(head_dim: int | None, attention: str, k: int) -> None:
    model = tiny_llama(head_dim, attention, layers=5)
    dims = flops.DecoderDims.from_config(model.config)
    schedule = flops.vtw_tokens_per_layer(dims.num_layers, vision_tokens=17, text_tokens=6, k=k)
    prefill, decode = run_schedule(model, schedule, steps=4)
    assert prefill == flops.prefill_flops(dims, schedule)
    assert decode == flops.decode_flops(dims, schedule, 4)


def test_gradual_schedule_matches_flop_counter() -> None:
    # A FastV / G-Search style schedule: a different count at every layer.
    model = tiny_llama(24, layers=5)
    dims = flops.DecoderDims.from_config(model.config)
    schedule = [20, 20, 14, 9, 3]
    prefill, decode = run_schedule(model, schedule, steps=3)
    assert prefill == flops.prefill_flops(dims, schedule)
    assert decode == flops.decode_flops(dims, schedule, 3)


# ---------------------------------------------------------------------------------------------------------
# Vision towers: FlopCounterMode around get_image_features on tiny random models

TINY_TEXT = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
}
TINY_CLIP = {
    "model_type": "clip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 40,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "image_size": 28,
    "patch_size": 7,
}


def build(config, attention: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(config, attn_implementation=attention).eval()


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize(("feature_layer", "strategy"), [(-2, "default"), ([-3, -1], "full"), (-1, "full")])
def test_llava_vision_matches_flop_counter(attention: str, feature_layer, strategy: str) -> None:
    config = LlavaConfig(
        vision_config=TINY_CLIP,
        text_config=TINY_TEXT,
        image_token_id=127,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
    )
    model = build(config, attention)
    images = 3
    measured = measure(lambda: model.model.get_image_features(pixel_values=torch.randn(images, 3, 28, 28)))
    assert measured == flops.vision_flops(config, num_crops=images)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_llava_next_vision_matches_flop_counter(attention: str) -> None:
    pinpoints = [[28, 56], [56, 28], [56, 56]]
    config = LlavaNextConfig(
        vision_config=TINY_CLIP,
        text_config=TINY_TEXT,
        image_token_id=127,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = build(config, attention)
    image_sizes = torch.tensor([[30, 80], [60, 60], [20, 20]])
    crops = [image_size_to_num_patches(size.tolist(), pinpoints, 28) for size in image_sizes]
    assert crops == [3, 5, 3]  # base image + anyres tiles
    # Padded to the largest crop count, as the processor does; HF runs only each image's real crops.
    pixel_values = torch.randn(len(crops), max(crops) + 1, 3, 28, 28)
    measured = measure(lambda: model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes))
    assert measured == flops.vision_flops(config, num_crops=sum(crops))


def qwen_config(model_type: str, full_blocks: list[int] | None = None):
    vision = {"depth": 4, "num_heads": 4, "patch_size": 4, "temporal_patch_size": 2, "spatial_merge_size": 2}
    if model_type == "qwen2_vl":
        vision |= {"embed_dim": 32, "mlp_ratio": 2, "hidden_size": 64}
        return Qwen2VLConfig(vision_config=vision, text_config=TINY_TEXT | {"model_type": "qwen2_vl_text"})
    # Windows of 16 pixels = 2x2 merged units = 16 patches; blocks 1 and 3 attend over the whole frame.
    vision |= {"hidden_size": 32, "intermediate_size": 48, "out_hidden_size": 64, "window_size": 16}
    vision["fullatt_block_indexes"] = [1, 3] if full_blocks is None else full_blocks
    return Qwen2_5_VLConfig(vision_config=vision, text_config=TINY_TEXT | {"model_type": "qwen2_5_vl_text"})


# (t, h, w) patch grids: two images, one with ragged windows (10 x 6 patches = 5 x 3 merged units), and a
# two-frame entry (each frame attends on its own).
GRIDS = [(1, 12, 8), (1, 10, 6), (2, 4, 4)]


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("model_type", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_vision_matches_flop_counter(attention: str, model_type: str) -> None:
    config = qwen_config(model_type)
    model = build(config, attention)
    patches = sum(t * h * w for t, h, w in GRIDS)
    pixel_values = torch.randn(patches, 3 * 2 * 4 * 4)
    grid_thw = torch.tensor(GRIDS)
    measured = measure(lambda: model.model.get_image_features(pixel_values=pixel_values, image_grid_thw=grid_thw))
    assert measured == flops.vision_flops(config, grid_thw=GRIDS)


def test_qwen25_window_attention_is_cheaper_than_full() -> None:
    # The tiny grids above really use several windows: all-full attention would count more.
    windowed = flops.vision_flops(qwen_config("qwen2_5_vl"), grid_thw=GRIDS)
    full = flops.vision_flops(qwen_config("qwen2_5_vl", full_blocks=[0, 1, 2, 3]), grid_thw=GRIDS)
    assert windowed < full


def test_real_llava_clip_tower_on_meta_matches() -> None:
    # CLIP ViT-L/14-336 at full size: 577 tokens through all 24 layers, then the projector on 576.
    model = meta_model("llava-1.5-7b")
    pixel_values = torch.empty(2, 3, 336, 336, device="meta")
    measured = measure(lambda: model.model.get_image_features(pixel_values=pixel_values))
    assert measured == flops.vision_flops(model.config, num_crops=2)


def test_real_llava_next_tower_on_meta_matches() -> None:
    model = meta_model("llava-v1.6-vicuna-7b")
    image_sizes = torch.tensor([[500, 700], [336, 336]])
    crops = [image_size_to_num_patches(size.tolist(), model.config.image_grid_pinpoints, 336) for size in image_sizes]
    pixel_values = torch.empty(2, max(crops), 3, 336, 336, device="meta")
    measured = measure(lambda: model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes))
    assert measured == flops.vision_flops(model.config, num_crops=sum(crops))


# ---------------------------------------------------------------------------------------------------------
# request_flops, schedules and errors


def test_request_flops_is_consistent(llava7b_config) -> None:
    dims = flops.DecoderDims.from_config(llava7b_config)
    result = flops.request_flops(llava7b_config, vision_tokens=576, text_tokens=62, k=16, new_tokens=20)
    assert result["num_layers"] == 32
    assert (result["vision_tokens"], result["text_tokens"], result["k"], result["new_tokens"]) == (576, 62, 16, 20)
    for side, k in (("baseline", None), ("vtw", 16)):
        schedule = flops.vtw_tokens_per_layer(32, 576, 62, k)
        figures = result[side]
        assert figures["prefill_flops"] == flops.prefill_flops(dims, schedule)
        assert figures["decode_flops"] == flops.decode_flops(dims, schedule, 19)
        assert figures["total_flops"] == figures["prefill_flops"] + figures["decode_flops"]
    assert result["total_ratio"] == result["vtw"]["total_flops"] / result["baseline"]["total_flops"]
    # Decoding after withdrawal saves the 576 cached vision keys in 16 layers, nothing else.
    saved = result["baseline"]["decode_flops"] - result["vtw"]["decode_flops"]
    assert saved == 19 * 16 * 2 * 2 * 576 * dims.num_heads * dims.head_dim
    assert flops.request_flops(llava7b_config, 576, 62, k=16, new_tokens=1)["vtw"]["decode_flops"] == 0
    same = flops.request_flops(llava7b_config, 576, 62, k=32, new_tokens=5)
    assert same["baseline"] == same["vtw"] and same["prefill_ratio"] == 1.0


def test_vtw_schedule() -> None:
    assert flops.vtw_tokens_per_layer(4, 10, 3, 1) == [13, 3, 3, 3]
    assert flops.vtw_tokens_per_layer(4, 10, 3, None) == [13] * 4
    assert flops.vtw_tokens_per_layer(4, 10, 3, 4) == [13] * 4
    assert flops.vtw_tokens_per_layer(4, 10, 3, 0) == [3] * 4


@pytest.mark.parametrize("k", [-1, 33, 100])
def test_k_out_of_range(llava7b_config, k: int) -> None:
    with pytest.raises(InputError, match="from 0 to 32"):
        flops.request_flops(llava7b_config, 576, 62, k=k)
    with pytest.raises(InputError, match="from 0 to 32"):
        flops.vtw_tokens_per_layer(32, 576, 62, k)


def test_bad_schedules_and_counts(llava7b_config) -> None:
    dims = flops.DecoderDims.from_config(llava7b_config)
    with pytest.raises(InputError, match="32 layers"):
        flops.prefill_flops(dims, [10] * 31)
    with pytest.raises(InputError):
        flops.decode_flops(dims, [10] * 32, -1)
    with pytest.raises(InputError):
        flops.request_flops(llava7b_config, 576, 62, k=16, new_tokens=-1)
    with pytest.raises(InputError):
        flops.request_flops(llava7b_config, 576, 0, k=16)


def test_unsupported_model_type() -> None:
    config = AutoConfig.for_model("paligemma")
    with pytest.raises(UnsupportedModelError) as error:
        flops.vision_flops(config, num_crops=1)
    for family in ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "video_llava", "internvl", "qwen3_vl", "smolvlm"):
        assert f"`{family}`" in str(error.value)


def test_unsupported_vision_tower() -> None:
    config = LlavaConfig(vision_config={"model_type": "dinov2"}, text_config=TINY_TEXT)
    with pytest.raises(UnsupportedModelError, match="clip_vision_model"):
        flops.vision_flops(config, num_crops=1)


# ---------------------------------------------------------------------------------------------------------
# Shipped configs

SHIPPED = {
    # name: (model class, parameters of the real checkpoint)
    "llava-1.5-7b": ("LlavaForConditionalGeneration", 7.06e9),
    "llava-1.5-13b": ("LlavaForConditionalGeneration", 13.35e9),
    "llava-v1.6-vicuna-7b": ("LlavaNextForConditionalGeneration", 7.06e9),
    "qwen2-vl-2b": ("Qwen2VLForConditionalGeneration", 2.21e9),
    "video-llava-7b": ("VideoLlavaForConditionalGeneration", 7.37e9),
    "llava-next-video-7b": ("LlavaNextVideoForConditionalGeneration", 7.06e9),
    "llava-onevision-qwen2-0.5b": ("LlavaOnevisionForConditionalGeneration", 0.894e9),
    "internvl3-1b": ("InternVLForConditionalGeneration", 0.938e9),
    "qwen3-vl-2b": ("Qwen3VLForConditionalGeneration", 2.13e9),
    "idefics3-8b-llama3": ("Idefics3ForConditionalGeneration", 8.46e9),
    "smolvlm-256m": ("SmolVLMForConditionalGeneration", 0.256e9),
}


def test_shipped_config_names() -> None:
    assert shipped_config_names() == sorted(SHIPPED)
    assert shipped_config_path("no-such-model") is None
    assert shipped_config_path("llava-hf/llava-1.5-7b-hf") is None
    assert shipped_config_path("../configs") is None


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_builds_the_real_architecture(name: str) -> None:
    model = meta_model(name)
    architecture, parameters = SHIPPED[name]
    assert type(model).__name__ == architecture
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(parameters, rel=0.005)
    # Independent of FlopCounterMode: per token, a linear layer costs 2 FLOPs per weight.
    dims = flops.DecoderDims.from_config(model.config)
    decoder = language_model(model)
    layer_weights = sum(m.weight.numel() for m in decoder.layers.modules() if isinstance(m, torch.nn.Linear))
    assert dims.num_layers * flops.decoder_layer_flops(dims, 1, 0) == 2 * layer_weights
    assert flops.lm_head_flops(dims, 1) == 2 * model.lm_head.weight.numel()


def test_qwen2_vl_2b_real_tower_on_meta_matches() -> None:
    model = meta_model("qwen2-vl-2b")
    grids = [(1, 36, 36), (1, 16, 24)]
    pixel_values = torch.empty(36 * 36 + 16 * 24, 3 * 2 * 14 * 14, device="meta")
    grid_thw = torch.tensor(grids)  # stays on CPU: HF reads it with .tolist()
    # The rotary positions meet meta weights, so they are precomputed (HF takes them as a kwarg) and moved.
    positions = get_vision_position_ids(grid_thw, model.config.vision_config.spatial_merge_size).to("meta")
    measured = measure(
        lambda: model.model.get_image_features(
            pixel_values=pixel_values, image_grid_thw=grid_thw, position_ids=positions
        )
    )
    assert measured == flops.vision_flops(model.config, grid_thw=grids)


def test_real_video_llava_video_tower_on_meta_matches() -> None:
    """Video-LLaVA-7B on 8 frames: each frame through the video tower (CLS kept), then the projector."""
    model = meta_model("video-llava-7b")
    frames = torch.empty(1, 8, 3, 224, 224, device="meta")
    measured = measure(lambda: model.model.get_video_features(pixel_values_videos=frames))
    assert measured == flops.vision_flops(model.config, video_frames=8)


def test_vision_arguments_per_family(llava7b_config) -> None:
    assert flops.vision_flops(llava7b_config) == 0  # no images
    with pytest.raises(InputError):
        flops.vision_flops(llava7b_config, grid_thw=[(1, 24, 24)])
    with pytest.raises(InputError):
        flops.vision_flops(qwen_config("qwen2_vl"), num_crops=1)
    with pytest.raises(InputError):
        flops.vision_flops(qwen_config("qwen2_vl"), grid_thw=[(1, 5, 4)])  # h not a multiple of the merge size


# ---------------------------------------------------------------------------------------------------------
# The new families: vision towers (images and video frames) and the engine's decoder, on the tiny configs


def _tiny_family_model(family: str, attention: str) -> torch.nn.Module:
    from vtw_core.testing.tiny import tiny_config

    torch.manual_seed(0)
    return AutoModelForImageTextToText.from_config(tiny_config(family), attn_implementation=attention).eval()


def _family_inputs(family: str, images: int, videos: int) -> dict:
    from PIL import Image

    from vtw_core.models.prompts import processor_images
    from vtw_core.testing.tiny import build_tiny_processor

    processor = build_tiny_processor(family)
    generator = torch.Generator().manual_seed(0)

    def picture(width: int, height: int) -> Image.Image:
        return Image.fromarray(
            torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8).numpy()
        )

    content = [{"type": "image"}] * images + [{"type": "video"}] * videos + [{"type": "text", "text": "What?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    clips = [[picture(48, 40) for _ in range(3)] for _ in range(videos)]
    pictures = [picture(64, 40), picture(40, 72)][:images]
    images = processor_images(processor, [pictures])
    return dict(processor(text=[text], images=images, videos=clips or None, return_tensors="pt"))


def _vision_part_flops(model: torch.nn.Module, inputs: dict) -> int:
    """Everything the stock model computes before its decoder: the vision tower(s), projector and merging."""
    from vtw_core.engine.embed import embed_prompt

    return measure(lambda: embed_prompt(model, inputs))


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize(
    ("family", "images", "videos"),
    [
        ("llava_next_video", 1, 0),
        ("llava_next_video", 0, 2),
        ("llava_next_video", 1, 1),
        ("video_llava", 2, 0),
        ("video_llava", 0, 1),
        ("llava_onevision", 1, 0),
        ("llava_onevision", 2, 1),
        ("llava_onevision", 0, 1),
        ("internvl", 1, 0),
        ("internvl", 2, 0),
        ("internvl", 1, 1),
        ("qwen2_vl", 1, 1),
        ("qwen2_5_vl", 0, 1),
        ("qwen3_vl", 2, 0),
        ("qwen3_vl", 1, 1),
        ("idefics3", 1, 0),
        ("idefics3", 2, 0),
        ("smolvlm", 1, 0),
    ],
)
def test_family_vision_matches_flop_counter(family: str, images: int, videos: int, attention: str) -> None:
    model = _tiny_family_model(family, attention)
    inputs = _family_inputs(family, images, videos)
    assert _vision_part_flops(model, inputs) == flops.request_vision_flops(model.config, inputs)


@pytest.mark.parametrize(
    "family", ["llava_next_video", "video_llava", "llava_onevision", "internvl", "qwen3_vl", "idefics3", "smolvlm"]
)
@pytest.mark.parametrize("k", [0, 2, None])
def test_family_engine_prefill_matches_flop_counter(family: str, k: int | None) -> None:
    """The engine's VTW prefill on a real processor prompt costs what prefill_flops says for its layer schedule."""
    from vtw_core.engine.decoder import prefill, withdrawal_selector
    from vtw_core.engine.embed import embed_prompt

    model = _tiny_family_model(family, "sdpa")
    inputs = _family_inputs(family, 1, 1 if family not in ("internvl", "idefics3", "smolvlm") else 0)
    prompt = embed_prompt(model, inputs)
    dims = flops.DecoderDims.from_config(model.config)
    vision = int(prompt.vision_mask.sum())
    text = int(prompt.attention_mask.sum()) - vision
    schedule = flops.vtw_tokens_per_layer(dims.num_layers, vision, text, k)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=flops.flop_counter_formulas()) as counter:
        prefill(model, prompt, withdrawal_selector(k, dims.num_layers))
    # The rotary tables are one small matmul per layer group (inv_freq x positions), outside the FLOPs convention.
    per_module = counter.get_flop_counts()
    rotary = sum(sum(counts.values()) for name, counts in per_module.items() if name.endswith("rotary_emb"))
    assert counter.get_total_flops() - rotary == flops.prefill_flops(dims, schedule)
