"""The OpenAI chat-completions API over one ModelManager: `/v1/chat/completions` and `/v1/models`.

`ChatService` does the work (parse, choose the method, admit, decode the images, queue in the batcher, answer
as JSON or SSE); `build_app` exposes it as a FastAPI app for uvicorn, with the API key, CORS and the docs
pages as options, and `vtw_core.serve.ray_app` exposes the same service in every Ray Serve replica. `usage`
carries OpenAI's token counts plus a `vtw` object: the method, K, the request's stats (TTFT, prefill/decode
FLOPs, KV-cache bytes, ...), the time it waited and its batch size.

A request goes through, in order: the body's size (`read_json`, before parsing), its structure, texts and
image headers (no pixel decoded), admission (`vtw_core.serve.admission`: a queue slot and an image-memory
budget, or 503 at once), the image decoders (a few at a time), then the batcher. A client that disconnects
stops its request: at once while it waits, at the next decode step while it runs.
"""

from __future__ import annotations

import asyncio
import json
import threading
import weakref
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vtw_core.engine.methods import Method, parse_method
from vtw_core.generation.manager import ModelManager
from vtw_core.models.defaults import default_model
from vtw_core.serve.admission import Admission, BodyBudget
from vtw_core.serve.auth import check_api_key, check_host, host_allowlist
from vtw_core.serve.batching import Batcher, Job
from vtw_core.serve.errors import APIError, bad_request, from_exception, log_refusal, logger
from vtw_core.serve.limits import DEFAULT_BATCH_FILL_MS
from vtw_core.serve.protocol import (
    DEFAULT_LIMITS,
    MAX_REQUEST_BYTES,
    ChatRequest,
    RequestLimits,
    accept_image_bytes,
    decode_images,
    plan_chat_request,
)
from vtw_core.serve.remote_images import RemoteImagePolicy, fetch_image
from vtw_core.serve.replies import Reply, Ticket

DISCONNECT_POLL_S = 0.1  # how often a waiting request checks that its client is still there
MAX_DECODING = 2  # requests decoding images at a time
THREADPOOL_JSON_BYTES = 2**20  # bigger bodies are parsed off the event loop
# A body at most this large, whose images have at most INLINE_PIXELS pixels together, is checked and its images
# decoded on the event loop (well under 0.5 ms): two hops to a worker thread and back cost more than the work.
INLINE_BODY_BYTES = 64 * 2**10
INLINE_PIXELS = 256 * 256
# A body must arrive whole within this time (the largest legal one at 1 MB/s): a client that trickles bytes
# would otherwise hold its share of the body budget, and a few of them would refuse everyone else.
BODY_SECONDS = 60.0
BODIES_RECEIVED_AT_ONCE = 4  # the largest legal bodies one process receives at a time (smaller ones: more)
BODY_BUDGET = BodyBudget(BODIES_RECEIVED_AT_ONCE * MAX_REQUEST_BYTES)  # the process's, unless an app has its own


def source_name(source: str) -> str:
    """The model's source as clients may see it: "default-model", a hub id, or a local folder's name (no path)."""
    if source == default_model():
        return "default-model"
    path = Path(source)
    return path.name if path.is_absolute() or path.is_dir() else source.rstrip("/")


def client_gone() -> APIError:
    """The request of a client that closed its connection (nginx's 499): nobody reads the answer."""
    return APIError(499, "the client closed the connection; the request was stopped", code="client_closed_request")


class ChatService:
    """One model behind the OpenAI API: requests are admitted, decoded and queued in one batcher (the device's)."""

    def __init__(
        self,
        manager: ModelManager,
        *,
        model_id: str,
        default_method: str = "default",
        max_batch_size: int = 8,
        batch_wait_ms: float = 0.0,
        batch_fill_ms: float = DEFAULT_BATCH_FILL_MS,
        max_queue: int = 64,
        allow_remote_images: bool = False,
        limits: RequestLimits = DEFAULT_LIMITS,
        max_decoding: int = MAX_DECODING,
        max_image_memory: int | None = None,
        remote_policy: RemoteImagePolicy | None = None,
        compute_cpus: frozenset[int] | None = None,
    ):
        """`max_image_memory`: bytes the images of all admitted requests may hold (default: a full batch of
        the largest requests); `remote_policy`: what http(s) image URLs may reach (with allow_remote_images);
        `compute_cpus`: the cores the computing thread is pinned to (vtw_core.runtime; None: any)."""
        self.manager = manager
        self.model_id = model_id
        self.limits = limits
        self.default_method = self._default_spec(default_method)
        self.resolve_method(self.default_method)  # a bad default fails at start, not at the first request
        if max_image_memory is None:
            max_image_memory = max_batch_size * limits.max_image_memory
        if max_image_memory < limits.max_image_memory:
            raise ValueError(f"the image memory budget ({max_image_memory / 2**20:.0f} MB) must hold one request "
                             f"with the largest images ({limits.max_image_memory / 2**20:.0f} MB)")  # fmt: skip
        self.admission = Admission(max_waiting=max_queue, max_decoding=max_decoding,
                                   max_image_memory=max_image_memory)  # fmt: skip
        self.batcher = Batcher(manager, max_batch_size=max_batch_size, batch_wait_ms=batch_wait_ms,
                               batch_fill_ms=batch_fill_ms, max_queue=max_queue,
                               compute_cpus=compute_cpus)  # fmt: skip
        if remote_policy is None and allow_remote_images:
            remote_policy = RemoteImagePolicy(max_bytes=limits.max_image_bytes)
        self.remote_policy = remote_policy  # None: http(s) image URLs are refused

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
                        "source": source_name(info.source),
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

    def _method(self, request: ChatRequest) -> tuple[str, Method]:
        if request.schedule is not None:
            if len(request.schedule.keep) != self.manager.info.num_layers:
                raise bad_request(f"vtw.schedule has {len(request.schedule.keep)} keep shares; the model has "
                                  f"{self.manager.info.num_layers} layers", param="vtw.schedule")  # fmt: skip
            return f"schedule:{request.schedule.name}", Method(request.schedule.name, schedule=request.schedule)
        spec = request.method or self.default_method
        return spec, self.resolve_method(spec)

    async def chat_completions(
        self, body: Any, http_request: Request | None = None, body_bytes: int | None = None
    ) -> Response:
        """Answer one request body. With `http_request`, a client that disconnects stops its request.
        `body_bytes`: the body's size, when known; a small one is checked on the event loop (INLINE_BODY_BYTES).

        Every failure leaves as an APIError (a 4xx for the client's mistakes, engine refusals included).
        """
        inline = body_bytes is not None and body_bytes <= INLINE_BODY_BYTES
        try:
            remote = self.remote_policy is not None
            if inline:
                request = plan_chat_request(body, self.limits, remote_images=remote)
            else:
                request = await run_in_threadpool(plan_chat_request, body, self.limits, remote_images=remote)
            body = None  # the parsed body (its base64 strings) is not needed any more
            return await self._answer(request, http_request, inline)
        except APIError:
            raise
        except Exception as error:  # the engine's refusals (InputError), out of memory, and bugs
            api_error = from_exception(error)
            if api_error.code == "internal_error":
                logger.error("internal error in /v1/chat/completions", exc_info=error)
            raise api_error from None

    async def _answer(self, request: ChatRequest, http_request: Request | None, inline: bool = False) -> Response:
        if request.model not in (None, self.model_id):
            raise APIError(404, f"the model {request.model[:100]!r} does not exist; this server serves "
                           f"{self.model_id!r}", param="model", code="model_not_found")  # fmt: skip
        spec, method = self._method(request)
        slot = self.admission.admit(request.image_memory(self.limits))  # or 503 now, before any pixel is decoded
        stop = threading.Event()
        ticket = Ticket(asyncio.get_running_loop())
        watcher = None
        if http_request is not None:
            watcher = asyncio.create_task(self._watch_disconnect(http_request, stop, ticket))
        streaming = False
        try:
            await self._read_images(request, stop, inline)
            handoff = threading.Event() if request.stream else None  # a reply sent whole has no first token to send
            job = Job(request.messages, request.images, method, request.sampling, ticket.deliver, stop=stop,
                      handoff=handoff)  # fmt: skip
            slot.job = job
            self.batcher.submit(job)
            reply = Reply(self.model_id, spec, method, request, job, on_close=slot.release)
            weakref.finalize(reply, _abandon, stop, slot)  # a stream dropped before it started still ends
            first = await ticket.next()  # errors before the first token still get their HTTP status
            if request.stream:
                streaming = True  # the stream stops the job and releases the slot when it ends
                return StreamingResponse(reply.sse(ticket, first), media_type="text/event-stream")
            event, hit = first, False
            while True:
                text, hit = reply.stop_text.visible(event.text, event.finished)
                if hit or event.finished:
                    break
                event = await ticket.next()
            return JSONResponse(reply.completion(text, event, hit))
        finally:
            if watcher is not None:
                watcher.cancel()
            if not streaming:
                stop.set()  # the answer is complete, or nobody waits for it: the engine may drop the row
                slot.release()

    async def _read_images(self, request: ChatRequest, stop: threading.Event, inline: bool = False) -> None:
        """Fetch the http(s) images (allowed servers only), then decode every image, a few requests at a time;
        `inline`: images of at most INLINE_PIXELS together, none remote, are decoded on the event loop."""
        images = request.image_inputs
        if inline and not any(image.remote for image in images) and sum(i.pixels for i in images) <= INLINE_PIXELS:
            decode_images(request, self.limits)
            return
        for image in request.image_inputs:
            if image.remote and image.data is None:
                data = await fetch_image(image.url, self.remote_policy, param=image.param)
                accept_image_bytes(request, image, data, self.limits)
            if stop.is_set():
                raise client_gone()
        if request.image_inputs:
            async with self.admission.decoding:
                if stop.is_set():  # the client left while the request waited for a decoder
                    raise client_gone()
                await run_in_threadpool(decode_images, request, self.limits)
        if stop.is_set():
            raise client_gone()

    @staticmethod
    async def _watch_disconnect(http_request: Request, stop: threading.Event, ticket: Ticket) -> None:
        """Stop the request when its client disconnects: a queued job is then skipped, a running one ends."""
        while not stop.is_set():
            try:
                gone = await http_request.is_disconnected()
            except Exception:  # a server that cannot tell: the request runs to its end
                return
            if gone:
                stop.set()
                ticket.queue.put_nowait(client_gone())  # wakes the handler, whether or not the engine answers
                return
            await asyncio.sleep(DISCONNECT_POLL_S)


def _abandon(stop: threading.Event, slot: Any) -> None:
    stop.set()
    slot.release()


def _media_type(headers: Headers) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


async def read_json(
    request: Request, max_bytes: int = MAX_REQUEST_BYTES, budget: BodyBudget | None = None,
    seconds: float | None = None,
) -> Any:  # fmt: skip
    """The JSON body, read with a size limit (bodies may come chunked, without a length) within the bytes that
    the process may be receiving at once (`budget`, else BODY_BUDGET: 503 past it) and within `seconds` (else
    BODY_SECONDS: 408 past it).

    Only `Content-Type: application/json` is read (415 otherwise): a browser page on another origin can send
    text/plain without asking the server first (a CORS "simple request"), but not JSON.
    """
    if _media_type(request.headers) != "application/json":
        raise APIError(415, "send the request body as JSON, with Content-Type: application/json",
                       code="unsupported_media_type")  # fmt: skip
    too_large = APIError(413, f"the request is larger than {max_bytes / 2**20:.1f} MB (the largest legal request)",
                         code="request_too_large")  # fmt: skip
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    budget = budget or BODY_BUDGET
    seconds = BODY_SECONDS if seconds is None else seconds
    data, taken = bytearray(), 0
    try:
        if declared is not None and declared.isdigit():
            budget.take(int(declared))  # the declared length at once: the body cannot be longer than declared
            taken = int(declared)
        async with asyncio.timeout(seconds):
            async for chunk in request.stream():
                data.extend(chunk)
                if len(data) > max_bytes:
                    raise too_large
                if len(data) > taken:
                    budget.take(len(data) - taken)
                    taken = len(data)
        if len(data) > THREADPOOL_JSON_BYTES:
            return await run_in_threadpool(_loads, data)
        return _loads(data)
    except TimeoutError:  # only the timeout above raises it
        raise APIError(408, f"the request body did not arrive within {seconds:g} s",
                       code="request_timeout") from None  # fmt: skip
    finally:
        budget.give(taken)


def _loads(data: bytes | bytearray) -> Any:
    try:
        return json.loads(data)
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):
        raise bad_request("the request body is not valid JSON") from None


def error_response(error: BaseException) -> JSONResponse:
    api_error = from_exception(error)
    headers = {"WWW-Authenticate": "Bearer"} if api_error.status == 401 else None
    return JSONResponse(api_error.body(), status_code=api_error.status, headers=headers)


class _CatchAll:
    """Any exception the routes let through becomes an OpenAI error response and one log line.

    Starlette's own catch-all answers too, but then re-raises: the server prints a long traceback and drops
    the keep-alive connection. Here only a bug (a 500) logs its traceback, and the connection stays usable.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as error:
            api_error = from_exception(error)
            if isinstance(error, ClientDisconnect):  # the client left while its body or its answer travelled
                api_error = client_gone()
            elif api_error.code == "internal_error":
                logger.error("internal error in %s %s", scope["method"], scope["path"], exc_info=error)
            log_refusal(api_error, scope["method"], scope["path"])
            if not started:
                await error_response(api_error)(scope, receive, send)


def route_path(scope: Scope) -> str:
    """The path within the application, without the prefix it is mounted at (a proxy's root path, Ray Serve's
    route prefix)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :] or "/"
    return path


class AccessMiddleware:
    """The `Host` header (400 for a name not allowed) and `Authorization: Bearer KEY` on every route but /health
    (401), `vtw_core.serve.auth`; the single server and the Ray ingress both use it."""

    def __init__(self, app: ASGIApp, api_key: str | None, allowed_hosts: frozenset[str] | None = None):
        self.app, self.api_key, self.allowed_hosts = app, api_key, allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (self.api_key is not None or self.allowed_hosts is not None):
            try:
                headers = Headers(scope=scope)
                check_host(self.allowed_hosts, headers)
                check_api_key(self.api_key, route_path(scope), headers)
            except APIError as error:
                log_refusal(error, scope["method"], scope["path"])
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def install_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's (404 route, 405 method), in OpenAI's error format, one log line each."""

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, error: APIError) -> JSONResponse:
        log_refusal(error, request.method, request.url.path)
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        api_error = APIError(error.status_code, str(error.detail))
        log_refusal(api_error, request.method, request.url.path)
        return JSONResponse(api_error.body(), status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        api_error = bad_request(f"invalid request: {error.errors()[:3]}")
        log_refusal(api_error, request.method, request.url.path)
        return error_response(api_error)

    app.add_middleware(_CatchAll)


def build_app(
    service: ChatService,
    *,
    api_key: str | None = None,
    allowed_origins: Iterable[str] = (),
    docs: bool = False,
    allowed_hosts: Iterable[str] | None = None,
) -> FastAPI:
    """The FastAPI app for one process (uvicorn); the Ray Serve app declares the same routes per replica.

    `api_key`: required on every route but /health (None: no key); `allowed_origins`: the web pages (origins)
    whose browsers may call the API (none by default); `docs`: serve /docs, /redoc and /openapi.json;
    `allowed_hosts`: the only names the `Host` header may carry (None or a "*" among them: any).
    """

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()  # let the batcher's worker finish its batch and end

    app = FastAPI(
        title="VTW Chat OpenAI-compatible API",
        lifespan=lifespan,
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    install_error_handlers(app)
    app.add_middleware(AccessMiddleware, api_key=api_key, allowed_hosts=host_allowlist(allowed_hosts))
    # Outermost: preflights are answered (and refused for other origins) before the key is asked for.
    app.add_middleware(CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["GET", "POST"],
                       allow_headers=["Authorization", "Content-Type"], max_age=600)  # fmt: skip
    max_bytes = service.limits.max_request_bytes
    bodies = BodyBudget(BODIES_RECEIVED_AT_ONCE * max_bytes)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return service.models()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await read_json(request, max_bytes, bodies)
        declared = request.headers.get("content-length", "")
        return await service.chat_completions(body, request, int(declared) if declared.isdigit() else None)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
