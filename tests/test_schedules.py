"""Per-layer vision-token schedules: VTW and FastV as schedules, against the engine and an independent reference."""

from __future__ import annotations

import copy

import pytest
import torch
from test_engine import (
    build_model,
    deep_layers_logits,
    engine_tokens,
    prompt_inputs,
    record_language_model_call,
    stock_positions,
)
from transformers import AutoConfig

from vtw_core.engine import flops
from vtw_core.engine.decoder import prefill
from vtw_core.engine.embed import embed_prompt
from vtw_core.engine.schedules import Schedule, ScheduleSelector
from vtw_core.errors import InputError
from vtw_core.generation.generate import generate_tokens
from vtw_core.generation.types import GenerationStats, SamplingConfig
from vtw_core.models.configs import shipped_config_path

N = 4


def schedule_tokens(model, inputs, schedule, steps=8):
    stats = GenerationStats(k=None, num_layers=N)
    columns = generate_tokens(model, inputs, schedule=schedule, sampling=SamplingConfig(max_new_tokens=steps),
                              stats=stats)  # fmt: skip
    return torch.stack(list(columns), 1).tolist(), stats


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_keep_everything_is_the_baseline_and_vtw_is_vtw(family):
    model = build_model(family)
    inputs = prompt_inputs(model, family)
    everything = Schedule(tuple([1.0] * N))
    assert schedule_tokens(model, inputs, everything)[0] == engine_tokens(model, inputs, None)
    for k in (0, 1, 3):
        tokens, _ = schedule_tokens(model, inputs, Schedule.vtw(k, N))
        assert tokens == engine_tokens(model, inputs, k)


def reference_cut_logits(model, inputs, k: int, ratio: float, ranking: str = "last") -> torch.Tensor:
    """One cut before layer k, by definition and cache-free, from a stock *eager* forward: rank vision tokens by
    the attention (mean over heads) they get at layer k-1 from the last prompt token (FastV) or summed over all
    text tokens (G-Search), keep the top (1 - ratio), run layers >= k on the kept tokens."""
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    with torch.no_grad():
        attentions = eager(**inputs, output_attentions=True).attentions
    hidden_states, seen = record_language_model_call(model, inputs)
    ids = inputs["input_ids"][0]
    vision = ids == model.config.image_token_id
    weights = attentions[k - 1][0].mean(0)  # (queries, keys)
    received = weights[-1] if ranking == "last" else weights[~vision].sum(0)
    received = received.masked_fill(~vision, float("-inf"))
    kept_vision = round(int(vision.sum()) * (1 - ratio))  # the official FastV code's count
    top = received.topk(kept_vision).indices
    keep = ~vision
    keep[top] = True
    positions = stock_positions(seen, len(ids))[..., keep]
    return deep_layers_logits(model, hidden_states[k][:, keep], positions, k)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
@pytest.mark.parametrize(("k", "ratio"), [(1, 0.5), (2, 0.75), (3, 0.25)])
def test_fastv_equals_an_independent_reference(family, k, ratio):
    model = build_model(family)
    inputs = prompt_inputs(model, family)
    selector = ScheduleSelector(model, Schedule.fastv(k, ratio, N), N)
    logits, state = prefill(model, embed_prompt(model, inputs), selector)
    torch.testing.assert_close(logits, reference_cut_logits(model, inputs, k, ratio), rtol=1e-4, atol=1e-5)
    vision = int((inputs["input_ids"] == model.config.image_token_id).sum())
    kept = [int(count[0]) for count in state.prompt_tokens_per_layer]
    text = inputs["input_ids"].shape[1] - vision
    assert kept == [vision + text] * k + [text + Schedule.fastv(k, ratio, N).kept_counts(vision)[-1]] * (N - k)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_text_ranking_equals_an_independent_reference(family):
    model = build_model(family)
    inputs = prompt_inputs(model, family)
    selector = ScheduleSelector(model, Schedule((1.0, 1.0, 0.4, 0.4), "text"), N)
    logits, _ = prefill(model, embed_prompt(model, inputs), selector)
    torch.testing.assert_close(logits, reference_cut_logits(model, inputs, 2, 0.6, "text"), rtol=1e-4, atol=1e-5)


def test_text_ranked_schedule_cuts_layer_by_layer():
    model = build_model("llava_next")
    inputs = prompt_inputs(model, "llava_next")
    schedule = Schedule((1.0, 0.6, 0.3, 0.1), "text")
    tokens, stats = schedule_tokens(model, inputs, schedule)
    vision = stats.vision_tokens
    _, state = prefill(model, embed_prompt(model, inputs), ScheduleSelector(model, schedule, N))
    kept = [int(count[0]) - (stats.prompt_tokens - vision) for count in state.prompt_tokens_per_layer]
    assert kept == schedule.kept_counts(vision)
    assert [layer.get_seq_length() for layer in state.cache.layers] == [
        int(c[0]) for c in state.prompt_tokens_per_layer
    ]
    dims = flops.DecoderDims.from_config(model.config)
    assert stats.prefill_flops == flops.prefill_flops(dims, [int(c[0]) for c in state.prompt_tokens_per_layer])
    assert len(tokens[0]) == 8


def test_fastv_flops_match_the_paper():
    """FastV K=2, R=50% on LLaVA-1.5-7B: the paper's Table 2 says 4.91 TFLOPs (57.90% of 8.48)."""
    dims = flops.DecoderDims.from_config(AutoConfig.from_pretrained(shipped_config_path("llava-1.5-7b")))
    schedule = Schedule.fastv(2, 0.5, 32)
    per_layer = [62 + kept for kept in schedule.kept_counts(576)]
    assert flops.prefill_flops(dims, per_layer) / 1e12 == pytest.approx(4.91, rel=0.02)


def test_fastv_keeps_the_official_count():
    # FastV's code keeps round(L * (1 - R)) vision tokens: 115 of 576 at R = 0.8 (a ceiling would keep 116).
    assert Schedule.fastv(2, 0.8, 32).kept_counts(576)[2:] == [115] * 30
    assert Schedule.fastv(2, 0.5, 32).kept_counts(575)[-1] == 288  # 287.5 rounds to even


def test_schedule_validation_and_files(tmp_path):
    with pytest.raises(InputError, match="must not grow"):
        Schedule((1.0, 0.5, 0.7))
    with pytest.raises(InputError, match="between 0 and 1"):
        Schedule((1.0, 1.5))
    with pytest.raises(InputError, match="layer 0"):
        Schedule((0.5, 0.5))
    with pytest.raises(InputError, match="K must be between"):
        Schedule.fastv(0, 0.5, 4)
    schedule = Schedule((1.0, 0.5, 0.25, 0.0), "text", "searched")
    (tmp_path / "s.json").write_text(schedule.to_json())
    assert Schedule.load(tmp_path / "s.json") == schedule
    with pytest.raises(InputError, match="not a schedule"):
        Schedule.from_json("{}")
    model = build_model("llava")
    with pytest.raises(InputError, match="the schedule has 3 layers, the model 4"):
        schedule_tokens(model, prompt_inputs(model, "llava"), Schedule((1.0, 1.0, 0.0)))
    with pytest.raises(InputError, match="either K"):
        list(generate_tokens(model, prompt_inputs(model, "llava"), k=2, schedule=schedule))


def test_methods_by_name_and_file(tmp_path):
    from vtw_core.engine.methods import parse_method

    assert parse_method("vtw:7", 12).k == 7 and parse_method("baseline", 12).label == "baseline"
    assert parse_method("fastv:2:0.5", 12).schedule == Schedule.fastv(2, 0.5, 12)
    bundled = parse_method("schedule:easyvqa-gsearch", 16).schedule  # searched on the 16-layer default model
    assert len(bundled.keep) == 16 and bundled.keep[0] == 1.0
    (tmp_path / "mine.json").write_text(Schedule((1.0, 0.5)).to_json())
    assert parse_method(f"schedule:{tmp_path / 'mine.json'}", 2).schedule.keep == (1.0, 0.5)
    for bad in ("vtw:99", "fastv:x", "schedule:nowhere", "magic"):
        with pytest.raises(InputError):
            parse_method(bad, 12)
