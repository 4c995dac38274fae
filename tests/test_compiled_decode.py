"""The compiled decode step (vtw_core.engine.fast_decode.compiled_decode_step) against the eager static step: the
same greedy tokens, logits within a few ulps, one graph for every prompt length and token budget, and when `auto`
picks it."""

from __future__ import annotations

import torch
from test_engine import NUM_LAYERS, build_model, left_pad, prompt_inputs
from test_fast import tokens

from vtw_core.engine.decoder import prefill, withdrawal_selector
from vtw_core.engine.embed import embed_prompt
from vtw_core.engine.fast_decode import compiled_decode_step, fast_state_from_prefill, static_decode_step
from vtw_core.generation.generate import auto_engine, generate_tokens
from vtw_core.generation.types import GenerationStats, SamplingConfig

LOGIT_BOUND = 1e-4  # fused elementwise kernels round differently from the eager operators, in the last bits


def test_greedy_tokens_equal_the_static_step():
    model = build_model("llava")
    inputs = prompt_inputs(model, "llava")
    for k in (None, 0, 2):
        static, _ = tokens(model, inputs, k, "static")
        compiled, stats = tokens(model, inputs, k, "compiled")
        assert compiled == static and stats.engine == "compiled", k


def test_a_left_padded_batch_whose_rows_leave_early():
    """Rows of different lengths, each with its own token budget: the batch shrinks step by step (new shapes for
    the compiled step) and every row gets the static step's tokens."""
    model = build_model("llava")
    ids, mask = left_pad([torch.tensor([1, 30, 31, 32, 33, 34, 35]), torch.tensor([1, 40, 41]), torch.tensor([1, 50])])
    batch = {"input_ids": ids, "attention_mask": mask}
    limits = [3, 9, 6]

    def rows(engine):
        got = {row: [] for row in range(3)}
        steps = generate_tokens(model, batch, k=1, engine=engine, max_new_tokens=limits, pad_token_id=-1)
        for column in steps:
            for row, token in enumerate(column.tolist()):
                if token != -1:
                    got[row].append(token)
        return got

    compiled = rows("compiled")
    assert compiled == rows("static") and [len(compiled[row]) for row in range(3)] == limits


def test_logits_match_the_static_step_with_multimodal_rotary_positions():
    """Qwen2-VL's 3-D positions advance inside the compiled step exactly as in the eager one."""
    model = build_model("qwen2_vl")
    prompt = embed_prompt(model, prompt_inputs(model, "qwen2_vl"))
    states = []
    for _ in range(2):
        logits, state = prefill(model, prompt, withdrawal_selector(2, NUM_LAYERS))
        states.append(fast_state_from_prefill(state, max_new_tokens=5))
    eager, compiled = states
    for _ in range(4):
        token = logits.argmax(-1)[:, None]
        eager.input_ids.copy_(token)
        compiled.input_ids.copy_(token)
        logits = static_decode_step(model, eager)
        assert (compiled_decode_step(model, compiled) - logits).abs().max() <= LOGIT_BOUND
        for ours, theirs in zip(compiled.groups, eager.groups, strict=True):
            assert torch.equal(ours.next_position, theirs.next_position) and torch.equal(ours.valid, theirs.valid)
    assert compiled.next_slot == eager.next_slot
    assert all(torch.equal(a, b) for a, b in zip(compiled.write_index, eager.write_index, strict=True))


def test_prompts_of_other_lengths_and_budgets_reuse_the_graph():
    import torch._dynamo

    model = build_model("llava")
    tokens(model, prompt_inputs(model, "llava", text_tokens=3), 2, "compiled", SamplingConfig(max_new_tokens=3))
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for text_tokens, budget in ((11, 5), (20, 12)):
        inputs = prompt_inputs(model, "llava", text_tokens=text_tokens)
        tokens(model, inputs, 2, "compiled", SamplingConfig(max_new_tokens=budget))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before


def test_auto_compiles_the_step_where_the_prefill_is_compiled():
    model = build_model("llava")
    inputs = prompt_inputs(model, "llava")
    stats = GenerationStats(k=2, num_layers=NUM_LAYERS)
    steps = generate_tokens(model, inputs, k=2, sampling=SamplingConfig(max_new_tokens=3), stats=stats,
                            prefill_engine="compiled")  # fmt: skip
    assert len(list(steps)) == 3 and (stats.prefill_engine, stats.engine) == ("compiled", "compiled")
    assert auto_engine(torch.device("cpu"), "sdpa", compiled="compiled") == "compiled"
    assert auto_engine(torch.device("cpu"), "sdpa", compiled="tuned") == "tuned"
    assert auto_engine(torch.device("cpu"), "sdpa") == "static"
    assert auto_engine(torch.device("cuda"), "sdpa", compiled="tuned") == "graph"  # CUDA keeps its captured step
    assert auto_engine(torch.device("cpu"), "flash_attention_2", compiled="compiled") == "plain"
