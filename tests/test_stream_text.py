"""A streamed reply's text: each token's text goes out with that token, and the pieces add up to the decode."""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from vtw_core.generation.manager import ModelManager
from vtw_core.generation.streaming import text_collector
from vtw_core.generation.types import SamplingConfig
from vtw_core.models.defaults import DEFAULT_MODEL_DIR, require_model
from vtw_core.models.images import load_image
from vtw_core.models.prompts import user_message
from vtw_core.testing.tokenizers import build_tiny_tokenizer

TOKENIZERS = {
    "default model": lambda: AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR),
    "llama layout (byte fallback)": lambda: build_tiny_tokenizer("llava"),
    "qwen2 layout (byte-level)": lambda: build_tiny_tokenizer("qwen2_vl"),
}
# Words the tokenizers know, characters they spell in bytes, spaces and newlines.
PIECES = [*"abcdefgh .,?!\n", "shape", " circle", "é", "日", "本", "🙂"]
TEXT = st.lists(st.sampled_from(PIECES), max_size=30).map("".join)


@cache
def tokenizer_of(name: str):
    return TOKENIZERS[name]()


def streamed(tokenizer, ids: list[int]) -> list[str]:
    """The text handed out after each token, and after the end (the last item)."""
    collector = text_collector(tokenizer)
    pieces = []
    for token in ids:
        collector.put(token)
        pieces.append(collector.take())
    collector.end()
    pieces.append(collector.take())
    return pieces


@pytest.mark.parametrize("name", TOKENIZERS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TEXT)
def test_each_tokens_text_goes_out_with_it(name, text):
    tokenizer = tokenizer_of(name)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = streamed(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    for count in range(1, len(ids) + 1):
        decoded = tokenizer.decode(ids[:count], skip_special_tokens=True)
        if not decoded.endswith("\ufffd"):  # a whole text so far: it has all gone out, nothing is held back
            assert "".join(pieces[:count]) == decoded


def test_a_one_word_answer_arrives_with_its_token():
    """The default model answers the bundled example with one word: its first event carries it (it used to wait
    for the next decode step, as a word-by-word streamer does)."""
    manager = ModelManager.load(require_model(None), device="cpu")
    image = load_image(str(DEFAULT_MODEL_DIR.parent / "examples" / "easyvqa-0.png"))
    events = manager.stream([user_message("What shape is in the image?")], [image], sampling=SamplingConfig())
    first = next(iter(events))
    assert first.text_delta == "Triangle." and first.token_ids == first.token_ids[:1]
