"""The bookkeeping every streamed reply shares, alone (`generate.stream_generate`) or in a batch
(`batch_stream.stream_generate_batch`): its stats, its text as soon as each token's text is whole, the
events it yields, its timings, how it ends, and the device running out of memory.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from transformers import TextStreamer

from vtw_core.errors import ResourceError
from vtw_core.generation.types import GenerationStats, StreamEvent
from vtw_core.models.families import num_decoder_layers


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a clock reading counts it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_placement(model: nn.Module) -> dict[str, str]:
    """Where and how a model runs: its device, dtype and attention implementation, as stats and infos name them."""
    return {
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "attention": model.config.get_text_config()._attn_implementation,
    }


def request_stats(model: nn.Module, k: int | None, **counts: Any) -> GenerationStats:
    """Fresh stats of one request on `model` at K (None: the unchanged model), with any counts known up front."""
    return GenerationStats(k=k, num_layers=num_decoder_layers(model.config), **model_placement(model), **counts)


def record_token_time(stats: GenerationStats, now: float) -> None:
    """Timings after a token arrived `now` seconds into the request (`stats.new_tokens` already counts it)."""
    if stats.ttft_s is None:
        stats.ttft_s = now
    stats.total_s = now
    if stats.new_tokens > 1 and now > stats.ttft_s:
        stats.decode_tokens_per_s = (stats.new_tokens - 1) / (now - stats.ttft_s)


def end_reason(stop_event: threading.Event | None) -> str:
    """Why a reply that met no end token ended: "stopped" when its stop event is set, else "length"."""
    return "stopped" if stop_event is not None and stop_event.is_set() else "length"


@contextmanager
def out_of_memory_as_resource_error(device: torch.device, advice: str) -> Iterator[None]:
    """The device running out of memory becomes a ResourceError ("the device ran out of memory; {advice}"),
    with the CUDA cache emptied so the next request starts clean."""
    try:
        yield
    except torch.OutOfMemoryError as error:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        raise ResourceError(f"the device ran out of memory; {advice}") from error


def text_collector(tokenizer: Any) -> TextCollector | WordCollector:
    """The collector of a reply's text: token by token (`TextCollector`), or word by word (`WordCollector`) for
    tokenizers whose decoding cleans up spaces around punctuation, which changes text already out."""
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return WordCollector(tokenizer)
    return TextCollector(tokenizer)


class TextCollector:
    """A reply's text, handed out as soon as each token's text is whole, as vLLM and TGI stream it.

    After each token the reply is decoded whole and the text past what went out is handed out, unless it ends in
    a character whose bytes are still arriving (U+FFFD); at the end whatever is held goes out. For any reply that
    decodes to text, the pieces add up to `tokenizer.decode` of the reply. (transformers' streamer decodes whole
    too, but holds each word until the next one starts: a one-word answer arrived a decode step late.)
    """

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = 0  # characters handed out so far
        self.pending = ""

    def put(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._catch_up(text)

    def end(self) -> None:
        self._catch_up(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def take(self) -> str:
        text, self.pending = self.pending, ""
        return text

    def _catch_up(self, text: str) -> None:
        if len(text) > self.sent:
            self.pending += text[self.sent :]
            self.sent = len(text)


class WordCollector(TextStreamer):
    """transformers' streamer decides where words end; we collect its text instead of printing it."""

    def __init__(self, tokenizer: Any):
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.pending = ""

    def put(self, token: int) -> None:
        super().put(torch.tensor([token]))

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.pending += text

    def take(self) -> str:
        text, self.pending = self.pending, ""
        return text


class TextStream:
    """One reply's progress: its tokens and text so far, turned into `StreamEvent`s that carry its stats."""

    def __init__(self, stats: GenerationStats, tokenizer: Any):
        self.stats = stats
        self.collector = text_collector(tokenizer)
        self.token_ids: list[int] = []
        self.text = ""
        self.done = False

    def add(self, token: int, eos_ids: set[int]) -> StreamEvent:
        """The event of the reply's next token; an end token ends the reply (finish reason "eos") unshown."""
        self.token_ids.append(token)
        if token in eos_ids:
            self.stats.finish_reason = "eos"
            self.done = True
        else:
            self.collector.put(token)
        return self._event()

    def finish(self, reason: str | None) -> StreamEvent:
        """The reply's last event (finished=True), with the text the streamer still held back."""
        self.done = True
        self.stats.finish_reason = reason
        self.collector.end()
        return self._event(finished=True)

    def _event(self, finished: bool = False) -> StreamEvent:
        delta = self.collector.take()
        self.text += delta
        return StreamEvent(delta, self.text, list(self.token_ids), self.stats, finished=finished)
