"""The app's event handlers as plain functions, on a tiny checkpoint."""

from __future__ import annotations

import threading

import pytest
from PIL import Image

from app import handlers
from app.handlers import ChatState
from vtw_core.errors import InputError, ResourceError
from vtw_core.generate import SamplingConfig
from vtw_core.manager import ModelManager
from vtw_core.prompts import user_message


@pytest.fixture(scope="module")
def manager(tiny_model_path):
    return ModelManager.load(str(tiny_model_path("llava")), device="cpu")


@pytest.fixture()
def uploads(tmp_path, sample_images):
    """An upload folder with two images; the handlers only accept images under allowed roots."""
    for index, image in enumerate(sample_images[:2]):
        image.save(tmp_path / f"image{index}.png")
    return tmp_path


def ask(manager, state, text, paths, roots, k=2, params=SamplingConfig(max_new_tokens=4), **options):
    handlers.add_turn(state, text, [str(path) for path in paths], roots)
    return list(handlers.answer_last_turn(manager, state, k, params, **options))


def test_turns_stream_baseline_then_vtw(manager, uploads):
    state = ChatState()
    updates = ask(manager, state, "What is it?", [uploads / "image0.png"], [uploads])
    sides_seen = [("baseline" if shown["vtw"] == handlers.NO_ANSWER else "vtw") for _, shown in updates]
    assert sides_seen[0] == "baseline" and sides_seen[-1] == "vtw"
    assert sides_seen == sorted(sides_seen)  # every baseline update comes before any VTW update
    final, shown = updates[-1]
    assert [message["role"] for message in final.display("vtw")] == ["user", "user", "assistant"]
    assert "GFLOPs" in shown["baseline"] and "KV cache" in shown["vtw"] and "GPU peak: CPU" in shown["vtw"]
    assert "VTW / baseline" in shown["summary"] and "one after the other" in shown["summary"]
    # The answers equal the engine's own, called directly.
    direct = manager.generate(
        [user_message("What is it?")], [Image.open(uploads / "image0.png")], k=2, sampling=SamplingConfig(4)
    )
    assert final.results["vtw"]["token_ids"] == direct.token_ids
    # A second turn without a new image: the first image stays; each side keeps its own history.
    ask(manager, final, "And now?", [], [uploads], params=SamplingConfig(max_new_tokens=3))
    messages, paths = final.conversation("vtw")
    assert [message["role"] for message in messages] == ["user", "assistant", "user"]
    assert len(paths) == 1 and len(final.answers["baseline"]) == 2


def test_k_equal_to_layers_gives_identical_answers(manager, uploads):
    *_, (_, shown) = ask(manager, ChatState(), "Describe it.", [uploads / "image1.png"], [uploads], k=4)
    assert "answers **identical**" in shown["summary"]


def test_seeded_sampling_is_the_same_on_both_sides_at_k_equal_n(manager, uploads):
    params = SamplingConfig(max_new_tokens=6, do_sample=True, temperature=1.3, top_p=0.95, seed=5)
    *_, (state, _) = ask(manager, ChatState(), "Describe it.", [uploads / "image1.png"], [uploads], 4, params)
    assert state.results["baseline"]["token_ids"] == state.results["vtw"]["token_ids"]


def test_race_mode_answers_both_sides_and_says_so(manager, uploads):
    state = ChatState()
    updates = ask(manager, state, "What?", [uploads / "image0.png"], [uploads], k=4, mode="race")
    final, shown = updates[-1]
    assert "Race mode" in shown["summary"] and "contended" in shown["summary"]
    assert final.results["baseline"]["token_ids"] == final.results["vtw"]["token_ids"]


def test_regenerate_and_undo(manager, uploads):
    state = ChatState()
    ask(manager, state, "What?", [uploads / "image0.png"], [uploads])
    handlers.drop_last_answers(state)
    assert state.answers == {"baseline": [], "vtw": []} and len(state.turns) == 1
    list(handlers.answer_last_turn(manager, state, 1, SamplingConfig(max_new_tokens=3)))
    assert len(state.answers["vtw"]) == 1
    handlers.undo_last_turn(state)
    assert state.turns == [] and state.answers == {"baseline": [], "vtw": []}
    with pytest.raises(InputError, match="nothing to regenerate"):
        handlers.drop_last_answers(state)


def test_stop_ends_the_turn_and_skips_the_second_side(manager, uploads):
    state = ChatState()
    handlers.add_turn(state, "Talk.", [str(uploads / "image0.png")], [uploads])
    stop = threading.Event()
    updates = []
    for update in handlers.answer_last_turn(manager, state, 2, SamplingConfig(max_new_tokens=50), stop_event=stop):
        updates.append(update)
        stop.set()
    final, shown = updates[-1]
    assert final.results["baseline"]["stats"]["finish_reason"] == "stopped"
    assert final.results["vtw"] is None and "(stopped)" in shown["baseline"]


def test_bad_input_is_refused_and_leaves_the_chat_unchanged(manager, uploads, tmp_path_factory):
    state = ChatState()
    bad = uploads / "bad.png"
    bad.write_text("not an image")
    outside = tmp_path_factory.mktemp("elsewhere") / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    cases = [
        ("What?", [bad], "not an image"),
        ("  ", [uploads / "image0.png"], "type a question"),
        ("What?", [], "upload an image"),
        ("What?", [outside], "only come from uploads"),
        ("What?", [uploads / ".." / "image0.png"] * 5, "at most 4 images"),
        ("What?", ["/etc/passwd"], "only come from uploads"),
    ]
    for text, paths, message in cases:
        with pytest.raises(InputError, match=message):
            handlers.add_turn(state, text, [str(path) for path in paths], [uploads])
        assert state.turns == []
    handlers.add_turn(state, "What?", [str(uploads / "image0.png")], [uploads])
    with pytest.raises(InputError, match="K must be a whole number from 0 to 4"):
        list(handlers.answer_last_turn(manager, state, 9, SamplingConfig()))


def test_compare_api_payload(manager, uploads):
    result = handlers.compare_once(manager, str(uploads / "image0.png"), "What is it?", 2, 5)
    assert set(result) == {"baseline", "vtw"}
    assert result["vtw"]["k"] == 2 and result["baseline"]["stats"]["k"] is None
    direct = manager.generate([user_message("What is it?")], [Image.open(uploads / "image0.png")], k=2,
                              sampling=SamplingConfig(5))  # fmt: skip
    assert result["vtw"]["token_ids"] == direct.token_ids
    assert {"ttft_s", "prefill_flops", "kv_cache_bytes", "peak_memory_bytes"} <= set(result["vtw"]["stats"])


def test_messages_and_counters():
    assert handlers.format_stats(None) == handlers.NO_ANSWER
    assert handlers.error_message(ResourceError("the device ran out of memory")).startswith("Out of memory")
    assert handlers.error_message(InputError("please type a question")) == "please type a question"
    assert handlers.error_message(RuntimeError("boom")).startswith("Unexpected error (RuntimeError)")
    base = {"ttft_s": 2.0, "total_s": 4.0, "prefill_flops": 10, "decode_flops": 10, "vision_flops": 1,
            "kv_cache_bytes": 100, "peak_memory_bytes": 400, "finish_reason": "eos", "prompt_tokens": 9,
            "vision_tokens": 5, "new_tokens": 3, "decode_tokens_per_s": 1.0}  # fmt: skip
    vtw = {**base, "ttft_s": 1.0, "prefill_flops": 5, "kv_cache_bytes": 50, "peak_memory_bytes": 200}
    summary = handlers.format_summary(
        {"baseline": {"stats": base, "token_ids": [1]}, "vtw": {"stats": vtw, "token_ids": [2]}}
    )
    assert "TTFT 0.50×" in summary and "prefill FLOPs 0.50×" in summary and "all FLOPs 0.75×" in summary
    assert "GPU peak 0.50×" in summary and "answers **different**" in summary
    assert "400.0 MB" not in handlers.format_stats(vtw) and "GPU peak: 0.0 MB" in handlers.format_stats(vtw)


def test_prompt_beyond_the_context_and_out_of_memory_are_clear(manager, uploads, monkeypatch):
    import torch

    import vtw_core.generate

    state = ChatState()
    # A short context, so a question within the text limits still overflows it.
    monkeypatch.setattr(manager.model.config.get_text_config(), "max_position_embeddings", 300)
    handlers.add_turn(state, "word " * 300, [str(uploads / "image0.png")], [uploads])
    with pytest.raises(InputError, match="exceeds the model's context"):
        list(handlers.answer_last_turn(manager, state, 2, SamplingConfig(max_new_tokens=4)))
    handlers.undo_last_turn(state)
    monkeypatch.undo()

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(vtw_core.generate, "prefill", out_of_memory)
    handlers.add_turn(state, "What?", [str(uploads / "image0.png")], [uploads])
    with pytest.raises(ResourceError) as caught:
        list(handlers.answer_last_turn(manager, state, 2, SamplingConfig(max_new_tokens=4)))
    assert handlers.error_message(caught.value).startswith("Out of memory: the device ran out of memory")
    monkeypatch.undo()
    # The manager's lock was released: the next request is served.
    handlers.undo_last_turn(state)
    assert ask(manager, state, "What?", [uploads / "image0.png"], [uploads])[-1][0].results["vtw"] is not None


def test_search_k_on_the_current_turn_and_attention(tiny_model_path, uploads):
    manager = ModelManager.load(str(tiny_model_path("llava", 8)), device="cpu")
    state = ChatState()
    with pytest.raises(InputError, match="ask a question first"):
        handlers.calibration_for("turn", state)
    ask(manager, state, "What is it?", [uploads / "image0.png"], [uploads])
    samples = handlers.calibration_for("turn", state)
    assert len(samples) == 1 and samples[0].question == "What is it?" and len(samples[0].images) == 1
    progress = []
    result = handlers.search_k_result(manager, samples, 100, lambda done, total: progress.append(done))
    assert result["k"] == 5 and progress == [1]
    assert "**K = 5**" in handlers.describe_search(result, "turn")
    none = handlers.search_k_result(manager, samples, 0.0)
    assert none["k"] is None and "slider is unchanged" in handlers.describe_search(none, "turn")

    report = handlers.attention_report(manager, state, "vtw", 3, max_new_tokens=2)
    assert report["k"] == 3 and all(layer["vision"] == 0 for layer in report["prompt"][3:])
    assert "Vision tokens (36 of the prompt)" in handlers.describe_attention(report)
    with pytest.raises(InputError, match="ask a question first"):
        handlers.attention_report(manager, ChatState(), "baseline", 3)


def test_the_accelerated_pane_can_run_fastv_or_a_schedule(manager, uploads, tmp_path):
    from vtw_core.schedules import Schedule

    state = ChatState()
    handlers.add_turn(state, "What?", [str(uploads / "image0.png")], [uploads])
    *_, (state, _) = handlers.answer_last_turn(manager, state, 2, SamplingConfig(max_new_tokens=3), method="fastv:0.5")
    base, fastv = state.results["baseline"]["stats"], state.results["vtw"]["stats"]
    assert fastv["prefill_flops"] < base["prefill_flops"] and fastv["k"] is None
    schedule = tmp_path / "s.json"
    schedule.write_text(Schedule((1.0, 1.0, 1.0, 1.0), "text", "keep-all").to_json())
    handlers.drop_last_answers(state)
    *_, (state, shown) = handlers.answer_last_turn(
        manager, state, 2, SamplingConfig(max_new_tokens=3), method=f"schedule:{schedule}"
    )
    assert "answers **identical**" in shown["summary"]  # keeping everything is the baseline
    assert handlers.accelerated_method("vtw", 3, 4).k == 3
    with pytest.raises(InputError, match="unknown method"):
        handlers.accelerated_method("turbo", 3, 4)


def test_flops_are_shown_in_a_readable_unit():
    assert handlers._flops(8.477e12) == "8.477 TFLOPs"
    assert handlers._flops(7.0e8) == "0.700 GFLOPs"


def test_header_names_the_model(manager):
    from vtw_core.defaults import require_model

    assert manager.info.source in handlers.header(manager) and "12 decoder layers" not in handlers.header(manager)
    default = ModelManager.load(require_model(None), device="cpu")
    assert "embedded default model" in handlers.header(default) and "12 decoder layers" in handlers.header(default)
