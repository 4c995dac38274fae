"""The tuned kernels (vtw_core.engine.tuned_kernels): the compiled engine's graphs with their matmuls as inductor's CPU
GEMM templates on frozen weights. Against the plain engines: the same greedy tokens and logits within a few ulps, the
templates really in the graphs, and graphs of each model's own weights."""

from __future__ import annotations

import pytest
import torch
from test_engine import NUM_LAYERS, build_model, prompt_inputs
from test_fast import tokens
from torch._dynamo.utils import counters

from vtw_core.engine.compiled_prefill import compiled_prefill
from vtw_core.engine.decoder import prefill, withdrawal_selector
from vtw_core.engine.embed import embed_prompt
from vtw_core.engine.tuned_kernels import tuned_kernels_apply
from vtw_core.generation.generate import generate_tokens
from vtw_core.generation.types import GenerationStats, SamplingConfig

LOGIT_BOUND = 1e-4  # float32: the templates sum the products in another order than the library's matmul


def tuned_logits(model, inputs, k):
    prompt = embed_prompt(model, inputs)
    selector = withdrawal_selector(k, NUM_LAYERS)
    plain, _ = prefill(model, prompt, selector)
    logits, _, ran = compiled_prefill(model, prompt, selector, tuned_kernels=True)
    assert ran == "tuned"
    return logits, plain


@pytest.fixture(scope="module")
def llava():
    model = build_model("llava")
    return model, prompt_inputs(model, "llava")


def test_a_tuned_prefill_gives_the_plain_prefills_logits(llava):
    """VTW at K = 2: layers over every token, then text-only layers (one prompt's decode steps are checked on the
    default model below, a batch's next)."""
    model, inputs = llava
    templates = counters["inductor"]["cpp_templated_kernel_counter"]
    grouped = counters["inductor"]["cpp_grouped_gemm_template"]
    logits, plain = tuned_logits(model, inputs, 2)
    assert (logits - plain).abs().max() <= LOGIT_BOUND
    assert counters["inductor"]["cpp_templated_kernel_counter"] > templates  # the matmuls came from the templates
    # q, k and v, and gate and up, read one input: each set is one grouped GEMM, for the rows of the layers before K
    # and for the kept rows after (layers of one shape share their generated kernels)
    assert counters["inductor"]["cpp_grouped_gemm_template"] - grouped >= 4
    assert tuned_kernels_apply(torch.device("cpu")) and not tuned_kernels_apply(torch.device("cuda"))


def test_a_batch_prefills_on_the_library_matmuls_and_decodes_tuned(llava):
    """Over several prompts' tokens the templates lose to the library's matmuls, so a batch's prefill keeps them (and
    says so); its decode steps, a row per prompt, are tuned. The tokens are the static engine's."""
    model, inputs = llava
    batch = {name: torch.cat([value, value]) for name, value in inputs.items()}
    for k, engine in ((None, "tuned (the library's matmuls for a batch's prefill)"),
                      (2, "tuned (the library's matmuls before K for a batch's prefill)")):  # fmt: skip
        stats, sampling = GenerationStats(k=k, num_layers=NUM_LAYERS), SamplingConfig(max_new_tokens=4)
        steps = generate_tokens(model, batch, k=k, sampling=sampling, stats=stats, prefill_engine="tuned")
        assert torch.stack(list(steps), 1).tolist() == tokens(model, batch, k, "static", sampling)[0]
        assert (stats.prefill_engine, stats.engine) == (engine, "tuned")


@pytest.mark.parametrize("rows", [True, False])
def test_a_batch_under_vtw_runs_its_layers_from_k_on_the_templates(llava, monkeypatch, rows):
    """Under VTW a batch's layers from K see a few dozen kept rows, where the templates win: those layers run in a
    tuned graph of their own, after the layers before K on the library's matmuls. Logits, keys and values within the
    bound of the plain prefill's, for left-padded and for equal rows, with layer K-1 run for the kept tokens only
    (`rows`) or whole (a family whose layers engine.layer_rows does not take)."""
    from test_engine import processor_inputs, sample_image

    from vtw_core.engine import compiled_prefill as module

    model, single = llava
    if not rows:
        monkeypatch.setattr(module, "computes_rows", lambda layer: False)
    padded = processor_inputs("llava", [[], [sample_image()], [sample_image(), sample_image(seed=1)]])
    equal = {name: torch.cat([value, value]) for name, value in single.items()}
    for inputs in (padded, equal) if rows else (padded,):
        prompt = embed_prompt(model, inputs)
        selector = withdrawal_selector(2, NUM_LAYERS)
        plain_logits, plain_state = prefill(model, prompt, selector)
        templates = counters["inductor"]["cpp_templated_kernel_counter"]
        logits, state, ran = compiled_prefill(model, prompt, selector, tuned_kernels=True)
        assert ran == "tuned (the library's matmuls before K for a batch's prefill)"
        assert (logits - plain_logits).abs().max() <= LOGIT_BOUND
        for ours, theirs in zip(state.cache.layers, plain_state.cache.layers, strict=True):
            assert ours.keys.shape == theirs.keys.shape
            assert (ours.keys - theirs.keys).abs().max() <= LOGIT_BOUND
            assert (ours.values - theirs.values).abs().max() <= LOGIT_BOUND
        if inputs is padded:  # compiled at the first call: the templates are in the graph of the layers from K
            assert counters["inductor"]["cpp_templated_kernel_counter"] > templates


def test_a_batch_whose_tuned_layers_do_not_compile_runs_the_compiled_ones(monkeypatch):
    """The layers from K fall back as a whole prefill does: a warning, the engine's name, the same answer."""
    from vtw_core.engine import compiled_prefill as module

    model = build_model("llava", seed=3)
    single = prompt_inputs(model, "llava")
    inputs = {name: torch.cat([value, value]) for name, value in single.items()}

    def failing(*args):
        raise torch._dynamo.exc.InternalTorchDynamoError("the compiler failed")

    monkeypatch.setattr(module, "_tuned_from_k", failing)
    prompt = embed_prompt(model, inputs)
    selector = withdrawal_selector(2, NUM_LAYERS)
    plain, _ = prefill(model, prompt, selector)
    with pytest.warns(RuntimeWarning, match="tuned kernels did not compile"):
        logits, _, ran = compiled_prefill(model, prompt, selector, tuned_kernels=True)
    assert ran == "compiled (no tuned kernels for this device or model)"
    assert (logits - plain).abs().max() <= LOGIT_BOUND


def test_each_model_gets_graphs_of_its_own_weights(llava):
    """The weights are constants of a tuned graph: a second model of the same shapes must not run on the first's,
    nor the first, afterwards, on the second's."""
    first, inputs = llava
    second = build_model("llava", seed=1)
    answers = []
    for model in (first, second, first):
        logits, plain = tuned_logits(model, inputs, 2)
        assert (logits - plain).abs().max() <= LOGIT_BOUND
        answers.append(logits)
    assert (answers[0] - answers[1]).abs().max() > 100 * LOGIT_BOUND  # the two models really differ


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_the_default_model_answers_easy_vqa_questions_the_same(dtype):
    """The shipped model in the served precision, VTW at its K (layers over every token, then text-only ones): the
    tuned prefill and decode give the plain engines' greedy replies to test questions."""
    from test_compiled_prefill import assert_same_replies

    from vtw_core.generation.manager import ModelManager
    from vtw_core.models.defaults import require_model
    from vtw_core.training.easyvqa import load_split

    plain = ModelManager.load(require_model(None), device="cpu", dtype=dtype)
    tuned = ModelManager(plain.model, plain.processor, plain.info.source, prefill_engine="tuned")
    assert_same_replies(tuned, plain, load_split("test")[:8], plain.info.searched_k, "tuned")


def test_a_model_whose_tuned_graphs_do_not_compile_runs_the_compiled_ones(monkeypatch):
    """A compiler failure (dynamo's own errors) warns once, names the engine that ran and keeps the answer."""
    from vtw_core.engine import compiled_prefill as module

    model = build_model("llava", seed=2)
    inputs = prompt_inputs(model, "llava")
    attempts = []

    def failing(*args):
        attempts.append(True)
        raise torch._dynamo.exc.InternalTorchDynamoError("the compiler failed")

    monkeypatch.setattr(module, "_tuned_loop", failing)
    prompt = embed_prompt(model, inputs)
    plain, _ = prefill(model, prompt, None)
    with pytest.warns(RuntimeWarning, match="tuned kernels did not compile"):
        logits, _, ran = compiled_prefill(model, prompt, None, tuned_kernels=True)
    assert ran == "compiled (no tuned kernels for this device or model)"
    assert (logits - plain).abs().max() <= LOGIT_BOUND
    compiled_prefill(model, prompt, None, tuned_kernels=True)
    assert attempts == [True]  # not tried again for this model
