"""The OpenAI chat-completions API over one ModelManager: `/v1/chat/completions` and `/v1/models`.

`ChatService` does the work (parse, choose the method, queue in the batcher, answer as JSON or SSE);
`build_app` exposes it as a FastAPI app for uvicorn, and `vtw_core.serve.ray_app` exposes the same service
in every Ray Serve replica. `usage` carries OpenAI's token counts plus a `vtw` object: the method, K, the
request's stats (TTFT, prefill/decode FLOPs, KV-cache bytes, ...), the time it waited and its batch size.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from vtw_core.engine.methods import Method, parse_method
from vtw_core.generation.manager import ModelManager
from vtw_core.generation.types import StreamEvent
from vtw_core.serve.batching import Batcher, Job
from vtw_core.serve.errors import APIError, bad_request, from_exception
from vtw_core.serve.protocol import MAX_REQUEST_BYTES, ChatRequest, parse_chat_request
from vtw_core.serve.remote_images import fetch_image

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


class ChatService:
    """One model behind the OpenAI API: requests queue in one batcher, which owns the device."""

    def __init__(
        self,
        manager: ModelManager,
        *,
        model_id: str,
        default_method: str = "default",
        max_batch_size: int = 8,
        batch_wait_ms: float = 5.0,
        max_queue: int = 64,
        allow_remote_images: bool = False,
    ):
        self.manager = manager
        self.model_id = model_id
        self.default_method = self._default_spec(default_method)
        self.resolve_method(self.default_method)  # a bad default fails at start, not at the first request
        self.batcher = Batcher(manager, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                               max_queue=max_queue)  # fmt: skip
        self.fetch = fetch_image if allow_remote_images else None

    def _default_spec(self, spec: str) -> str:
        """ "default": VTW at the K saved beside the checkpoint (the embedded model ships one), else the baseline."""
        if spec != "default":
            return spec
        return "vtw:auto" if self.manager.info.searched_k is not None else "baseline"

    def resolve_method(self, spec: str) -> Method:
        """A method from its spec, for a remote caller: bundled schedules by name only, never a server path."""
        name, _, rest = spec.partition(":")
        if name == "schedule" and ("/" in rest or "\\" in rest or rest.startswith(".")):
            raise bad_request("schedule:NAME takes a bundled schedule's name; send others inline as vtw.schedule",
                              param="vtw.method")  # fmt: skip
        try:
            return parse_method(spec, self.manager.info.num_layers, auto_k=self.manager.info.searched_k)
        except APIError:
            raise
        except Exception as error:  # InputError, and OSError for a schedule name that is not bundled
            raise bad_request(str(error), param="vtw.method", code="invalid_method") from None

    def close(self) -> None:
        self.batcher.close()

    def models(self) -> dict[str, Any]:
        info = self.manager.info
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "vtw-chat",
                    "vtw": {
                        "source": info.source,
                        "family": info.family,
                        "num_layers": info.num_layers,
                        "device": info.device,
                        "dtype": info.dtype,
                        "attention": info.attention,
                        "random_weights": info.random_weights,
                        "searched_k": info.searched_k,
                        "default_method": self.default_method,
                    },
                }
            ],
        }

    async def chat_completions(self, body: Any) -> Response:
        request = await run_in_threadpool(parse_chat_request, body, fetch=self.fetch)
        if request.model not in (None, self.model_id):
            raise APIError(404, f"the model {request.model!r} does not exist; this server serves {self.model_id!r}",
                           param="model", code="model_not_found")  # fmt: skip
        if request.schedule is not None:
            spec, method = f"schedule:{request.schedule.name}", Method(request.schedule.name, schedule=request.schedule)
        else:
            spec = request.method or self.default_method
            method = self.resolve_method(spec)
        ticket = Ticket(asyncio.get_running_loop())
        job = Job(request.messages, request.images, method, request.sampling, ticket.deliver)
        self.batcher.submit(job)
        reply = _Reply(self.model_id, spec, method, request, job)
        try:
            first = await ticket.next()  # errors before the first token still get their HTTP status
        except BaseException:
            job.stop.set()
            raise
        if request.stream:
            return StreamingResponse(reply.sse(ticket, first), media_type="text/event-stream")
        try:
            event, hit = first, False
            while True:
                text, hit = reply.stop_text.visible(event.text, event.finished)
                if hit or event.finished:
                    break
                event = await ticket.next()
        finally:
            job.stop.set()
        return JSONResponse(reply.completion(text, event, hit))


class _Reply:
    """The response's fixed parts and its JSON / SSE shapes."""

    def __init__(self, model_id: str, spec: str, method: Method, request: ChatRequest, job: Job):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model_id, self.spec, self.method, self.request, self.job = model_id, spec, method, request, job
        self.stop_text = StopText(request.stop)

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
                if hit or event.finished:
                    break
                event = await ticket.next()
            extra = {"token_ids": list(event.token_ids)} if self.request.return_token_ids else {}
            yield self.chunk({}, self.finish_reason(event, hit), **extra)
            if self.request.include_usage:
                yield self._sse_line({"choices": [], "usage": self.usage(event)})
        except Exception as error:  # the status line has gone out: report the error in the stream
            yield f"data: {json.dumps(from_exception(error).body())}\n\n"
        finally:
            self.job.stop.set()  # the client left, or the reply is complete: the engine may stop this row
        yield "data: [DONE]\n\n"


async def read_json(request: Request) -> Any:
    """The JSON body, read with a size limit (bodies may come chunked, without a length)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
        raise APIError(413, f"the request is larger than {MAX_REQUEST_BYTES // 2**20} MB", code="request_too_large")
    data = bytearray()
    async for chunk in request.stream():
        data.extend(chunk)
        if len(data) > MAX_REQUEST_BYTES:
            raise APIError(413, f"the request is larger than {MAX_REQUEST_BYTES // 2**20} MB", code="request_too_large")
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise bad_request("the request body is not valid JSON") from None


def error_response(error: BaseException) -> JSONResponse:
    api_error = from_exception(error)
    return JSONResponse(api_error.body(), status_code=api_error.status)


def install_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's (404 route, 405 method), in OpenAI's error format."""

    @app.exception_handler(APIError)
    async def on_api_error(_request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        body = APIError(error.status_code, str(error.detail)).body()
        return JSONResponse(body, status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(bad_request(f"invalid request: {error.errors()[:3]}"))

    @app.exception_handler(Exception)
    async def on_error(_request: Request, error: Exception) -> JSONResponse:
        return error_response(error)


def build_app(service: ChatService) -> FastAPI:
    """The FastAPI app for one process (uvicorn); the Ray Serve app declares the same routes per replica."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()  # let the batcher's worker finish its batch and end

    app = FastAPI(title="VTW Chat OpenAI-compatible API", lifespan=lifespan)
    install_error_handlers(app)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return service.models()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await service.chat_completions(await read_json(request))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
