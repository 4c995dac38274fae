"""The Ray Serve application's front door: API key, request parsing, and failover to another model replica.

The ingress holds no model. It reads the body (size limit, JSON), checks the key, and forwards the body to
the model deployment through a `DeploymentHandle`; each model replica answers with a head (status, and the
JSON body or "a stream follows") and, for streams, the server-sent events of `ChatService`.

When the replica answering a request dies (`kill -9`, its node lost, the out-of-memory killer), Ray raises
`ActorDiedError` (or `ActorUnavailableError` while the replica cannot be reached) in the ingress, and the
handle's router stops choosing that replica. Then:

- an idempotent request (greedy: `temperature` 0 or absent; or sampled with a `seed`) runs again on another
  replica, up to `max_attempts` runs in all, with a short pause between them. A stream that had already sent
  text is re-run in full and spliced: the client gets the text it lacks, one role chunk, one id and `created`
  for every chunk, so it sees one seamless stream (or an error event if the re-run does not give the text it
  already has);
- a request sampled without a seed is not re-run (its answer would change): 503 `replica_lost` (retryable),
  or, once a stream has started, an error event and `[DONE]`.

Responses carry `x-vtw-replica` (the model replica that answered) and, when a request was re-run,
`x-vtw-retries` (non-streamed answers only: a stream's headers leave before any re-run).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from ray.exceptions import NodeDiedError, RayActorError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import ReplicaUnavailableError

from vtw_core.serve.errors import APIError, from_exception
from vtw_core.serve.limits import MAX_REQUEST_BYTES
from vtw_core.serve.openai_api import AccessMiddleware, install_error_handlers, read_json

logger = logging.getLogger("ray.serve")

# The replica is gone or unreachable: ActorDiedError and ActorUnavailableError are RayActorErrors.
LOST = (RayActorError, ReplicaUnavailableError, WorkerCrashedError, NodeDiedError)
DEFAULT_MAX_ATTEMPTS = 3
BACKOFF_S = 0.25  # pause before re-run n: n x BACKOFF_S (the router has dropped the dead replica by then)
DONE = "data: [DONE]\n\n"


def replica_lost(error: BaseException) -> bool:
    """Whether an exception from a handle call means that the replica died or cannot be reached."""
    if isinstance(error, LOST):
        return True
    return isinstance(error, RayTaskError) and isinstance(getattr(error, "cause", None), LOST)


def idempotent(body: Any) -> bool:
    """Re-running gives the same answer: greedy (temperature 0 or absent) or sampled with a seed.

    A body that is not an object, or has a temperature that is not a number, is refused the same way by every
    replica, so it counts as idempotent too.
    """
    if not isinstance(body, dict):
        return True
    temperature = body.get("temperature")
    if temperature is None or isinstance(temperature, bool) or not isinstance(temperature, int | float):
        return True
    return temperature == 0 or body.get("seed") is not None


def replica_lost_error(retried: bool) -> APIError:
    if retried:
        message = "the model replicas answering this request stopped, and so did its re-runs; send it again"
    else:
        message = ("the model replica answering this request stopped; a request sampled without a seed is not "
                   "re-run by the server (its answer would change): send it again")  # fmt: skip
    return APIError(503, message, type="server_error", code="replica_lost")


def event(error: APIError) -> str:
    return f"data: {json.dumps(error.body())}\n\n"


class Diverged(Exception):
    """The re-run of a stream does not begin with the text the client already has."""


class StreamSplice:
    """The events of one streamed answer across runs: one id and `created`, one role chunk, each text once."""

    def __init__(self) -> None:
        self.id: str | None = None
        self.created: int | None = None
        self.sent = ""  # the text the client has
        self.run_text = ""  # the text of the current run so far
        self.role_sent = False
        self.finished = False  # [DONE] went out

    def restart(self) -> None:
        self.run_text = ""

    def feed(self, item: str) -> list[str]:
        """The events to send for one item of a replica's stream (it may hold several events)."""
        out = []
        for part in item.split("\n\n"):
            if part.strip():
                out.extend(self._event(part))
        return out

    def _event(self, part: str) -> list[str]:
        data = part.removeprefix("data:").strip()
        if data == "[DONE]":
            self.finished = True
            return [DONE]
        try:
            chunk = json.loads(data)
        except ValueError:
            return [part + "\n\n"]
        if not isinstance(chunk, dict) or chunk.get("object") != "chat.completion.chunk":
            return [part + "\n\n"]  # an error event
        if self.id is None:
            self.id, self.created = chunk.get("id"), chunk.get("created")
        chunk["id"], chunk["created"] = self.id, self.created
        choices = chunk.get("choices") or []
        delta = choices[0].get("delta") if choices and isinstance(choices[0], dict) else None
        if isinstance(delta, dict):
            if "role" in delta:
                if self.role_sent:
                    return []  # a re-run's role chunk: the client has one
                self.role_sent = True
            content = delta.get("content")
            if content:
                self.run_text += content
                if len(self.run_text) <= len(self.sent):
                    if not self.sent.startswith(self.run_text):
                        raise Diverged
                    return []  # text the client already has
                if not self.run_text.startswith(self.sent):
                    raise Diverged
                delta["content"] = self.run_text[len(self.sent) :]
                self.sent = self.run_text
        return [f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"]


class Relay:
    """Forwards requests to the model deployment and re-runs idempotent ones whose replica died.

    `model`: a DeploymentHandle (or anything with the same calls) of a deployment with `respond(body)`, an
    async generator of a head dict then the stream's events, and `models()`.
    """

    def __init__(self, model: Any, max_attempts: int = DEFAULT_MAX_ATTEMPTS, backoff_s: float = BACKOFF_S):
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.model = model
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.retries = 0  # re-runs since start, for the logs

    async def _pause(self, error: BaseException, attempt: int, what: str) -> None:
        self.retries += 1
        logger.warning("model replica lost (%s) during %s; running it again on another replica (run %d of %d; "
                       "%d re-runs since start)", type(error).__name__, what, attempt + 1, self.max_attempts,
                       self.retries)  # fmt: skip
        await asyncio.sleep(self.backoff_s * attempt)

    async def models(self) -> dict[str, Any]:
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self.model.models.remote()
            except Exception as error:
                if not replica_lost(error) or attempt >= self.max_attempts:
                    if replica_lost(error):
                        raise replica_lost_error(attempt > 1) from None
                    raise
                await self._pause(error, attempt, "GET /v1/models")

    async def _start(self, body: Any, safe: bool, attempt: int) -> tuple[Any, dict[str, Any], int]:
        """Send the body until a replica answers with its head: (the reply's generator, the head, the run)."""
        while True:
            attempt += 1
            reply = self.model.options(stream=True).respond.remote(body)
            try:
                return reply, await reply.__anext__(), attempt
            except asyncio.CancelledError:  # the client left: the replica stops the request too
                reply.cancel()
                raise
            except StopAsyncIteration:
                raise APIError(500, "the model replica sent no answer", type="server_error",
                               code="internal_error") from None  # fmt: skip
            except Exception as error:
                if not replica_lost(error):
                    raise
                if not safe or attempt >= self.max_attempts:
                    raise replica_lost_error(attempt > 1) from None
                await self._pause(error, attempt, "a chat completion")

    async def chat(self, body: Any) -> Response:
        safe = idempotent(body)
        reply, head, attempt = await self._start(body, safe, 0)
        headers = {"x-vtw-replica": str(head.get("replica", ""))}
        if attempt > 1:
            headers["x-vtw-retries"] = str(attempt - 1)
        if "body" in head:  # a whole answer (JSON), or an error before the first token
            await _drain(reply)
            headers.update(head.get("headers") or {})
            return Response(head["body"], status_code=int(head["status"]), headers=headers,
                            media_type="application/json")  # fmt: skip
        return StreamingResponse(self._stream(body, safe, reply, attempt), media_type="text/event-stream",
                                 headers=headers)  # fmt: skip

    async def _stream(self, body: Any, safe: bool, reply: Any, attempt: int) -> AsyncIterator[str]:
        splice = StreamSplice()
        try:
            while True:
                try:
                    async for item in reply:
                        for out in splice.feed(item if isinstance(item, str) else bytes(item).decode()):
                            yield out
                    if not splice.finished:
                        yield DONE
                    return
                except Diverged:
                    logger.error("the re-run of a stream gave other text than the first run; ending the stream")
                    yield event(APIError(503, "the re-run of this request on another replica gave another answer; "
                                         "send it again", type="server_error", code="replica_lost"))  # fmt: skip
                    yield DONE
                    return
                except Exception as error:
                    if not replica_lost(error):  # the status line has gone out: report it in the stream
                        api_error = from_exception(error)
                        if api_error.code == "internal_error":
                            logger.error("error while relaying a stream", exc_info=error)
                        yield event(api_error)
                        yield DONE
                        return
                    if not safe or attempt >= self.max_attempts:
                        yield event(replica_lost_error(attempt > 1))
                        yield DONE
                        return
                    await self._pause(error, attempt, "a streamed chat completion")
                try:
                    reply, head, attempt = await self._start(body, safe, attempt)
                except Exception as error:  # replicas lost again and again (503), or a bug (500)
                    yield event(from_exception(error))
                    yield DONE
                    return
                if "body" in head:  # the re-run was refused before its first token (a full queue, say)
                    await _drain(reply)
                    yield f"data: {bytes(head['body']).decode()}\n\n"
                    yield DONE
                    return
                splice.restart()
        finally:
            reply.cancel()  # the client left, or the stream is over: nothing more to read


async def _drain(reply: Any) -> None:
    """Read a reply's generator to its end (it ends after a JSON head); its replica may die meanwhile."""
    try:
        async for _ in reply:
            pass
    except Exception as error:
        if not replica_lost(error):
            raise


def ingress_app(
    relay: Relay, *, api_key: str | None = None, docs: bool = False, max_bytes: int = MAX_REQUEST_BYTES
) -> FastAPI:
    """The ingress's routes: /v1/chat/completions and /v1/models (key required if set), /health (open).

    `docs`: serve /docs, /redoc and /openapi.json (behind the key too); `max_bytes`: the body limit, from the
    model replicas' request limits.
    """
    app = FastAPI(
        title="VTW Chat OpenAI-compatible API (Ray Serve)",
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    install_error_handlers(app)
    app.add_middleware(AccessMiddleware, api_key=api_key)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return await relay.models()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await relay.chat(await read_json(request, max_bytes))

    return app
