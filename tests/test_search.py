"""K search (Algorithm 1), calibration data and the attention analysis."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from test_engine import PROCESSOR_FAMILIES, VIDEO_FAMILIES

from vtw_core.analysis.attention import SEGMENTS, analyze_attention, prompt_segments
from vtw_core.analysis.calibration import load_calibration
from vtw_core.analysis.k_search import (
    CalibrationSample,
    default_eta,
    kl_divergence,
    kl_per_k,
    kl_per_k_naive,
    search_k,
)
from vtw_core.engine.embed import embed_prompt
from vtw_core.errors import InputError
from vtw_core.generation.manager import ModelManager
from vtw_core.models.prompts import build_model_inputs, user_message

NUM_LAYERS = 8


@pytest.fixture(scope="module")
def managers(tiny_model_path):
    loaded = {}

    def get(family: str, attention: str = "sdpa") -> ModelManager:
        if (family, attention) not in loaded:
            path = str(tiny_model_path(family, NUM_LAYERS))
            loaded[family, attention] = ModelManager.load(path, device="cpu", attention=attention)
        return loaded[family, attention]

    return get


def samples(sample_images, count=3) -> list[CalibrationSample]:
    questions = ["What is it?", "What colour is the shape?", "Describe the picture."]
    return [CalibrationSample(questions[i % 3], [sample_images[i % 3]]) for i in range(count)]


def test_kl_divergence_against_a_hand_computation():
    p, q = torch.tensor([[0.7, 0.2, 0.1]]), torch.tensor([[0.5, 0.3, 0.2]])
    expected = sum(a * torch.log(a / b) for a, b in zip(p[0], q[0], strict=True))
    torch.testing.assert_close(kl_divergence(p.log(), q.log()), expected[None])
    assert float(kl_divergence(p.log(), p.log())) == pytest.approx(0, abs=1e-7)


NEW_FAMILIES = PROCESSOR_FAMILIES  # the families added with their real processor classes


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", *NEW_FAMILIES])
def test_one_pass_equals_a_vtw_pass_per_k(managers, sample_images, family):
    manager = managers(family)
    model = manager.model
    inputs = build_model_inputs(
        manager.processor, [[user_message("What is it?")]], [[sample_images[1]]], model.device, model.dtype
    )
    prompt = embed_prompt(model, inputs)
    ks = list(range(NUM_LAYERS))
    fast, naive = kl_per_k(model, prompt, ks), kl_per_k_naive(model, prompt, ks)
    torch.testing.assert_close(fast, naive, rtol=1e-4, atol=1e-7)
    assert bool((naive > 0).all())  # every K changes the distribution a little on a random model


def test_search_picks_the_first_k_below_eta(managers, sample_images):
    manager = managers("llava")
    calls = []
    result = search_k(manager.model, manager.processor, samples(sample_images), eta=100, start=2,
                      progress=lambda done, total: calls.append((done, total)))  # fmt: skip
    assert result.k == 2 and [k for k, _ in result.curve] == list(range(2, NUM_LAYERS))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    curve = dict(result.curve)
    # A threshold between two curve values picks the first K below it, by definition.
    threshold = sorted(curve.values())[len(curve) // 2]
    chosen = search_k(manager.model, manager.processor, samples(sample_images), eta=threshold, start=2).k
    assert chosen == min(k for k, kl in curve.items() if kl <= threshold)
    # The official rule is KL <= eta: a threshold equal to the first K's KL picks that K.
    assert search_k(manager.model, manager.processor, samples(sample_images), eta=curve[2], start=2).k == 2
    # Mean over samples, per K.
    for index, (_, mean) in enumerate(result.curve):
        assert mean == pytest.approx(sum(row[index] for row in result.per_sample) / 3)


def test_default_eta_follows_the_official_evaluation():
    assert default_eta("llava-hf/llava-1.5-7b-hf")[0] == 0.003
    assert default_eta("llava-hf/llava-1.5-13b-hf")[0] == 0.0005
    assert default_eta("/models/llava-v1.6-vicuna-7b-hf/")[0] == 0.0001
    value, source = default_eta("Qwen/Qwen2-VL-2B-Instruct")
    assert value == 0.003 and "default" in source


def test_search_when_no_k_meets_eta(managers, sample_images):
    manager = managers("qwen2_vl")
    result = search_k(manager.model, manager.processor, samples(sample_images, 2), eta=0.0, start=5)
    assert result.k is None and len(result.curve) == NUM_LAYERS - 5
    assert result.to_dict()["k"] is None and result.to_dict()["curve"][0]["k"] == 5


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_one_pass_equals_a_vtw_pass_per_k_on_video(managers, sample_images, family):
    from vtw_core.models.videos import Video

    manager = managers(family)
    model = manager.model
    clip = Video(frames=[image.resize((48, 40)) for image in sample_images], fps=1.0, total_frames=3)
    inputs = build_model_inputs(
        manager.processor,
        [[user_message("What happens?", num_images=0, num_videos=1)]],
        [[]],
        model.device,
        model.dtype,
        videos=[[clip]],
    )
    prompt = embed_prompt(model, inputs)
    assert int(prompt.vision_mask.sum()) > 0
    ks = list(range(NUM_LAYERS))
    fast, naive = kl_per_k(model, prompt, ks), kl_per_k_naive(model, prompt, ks)
    torch.testing.assert_close(fast, naive, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", ["llava_next", *NEW_FAMILIES])
def test_fast_and_naive_search_agree(managers, sample_images, family):
    manager = managers(family)
    fast = search_k(manager.model, manager.processor, samples(sample_images, 2), start=1)
    naive = search_k(manager.model, manager.processor, samples(sample_images, 2), start=1, naive=True)
    assert fast.k == naive.k
    for (k1, a), (k2, b) in zip(fast.curve, naive.curve, strict=True):
        assert k1 == k2 and a == pytest.approx(b, rel=1e-4, abs=1e-8)


def test_search_bad_arguments(managers, sample_images):
    manager = managers("llava")
    with pytest.raises(InputError, match="calibration set is empty"):
        search_k(manager.model, manager.processor, [])
    for eta in (-1, float("nan"), float("inf"), "x", None, 101):
        with pytest.raises(InputError, match="eta"):
            search_k(manager.model, manager.processor, samples(sample_images, 1), eta=eta)
    assert search_k(manager.model, manager.processor, samples(sample_images, 1), start=NUM_LAYERS).curve == []


def test_calibration_files(tmp_path, sample_images):
    bundled = load_calibration("default")
    assert len(bundled) == 20 and all(sample.images and sample.question for sample in bundled)
    assert len({sample.question for sample in bundled}) == 20
    sample_images[0].save(tmp_path / "a.png")
    (tmp_path / "set.jsonl").write_text(
        json.dumps({"image": "a.png", "question": "What?"}) + "\n\n" + json.dumps({"image": ["a.png", "a.png"],
                                                                                   "question": "Both?"}) + "\n"
    )  # fmt: skip
    loaded = load_calibration(tmp_path / "set.jsonl")
    assert [len(sample.images) for sample in loaded] == [1, 2]
    (tmp_path / "bad.jsonl").write_text('{"question": "no image"}\n')
    with pytest.raises(InputError, match="line 1"):
        load_calibration(tmp_path / "bad.jsonl")
    with pytest.raises(InputError, match="not found"):
        load_calibration(tmp_path / "missing.jsonl")


# --- Attention analysis -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_attention_shares_equal_eager_attention(managers, family):
    sdpa, eager = managers(family), managers(family, "eager")
    image = Image.new("RGB", (64, 64), "red")
    messages = [user_message("What is it?")]
    report = analyze_attention(sdpa.model, sdpa.processor, messages, [image], max_new_tokens=3)
    assert sdpa.model.config.get_text_config()._attn_implementation == "sdpa"  # never switched to eager

    inputs = build_model_inputs(sdpa.processor, [messages], [[image]], "cpu", torch.float32)
    fed = torch.tensor([report.token_ids[: len(report.generated)]])
    full = {**inputs, "input_ids": torch.cat([inputs["input_ids"], fed], 1)}
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    if "mm_token_type_ids" in inputs:
        full["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(fed)], 1)
    with torch.no_grad():
        attentions = eager.model(**full, output_attentions=True).attentions
    prompt_length = inputs["input_ids"].shape[1]
    vision = inputs["input_ids"][0] == eager.model.config.image_token_id
    labels = torch.cat([prompt_segments(vision), torch.full((fed.shape[1],), SEGMENTS.index("output"))])
    rows = [(prompt_length - 1, report.prompt)] + [
        (prompt_length + step, shares) for step, shares in enumerate(report.generated)
    ]
    for row, per_layer in rows:
        for layer, shares in enumerate(per_layer):
            probabilities = attentions[layer][0, :, row, : row + 1].mean(0)
            expected = torch.zeros(len(SEGMENTS)).index_add_(0, labels[: row + 1], probabilities)
            torch.testing.assert_close(torch.tensor([shares[s] for s in SEGMENTS]), expected, atol=1e-5, rtol=1e-4)
    assert report.segment_tokens["vision"] == int(vision.sum())


def test_attention_under_vtw_sees_no_vision_after_k(managers, sample_images):
    manager = managers("llava")
    report = analyze_attention(manager.model, manager.processor, [user_message("Hi")], sample_images[:1], k=3,
                               max_new_tokens=2)  # fmt: skip
    for per_layer in [report.prompt, *report.generated]:
        assert all(shares["vision"] > 0 for shares in per_layer[:3])
        assert all(shares["vision"] == 0 for shares in per_layer[3:])
        assert all(sum(shares.values()) == pytest.approx(1, abs=1e-5) for shares in per_layer)


def test_prompt_segments():
    vision = torch.tensor([False, False, True, True, False, False])
    assert prompt_segments(vision).tolist() == [0, 0, 1, 1, 2, 2]
    assert prompt_segments(torch.zeros(3, dtype=torch.bool)).tolist() == [2, 2, 2]


def test_reply_kl_variant(managers, sample_images):
    from vtw_core.analysis.k_search import reply_kl_per_k

    manager = managers("llava")
    model = manager.model
    inputs = build_model_inputs(manager.processor, [[user_message("What?")]], [[sample_images[0]]], "cpu",
                                model.dtype)  # fmt: skip
    prompt = embed_prompt(model, inputs)
    one_token = torch.tensor([[5]])
    # A one-token reply has one position: the last prompt position, i.e. the paper's criterion.
    torch.testing.assert_close(reply_kl_per_k(model, prompt, one_token, [2, 5, 7]), kl_per_k(model, prompt, [2, 5, 7]))
    longer = reply_kl_per_k(model, prompt, torch.tensor([[5, 9, 13, 2]]), [2, 5, NUM_LAYERS])
    assert float(longer[-1]) == pytest.approx(0, abs=1e-7) and bool((longer[:-1] > 0).all())
    result = search_k(model, manager.processor, samples(sample_images, 1), eta=100, start=2, over="reply")
    assert result.k == 2
    with pytest.raises(InputError, match="over"):
        search_k(model, manager.processor, samples(sample_images, 1), over="everything")


def test_a_pass_without_cache_gives_the_same_logits(managers, sample_images):
    """The search's passes store no keys and values; their logits are those of a pass that does."""
    from vtw_core.engine.decoder import prefill, withdrawal_selector

    manager = managers("qwen2_vl")
    model = manager.model
    inputs = build_model_inputs(
        manager.processor, [[user_message("What is it?")]], [[sample_images[2]]], model.device, model.dtype
    )
    prompt = embed_prompt(model, inputs)
    for k in (None, 3):
        cached, state = prefill(model, prompt, withdrawal_selector(k, NUM_LAYERS))
        uncached, bare = prefill(model, prompt, withdrawal_selector(k, NUM_LAYERS), use_cache=False)
        torch.testing.assert_close(uncached, cached, rtol=1e-5, atol=1e-6)
        assert bare.cache is None and bare.kv_cache_bytes() == 0 and state.kv_cache_bytes() > 0
