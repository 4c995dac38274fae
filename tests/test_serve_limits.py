"""The server's resource limits against a hostile client, on `python -m vtw_core serve` with the default model.

- images and decoded pixels are counted per request, from the image headers, before a single pixel is decoded:
  an illegal request is refused in milliseconds and costs the server no memory;
- the body limit fits the largest legal request (and not much more);
- eight concurrent worst-case legal requests keep the server's peak RSS under the bound docs/serving.md gives;
- image decoding waits for admission: a full queue answers 503 without decoding, and at most `max_decoding`
  requests decode at a time.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from conftest import free_port
from PIL import Image

from vtw_core.serve import protocol
from vtw_core.serve.errors import APIError
from vtw_core.serve.limits import DEFAULT_LIMITS, MAX_MESSAGES, RequestLimits
from vtw_core.serve.readiness import process_usage, wait_until_ready
from vtw_core.validation import MAX_TEXT_BYTES, MAX_TEXT_CHARS

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "assets" / "examples"
# The bound docs/serving.md states for 8 concurrent worst-case legal requests on the default model.
PEAK_RSS_BOUND = 3.5 * 2**30


@functools.cache
def png(width: int, height: int, mode: str = "RGB") -> bytes:
    """A solid image: megapixels on the wire in a few KB (PNG compresses a flat colour to almost nothing)."""
    buffer = io.BytesIO()
    Image.new(mode, (width, height), "red" if mode == "RGB" else 1).save(buffer, format="PNG")
    return buffer.getvalue()


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}


def ask(images: list[bytes], text: str = "what is the shape?", max_tokens: int = 2) -> dict:
    content = [*(image_part(data) for data in images), {"type": "text", "text": text}]
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python -m vtw_core serve` with the default limits: (url, pid, log)."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with log.open("w") as output:
        process = subprocess.Popen([sys.executable, "-m", "vtw_core", "serve", "--port", str(port), "--threads", "1"],
                                   cwd=ROOT, stdout=output, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process, path="/health", timeout_s=120, log=log)
        yield url, process.pid, log
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def test_the_request_limits_are_the_apps():
    from app.media import MAX_IMAGES_PER_TURN
    from vtw_core.models.images import MAX_IMAGE_PIXELS

    assert DEFAULT_LIMITS.max_images == protocol.MAX_IMAGES_PER_REQUEST == MAX_IMAGES_PER_TURN
    assert DEFAULT_LIMITS.max_image_pixels == MAX_IMAGE_PIXELS
    assert DEFAULT_LIMITS.max_pixels <= 4 * MAX_IMAGE_PIXELS


def largest_legal_body(limits: RequestLimits) -> bytes:
    """Every limit at once: 64 messages whose text is the longest JSON the text limits allow, and the images at
    their byte limit. 2,666 characters beyond the BMP (4 UTF-8 bytes, 12 bytes as JSON escapes) and 1,333
    control characters (1 byte, 6 as JSON): 11,997 UTF-8 bytes, 39,990 bytes of JSON."""
    text = "\U0001f600" * 2_666 + "\x01" * 1_333
    assert len(text) <= MAX_TEXT_CHARS and len(text.encode()) <= MAX_TEXT_BYTES
    messages = [{"role": "user" if index % 2 == 0 else "assistant", "content": text} for index in range(MAX_MESSAGES)]
    messages[-2]["role"], messages[-1]["role"] = "assistant", "user"
    image = b"\x89PNG" + bytes(limits.max_image_bytes - 4)  # not a real image: only its size matters here
    messages[-1]["content"] = [*(image_part(image) for _ in range(limits.max_images)), {"type": "text", "text": text}]
    schedule = {"keep": [1.0] * 16, "ranking": "text", "name": "s"}
    body = {"messages": messages, "max_tokens": 4096, "temperature": 1.0, "top_p": 0.5, "top_k": 5, "seed": 2**62,
            "stop": ["\U0001f600" * MAX_TEXT_CHARS] * 4, "stream": True, "stream_options": {"include_usage": True},
            "vtw": {"schedule": schedule, "return_token_ids": True}}  # fmt: skip
    return json.dumps(body, indent=2).encode()


def test_the_body_limit_fits_the_largest_legal_request():
    for limits in (DEFAULT_LIMITS, RequestLimits(max_images=1, max_image_bytes=2**20)):
        size = len(largest_legal_body(limits))
        assert 0.8 * limits.max_request_bytes < size <= limits.max_request_bytes, (size, limits)
    assert protocol.MAX_REQUEST_BYTES == DEFAULT_LIMITS.max_request_bytes < 64 * 2**20
    docs = (ROOT / "docs" / "serving.md").read_text()
    assert f"{DEFAULT_LIMITS.max_request_bytes:,}" in docs  # the documented arithmetic is the code's


def test_illegal_requests_are_refused_in_milliseconds_without_decoding(server):
    """Runs first on this server: its peak memory before is the model's alone."""
    url, pid, _ = server
    huge = png(6000, 6000)  # 36 megapixels: legal alone, 108 MB once decoded
    one_each = {"messages": [ask([png(8, 8)])["messages"][0]] * 5}  # the former limit was 4 per message
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 9000 9000\n"  # PIL would run Ghostscript on it
    first = "messages[0].content[0]"
    cases = [
        ("16 huge images", ask([huge] * 16), "too_many_images", "messages"),
        ("5 images over 5 messages", one_each, "too_many_images", "messages"),
        ("2 huge images: 72 megapixels", ask([huge, huge]), "too_many_pixels", "messages[0].content[1]"),
        ("one image of 81 megapixels", ask([png(9000, 9000, "1")]), "invalid_image", first),
        ("a 1x4000 strip", ask([png(1, 4000)]), "invalid_image", first),
        ("an EPS image", ask([eps]), "invalid_image", first),
    ]
    cpu_before, _, peak_before = process_usage(pid)
    with httpx.Client(base_url=url, timeout=30, headers={"content-type": "application/json"}) as client:
        client.get("/health")  # the connection is open: the timings below are the server's
        for what, body, code, param in cases:
            content = json.dumps(body).encode()
            start = time.perf_counter()
            response = client.post("/v1/chat/completions", content=content)
            elapsed = time.perf_counter() - start
            error = response.json()["error"]
            assert response.status_code == 400 and error["code"] == code and error["param"] == param, (what, error)
            assert elapsed < 1.0, (what, elapsed)
            print(f"{what}: {elapsed * 1000:.0f} ms, {error['message']}")
    cpu_after, _, peak_after = process_usage(pid)
    assert cpu_after - cpu_before < 1.0  # decoding one 36-megapixel PNG alone takes about 0.3 s
    assert peak_after - peak_before < 50 * 2**20, (peak_before, peak_after)  # one decoded huge image is 108 MB


def test_the_largest_legal_body_is_read_and_one_byte_more_is_not(server):
    url, _, _ = server
    body = largest_legal_body(DEFAULT_LIMITS)
    padded = body[:-1] + b" " * (DEFAULT_LIMITS.max_request_bytes - len(body)) + b"}"
    with httpx.Client(base_url=url, timeout=60, headers={"content-type": "application/json"}) as client:
        read = client.post("/v1/chat/completions", content=padded)
        assert read.status_code == 400 and read.json()["error"]["code"] == "invalid_image"  # read, then refused
        refused = client.post("/v1/chat/completions", content=padded + b" ")
        assert refused.status_code == 413 and refused.json()["error"]["code"] == "request_too_large"


def test_eight_concurrent_worst_case_requests_stay_within_the_memory_bound(server):
    """Eight clients at once, each with one image at the per-image limit (40 megapixels, 120 MB decoded)."""
    url, pid, log = server
    body = json.dumps(ask([png(8000, 5000)])).encode()

    def post(_):
        response = httpx.post(f"{url}/v1/chat/completions", content=body, timeout=300,
                              headers={"content-type": "application/json"})  # fmt: skip
        return response.status_code, response.json()

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(post, range(8)))
    assert all(status == 200 for status, _ in replies), replies
    _, _, peak = process_usage(pid)
    print(f"peak RSS with 8 concurrent worst-case requests: {peak / 2**30:.2f} GiB")
    assert peak < PEAK_RSS_BOUND
    assert "Traceback" not in log.read_text()


@pytest.fixture(scope="module")
def manager():
    from vtw_core.generation.manager import ModelManager
    from vtw_core.models.defaults import require_model

    return ModelManager.load(require_model(None), device="cpu")


def test_a_full_queue_answers_503_before_decoding(manager, monkeypatch):
    from vtw_core.serve.openai_api import ChatService

    decoded, real_load = [], protocol.load_image
    monkeypatch.setattr("vtw_core.serve.protocol.load_image", lambda *args: decoded.append(args) or real_load(*args))
    service = ChatService(manager, model_id="default-model", max_queue=2)
    try:
        slots = [service.admission.admit(0) for _ in range(2)]  # two requests wait
        with pytest.raises(APIError) as caught:
            asyncio.run(service.chat_completions(ask([png(64, 64)])))
        assert caught.value.status == 503 and caught.value.code == "overloaded" and not decoded
        slots[0].release()
        assert asyncio.run(service.chat_completions(ask([(EXAMPLES / "easyvqa-0.png").read_bytes()]))) is not None
        assert len(decoded) == 1
    finally:
        service.close()


def test_at_most_max_decoding_requests_decode_at_once(manager, monkeypatch):
    from vtw_core.serve.openai_api import ChatService

    active, peak, lock = [0], [0], threading.Lock()
    real_decode = protocol.decode_images

    def slow_decode(request, limits):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        real_decode(request, limits)

    monkeypatch.setattr("vtw_core.serve.openai_api.decode_images", slow_decode)
    service = ChatService(manager, model_id="default-model", max_decoding=2)

    async def many() -> list:
        body = ask([(EXAMPLES / "easyvqa-0.png").read_bytes()])
        return await asyncio.gather(*(service.chat_completions(body) for _ in range(6)))

    try:
        replies = asyncio.run(many())
    finally:
        service.close()
    assert all(reply.status_code == 200 for reply in replies) and peak[0] == 2


def test_the_image_memory_budget_answers_503():
    from vtw_core.serve.admission import Admission

    admission = Admission(max_waiting=10, max_image_memory=300)
    held = [admission.admit(200)]
    with pytest.raises(APIError) as caught:
        admission.admit(200)
    assert caught.value.status == 503
    held.append(admission.admit(0))  # a request without images needs only a queue slot
    held[0].release()
    held[0].release()  # idempotent
    assert admission.admit(200).memory == 200 and admission.held_memory == 200


class FakeBody:
    """A request body as Starlette hands it over: headers, then chunks."""

    def __init__(self, chunks: list[bytes], declared: bool = True, pause: float = 0.0):
        from starlette.datastructures import Headers

        size = {"content-length": str(sum(map(len, chunks)))} if declared else {}
        self.headers = Headers({"content-type": "application/json", **size})
        self.chunks = chunks
        self.pause = pause  # seconds before each chunk: a slow client

    async def stream(self):
        for chunk in self.chunks:
            await asyncio.sleep(self.pause)
            yield chunk


def test_the_bodies_being_received_at_once_are_bounded():
    """Bodies are read before admission: a process-wide budget bounds the bytes of those arriving at once."""
    from vtw_core.serve.admission import BodyBudget
    from vtw_core.serve.openai_api import read_json

    budget = BodyBudget(100)
    body = [b'{"padding": "', b"x" * 30, b'"}']  # 45 bytes
    assert asyncio.run(read_json(FakeBody(body), budget=budget)) == {"padding": "x" * 30} and budget.held == 0
    budget.take(60)  # another body is arriving
    for declared in (True, False):  # refused from its Content-Length, or at the chunk that passes the budget
        with pytest.raises(APIError) as caught:
            asyncio.run(read_json(FakeBody(body, declared), budget=budget))
        assert caught.value.status == 503 and budget.held == 60


def test_a_body_that_trickles_in_is_cut_off_and_gives_its_budget_back():
    """A client that sends a byte now and then cannot hold the body budget (and so refuse everyone) for long."""
    from vtw_core.serve.admission import BodyBudget
    from vtw_core.serve.openai_api import read_json

    budget = BodyBudget(100)
    body = [b'{"a":', b" ", b"1}"]
    with pytest.raises(APIError) as caught:
        asyncio.run(read_json(FakeBody(body, pause=0.2), budget=budget, seconds=0.3))
    assert caught.value.status == 408 and "within 0.3 s" in str(caught.value) and budget.held == 0
    assert asyncio.run(read_json(FakeBody(body, pause=0.01), budget=budget, seconds=0.3)) == {"a": 1}


def test_a_small_request_is_checked_and_decoded_on_the_event_loop_a_large_image_is_not(manager, monkeypatch):
    """Through the HTTP app: a small body with a small image never leaves the event loop (two thread hops fewer);
    an image of many pixels, even in a few bytes, is still decoded on a worker thread; and the same body without
    its size known (a caller other than the HTTP route) takes the threads as before."""
    from fastapi.testclient import TestClient

    from vtw_core.serve import openai_api
    from vtw_core.serve.openai_api import ChatService, build_app

    hops: list[str] = []
    real = openai_api.run_in_threadpool

    async def counted(fn, *args, **kwargs):
        hops.append(fn.__name__)
        return await real(fn, *args, **kwargs)

    monkeypatch.setattr(openai_api, "run_in_threadpool", counted)
    service = ChatService(manager, model_id="default-model")
    small, many_pixels = ask([(EXAMPLES / "easyvqa-0.png").read_bytes()]), ask([png(600, 600)])
    assert len(json.dumps(many_pixels)) < openai_api.INLINE_BODY_BYTES and openai_api.INLINE_PIXELS < 600 * 600
    try:
        assert asyncio.run(service.chat_completions(small)).status_code == 200
        assert hops == ["plan_chat_request", "decode_images"]
        with TestClient(build_app(service)) as client:  # the app's lifespan closes the service at the end
            for body, expected in ((small, []), (many_pixels, ["decode_images"])):
                hops.clear()
                reply = client.post("/v1/chat/completions", json=body)
                assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"]
                assert hops == expected
    finally:
        service.close()
