"""The app's event handlers as plain functions, on a tiny checkpoint."""

from __future__ import annotations

import pytest

from app.handlers import ChatState, compare, error_message, format_stats
from vtw_core.errors import InputError
from vtw_core.manager import ModelManager


@pytest.fixture(scope="module")
def manager(tiny_model_path):
    return ModelManager.load(str(tiny_model_path("llava")), device="cpu")


@pytest.fixture()
def image_path(tmp_path, sample_images):
    path = tmp_path / "shape.png"
    sample_images[0].save(path)
    return str(path)


def test_compare_streams_baseline_then_vtw(manager, image_path):
    state = ChatState()
    updates = list(compare(manager, state, "What is it?", [image_path], k=2, max_new_tokens=4))
    assert len(updates) >= 2
    final_state, counters = updates[-1]
    assert [message["role"] for message in final_state.display["vtw"]] == ["user", "user", "assistant"]
    assert "TFLOPs" in counters["baseline"] and "TFLOPs" in counters["vtw"]
    assert "VTW / baseline" in counters["summary"]
    # Second turn: the first image stays in the conversation, both sides keep their own history.
    list(compare(manager, final_state, "And now?", [], k=2, max_new_tokens=3))
    assert len(final_state.messages["baseline"]) == 4 and len(final_state.messages["vtw"]) == 4


def test_k_equal_to_layers_gives_identical_answers(manager, image_path):
    *_, (_, counters) = compare(manager, ChatState(), "Describe it.", [image_path], k=4, max_new_tokens=6)
    assert "answers **identical**" in counters["summary"]


def test_bad_input_is_reported(manager, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(InputError) as caught:
        list(compare(manager, ChatState(), "What?", [str(bad)], k=2, max_new_tokens=3))
    assert "not an image" in error_message(caught.value)
    with pytest.raises(InputError, match="empty"):
        list(compare(manager, ChatState(), "  ", [], k=2, max_new_tokens=3))
    assert error_message(RuntimeError("boom")).startswith("unexpected error")
    assert format_stats(None) == "_no answer yet_"
