"""The Ray Serve ingress without a cluster: failover of idempotent requests, stream splicing, the API key, docs.

A fake model handle stands in for the model deployment: each call plays a script (a head, events, and maybe
`ActorDiedError` where the replica "dies"), so every failover path runs deterministically in milliseconds.
The same paths against real replicas killed with SIGKILL are in tests/test_serve_ray.py.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

pytest.importorskip("ray.serve")

from fastapi.testclient import TestClient
from ray.exceptions import ActorDiedError, ActorUnavailableError

from vtw_core.serve.ray_ingress import Relay, StreamSplice, idempotent, ingress_app, replica_lost

KEY = "sk-test-key"
DIES = object()  # in a script: the replica dies here


def chunk(delta: dict[str, Any], finish: str | None = None, run: int = 0) -> str:
    body = {"id": f"chatcmpl-run{run}", "object": "chat.completion.chunk", "created": 1000 + run, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}  # fmt: skip
    return f"data: {json.dumps(body)}\n\n"


def stream_script(text_parts: list[str], run: int, die_after: int | None = None) -> list[Any]:
    """A replica's streamed answer: head, role chunk, one chunk per part, finish, [DONE]; or death after n parts."""
    items: list[Any] = [{"status": 200, "replica": f"r{run}"}, chunk({"role": "assistant", "content": ""}, run=run)]
    for n, part in enumerate(text_parts):
        if die_after is not None and n == die_after:
            return [*items, DIES]
        items.append(chunk({"content": part}, run=run))
    return [*items, chunk({}, "stop", run=run), "data: [DONE]\n\n"]


def json_script(content: str, run: int) -> list[Any]:
    body = {"id": f"chatcmpl-run{run}", "object": "chat.completion", "choices": [{"message": {"content": content}}]}
    return [{"status": 200, "body": json.dumps(body).encode(), "replica": f"r{run}"}]


class FakeReply:
    def __init__(self, script: list[Any], error: BaseException):
        self.items, self.error, self.cancelled = list(script), error, False

    def __aiter__(self) -> FakeReply:
        return self

    async def __anext__(self) -> Any:
        await asyncio.sleep(0)
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if item is DIES:
            raise self.error
        return item

    def cancel(self) -> None:
        self.cancelled = True


class FakeMethod:
    def __init__(self, handle: FakeHandle, name: str):
        self.handle, self.name = handle, name

    def remote(self, *args: Any) -> Any:
        self.handle.calls.append((self.name, args))
        script = self.handle.scripts.pop(0)
        if self.name == "respond":
            return FakeReply(script, self.handle.error)

        async def unary() -> Any:
            if script is DIES:
                raise self.handle.error
            return script

        return unary()


class FakeHandle:
    """The model deployment's handle: each call takes the next script."""

    def __init__(self, *scripts: Any, error: BaseException | None = None):
        self.scripts = list(scripts)
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.error = error if error is not None else ActorDiedError()

    def options(self, **_options: Any) -> FakeHandle:
        return self

    def __getattr__(self, name: str) -> FakeMethod:
        return FakeMethod(self, name)


def client_for(handle: FakeHandle, **options: Any) -> TestClient:
    relay = Relay(handle, max_attempts=options.pop("max_attempts", 3), backoff_s=0.0)
    return TestClient(ingress_app(relay, **options))


GREEDY = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
SEEDED = {**GREEDY, "temperature": 0.8, "seed": 3}
SAMPLED = {**GREEDY, "temperature": 0.8}


def read_stream(response: Any) -> tuple[str, list[dict[str, Any]], list[str]]:
    """(the text, the chunks, the raw data lines) of an SSE response."""
    lines = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line.strip()]
    chunks = [json.loads(line) for line in lines if line != "[DONE]"]
    text = "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices") and "delta" in c["choices"][0]
    )
    return text, chunks, lines


def test_which_requests_are_idempotent():
    assert idempotent(GREEDY) and idempotent({**GREEDY, "temperature": 0})
    assert idempotent({**GREEDY, "temperature": 0.0})
    assert idempotent(SEEDED) and not idempotent(SAMPLED) and not idempotent({**SAMPLED, "seed": None})
    assert idempotent([1, 2]) and idempotent({**GREEDY, "temperature": "hot"})  # refused alike everywhere


def test_lost_replicas_are_told_from_other_errors():
    assert replica_lost(ActorDiedError()) and replica_lost(ActorUnavailableError("gone", None))
    assert not replica_lost(ValueError("bad")) and not replica_lost(TimeoutError())


def test_a_greedy_request_whose_replica_dies_runs_again_elsewhere():
    handle = FakeHandle([DIES], json_script("Red.", run=1))
    response = client_for(handle).post("/v1/chat/completions", json=GREEDY)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "Red."
    assert response.headers["x-vtw-retries"] == "1" and response.headers["x-vtw-replica"] == "r1"
    assert [name for name, _ in handle.calls] == ["respond", "respond"]
    assert handle.calls[1][1] == (GREEDY,)  # the same body


def test_a_seeded_request_is_rerun_and_an_unseeded_one_gets_a_503():
    handle = FakeHandle([DIES], json_script("Blue.", run=1), error=ActorUnavailableError("unreachable", None))
    assert client_for(handle).post("/v1/chat/completions", json=SEEDED).status_code == 200
    handle = FakeHandle([DIES], json_script("never", run=1))
    response = client_for(handle).post("/v1/chat/completions", json=SAMPLED)
    assert response.status_code == 503 and response.json()["error"]["code"] == "replica_lost"
    assert "seed" in response.json()["error"]["message"] and len(handle.calls) == 1  # not re-run


def test_attempts_are_bounded():
    handle = FakeHandle([DIES], [DIES], json_script("late", run=2))
    response = client_for(handle, max_attempts=2).post("/v1/chat/completions", json=GREEDY)
    assert response.status_code == 503 and response.json()["error"]["code"] == "replica_lost"
    assert len(handle.calls) == 2


def test_errors_from_a_live_replica_are_not_retried():
    error = {"error": {"message": "bad method", "type": "invalid_request_error", "param": "vtw.method", "code": None}}
    handle = FakeHandle([{"status": 400, "body": json.dumps(error).encode(), "replica": "r0"}])
    response = client_for(handle).post("/v1/chat/completions", json=GREEDY)
    assert response.status_code == 400 and response.json() == error and len(handle.calls) == 1


def test_a_stream_cut_mid_answer_is_spliced_into_one_seamless_stream():
    parts = ["The ", "red ", "shape ", "is a ", "circle."]
    handle = FakeHandle(stream_script(parts, run=0, die_after=3), stream_script(parts, run=1))
    response = client_for(handle).post("/v1/chat/completions", json={**GREEDY, "stream": True})
    assert response.status_code == 200 and response.headers["x-vtw-replica"] == "r0"
    text, chunks, lines = read_stream(response)
    assert text == "".join(parts)
    assert {c["id"] for c in chunks} == {"chatcmpl-run0"} and {c["created"] for c in chunks} == {1000}
    assert sum("role" in c["choices"][0]["delta"] for c in chunks) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("stop") == 1
    assert lines[-1] == "[DONE]" and lines.count("[DONE]") == 1
    assert len(handle.calls) == 2


def test_a_stream_cut_before_its_first_token_is_rerun():
    handle = FakeHandle([DIES], stream_script(["Red."], run=1))
    response = client_for(handle).post("/v1/chat/completions", json={**SEEDED, "stream": True})
    assert response.status_code == 200 and response.headers["x-vtw-replica"] == "r1"
    assert read_stream(response)[0] == "Red."


def test_a_rerun_that_gives_other_text_ends_the_stream_with_an_error():
    handle = FakeHandle(stream_script(["The ", "red "], run=0, die_after=1), stream_script(["A ", "blue"], run=1))
    text, chunks, lines = read_stream(client_for(handle).post("/v1/chat/completions", json={**GREEDY, "stream": True}))
    assert text == "The " and chunks[-1]["error"]["code"] == "replica_lost" and lines[-1] == "[DONE]"


def test_an_unseeded_stream_cut_mid_answer_ends_with_an_error_event():
    handle = FakeHandle(stream_script(["The ", "red "], run=0, die_after=1), stream_script(["x"], run=1))
    response = client_for(handle).post("/v1/chat/completions", json={**SAMPLED, "stream": True})
    text, chunks, lines = read_stream(response)
    assert response.status_code == 200 and text == "The "
    assert chunks[-1]["error"]["code"] == "replica_lost" and lines[-1] == "[DONE]" and len(handle.calls) == 1


def test_splice_keeps_text_held_across_chunk_boundaries():
    splice = StreamSplice()
    first = splice.feed(chunk({"role": "assistant", "content": ""}) + chunk({"content": "ab"}))
    assert len(first) == 2
    splice.restart()
    assert splice.feed(chunk({"role": "assistant", "content": ""}, run=1)) == []
    assert splice.feed(chunk({"content": "a"}, run=1)) == []  # the client has it
    (out,) = splice.feed(chunk({"content": "bcd"}, run=1))
    assert json.loads(out.removeprefix("data: "))["choices"][0]["delta"]["content"] == "cd"


def test_models_are_retried_too():
    models = {"object": "list", "data": [{"id": "default-model"}]}
    handle = FakeHandle(DIES, models)
    response = client_for(handle).get("/v1/models")
    assert response.status_code == 200 and response.json() == models


@pytest.mark.parametrize("docs", [False, True])
def test_the_key_is_required_everywhere_but_health(docs):
    handle = FakeHandle(json_script("ok", run=0), {"object": "list", "data": []})  # the two calls with the key
    client = client_for(handle, api_key=KEY, docs=docs)
    assert client.get("/health").status_code == 200
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/docs"),
                         ("GET", "/openapi.json"), ("GET", "/nowhere")]:  # fmt: skip
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}]:
            response = client.request(method, path, json=GREEDY, headers=headers)
            assert response.status_code == 401, (method, path, headers)
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert response.headers["www-authenticate"] == "Bearer"
    assert handle.calls == []  # nothing reached a model replica
    good = {"Authorization": f"Bearer {KEY}"}
    assert client.post("/v1/chat/completions", json=GREEDY, headers=good).status_code == 200
    assert client.get("/v1/models", headers=good).status_code == 200
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert client.get(path, headers=good).status_code == (200 if docs else 404)


def test_no_key_means_open_routes_and_no_docs():
    client = client_for(FakeHandle({"object": "list", "data": []}))
    assert client.get("/v1/models").status_code == 200
    assert client.get("/docs").status_code == 404 and client.get("/openapi.json").status_code == 404
