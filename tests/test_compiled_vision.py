"""The compiled vision tower (vtw_core.engine.compiled_vision): the stock tower's features within a few ulps, only
for the thread that asked, one graph for every batch beyond one, and the stock forward everywhere else."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from test_engine import build_model, processor_inputs, prompt_inputs, sample_image
from test_fast_prefill import generated

from vtw_core.engine import compiled_vision as module
from vtw_core.engine.compiled_vision import compiled_vision, vision_tower
from vtw_core.engine.embed import embed_prompt

FEATURE_BOUND = 1e-5  # fused elementwise kernels round differently from the eager operators, in the last bits
TUNED_FEATURE_BOUND = 1e-4  # and the GEMM templates sum the products in another order than the library's matmul


@pytest.fixture(scope="module")
def llava():
    model = build_model("llava")
    return model, prompt_inputs(model, "llava")


@pytest.fixture
def compiled_calls(monkeypatch):
    """How many tower calls went through the compiled function."""
    calls = []
    compiled = module._compiled_forward

    def counted(*args, **kwargs):
        calls.append(threading.get_ident())
        return compiled(*args, **kwargs)

    monkeypatch.setattr(module, "_compiled_forward", counted)
    return calls


def test_the_compiled_tower_gives_the_stock_embeddings(llava, compiled_calls):
    model, inputs = llava
    stock = embed_prompt(model, inputs)
    ours = embed_prompt(model, inputs, compile_vision=True)
    assert compiled_calls == [threading.get_ident()]
    assert (ours.inputs_embeds - stock.inputs_embeds).abs().max() <= FEATURE_BOUND
    for name in ("attention_mask", "position_ids", "vision_mask"):
        assert torch.equal(getattr(ours, name), getattr(stock, name)), name
    embed_prompt(model, inputs)  # outside the block: the stock forward again
    assert len(compiled_calls) == 1


def test_other_threads_keep_the_stock_tower(llava, compiled_calls):
    """While one thread is inside `compiled_vision`, another thread's call of the same tower is the stock one."""
    model, inputs = llava
    stock = embed_prompt(model, inputs).inputs_embeds
    seen = {}
    inside, done = threading.Event(), threading.Event()

    def other_thread():
        inside.wait(timeout=60)
        seen["embeds"] = embed_prompt(model, inputs).inputs_embeds
        done.set()

    worker = threading.Thread(target=other_thread)
    worker.start()
    with compiled_vision(model):
        inside.set()
        assert done.wait(timeout=120)
    worker.join()
    assert torch.equal(seen["embeds"], stock) and compiled_calls == []


def test_batches_of_any_size_share_one_graph(llava):
    model, _ = llava
    batches = [processor_inputs("llava", [[sample_image(seed=seed)] for seed in range(rows)]) for rows in (2, 3, 5)]
    embed_prompt(model, batches[0], compile_vision=True)
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for inputs in batches[1:]:
        ours = embed_prompt(model, inputs, compile_vision=True).inputs_embeds
        assert (ours - embed_prompt(model, inputs).inputs_embeds).abs().max() <= FEATURE_BOUND
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before


def test_a_deep_copy_routes_its_own_tower(llava):
    model, inputs = llava
    embed_prompt(model, inputs, compile_vision=True)  # the router is in place
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in vision_tower(twin).parameters():
            parameter.mul_(0.5)
    assert vars(vision_tower(twin))["forward"].__self__ is vision_tower(twin)
    assert not torch.equal(embed_prompt(twin, inputs).inputs_embeds, embed_prompt(model, inputs).inputs_embeds)


def test_the_compiled_engine_compiles_the_tower_and_keeps_the_tokens(llava, compiled_calls):
    model, inputs = llava
    plain, _ = generated(model, inputs, 2)
    ours, stats = generated(model, inputs, 2, prefill_engine="compiled")
    assert ours == plain and stats.prefill_engine == "compiled" and len(compiled_calls) == 1


def test_towers_that_cut_images_into_grids_stay_stock():
    model = build_model("qwen2_vl")
    inputs = prompt_inputs(model, "qwen2_vl")
    assert vision_tower(model) is None
    stock = embed_prompt(model, inputs).inputs_embeds
    assert torch.equal(embed_prompt(model, inputs, compile_vision=True).inputs_embeds, stock)
    assert "forward" not in vars(model.model.visual)


def test_someone_elses_forward_wrapper_is_left_alone(compiled_calls):
    """A tower whose forward another library replaced (accelerate's offload hooks do) is not routed."""
    model = build_model("llava")
    inputs = prompt_inputs(model, "llava")
    tower = vision_tower(model)
    wrapped = []

    def their_forward(*args, **kwargs):
        wrapped.append(True)
        return type(tower).forward(tower, *args, **kwargs)

    tower.forward = their_forward
    embed_prompt(model, inputs, compile_vision=True)
    assert wrapped == [True] and compiled_calls == [] and vars(tower)["forward"] is their_forward


def failing_compiler(monkeypatch, name: str) -> list[bool]:
    """Replace the module's compiled function `name` by one that fails as dynamo does; returns its calls."""
    attempts = []

    def failing(*args, **kwargs):
        attempts.append(True)
        raise torch._dynamo.exc.InternalTorchDynamoError("the compiler failed")

    monkeypatch.setattr(module, name, failing)
    return attempts


def test_a_tower_that_does_not_compile_runs_stock(monkeypatch):
    """A compiler failure (dynamo's own errors) warns once and leaves that tower stock; the answer is the same."""
    model = build_model("llava")
    inputs = prompt_inputs(model, "llava")
    attempts = failing_compiler(monkeypatch, "_compiled_forward")
    stock = embed_prompt(model, inputs).inputs_embeds
    with pytest.warns(RuntimeWarning, match="did not compile"):
        assert torch.equal(embed_prompt(model, inputs, compile_vision=True).inputs_embeds, stock)
    assert torch.equal(embed_prompt(model, inputs, compile_vision=True).inputs_embeds, stock)
    assert attempts == [True]  # not tried again


def test_the_tuned_tower_gives_the_stock_embeddings(llava):
    """The tuned engine's tower: its matmuls from inductor's GEMM templates on frozen weights."""
    model, inputs = llava
    stock = embed_prompt(model, inputs).inputs_embeds
    templates = torch._dynamo.utils.counters["inductor"]["cpp_templated_kernel_counter"]
    ours = embed_prompt(model, inputs, compile_vision=True, tuned_kernels=True).inputs_embeds
    assert torch._dynamo.utils.counters["inductor"]["cpp_templated_kernel_counter"] > templates
    assert (ours - stock).abs().max() <= TUNED_FEATURE_BOUND


def test_a_tuned_tower_that_does_not_compile_runs_compiled(monkeypatch, compiled_calls):
    """A tuned graph that fails warns once; that tower runs the compiled graph from then on, with the same answer."""
    model = build_model("llava")
    inputs = prompt_inputs(model, "llava")
    attempts = failing_compiler(monkeypatch, "_tuned_forward")
    stock = embed_prompt(model, inputs).inputs_embeds
    with pytest.warns(RuntimeWarning, match="tuned kernels did not compile"):
        ours = embed_prompt(model, inputs, compile_vision=True, tuned_kernels=True).inputs_embeds
    assert (ours - stock).abs().max() <= FEATURE_BOUND
    embed_prompt(model, inputs, compile_vision=True, tuned_kernels=True)
    assert attempts == [True] and len(compiled_calls) == 2  # not tried again; the compiled graph both times
