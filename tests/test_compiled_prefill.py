"""The compiled prefill (vtw_core.engine.compiled_prefill) against the plain one: logits within a few ulps, the same
greedy tokens and decode state, one graph for every prompt length, and its fallbacks."""

from __future__ import annotations

import pytest
import torch
from test_engine import NUM_LAYERS, build_model, processor_inputs, prompt_inputs, sample_image
from test_fast_prefill import generated

from vtw_core.engine.compiled_prefill import compiled_prefill, fallback_reason
from vtw_core.engine.decoder import Withdrawal, prefill, withdrawal_selector
from vtw_core.engine.embed import embed_prompt
from vtw_core.engine.schedules import Schedule

LOGIT_BOUND = 1e-4  # fused elementwise kernels round differently from the eager operators, in the last bits


@pytest.fixture(scope="module")
def llava():
    model = build_model("llava")
    return model, prompt_inputs(model, "llava")


@pytest.mark.parametrize("k", [None, 0, 2])
def test_logits_and_decode_state_match_the_plain_prefill(llava, k):
    model, inputs = llava
    assert_matches_the_plain_prefill(model, inputs, k)


@pytest.mark.parametrize("k", [None, 0, 2])
def test_a_left_padded_batch_matches_the_plain_prefill(llava, k):
    """Rows with 0, 1 and 2 images: every row has its own length and, from K, its own count of kept tokens."""
    model, _ = llava
    inputs = processor_inputs("llava", [[], [sample_image()], [sample_image(), sample_image(seed=1)]])
    assert not bool(inputs["attention_mask"].all())  # really left-padded
    assert_matches_the_plain_prefill(model, inputs, k)
    same = {name: torch.cat([value, value]) for name, value in llava[1].items()}  # equal rows: no padding, no mask
    assert_matches_the_plain_prefill(model, same, k)


def assert_matches_the_plain_prefill(model, inputs, k):
    prompt = embed_prompt(model, inputs)
    selector = withdrawal_selector(k, NUM_LAYERS)
    plain_logits, plain_state = prefill(model, prompt, selector)
    logits, state, ran = compiled_prefill(model, prompt, selector)
    assert ran == "compiled"
    assert (logits - plain_logits).abs().max() <= LOGIT_BOUND
    assert state.group_of_layer == plain_state.group_of_layer
    assert [group.first_layer for group in state.groups] == [group.first_layer for group in plain_state.groups]
    for ours, theirs in zip(state.groups, plain_state.groups, strict=True):
        assert torch.equal(ours.valid, theirs.valid) and torch.equal(ours.prompt_index, theirs.prompt_index)
        assert torch.equal(ours.next_position, theirs.next_position)
    assert state.cache_lengths() == plain_state.cache_lengths()
    for ours, theirs in zip(state.cache.layers, plain_state.cache.layers, strict=True):
        assert (ours.keys - theirs.keys).abs().max() <= LOGIT_BOUND
        assert (ours.values - theirs.values).abs().max() <= LOGIT_BOUND


@pytest.mark.parametrize("k", [None, 2])
def test_greedy_tokens_equal_the_plain_prefill(llava, k):
    model, inputs = llava
    plain, _ = generated(model, inputs, k)
    tokens, stats = generated(model, inputs, k, prefill_engine="compiled")
    assert tokens == plain and stats.prefill_engine == "compiled"


def test_prompts_of_other_lengths_reuse_the_compiled_graph(llava):
    model, _ = llava
    for text_tokens in (3, 11, 20):
        inputs = prompt_inputs(model, "llava", text_tokens=text_tokens)
        prompt = embed_prompt(model, inputs)
        plain = prefill(model, prompt, Withdrawal(2))[0]
        logits, _, ran = compiled_prefill(model, prompt, Withdrawal(2))
        assert ran == "compiled" and (logits - plain).abs().max() <= LOGIT_BOUND
    from vtw_core.engine import compiled_prefill as module

    assert module._compiled_loop.fn is module._layer_loop  # one compiled function


def test_a_fresh_trace_compiles_one_graph_quietly(llava):
    """Tracing the layer loop from scratch gives one graph (no guard on the cache-argument lookup that a second
    call would fail, recompiling) and no warning for the user (dynamo warns about an lru_cache it traces through)."""
    import warnings

    model, inputs = llava
    prompt = embed_prompt(model, inputs)
    torch._dynamo.reset()
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert compiled_prefill(model, prompt, Withdrawal(2))[2] == "compiled"
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before + 1
    assert not [str(w.message) for w in caught if "torch" in w.filename]


def test_what_it_cannot_trace_falls_back_to_the_plain_prefill(llava):
    model, inputs = llava
    prompt = embed_prompt(model, inputs)
    assert fallback_reason(model, prompt, None, "original") is None
    schedule = Schedule((1.0, 0.5, 0.5, 0.5), "last")
    from vtw_core.engine.schedules import ScheduleSelector

    assert fallback_reason(model, prompt, ScheduleSelector(model, schedule, NUM_LAYERS), "original") == "schedule"
    assert fallback_reason(model, prompt, None, "rearrange") == "rearranged positions"
    logits, _, ran = compiled_prefill(model, prompt, Withdrawal(2), "rearrange")
    assert ran == "plain (rearranged positions)"
    assert torch.equal(logits, prefill(model, prompt, Withdrawal(2), "rearrange")[0])


def test_multimodal_rotary_positions_fall_back():
    model = build_model("qwen2_vl")
    prompt = embed_prompt(model, prompt_inputs(model, "qwen2_vl"))
    assert compiled_prefill(model, prompt, None)[2] == "plain (multimodal rotary positions)"


def test_the_default_model_answers_easy_vqa_questions_the_same(default_manager_compiled):
    """The shipped model, on test questions: compiled prefill and decode give the plain engines' greedy replies (the
    baseline: every layer over every token; VTW at the shipped K through the tuned kernels' graphs of the same loop:
    tests/test_tuned_kernels.py). Batches, padded and shrinking, are checked on the tiny models (above, and
    tests/test_compiled_decode.py), where the graphs compile in a fraction of the time."""
    from vtw_core.training.easyvqa import load_split

    compiled, plain = default_manager_compiled
    assert_same_replies(compiled, plain, load_split("test")[:12], None, "compiled")


def assert_same_replies(manager, plain, items, k, engine: str) -> None:
    """Each easy-vqa item asked alone: `manager` (its prefill and decode engines both `engine`) gives `plain`'s
    greedy reply."""
    from vtw_core.generation.types import SamplingConfig
    from vtw_core.models.images import load_image
    from vtw_core.models.prompts import user_message

    sampling = SamplingConfig(max_new_tokens=6)
    for item in items:
        messages, images = [user_message(item.question)], [load_image(item.image)]
        ours = manager.generate(messages, images, k=k, sampling=sampling)
        theirs = plain.generate(messages, images, k=k, sampling=sampling)
        assert (ours.stats.prefill_engine, ours.stats.engine) == (engine, engine), item.question
        assert ours.token_ids == theirs.token_ids, item.question


@pytest.fixture(scope="module")
def default_manager_compiled():
    from vtw_core.generation.manager import ModelManager
    from vtw_core.models.defaults import require_model

    plain = ModelManager.load(require_model(None), device="cpu", dtype="float32")
    compiled = ModelManager(plain.model, plain.processor, plain.info.source, prefill_engine="compiled")
    return compiled, plain


def test_serve_compiles_the_baseline_and_its_default_method_before_listening(default_manager_compiled, monkeypatch):
    import uvicorn

    from vtw_core.serve import standalone

    compiled, _ = default_manager_compiled
    warmed = []
    monkeypatch.setattr(type(compiled), "warm_up", lambda self, ks, batches: warmed.append((list(ks), batches)))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)
    from vtw_core.generation.manager import ModelManager

    tuned = ModelManager(compiled.model, compiled.processor, compiled.info.source, prefill_engine="tuned")
    standalone.serve(compiled, port=0, sock=standalone.bind_socket("127.0.0.1", 0))
    standalone.serve(compiled, port=0, sock=standalone.bind_socket("127.0.0.1", 0), max_batch_size=1)
    standalone.serve(tuned, port=0, sock=standalone.bind_socket("127.0.0.1", 0))
    k = compiled.info.searched_k  # the default method: VTW at the shipped K
    # Batches too, unless the server never batches; the tuned engine's graphs as the compiled one's.
    assert warmed == [([None, k], True), ([None, k], False), ([None, k], True)]


def test_a_warm_up_leaves_nothing_to_compile_for_a_batch():
    """After `warm_up(..., batches=True)`, batches of equal and of left-padded prompts run without recompiling (a
    tiny LLaVA behind its real processor: the graphs' kinds are the default model's, at a fraction of the compile
    time)."""
    import torch._dynamo
    from test_engine import tiny_processor

    from vtw_core.engine import compiled_prefill as module
    from vtw_core.generation.manager import ModelManager
    from vtw_core.generation.types import SamplingConfig
    from vtw_core.models.prompts import user_message

    compiled = ModelManager(build_model("llava"), tiny_processor("llava"), "tiny", prefill_engine="compiled")
    torch._dynamo.reset()  # forget graphs earlier tests compiled, so only the warm-up can have compiled them
    compiled.warm_up([None], batches=True)
    questions = ["What is in the image?", "What colour is the shape?", "Which shape does this picture show?"]
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for rows in ([0], [0, 0, 0], [0, 1, 2]):
        conversations = [[user_message(questions[row])] for row in rows]
        images = [[sample_image(seed=row)] for row in rows]
        for _ in compiled.stream_batch(conversations, images, sampling=SamplingConfig(max_new_tokens=2)):
            pass
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before
    assert module._compiled_loop.fn is module._layer_loop
