"""An answer in the OpenAI API's shapes: the JSON completion, the server-sent event chunks, `stop` sequences, and the
ticket that carries a request's events from the batcher's thread to the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from vtw_core.engine.methods import Method
from vtw_core.generation.types import StreamEvent
from vtw_core.serve.batching import Job
from vtw_core.serve.errors import from_exception, log_refusal
from vtw_core.serve.protocol import ChatRequest

FINISH_REASONS = {"eos": "stop", "length": "length", "stopped": "stop"}


class Ticket:
    """A request's events, handed from the batcher's thread to the event loop without blocking either."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue[StreamEvent | BaseException] = asyncio.Queue()

    def deliver(self, item: StreamEvent | BaseException) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed (shutdown): nobody is waiting any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def next(self) -> StreamEvent:
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item


class StopText:
    """OpenAI `stop` sequences: the visible text ends before the first one; text that may start one is held."""

    def __init__(self, stops: list[str]):
        self.stops = stops

    def visible(self, text: str, final: bool) -> tuple[str, bool]:
        """(the text that can be shown now, whether a stop sequence was hit)."""
        hits = [index for index in (text.find(stop) for stop in self.stops) if index >= 0]
        if hits:
            return text[: min(hits)], True
        if final:
            return text, False
        held = max((n for stop in self.stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
        return text[: len(text) - held], False


class Reply:
    """The response's fixed parts and its JSON / SSE shapes."""

    def __init__(
        self,
        model_id: str,
        spec: str,
        method: Method,
        request: ChatRequest,
        job: Job,
        on_close: Callable[[], None] | None = None,
    ):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model_id, self.spec, self.method, self.request, self.job = model_id, spec, method, request, job
        self.stop_text = StopText(request.stop)
        self.on_close = on_close

    def usage(self, event: StreamEvent) -> dict[str, Any]:
        stats = event.stats.to_dict()
        extra = {"method": self.spec, "label": self.method.label, "batch_size": self.job.batch_size,
                 "queue_s": self.job.queue_s}  # fmt: skip
        return {
            "prompt_tokens": stats["prompt_tokens"],
            "completion_tokens": len(event.token_ids),
            "total_tokens": stats["prompt_tokens"] + len(event.token_ids),
            "vtw": {**extra, **stats},
        }

    def finish_reason(self, event: StreamEvent, hit: bool) -> str:
        return "stop" if hit else FINISH_REASONS.get(event.stats.finish_reason or "length", "stop")

    def completion(self, text: str, event: StreamEvent, hit: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": self.finish_reason(event, hit),
            "logprobs": None,
        }
        if self.request.return_token_ids:
            choice["token_ids"] = list(event.token_ids)
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model_id,
            "choices": [choice],
            "usage": self.usage(event),
        }

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None, **extra}
        return self._sse_line({"choices": [choice]})

    def _sse_line(self, payload: dict[str, Any]) -> str:
        full = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model_id}
        return f"data: {json.dumps({**full, **payload}, ensure_ascii=False)}\n\n"

    def _handed_off(self) -> None:
        """The first text has been sent (or the stream ended): the worker may take the cores back."""
        if self.job.handoff is not None:
            self.job.handoff.set()

    async def sse(self, ticket: Ticket, first: StreamEvent) -> AsyncIterator[str]:
        """Server-sent events as OpenAI sends them: role, text deltas, finish reason, usage, [DONE]."""
        try:
            yield self.chunk({"role": "assistant", "content": ""})
            sent, event = "", first
            while True:
                text, hit = self.stop_text.visible(event.text, event.finished)
                if len(text) > len(sent):
                    yield self.chunk({"content": text[len(sent) :]})
                    sent = text
                    self._handed_off()
                if hit or event.finished:
                    break
                event = await ticket.next()
            extra = {"token_ids": list(event.token_ids)} if self.request.return_token_ids else {}
            yield self.chunk({}, self.finish_reason(event, hit), **extra)
            if self.request.include_usage:
                yield self._sse_line({"choices": [], "usage": self.usage(event)})
        except Exception as error:  # the status line has gone out: report the error in the stream
            api_error = from_exception(error)
            log_refusal(api_error, "POST", "/v1/chat/completions (stream)")
            yield f"data: {json.dumps(api_error.body())}\n\n"
        finally:
            self._handed_off()
            self.job.stop.set()  # the client left, or the reply is complete: the engine may stop this row
            if self.on_close is not None:
                self.on_close()
        yield "data: [DONE]\n\n"
