"""The app's event handlers as plain functions, on a tiny checkpoint."""

from __future__ import annotations

import re
import threading

import gradio as gr
import pytest
from PIL import Image

from app import attention, benchmark, errors, media, metrics, search, session, turns
from app.session import ChatState
from vtw_core.errors import InputError, ResourceError
from vtw_core.generation.manager import ModelManager
from vtw_core.generation.types import SamplingConfig
from vtw_core.models.prompts import user_message


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
    turns.add_turn(state, text, [str(path) for path in paths], roots)
    return list(turns.answer_last_turn(manager, state, k, params, **options))


def sides_in_order(manager, state, *args, **options) -> list[str]:
    """Which side each streamed update belongs to, by whose result changed."""
    seen, last = [], {}
    for chat, _ in turns.answer_last_turn(manager, state, *args, **options):
        for side in session.SIDES:
            result = chat.results[side]
            if result is not None and result["token_ids"] != last.get(side):
                seen.append(side)
                last[side] = list(result["token_ids"])
    return [side for index, side in enumerate(seen) if index == 0 or seen[index - 1] != side]


def test_turns_stream_one_side_then_the_other(manager, uploads):
    state = ChatState()
    updates = ask(manager, state, "What is it?", [uploads / "image0.png"], [uploads])
    final, shown = updates[-1]
    assert [message["role"] for message in final.display("vtw")] == ["user", "user", "assistant"]
    assert "KV cache" in shown["metrics"] and "not measured on CPU" in shown["metrics"]
    assert "token for token" in shown["summary"] or "different** from" in shown["summary"]
    assert "One side after the other" in shown["summary"]
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
    assert "Answers **identical**" in shown["summary"]


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
    turns.drop_last_answers(state)
    assert state.answers == {"baseline": [], "vtw": []} and len(state.turns) == 1
    list(turns.answer_last_turn(manager, state, 1, SamplingConfig(max_new_tokens=3)))
    assert len(state.answers["vtw"]) == 1
    turns.undo_last_turn(state)
    assert state.turns == [] and state.answers == {"baseline": [], "vtw": []}
    with pytest.raises(InputError, match="nothing to regenerate"):
        turns.drop_last_answers(state)


def test_stop_ends_the_turn_and_skips_the_second_side(manager, uploads):
    state = ChatState()
    turns.add_turn(state, "Talk.", [str(uploads / "image0.png")], [uploads])
    stop = threading.Event()
    updates = []
    for update in turns.answer_last_turn(manager, state, 2, SamplingConfig(max_new_tokens=50), stop_event=stop):
        updates.append(update)
        stop.set()
    final, _ = updates[-1]
    assert final.results["baseline"]["stats"]["finish_reason"] == "stopped"
    assert final.results["vtw"] is None
    assert final.status == {"baseline": ["stopped"], "vtw": ["skipped"]}
    assert session.SKIPPED in final.display("vtw")[-1]["content"]
    assert "…" not in final.display("vtw")[-1]["content"]  # no answer stays "in progress" after Stop


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
            turns.add_turn(state, text, [str(path) for path in paths], [uploads])
        assert state.turns == []
    turns.add_turn(state, "What?", [str(uploads / "image0.png")], [uploads])
    with pytest.raises(InputError, match="K must be a whole number from 0 to 4"):
        list(turns.answer_last_turn(manager, state, 9, SamplingConfig()))


def test_compare_api_payload(manager, uploads):
    result = turns.compare_once(manager, str(uploads / "image0.png"), "What is it?", 2, 5)
    assert set(result) == {"baseline", "vtw"}
    assert result["vtw"]["k"] == 2 and result["baseline"]["stats"]["k"] is None
    direct = manager.generate([user_message("What is it?")], [Image.open(uploads / "image0.png")], k=2,
                              sampling=SamplingConfig(5))  # fmt: skip
    assert result["vtw"]["token_ids"] == direct.token_ids
    assert {"ttft_s", "prefill_flops", "kv_cache_bytes", "peak_memory_bytes"} <= set(result["vtw"]["stats"])


def test_messages():
    assert errors.error_message(ResourceError("the device ran out of memory")).startswith("Out of memory")
    assert errors.error_message(InputError("please type a question")) == "please type a question"
    assert errors.error_message(RuntimeError("boom")).startswith("Unexpected error (RuntimeError)")


STATS = {"ttft_s": 2.0, "total_s": 4.0, "prefill_flops": 10e9, "decode_flops": 10e6, "vision_flops": 1e6,
         "kv_cache_bytes": 100e6, "peak_memory_bytes": 400e6, "finish_reason": "eos", "prompt_tokens": 9,
         "vision_tokens": 5, "new_tokens": 3, "decode_tokens_per_s": 1.0, "engine": "plain"}  # fmt: skip


def test_metrics_table_compares_the_sides_and_marks_the_better_value():
    fast = {**STATS, "ttft_s": 1.0, "prefill_flops": 5e9, "kv_cache_bytes": 50e6, "peak_memory_bytes": 200e6,
            "decode_tokens_per_s": 2.0}  # fmt: skip
    results = {"baseline": {"stats": STATS, "token_ids": [1]}, "vtw": {"stats": fast, "token_ids": [2]}}
    rows = {row["name"]: row for row in metrics.metrics_rows(results)}
    assert set(rows) == {name for name, *_ in metrics.METRICS}
    # A turn's timings are one run each: a ratio, but never a better side (that needs repeated runs).
    assert rows["time to first token"]["ratio"] == 0.5 and rows["time to first token"]["better"] is None
    assert rows["decode tokens/s"]["ratio"] is None and rows["decode tokens/s"]["vtw"] == "– (2 decoded)"
    assert rows["total time"]["ratio"] == 1.0 and rows["total time"]["better"] is None  # a tie marks nothing
    assert rows["prefill FLOPs"]["baseline"] == "10.0 GFLOPs" and rows["prefill FLOPs"]["vtw"] == "5.00 GFLOPs"
    assert rows["KV cache"]["vtw"] == "50.0 MB" and rows["peak GPU memory"]["baseline"] == "400 MB"
    table = metrics.metrics_table(results, "FastV K=2 R=0.5")
    assert "| | baseline | FastV K=2 R=0.5 | FastV / baseline |" in table  # not "VTW" when FastV ran
    assert "| time to first token | 2.00 s | 1.00 s | 0.50× |" in table and "**5.00 GFLOPs** ✓" in table
    assert "VTW / baseline" not in table
    # On a CPU there is no peak memory; before both sides finish there are no ratios.
    cpu = {**STATS, "peak_memory_bytes": None}
    half = {"baseline": {"stats": cpu, "token_ids": []}, "vtw": {"stats": {**cpu, "finish_reason": None},
            "token_ids": []}}  # fmt: skip
    rows = {row["name"]: row for row in metrics.metrics_rows(half)}
    assert rows["peak GPU memory"]["baseline"] == "not measured on CPU"
    assert all(row["ratio"] is None for row in rows.values())
    assert "| time to first token | – | – | – |" in metrics.metrics_table({})


def test_one_formatter_for_flops_bytes_and_kl():
    from vtw_core.analysis.units import format_bytes, format_flops, format_kl, format_seconds

    assert format_flops(8.477e12) == "8.48 TFLOPs" and format_flops(2.12e8) == "212 MFLOPs"
    assert format_flops(999.7e3) == "1.00 MFLOPs" and format_flops(0) == "0 FLOPs"
    assert format_bytes(1_500_000) == "1.50 MB"
    assert format_kl(5.4e-5) == "5.40e-05" and format_kl(0.0123) == "0.0123" and format_kl(0) == "0"
    assert format_seconds(0.052) == "52 ms" and format_seconds(1.239) == "1.24 s"


def test_the_side_that_runs_first_alternates(manager, uploads):
    state = ChatState()
    turns.add_turn(state, "What?", [str(uploads / "image0.png")], [uploads])
    params = SamplingConfig(max_new_tokens=3)
    assert sides_in_order(manager, state, 2, params) == ["baseline", "vtw"] and state.first == "baseline"
    turns.add_turn(state, "And?", [], [uploads])
    assert sides_in_order(manager, state, 2, params) == ["vtw", "baseline"] and state.first == "vtw"
    *_, (_, shown) = turns.answer_last_turn(manager, turns.add_turn(state, "Again?", [], [uploads]), 2, params)
    assert "the baseline ran first" in shown["summary"]
    assert turns.run_order(0) == ("baseline", "vtw") and turns.run_order(1) == ("vtw", "baseline")
    # Every finished side adds its TTFT and total time to the chart, per turn.
    rows = benchmark.timing_rows(state)
    assert {row["turn"] for row in rows} == {"1", "2", "3"} and len(rows) == 3 * 2 * 2
    assert {row["series"] for row in rows} == {"baseline TTFT", "baseline total", "VTW K=2 TTFT",
                                               "VTW K=2 total"}  # fmt: skip


def test_every_answer_keeps_the_footer_of_its_settings(manager, uploads):
    import torch

    from vtw_core.generation.generate import auto_engine

    engine = auto_engine(torch.device("cpu"), manager.info.attention)  # the decode engine "auto" runs here
    state = ChatState()
    turns.add_turn(state, "What?", [str(uploads / "image0.png")], [uploads])
    list(turns.answer_last_turn(manager, state, 3, SamplingConfig(max_new_tokens=2)))
    turns.add_turn(state, "And?", [], [uploads])
    list(turns.answer_last_turn(manager, state, 1, SamplingConfig(max_new_tokens=2), method="fastv:0.25", eta=1))
    turns.add_turn(state, "Again?", [], [uploads])
    list(turns.answer_last_turn(manager, state, 3, SamplingConfig(max_new_tokens=2), eta=0.003))
    assert state.footers["vtw"][0] == f"VTW K = 3 · engine {engine}"  # K set by hand: no eta
    assert state.footers["vtw"][2] == f"VTW K = 3 · engine {engine} · K searched at eta 0.003"
    assert state.footers["vtw"][1] == f"FastV K = 1 · R = 0.25 · engine {engine}"
    assert state.footers["baseline"] == [f"baseline (all 4 layers) · engine {engine}"] * 3
    assert state.display("vtw")[2]["content"].endswith(f"<sub>⚙ VTW K = 3 · engine {engine}</sub>")
    # The pane's title speaks of the next turn, never of answers already given.
    assert metrics.pane_label("vtw", 2, 0.5, 4) == "next turn: VTW K = 2"
    assert metrics.pane_label("fastv", 0, 0.5, 4) == "next turn: FastV K = 1 · R = 0.5"
    assert metrics.pane_label("vtw", 9, 0.5, 4).startswith("Accelerated")


def test_benchmark_this_turn_runs_both_sides_interleaved(manager, uploads, monkeypatch):
    state = ChatState()
    with pytest.raises(InputError, match="ask a question first"):
        benchmark.benchmark_turn(manager, state, 2, "vtw", 3)
    turns.add_turn(state, "What?", [str(uploads / "image0.png")], [uploads])
    calls = []
    original = manager.generate
    monkeypatch.setattr(manager, "generate", lambda *a, **kw: calls.append(kw["k"]) or original(*a, **kw))
    result = benchmark.benchmark_turn(manager, state, 2, "vtw", 3, max_new_tokens=2)
    assert calls == [None, 2, 2, None, None, 2]  # interleaved, the order alternating
    assert result["repeats"] == 3 and result["label"] == "VTW K=2"
    for side in session.SIDES:
        for key in ("ttft_s", "total_s"):
            spread = result["sides"][side][key]
            assert spread["n"] == 3 and spread["min"] <= spread["median"] <= spread["max"]
    text = benchmark.describe_benchmark(result)
    assert "3 runs per side, interleaved" in text and "| time to first token |" in text and "×" in text
    stop = threading.Event()
    stop.set()
    with pytest.raises(errors.Cancelled):
        benchmark.benchmark_turn(manager, state, 2, "vtw", 3, stop_event=stop)
    with pytest.raises(InputError, match="repetitions"):
        benchmark.benchmark_turn(manager, state, 2, "vtw", 0)


def test_a_new_image_starts_a_new_conversation_when_the_context_cannot_hold_both(manager, uploads, monkeypatch):
    state = ChatState()
    ask(manager, state, "What?", [uploads / "image0.png"], [uploads])
    one_image = turns.prompt_tokens(manager, ChatState(turns=[state.turns[0]]))
    # Room for one image and a short answer, not for two images (the embedded default model's case).
    limit = one_image + 20
    monkeypatch.setattr(manager.model.config.get_text_config(), "max_position_embeddings", limit)
    turns.add_turn(state, "And this one?", [str(uploads / "image1.png")], [uploads])
    fresh = turns.fit_new_turn(manager, state, 4)
    assert fresh is not state and [turn.text for turn in fresh.turns] == ["And this one?"]
    assert fresh.notice.startswith("**New image: a new conversation started.**") and str(limit) in fresh.notice
    for side in session.SIDES:  # the note heads both panes
        assert fresh.display(side)[0] == {"role": "assistant", "content": fresh.notice}
    *_, (fresh, _) = turns.answer_last_turn(manager, fresh, 2, SamplingConfig(max_new_tokens=4))
    assert fresh.results["vtw"] is not None and len(fresh.conversation("vtw")[1]) == 1  # one image: the new one
    # Where the context holds both images, the conversation goes on with both (real checkpoints).
    monkeypatch.setattr(manager.model.config.get_text_config(), "max_position_embeddings", 4096)
    assert turns.fit_new_turn(manager, state, 4) is state


def test_a_turn_too_long_for_the_context_is_refused_with_what_to_do(manager, uploads, monkeypatch):
    state = ChatState()
    ask(manager, state, "What?", [uploads / "image0.png"], [uploads])
    turns.add_turn(state, "And now?", [], [uploads])
    prompt = turns.prompt_tokens(manager, state)
    limit = prompt + 30
    monkeypatch.setattr(manager.model.config.get_text_config(), "max_position_embeddings", limit)
    with pytest.raises(turns.TooLong, match=r"lower max new tokens \(Parameters\) to 30 or less.*press Clear"):
        turns.fit_new_turn(manager, state, 31)
    assert turns.fit_new_turn(manager, state, 30) is state  # the advice is exact
    assert len(state.turns) == 2  # refusing changes nothing: the handler puts the question back
    # Regenerate is checked the same way, before the answers go.
    turns.undo_last_turn(state)
    with pytest.raises(turns.TooLong, match="lower max new tokens"):
        turns.check_room(manager, state, limit)
    turns.check_room(manager, state, 4)
    # A conversation that fills the context says so; two images that alone exceed it, too.
    monkeypatch.setattr(manager.model.config.get_text_config(), "max_position_embeddings", prompt - 5)
    turns.add_turn(state, "And now?", [], [uploads])
    with pytest.raises(turns.TooLong, match=r"the conversation fills the model's context.*press Clear"):
        turns.fit_new_turn(manager, state, 1)
    two = turns.add_turn(ChatState(), "Both?", [str(uploads / "image0.png"), str(uploads / "image1.png")], [uploads])
    with pytest.raises(turns.TooLong, match=r"2 images take .* send one image"):
        turns.fit_new_turn(manager, two, 1)


def test_the_room_for_the_next_answer_follows_the_conversation(manager, uploads, monkeypatch):
    limit = turns.context_limit(manager)
    image = uploads / "image0.png"
    first = turns.next_turn_room(manager, ChatState(), image)
    probe = turns.add_turn(ChatState(), turns.ROOM_QUESTION, [str(image)], [uploads])
    assert first == limit - turns.prompt_tokens(manager, probe)
    state = ChatState()
    ask(manager, state, "What?", [image], [uploads])
    after = turns.next_turn_room(manager, state, image)
    assert after < first  # the image, the question and the answers now take part of the context
    assert turns.next_turn_room(manager, ChatState(), None) is None  # no image to count a first turn with
    monkeypatch.setattr(manager.model.config.get_text_config(), "max_position_embeddings", limit - after - 1)
    assert turns.next_turn_room(manager, state, image) == -1  # full: a new image or Clear starts afresh


def test_a_turn_whose_job_is_gone_is_settled(manager, uploads):
    state = ChatState()
    ask(manager, state, "What?", [uploads / "image0.png"], [uploads])
    turns.add_turn(state, "And?", [], [uploads])
    turns.show_waiting(state)
    assert state.results == {"baseline": None, "vtw": None}  # the metrics speak of the waiting turn
    state.status["baseline"][-1], state.answers["baseline"][-1] = "running", "A red"
    turns.settle_last_turn(state)
    assert state.status == {"baseline": ["done", "stopped"], "vtw": ["done", "skipped"]}
    assert "…" not in state.display("vtw")[-1]["content"] and session.SKIPPED in state.display("vtw")[-1]["content"]


def test_a_turn_stopped_while_queued_says_skipped(manager, uploads):
    state = ChatState()
    turns.add_turn(state, "What?", [str(uploads / "image0.png")], [uploads])
    turns.show_waiting(state)
    assert session.WAITING in state.display("vtw")[-1]["content"]
    turns.skip_last_turn(state)
    for side in session.SIDES:
        assert state.status[side] == ["skipped"] and session.SKIPPED in state.display(side)[-1]["content"]


def test_warm_up_and_examples_fit_the_model(manager):
    from vtw_core.models.defaults import require_model

    turns.warm_up(manager, 2, media.EXAMPLES / "chelsea.jpg")  # untimed: leaves no trace in any chat
    shapes = [path.name for path, _ in media.example_files(True)]
    photos = [path.name for path, _ in media.example_files(False)]
    assert shapes and all(name.startswith("easyvqa-") for name in shapes)
    assert photos and not any(name.startswith("easyvqa-") for name in photos)
    assert media.is_default_model(ModelManager.load(require_model(None), device="cpu"))
    assert not media.is_default_model(manager)


def test_prompt_beyond_the_context_and_out_of_memory_are_clear(manager, uploads, monkeypatch):
    import torch

    import vtw_core.generation.generate

    state = ChatState()
    # A short context, so a question within the text limits still overflows it.
    monkeypatch.setattr(manager.model.config.get_text_config(), "max_position_embeddings", 300)
    turns.add_turn(state, "word " * 300, [str(uploads / "image0.png")], [uploads])
    with pytest.raises(InputError, match="exceeds the model's context"):
        list(turns.answer_last_turn(manager, state, 2, SamplingConfig(max_new_tokens=4)))
    turns.undo_last_turn(state)
    monkeypatch.undo()

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(vtw_core.generation.generate, "prefill", out_of_memory)
    turns.add_turn(state, "What?", [str(uploads / "image0.png")], [uploads])
    with pytest.raises(ResourceError) as caught:
        list(turns.answer_last_turn(manager, state, 2, SamplingConfig(max_new_tokens=4)))
    assert errors.error_message(caught.value).startswith("Out of memory: the device ran out of memory")
    monkeypatch.undo()
    # The manager's lock was released: the next request is served.
    turns.undo_last_turn(state)
    assert ask(manager, state, "What?", [uploads / "image0.png"], [uploads])[-1][0].results["vtw"] is not None


def test_search_k_on_the_current_turn_and_attention(tiny_model_path, uploads):
    manager = ModelManager.load(str(tiny_model_path("llava", 8)), device="cpu")
    state = ChatState()
    with pytest.raises(InputError, match="ask a question first"):
        search.calibration_for("turn", state)
    ask(manager, state, "What is it?", [uploads / "image0.png"], [uploads])
    samples = search.calibration_for("turn", state)
    assert len(samples) == 1 and samples[0].question == "What is it?" and len(samples[0].images) == 1
    progress = []
    result = search.search_k_result(manager, samples, 100, lambda done, total: progress.append(done))
    assert result["k"] == 5 and progress == [1]
    assert "**K = 5**" in search.describe_search(result, "turn")
    none = search.search_k_result(manager, samples, 0.0)
    assert none["k"] is None and "slider is unchanged" in search.describe_search(none, "turn")

    report = attention.attention_report(manager, state, "vtw", 3, max_new_tokens=2)
    assert report["k"] == 3 and all(layer["vision"] == 0 for layer in report["prompt"][3:])
    assert "Vision tokens (36 of the prompt)" in attention.describe_attention(report)
    with pytest.raises(InputError, match="ask a question first"):
        attention.attention_report(manager, ChatState(), "baseline", 3)


def test_the_accelerated_pane_can_run_fastv_or_a_schedule(manager, uploads, tmp_path):
    from vtw_core.engine.schedules import Schedule

    state = ChatState()
    turns.add_turn(state, "What?", [str(uploads / "image0.png")], [uploads])
    *_, (state, _) = turns.answer_last_turn(manager, state, 2, SamplingConfig(max_new_tokens=3), method="fastv:0.5")
    base, fastv = state.results["baseline"]["stats"], state.results["vtw"]["stats"]
    assert fastv["prefill_flops"] < base["prefill_flops"] and fastv["k"] is None
    schedule = tmp_path / "s.json"
    schedule.write_text(Schedule((1.0, 1.0, 1.0, 1.0), "text", "keep-all").to_json())
    turns.drop_last_answers(state)
    *_, (state, shown) = turns.answer_last_turn(
        manager, state, 2, SamplingConfig(max_new_tokens=3), method=f"schedule:{schedule}"
    )
    assert "Answers **identical**" in shown["summary"]  # keeping everything is the baseline
    assert turns.accelerated_method("vtw", 3, 4).k == 3
    with pytest.raises(InputError, match="unknown method"):
        turns.accelerated_method("turbo", 3, 4)


def test_header_names_the_model(manager):
    from vtw_core.models.defaults import require_model

    assert manager.info.source in metrics.header(manager) and "embedded" not in metrics.header(manager)
    default = ModelManager.load(require_model(None), device="cpu")
    layers = f"{default.info.num_layers} decoder layers"
    assert "embedded default model" in metrics.header(default) and layers in metrics.header(default)


def test_search_settings_fit_the_model_and_agree_with_the_cli_and_the_shipped_k(capsys):
    import json
    from pathlib import Path

    from vtw_core.cli import main
    from vtw_core.models.defaults import require_model

    default = ModelManager.load(require_model(None), device="cpu")
    shipped = json.loads((Path(default.info.source) / "vtw.json").read_text(encoding="utf-8"))
    settings = search.search_settings(default)
    assert settings.calibration[0] == ("easy-vqa train questions (20)", "easy-vqa")
    assert settings.criterion == shipped["kl_over"] and settings.eta == shipped["kl_threshold"]
    assert settings.starting == search.Searched(shipped["k"], settings.eta)  # the footers name eta at this K
    assert "easy-vqa" in settings.explanation and settings.explanation.count(". ") == 0  # one sentence
    samples = search.calibration_for(settings.calibration[0][1], ChatState())
    result = search.search_k_result(default, samples, settings.eta, over=settings.criterion)
    assert result["k"] == shipped["k"]
    code = main(["search-k", "--data", "easy-vqa", "--kl-over", settings.criterion, "--eta", str(settings.eta),
                 "--json"])  # fmt: skip
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and cli["k"] == result["k"]
    assert [point["kl"] for point in cli["curve"]] == pytest.approx([p["kl"] for p in result["curve"]], rel=1e-5)
    assert f"K = {shipped['k']}" in search.describe_search(result, "easy-vqa")


def test_search_settings_for_a_real_checkpoint_and_a_search_that_stops(tiny_model_path):
    manager = ModelManager.load(str(tiny_model_path("llava", 8)), device="cpu")
    settings = search.search_settings(manager)
    assert settings.calibration[0][1] == "bundled" and settings.criterion == "prompt"
    assert settings.starting is None  # nothing searched the starting K
    assert "paper" in settings.explanation
    samples = search.calibration_for("bundled", ChatState())
    reported = []
    with pytest.raises(errors.Cancelled, match="stopped after 2 of 20 samples"):
        search.search_k_result(manager, samples, 0.003, lambda done, total: reported.append(done),
                                 should_stop=lambda: len(reported) >= 1)  # fmt: skip
    assert reported == [1] and not manager.lock.locked()  # the device is free for the next request
    with pytest.raises(InputError, match="calibrate on"):
        search.calibration_for("everything", ChatState())


# --- The page's events, called as Gradio calls them, on a built page -----------------------------------------------


@pytest.fixture(scope="module")
def demo(manager):
    """The page on the tiny model (no warm-up: nothing here times a turn)."""
    from app.ui import page

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(page, "warm_up_on_device", lambda *args: None)
        yield page.build_demo(manager)


class Request:
    """What a handler reads of Gradio's request: the browser session."""

    def __init__(self, session_hash: str):
        self.session_hash = session_hash


def handler(demo, name: str):
    """The page's event function called `name` (the same function for every event that runs it)."""
    return next(block.fn for block in demo.fns.values() if block.name == name)


def dependency(demo, name: str):
    return next(block for block in demo.fns.values() if block.name == name)


def test_every_queued_job_carries_its_own_ticket_and_no_click_is_dropped(demo):
    """The frozen tab, for chat turns, K searches and benchmarks alike: a ticket read when the job starts (a
    gr.State) ran a stopped job with a later click's ticket, and Gradio's "once" dropped that later click's job."""
    for name in ("run_turn", "on_search", "on_benchmark"):
        job = dependency(demo, name)
        assert job.trigger_mode == "multiple", name
        tickets = [block for block in job.inputs if isinstance(block, gr.Number) and not block.visible]
        assert len(tickets) == 1, name  # a hidden component: the browser sends its value with the job
        taking = [block for block in demo.fns.values() if tickets[0] in block.outputs and block.name != name]
        assert taking and all(block.queue is False for block in taking), name  # taken at once, outside the queue


def test_closing_the_tab_fires_the_sessions_tab_closed_event(demo, monkeypatch):
    fired = []
    original = session.Sessions.fire

    def recording(self, name, event, ticket=None):
        step = original(self, name, event, ticket)
        fired.append((name, event, step))
        return step

    monkeypatch.setattr(session.Sessions, "fire", recording)
    chat, *_, ticket = handler(demo, "on_submit")(
        {"text": "What?", "files": [str(media.EXAMPLES / "chelsea.jpg")]}, ChatState(), None, 8, 4, Request("tab")
    )
    assert ticket is not None and fired[-1][2].after is session.Phase.QUEUED
    handler(demo, "on_leave")(Request("tab"))
    name, event, step = fired[-1]
    assert (name, event, step.before, step.after) == ("tab", session.Event.TAB_CLOSED, session.Phase.QUEUED,
                                                     session.Phase.IDLE)  # fmt: skip
    run_turn = handler(demo, "run_turn")
    updates = list(run_turn(chat, ticket, 2, "sequential", 4, False, 1, 1, 0, "vtw", 0.5, None, Request("tab")))
    assert len(updates) == 1 and all(isinstance(value, type(gr.skip())) for value in updates[0])  # nothing ran


def answered_footer(demo, session_hash: str, k: int, searched) -> str:
    """A question asked and answered in `session_hash` at K = `k`; the accelerated answer's footer."""
    chat, *_, ticket = handler(demo, "on_submit")(
        {"text": "What?", "files": [str(media.EXAMPLES / "chelsea.jpg")]}, ChatState(), None, 8, 4,
        Request(session_hash),
    )  # fmt: skip
    run_turn = handler(demo, "run_turn")
    *_, last = run_turn(chat, ticket, k, "sequential", 4, False, 1, 1, 0, "vtw", 0.5, searched, Request(session_hash))
    return last[0].footers["vtw"][-1]


def test_the_footer_names_eta_only_for_the_sessions_own_searched_k(demo):
    """One session's search chose K = 3 at eta 0.01; another set K = 3 by hand: only the first names eta."""
    found = search.Searched(3, 0.01)
    assert answered_footer(demo, "searched", 3, found).endswith("K searched at eta 0.01")
    assert "eta" not in answered_footer(demo, "by hand", 3, None)
    assert "eta" not in answered_footer(demo, "moved since", 2, found)  # the slider left the searched K


def test_a_stop_is_logged_as_stopped_and_a_refusal_as_refused(caplog):
    with caplog.at_level("INFO", logger="vtw_chat"):
        shown = errors.log_failure(errors.Cancelled("the K search was stopped after 2 of 20 samples"), "Search K")
        errors.log_failure(InputError("eta must be a finite number"), "Search K")
    stopped, refused = [record for record in caplog.records if record.name == "vtw_chat"]
    assert stopped.levelname == "INFO" and "refused" not in stopped.getMessage()
    assert stopped.getMessage() == "Search K stopped: the K search was stopped after 2 of 20 samples"
    assert shown == "the K search was stopped after 2 of 20 samples"
    assert refused.levelname == "WARNING" and refused.getMessage() == "Search K refused: eta must be a finite number"


def test_the_app_never_touches_tensors():
    """Token counts, shapes and tensors stay in vtw_core: the app asks it for plain values."""
    import re
    from pathlib import Path

    tensor_work = re.compile(r"\bimport torch\b|\bfrom torch\b|\.shape\b|input_ids|build_model_inputs")
    root = Path(__file__).resolve().parent.parent
    for path in [root / "app.py", *sorted((root / "app").rglob("*.py"))]:
        found = tensor_work.findall(path.read_text(encoding="utf-8"))
        assert not found, (path.relative_to(root).as_posix(), found)


# --- Video turns, on a tiny LLaVA-NeXT-Video (its processor takes images and videos) ---------------------------


@pytest.fixture(scope="module")
def video_manager(tiny_model_path):
    return ModelManager.load(str(tiny_model_path("llava_next_video")), device="cpu")


@pytest.fixture()
def clip(uploads):
    from test_videos import write_video

    return write_video(uploads / "clip.mp4", frames=12)


def test_a_video_turn_answers_as_the_engine_does(video_manager, uploads, clip):
    from vtw_core.models.videos import read_video

    family = video_manager.info.family
    state = turns.add_turn(ChatState(), "What happens?", [], [uploads], [str(clip)], num_frames=3, family=family)
    assert state.turns[0].video_paths == [str(clip.resolve())] and state.turns[0].num_frames == 3
    *_, (state, shown) = turns.answer_last_turn(video_manager, state, 1, SamplingConfig(max_new_tokens=4))
    messages = [user_message("What happens?", num_images=0, num_videos=1)]
    video = read_video(clip, 3)
    for side, k in (("baseline", None), ("vtw", 1)):
        direct = video_manager.generate(messages, [], videos=[video], k=k, sampling=SamplingConfig(4))
        assert state.results[side]["token_ids"] == direct.token_ids, side
        stats = state.results[side]["stats"]
        # LLaVA-NeXT-Video pools each frame's 4x4 grid to 2x2: 4 vision tokens per frame.
        assert stats["video_frames"] == 3 and stats["vision_tokens_per_frame"] == 4.0
    assert "| video frames | 3 | 3 | |" in shown["metrics"]
    assert "| vision tokens per frame | 4.0 | 4.0 | |" in shown["metrics"]
    assert "video frames" not in metrics.metrics_table({})  # no video rows for an image turn
    assert {"role": "user", "content": {"path": str(clip.resolve())}} in state.display("vtw")
    # A follow-up without media keeps the video in the conversation, sampled as when it was asked.
    turns.add_turn(state, "And then?", [], [uploads], num_frames=64, family=family)
    *_, (state, _) = turns.answer_last_turn(video_manager, state, 1, SamplingConfig(max_new_tokens=2))
    assert state.results["baseline"]["stats"]["video_frames"] == 3
    result = benchmark.benchmark_turn(video_manager, state, 1, "vtw", 1, max_new_tokens=2)
    assert set(result["sides"]) == set(session.SIDES)


def test_bad_videos_are_refused_and_leave_the_chat_unchanged(video_manager, uploads, clip, tmp_path_factory):
    family = video_manager.info.family
    state = turns.add_turn(ChatState(), "What?", [str(uploads / "image0.png")], [uploads], family=family)
    corrupt = uploads / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    outside = tmp_path_factory.mktemp("elsewhere") / "clip.mp4"
    outside.write_bytes(clip.read_bytes())
    cases = [
        ([corrupt], 8, media.VideoRefused, r"not a readable video|no video stream|no decodable frames"),
        ([clip], 65, InputError, "frame count must be from 1 to 64"),
        ([clip], 2.5, InputError, "frame count must be a whole number"),
        ([outside], 8, media.VideoRefused, "only come from uploads"),
        ([clip, clip], 8, media.VideoRefused, "at most 1 video"),
    ]
    for paths, frames, error, message in cases:
        with pytest.raises(error, match=message):
            turns.add_turn(state, "And this?", [], [uploads], [str(path) for path in paths], frames, family)
        assert len(state.turns) == 1 and state.turns[0].video_paths == []
    with pytest.raises(InputError, match="upload an image or a video with your first question"):
        turns.add_turn(ChatState(), "What?", [], [uploads], family=family)


def test_an_image_only_model_refuses_a_video_turn(uploads, clip):
    from vtw_core.models.defaults import require_model

    default = ModelManager.load(require_model(None), device="cpu")  # the embedded default model: LLaVA-1.5
    state = ChatState()
    with pytest.raises(media.VideoRefused, match=r"takes images only; videos work with .*LLaVA-NeXT-Video") as info:
        turns.add_turn(state, "What?", [], [uploads], [str(clip)], 8, default.info.family)
    assert "Qwen2-VL" in str(info.value) and state.turns == []
    assert not media.takes_video(default)
    # A video turn that reaches the model anyway is refused before any model work, with the same message.
    state.turns.append(session.Turn("What?", [], [str(clip)], 4))
    with pytest.raises(media.VideoRefused, match="takes images only"):
        list(turns.answer_last_turn(default, state, 2, SamplingConfig(max_new_tokens=2)))
    assert state.answers == {"baseline": [], "vtw": []} and state.runs == 0 and state.settings is None


def test_a_page_that_shows_the_turn_ended_takes_the_next_question_at_once(demo):
    """A question sent the moment the page shows the answers finished (the summary says whether they agree),
    or shows a question given back after a failure, is taken: the turn ended before that update went out. It
    was refused as "still running" when the job took its end only after its last update (a loaded machine
    widened that window to seconds)."""
    send, run_turn = handler(demo, "on_submit"), handler(demo, "run_turn")
    image = str(media.EXAMPLES / "chelsea.jpg")
    chat, *_, ticket = send({"text": "What?", "files": [image]}, ChatState(), None, 8, 4, Request("quick"))
    updates = run_turn(chat, ticket, 2, "sequential", 4, False, 1, 1, 0, "vtw", 0.5, None, Request("quick"))
    summaries = []
    for update in updates:  # outputs: chat, the two panes, metrics, summary, status line, then the job's own
        summaries.append(update[4])
        if re.search("identical|different", update[4]):
            break
    assert len(summaries) > 1 and not re.search("identical|different", "".join(summaries[:-1]))
    chat, *_, ticket = send({"text": "And?", "files": []}, update[0], None, 8, 4, Request("quick"))
    assert ticket is not None, "refused while the page showed the answers finished"
    updates.close()
    # A turn that fails (K beyond the model's layers) gives its question back: sending it again is taken.
    for update in run_turn(chat, ticket, 99, "sequential", 4, False, 1, 1, 0, "vtw", 0.5, None, Request("quick")):
        if "back in the box" in update[5]:
            break
    else:
        pytest.fail("the failed turn did not give its question back")
    *_, again = send({"text": "And?", "files": []}, update[0], None, 8, 4, Request("quick"))
    assert again is not None, "refused while the page showed the question given back"
