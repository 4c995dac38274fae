"""Streaming generation, stats and the model manager, on tiny checkpoints loaded through the real path."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vtw_core.engine import flops
from vtw_core.engine.decoder import decode_step, prefill, withdrawal_selector
from vtw_core.engine.embed import embed_prompt
from vtw_core.errors import InputError, VTWError
from vtw_core.generation.generate import generate_batch
from vtw_core.generation.manager import ModelManager, resolve_attention, resolve_dtype, searched_k
from vtw_core.generation.types import SamplingConfig
from vtw_core.models.prompts import assistant_message, build_model_inputs, user_message

FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl"]


@pytest.fixture(scope="module")
def managers(tiny_model_path):
    loaded: dict[str, ModelManager] = {}

    def get(family: str) -> ModelManager:
        if family not in loaded:
            loaded[family] = ModelManager.load(str(tiny_model_path(family)), device="cpu")
        return loaded[family]

    return get


def test_manager_defaults_on_cpu(managers):
    manager = managers("llava")
    assert manager.info.device == "cpu"
    assert manager.info.dtype == "float32"
    assert manager.info.attention == "sdpa"
    assert manager.info.num_layers == 4
    assert "LLaVA-1.5" in manager.info.describe()
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_attention("auto", torch.device("cpu")) == "sdpa"


def test_manager_attention_override(tiny_model_path):
    manager = ModelManager.load(str(tiny_model_path("llava")), device="cpu", attention="eager")
    assert manager.model.config.get_text_config()._attn_implementation == "eager"
    with pytest.raises(InputError, match="attention must be one of"):
        ModelManager.load(str(tiny_model_path("llava")), device="cpu", attention="magic")


def test_manager_refuses_remote_code_without_opt_in(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "my_custom_vlm", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}'
    )
    marker = tmp_path / "executed"
    (tmp_path / "configuration_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(VTWError, match="cannot load a model config"):
        ModelManager.load(str(tmp_path), device="cpu")
    assert not marker.exists()


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(VTWError, match="cannot load a model config"):
        ModelManager.load(str(tmp_path / "nowhere"), device="cpu")


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_deltas_and_stats(managers, sample_images, family):
    manager = managers(family)
    messages = [user_message("What shape is in the picture?")]
    events = list(manager.stream(messages, sample_images[:1], k=2, sampling=SamplingConfig(max_new_tokens=12)))
    last = events[-1]
    assert last.finished and not any(event.finished for event in events[:-1])
    assert "".join(event.text_delta for event in events) == last.text
    stats = last.stats
    assert stats.new_tokens == len(last.token_ids) <= 12
    assert stats.finish_reason in ("eos", "length")
    assert 0 < stats.ttft_s <= stats.total_s
    assert stats.vision_tokens > 0 and stats.prompt_tokens > stats.vision_tokens
    assert stats.vision_flops > 0 and stats.prefill_flops > 0
    assert stats.peak_memory_bytes is None  # CPU
    assert stats.k == 2 and stats.num_layers == 4
    # The KV cache really holds the prompt in layers < K, only its text in layers >= K (plus generated tokens).
    head_bytes = _kv_bytes_per_token(manager.model)
    decoded = stats.new_tokens - 1
    text_tokens = stats.prompt_tokens - stats.vision_tokens
    expected = 2 * (stats.prompt_tokens + decoded) + 2 * (text_tokens + decoded)
    assert stats.kv_cache_bytes == expected * head_bytes
    dims = flops.DecoderDims.from_config(manager.model.config)
    schedule = flops.vtw_tokens_per_layer(4, stats.vision_tokens, text_tokens, 2)
    assert stats.prefill_flops == flops.prefill_flops(dims, schedule)
    assert stats.decode_flops == flops.decode_flops(dims, schedule, decoded)


def _kv_bytes_per_token(model) -> int:
    """Key + value bytes of one token in one layer, from the config."""
    text = model.config.get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return 2 * text.num_key_value_heads * head_dim * model.dtype.itemsize


def test_vtw_costs_less_than_baseline(managers, sample_images):
    manager = managers("llava_next")
    messages = [user_message("Describe it.")]
    sampling = SamplingConfig(max_new_tokens=6)
    base = manager.generate(messages, sample_images[:1], sampling=sampling).stats
    vtw = manager.generate(messages, sample_images[:1], k=1, sampling=sampling).stats
    assert vtw.prefill_flops < base.prefill_flops
    assert vtw.vision_flops == base.vision_flops  # the vision tower runs either way
    assert vtw.kv_cache_bytes < base.kv_cache_bytes


def test_k_equal_to_layers_is_the_baseline(managers, sample_images):
    manager = managers("qwen2_vl")
    messages = [user_message("Describe it.")]
    sampling = SamplingConfig(max_new_tokens=10)
    base = manager.generate(messages, sample_images[1:2], sampling=sampling)
    same = manager.generate(messages, sample_images[1:2], k=4, sampling=sampling)
    assert same.token_ids == base.token_ids and same.text == base.text


def test_stop_event_ends_the_stream(managers, sample_images):
    manager = managers("llava")
    stop = threading.Event()
    events = []
    for event in manager.stream(
        [user_message("Talk.")], sample_images[:1], sampling=SamplingConfig(max_new_tokens=50), stop_event=stop
    ):
        events.append(event)
        if len(events) == 3:
            stop.set()
    assert events[-1].finished
    assert events[-1].stats.finish_reason == "stopped"
    assert events[-1].stats.new_tokens == 3


def test_multi_turn_and_several_images(managers, sample_images):
    manager = managers("llava")
    sampling = SamplingConfig(max_new_tokens=5)
    first = manager.generate([user_message("First?")], sample_images[:1], sampling=sampling)
    chat = [user_message("First?"), assistant_message(first.text or "ok"), user_message("And these two?", 2)]
    second = manager.generate(chat, sample_images, k=1, sampling=sampling)
    assert second.stats.vision_tokens == 3 * 36  # three images of 36 tokens each in one prompt
    with pytest.raises(InputError, match="3 image slot"):
        manager.generate(chat, sample_images[:2], sampling=sampling)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("k", [None, 1])
def test_processor_batch_equals_one_by_one(managers, sample_images, family, k):
    """Left-padded rows with 0, 1 and 2 images (different sizes) give each row's own greedy tokens."""
    manager = managers(family)
    conversations = [
        [user_message("Say something.", 0)],
        [user_message("What colour is the shape?", 1)],
        [user_message("Compare the two pictures, please.", 2)],
    ]
    images = [[], [sample_images[2]], sample_images[:2]]
    sampling = SamplingConfig(max_new_tokens=6)
    batched = generate_batch(manager.model, manager.processor, conversations, images, k=k, sampling=sampling)
    singles = [
        generate_batch(manager.model, manager.processor, [conversation], [row_images], k=k, sampling=sampling)[0]
        for conversation, row_images in zip(conversations, images, strict=True)
    ]
    assert batched == singles


def test_engine_flops_match_flop_counter(managers, sample_images):
    """The engine's analytic stats against FlopCounterMode on the engine's own prefill and decode."""
    manager = managers("llava")
    model = manager.model
    inputs = build_model_inputs(
        manager.processor, [[user_message("Count it.")]], [sample_images[:1]], model.device, model.dtype
    )
    prompt = embed_prompt(model, inputs)
    dims = flops.DecoderDims.from_config(model.config)
    for k in (None, 0, 2):
        counter = FlopCounterMode(display=False, custom_mapping=flops.flop_counter_formulas())
        with counter:
            logits, state = prefill(model, prompt, withdrawal_selector(k, 4))
        schedule = [int(count[0]) for count in state.prompt_tokens_per_layer]
        assert schedule == flops.vtw_tokens_per_layer(4, 36, schedule[-1] if k is not None else schedule[0] - 36, k)
        assert counter.get_total_flops() == flops.prefill_flops(dims, schedule)
        counter = FlopCounterMode(display=False, custom_mapping=flops.flop_counter_formulas())
        with counter:
            for _ in range(3):
                logits = decode_step(model, state, logits.argmax(-1, keepdim=True))
        assert counter.get_total_flops() == flops.decode_flops(dims, schedule, 3)


def test_bad_requests_are_clear(managers, sample_images):
    manager = managers("llava")
    with pytest.raises(InputError, match="question is empty"):
        user_message("   ")
    with pytest.raises(InputError, match="max_new_tokens"):
        manager.generate([user_message("Hi", 0)], [], sampling=SamplingConfig(max_new_tokens=0))
    with pytest.raises(InputError, match="K must be"):
        manager.generate([user_message("Hi", 0)], [], k=9)
    context = manager.model.config.get_text_config().max_position_embeddings
    with pytest.raises(InputError, match="characters long; at most 4,000"):
        user_message(" ".join(["word"] * context))  # refused before tokenising
    with pytest.raises(InputError, match="exceeds the model's context"):
        manager.generate([user_message("Hi", 0)], [], sampling=SamplingConfig(max_new_tokens=context))
    with pytest.raises(InputError, match="position_mode"):
        manager.generate([user_message("Hi")], sample_images[:1], k=1, position_mode="shuffled")


def test_searched_k_is_read_from_the_checkpoint_folder(tmp_path):
    assert searched_k(str(tmp_path), 12) is None  # no vtw.json
    (tmp_path / "vtw.json").write_text('{"k": 8, "num_layers": 12}')
    assert searched_k(str(tmp_path), 12) == 8
    for bad in ('{"k": 13}', '{"k": 0}', '{"k": true}', '{"k": "8"}', "[8]", "not json"):
        (tmp_path / "vtw.json").write_text(bad)
        assert searched_k(str(tmp_path), 12) is None, bad
    assert searched_k("llava-hf/llava-1.5-7b-hf", 32) is None  # a hub id is no folder


def test_stats_to_dict_is_dataclasses_asdict_with_lists_of_their_own():
    """`GenerationStats.to_dict` (the server's usage block) copies the fields as `dataclasses.asdict` does, lists
    included: changing the dict leaves the stats as they were."""
    import dataclasses

    from vtw_core.generation.types import GenerationStats

    stats = GenerationStats(k=5, num_layers=16, prompt_tokens=588, ttft_s=0.03, finish_reason="length",
                            prompt_tokens_per_row=[588, 590], prefill_flops_per_row=[7, 9])  # fmt: skip
    as_dict = stats.to_dict()
    assert as_dict == dataclasses.asdict(stats) and list(as_dict) == list(dataclasses.asdict(stats))
    as_dict["prompt_tokens_per_row"].append(1)
    assert stats.prompt_tokens_per_row == [588, 590]
