"""The engine against stock transformers and against an independent, cache-free VTW reference."""

from __future__ import annotations

import copy
import functools
import inspect
import threading

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from vtw_core.benchmarks.bench import synthetic_inputs
from vtw_core.engine.decoder import decode_step, prefill, withdrawal_selector
from vtw_core.engine.embed import embed_prompt
from vtw_core.errors import InputError, UnsupportedModelError
from vtw_core.generation.generate import generate_tokens
from vtw_core.generation.types import SamplingConfig
from vtw_core.models.families import language_model, vision_token_ids
from vtw_core.models.prompts import processor_images
from vtw_core.testing.tiny import SUPPORTED_TINY_FAMILIES, build_tiny_processor, tiny_config

SYNTHETIC_FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]
# Families whose test prompts come from their real processor class (tiny tokenizer and image processor).
PROCESSOR_FAMILIES = [family for family in SUPPORTED_TINY_FAMILIES if family not in SYNTHETIC_FAMILIES]
FAMILIES = SYNTHETIC_FAMILIES + PROCESSOR_FAMILIES
VIDEO_FAMILIES = [
    "llava_next_video",
    "video_llava",
    "llava_onevision",
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "internvl",
]
NUM_LAYERS = 4
IMAGE_SIZES = {"llava": None, "llava_next": (40, 72), "qwen2_vl": (56, 56), "qwen2_5_vl": (56, 84)}


def build_model(family: str, attention: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = tiny_config(family, num_layers=NUM_LAYERS)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32, attn_implementation=attention)
    model.generation_config.eos_token_id = None  # fixed-length outputs, so every step is compared
    return model.eval()


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, build_model(request.param)


@functools.cache
def tiny_processor(family: str):
    return build_tiny_processor(family)


def sample_image(width: int = 56, height: int = 80, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def processor_inputs(family: str, rows: list[list], text: str = "What is in the picture?") -> dict:
    """A left-padded batch through the family's real processor; each row is a list of images (and/or videos)."""
    processor = tiny_processor(family)
    texts, images, videos = [], [], []
    for items in rows:
        content = [{"type": "video" if isinstance(item, list) else "image"} for item in items]
        conversation = [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]
        texts.append(processor.apply_chat_template(conversation, add_generation_prompt=True))
        images.append([item for item in items if not isinstance(item, list)])
        videos += [item for item in items if isinstance(item, list)]
    batch = processor(
        text=texts,
        images=processor_images(processor, images),
        videos=videos or None,
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    return dict(batch)


def sample_video(frames: int = 4, seed: int = 0) -> list[Image.Image]:
    """A short clip as PIL frames (what vtw_core.models.videos.read_video returns), 48 wide x 40 high."""
    return [sample_image(48, 40, seed * 100 + index) for index in range(frames)]


def prompt_inputs(model, family: str, text_tokens: int = 7) -> dict[str, torch.Tensor]:
    if family in PROCESSOR_FAMILIES:
        return processor_inputs(family, [[sample_image()]])
    return synthetic_inputs(model, text_tokens=text_tokens, image_size=IMAGE_SIZES[family])


def engine_tokens(model, inputs, k, steps=8, position_mode="original") -> list[int]:
    columns = generate_tokens(
        model, inputs, k=k, position_mode=position_mode, sampling=SamplingConfig(max_new_tokens=steps)
    )
    return torch.stack(list(columns), dim=1).tolist()


# --- An independent reference: VTW by definition, recomputing the whole sequence at every step -------------


def record_language_model_call(model, inputs) -> tuple[tuple, dict]:
    """Stock forward with all hidden states, plus the position ids the stock code gave its language model."""
    seen = {}

    def remember(_module, _args, kwargs):
        seen.update(kwargs)

    handle = language_model(model).register_forward_pre_hook(remember, with_kwargs=True)
    try:
        with torch.no_grad():
            output = model(**inputs, output_hidden_states=True)
    finally:
        handle.remove()
    return output.hidden_states, seen


def stock_positions(seen: dict, length: int) -> torch.Tensor:
    """The position ids the stock model gave its language model: (1, seq) or (3, 1, seq)."""
    positions = seen.get("position_ids")
    if positions is None:
        return torch.arange(length)[None]
    return positions[1:] if positions.ndim == 3 and positions.shape[0] == 4 else positions


def deep_layers_logits(model, layer_input, positions, k: int) -> torch.Tensor:
    """A stock decoder made of layers >= k, run from layer k's input on the given (kept) tokens."""
    deep = copy.copy(language_model(model))
    deep._modules = dict(deep._modules)  # a shallow copy shares the submodule dict: don't cut the real model
    deep.config = copy.deepcopy(deep.config)
    deep.layers = torch.nn.ModuleList(list(deep.layers)[k:])
    deep.config.num_hidden_layers = len(deep.layers)
    if getattr(deep.config, "layer_types", None):
        deep.config.layer_types = deep.config.layer_types[k:]
    with torch.no_grad():
        # An explicit mask: with none, stock code reads the gap in the position ids as a packed-sequence boundary.
        mask = torch.ones(1, layer_input.shape[1], dtype=torch.long)
        hidden = deep(inputs_embeds=layer_input, attention_mask=mask, position_ids=positions, use_cache=False)
        return model.lm_head(hidden.last_hidden_state[:, -1]).float()


def reference_vtw_logits(model, inputs, k: int, rearrange: bool = False) -> torch.Tensor:
    """Layers < k on every token (stock forward), then a stock decoder made of layers >= k on text tokens only."""
    hidden_states, seen = record_language_model_call(model, inputs)
    input_ids = inputs["input_ids"][0]
    keep = ~torch.isin(input_ids, torch.tensor(vision_token_ids(model.config)))
    positions = stock_positions(seen, len(input_ids))[..., keep]
    if rearrange:
        positions = torch.arange(int(keep.sum()))[None].expand(*positions.shape[:-1], -1)
    return deep_layers_logits(model, hidden_states[k][:, keep], positions, k)


def reference_vtw_tokens(model, inputs, k: int, steps: int = 8, rearrange: bool = False) -> list[int]:
    inputs = dict(inputs)
    tokens = []
    for _ in range(steps):
        token = reference_vtw_logits(model, inputs, k, rearrange).argmax(-1)
        tokens.append(int(token))
        inputs["input_ids"] = torch.cat([inputs["input_ids"], token[:, None]], dim=1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        if "mm_token_type_ids" in inputs:  # generated tokens are text (type 0)
            inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(token[:, None])], 1)
    return tokens


# --- Baseline: identical to stock transformers ---------------------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_baseline_equals_stock_generate(attention):
    for family in FAMILIES:
        model = build_model(family, attention)
        inputs = prompt_inputs(model, family)
        with torch.no_grad():
            stock_logits = model(**inputs).logits[:, -1].float()
        logits, _ = prefill(model, embed_prompt(model, inputs))
        torch.testing.assert_close(logits, stock_logits, rtol=1e-4, atol=1e-5)
        stock = model.generate(**inputs, max_new_tokens=10, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        for k in (None, NUM_LAYERS):  # K = N withdraws nothing: the unchanged model
            assert engine_tokens(model, inputs, k, steps=10) == stock.tolist(), (family, attention, k)


# --- VTW: identical to the cache-free reference --------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_vtw_equals_reference(family_model, k):
    family, model = family_model
    inputs = prompt_inputs(model, family)
    logits, _ = prefill(model, embed_prompt(model, inputs), withdrawal_selector(k, NUM_LAYERS))
    torch.testing.assert_close(logits, reference_vtw_logits(model, inputs, k), rtol=1e-4, atol=1e-5)
    assert engine_tokens(model, inputs, k, steps=6)[0] == reference_vtw_tokens(model, inputs, k, steps=6)


# --- Video prompts: the same checks, with video placeholders as the vision tokens --------------------------------


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_prompt_baseline_and_vtw(family):
    model = build_model(family)
    inputs = processor_inputs(family, [[sample_video()]], text="What happens in the video?")
    video_id = getattr(model.config, "video_token_id", None)
    if video_id is None:  # InternVL marks video frames with its image token
        video_id = model.config.image_token_id
    else:
        assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 0
    assert int((inputs["input_ids"] == video_id).sum()) > 0
    stock = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, inputs["input_ids"].shape[1] :]
    for k in (None, NUM_LAYERS):
        assert engine_tokens(model, inputs, k, steps=6) == stock.tolist(), (family, k)
    for k in (0, 2):
        logits, state = prefill(model, embed_prompt(model, inputs), withdrawal_selector(k, NUM_LAYERS))
        torch.testing.assert_close(logits, reference_vtw_logits(model, inputs, k), rtol=1e-4, atol=1e-5)
        assert engine_tokens(model, inputs, k, steps=4)[0] == reference_vtw_tokens(model, inputs, k, steps=4)
        videos = int((inputs["input_ids"] == video_id).sum())
        assert state.cache_lengths()[k:] == [inputs["input_ids"].shape[1] - videos] * (NUM_LAYERS - k)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_video_batch_equals_one_by_one(family):
    """0, 1 and 2 videos per row (and an image beside a video), left-padded together, give each row's tokens."""
    model = build_model(family)
    rows = [[], [sample_video(seed=1)], [sample_video(seed=2), sample_video(seed=3)]]
    if family != "video_llava":  # Video-LLaVA's processor takes images or videos in one call, not both
        rows.append([sample_image(64, 64, 4), sample_video(seed=5)])
    k = 1
    singles = [engine_tokens(model, processor_inputs(family, [row]), k, steps=5)[0] for row in rows]
    batch = processor_inputs(family, rows)
    vision = torch.isin(batch["input_ids"], torch.tensor(vision_token_ids(model.config))).sum(1).tolist()
    assert vision[0] == 0 and 0 < vision[1] < vision[2]
    assert engine_tokens(model, batch, k, steps=5) == singles


def test_vtw_changes_the_output():
    """Guard against a reference that is trivially equal: withdrawing early must change the logits."""
    model = build_model("llava")
    inputs = prompt_inputs(model, "llava")
    baseline, _ = prefill(model, embed_prompt(model, inputs))
    withdrawn, _ = prefill(model, embed_prompt(model, inputs), withdrawal_selector(1, NUM_LAYERS))
    assert (baseline - withdrawn).abs().max() > 1e-3


def test_rearranged_positions_equal_reference():
    model = build_model("llava")
    inputs = prompt_inputs(model, "llava")
    k = 2
    got = engine_tokens(model, inputs, k, steps=6, position_mode="rearrange")[0]
    assert got == reference_vtw_tokens(model, inputs, k, steps=6, rearrange=True)
    logits, _ = prefill(model, embed_prompt(model, inputs), withdrawal_selector(k, NUM_LAYERS), "rearrange")
    original, _ = prefill(model, embed_prompt(model, inputs), withdrawal_selector(k, NUM_LAYERS))
    assert (logits - original).abs().max() > 1e-4  # the positions really changed


def test_cache_holds_vision_only_below_k(family_model):
    family, model = family_model
    inputs = prompt_inputs(model, family)
    prompt = embed_prompt(model, inputs)
    prompt_length = inputs["input_ids"].shape[1]
    vision = int(prompt.vision_mask.sum())
    assert vision > 0
    k = 2
    logits, state = prefill(model, prompt, withdrawal_selector(k, NUM_LAYERS))
    expected = [prompt_length] * k + [prompt_length - vision] * (NUM_LAYERS - k)
    assert state.cache_lengths() == expected
    for _ in range(3):
        logits = decode_step(model, state, logits.argmax(-1)[:, None])
    assert state.cache_lengths() == [length + 3 for length in expected]
    baseline_state = prefill(model, embed_prompt(model, inputs))[1]
    assert state.kv_cache_bytes() < baseline_state.kv_cache_bytes()


def test_no_image_prompt_is_identical_to_baseline():
    model = build_model("llava")
    input_ids = torch.tensor([[1, 17, 23, 41, 5, 9, 12]])
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    baseline, _ = prefill(model, embed_prompt(model, inputs))
    for k in range(NUM_LAYERS):
        withdrawn, state = prefill(model, embed_prompt(model, inputs), withdrawal_selector(k, NUM_LAYERS))
        assert torch.equal(withdrawn, baseline)
        assert state.cache_lengths() == [7] * NUM_LAYERS
    assert engine_tokens(model, inputs, 1) == engine_tokens(model, inputs, None)


# --- Batches: left padding, different image counts per row --------------------------------------------------


def left_pad(rows: list[torch.Tensor], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, width - len(row) :] = row
        mask[index, width - len(row) :] = 1
    return ids, mask


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("k", [None, 1, 3])
def test_batch_equals_one_by_one(attention, k):
    """Rows with 0, 1 and 2 images, left-padded together, give each row's unbatched tokens."""
    model = build_model("llava", attention)
    one = synthetic_inputs(model, text_tokens=6)
    image_id = model.config.image_token_id
    vision = int((one["input_ids"] == image_id).sum())
    image_block = torch.full((vision,), image_id)
    rows = [
        torch.tensor([1, 30, 31, 32, 33]),
        torch.cat([torch.tensor([1, 40]), image_block, torch.tensor([41, 42, 43])]),
        torch.cat([torch.tensor([1]), image_block, torch.tensor([50, 51]), image_block, torch.tensor([52, 53])]),
    ]
    generator = torch.Generator().manual_seed(3)
    pixels = [torch.randn(1, 3, *one["pixel_values"].shape[-2:], generator=generator) for _ in range(3)]
    row_pixels = [[], [pixels[0]], [pixels[1], pixels[2]]]
    singles = []
    for row, images in zip(rows, row_pixels, strict=True):
        inputs = {"input_ids": row[None], "attention_mask": torch.ones(1, len(row), dtype=torch.long)}
        if images:
            inputs["pixel_values"] = torch.cat(images)
        singles.append(engine_tokens(model, inputs, k)[0])
    ids, mask = left_pad(rows)
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.cat(pixels)}
    assert engine_tokens(model, batch, k) == singles


@pytest.mark.parametrize("family", PROCESSOR_FAMILIES)
@pytest.mark.parametrize("k", [None, 1])
def test_processor_batch_equals_one_by_one(family, k):
    """The real processor's left-padded batch with 0, 1 and 2 images per row gives each row's unbatched tokens."""
    model = build_model(family)
    rows = [[], [sample_image(64, 64, 1)], [sample_image(48, 80, 2), sample_image(96, 64, 3)]]
    singles = [engine_tokens(model, processor_inputs(family, [row]), k, steps=6)[0] for row in rows]
    batch = processor_inputs(family, rows)
    assert not bool(batch["attention_mask"][:, 0].all())  # really left-padded
    vision = torch.isin(batch["input_ids"], torch.tensor(vision_token_ids(model.config))).sum(1).tolist()
    assert vision[0] == 0 and 0 < vision[1] < vision[2]
    assert engine_tokens(model, batch, k, steps=6) == singles


def test_batch_matches_stock_generate_with_padding():
    model = build_model("llava")
    rows = [torch.tensor([1, 30, 31, 32, 33, 34, 35]), torch.tensor([1, 40, 41])]
    ids, mask = left_pad(rows)
    inputs = {"input_ids": ids, "attention_mask": mask}
    stock = model.generate(**inputs, max_new_tokens=8, do_sample=False)[:, ids.shape[1] :]
    assert engine_tokens(model, inputs, None) == stock.tolist()


# --- Sampling, concurrency, errors --------------------------------------------------------------------------


def test_seeded_sampling_is_reproducible():
    model = build_model("llava")
    inputs = prompt_inputs(model, "llava")

    def sample(seed):
        sampling = SamplingConfig(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95, seed=seed)
        return torch.stack(list(generate_tokens(model, inputs, k=2, sampling=sampling)), 1).tolist()

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    assert sample(7) != engine_tokens(model, inputs, 2, steps=12)


def test_two_threads_with_different_k_do_not_interfere():
    model = build_model("qwen2_vl")
    inputs = prompt_inputs(model, "qwen2_vl")
    expected = {k: engine_tokens(model, inputs, k) for k in (None, 1)}
    results: dict[int | None, list] = {}

    def run(k):
        for _ in range(3):
            assert engine_tokens(model, inputs, k) == expected[k]
        results[k] = True

    threads = [threading.Thread(target=run, args=(k,)) for k in (None, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == {None: True, 1: True}


@pytest.mark.parametrize("k", [-1, NUM_LAYERS + 1, 2.5, True])
def test_k_out_of_range_is_a_clear_error(k):
    model = build_model("llava")
    with pytest.raises(InputError, match="K must be a whole number from 0 to 4"):
        list(generate_tokens(model, prompt_inputs(model, "llava"), k=k))


def test_unsupported_model_names_the_supported_families():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, vocab_size=100)
    )
    inputs = {"input_ids": torch.tensor([[1, 2, 3]])}
    with pytest.raises(UnsupportedModelError, match=r"LLaVA-1\.5.*LLaVA-NeXT.*Qwen2-VL.*Qwen2\.5-VL"):
        list(generate_tokens(model, inputs))


@pytest.mark.parametrize(
    ("model_type", "reason"),
    [
        ("gemma3", "sliding-window"),
        ("qwen3_vl_moe", "mixture-of-experts"),
    ],
)
def test_refused_families_say_why(model_type, reason):
    from transformers import AutoConfig

    from vtw_core.models.families import model_family

    with pytest.raises(UnsupportedModelError, match=reason) as error:
        model_family(AutoConfig.for_model(model_type))
    assert "LLaVA-1.5" in str(error.value)  # and names what is supported


def test_deepstack_reaches_the_decoder_only_below_k():
    """Qwen3-VL adds DeepStack features to the outputs of decoder layers 0 and 1 at the vision positions. The
    layer-1 features reach the text only through layer 2 attending to vision, so only K >= 3 depends on them."""
    model = build_model("qwen3_vl")
    inputs = prompt_inputs(model, "qwen3_vl")
    prompt = embed_prompt(model, inputs)
    assert len(prompt.layer_additions) == 2
    assert all(bool((addition[~prompt.vision_mask] == 0).all()) for addition in prompt.layer_additions)
    changed = copy.copy(prompt)
    changed.layer_additions = (prompt.layer_additions[0], prompt.layer_additions[1] * 3)
    for k, differs in ((2, False), (3, True)):
        first, _ = prefill(model, prompt, withdrawal_selector(k, NUM_LAYERS))
        second, _ = prefill(model, changed, withdrawal_selector(k, NUM_LAYERS))
        assert bool((first != second).any()) == differs, k


def test_image_token_mismatch_is_a_clear_error():
    model = build_model("llava")
    inputs = prompt_inputs(model, "llava")
    inputs["input_ids"] = inputs["input_ids"][:, 2:]  # drop two text tokens: fine
    inputs["attention_mask"] = inputs["attention_mask"][:, 2:]
    list(generate_tokens(model, inputs, sampling=SamplingConfig(max_new_tokens=1)))
    image_id = model.config.image_token_id
    keep = torch.ones(inputs["input_ids"].shape[1], dtype=torch.bool)
    keep[(inputs["input_ids"][0] == image_id).nonzero()[0]] = False  # one placeholder fewer than features
    broken = {**inputs, "input_ids": inputs["input_ids"][:, keep], "attention_mask": inputs["attention_mask"][:, keep]}
    with pytest.raises(InputError, match=r"(?i)image"):
        list(generate_tokens(model, broken))


def test_decoder_layers_are_called_with_current_argument_names(recwarn):
    """No deprecation warning per layer call: the cache goes in under the name this transformers release uses."""
    import warnings

    from vtw_core.engine.decoder import cache_argument

    model = build_model("llava")
    layer_class = type(language_model(model).layers[0])
    assert cache_argument(layer_class) in inspect.signature(layer_class.forward).parameters
    warnings.simplefilter("always")
    list(generate_tokens(model, prompt_inputs(model, "llava"), k=1, sampling=SamplingConfig(max_new_tokens=3)))
    messages = [str(warning.message) for warning in recwarn]
    assert not [message for message in messages if "past_key_values" in message or "deprecated" in message], messages
