"""Batching inside a replica: concurrent greedy requests share one engine call and get their unbatched answers."""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from vtw_core.engine.methods import parse_method
from vtw_core.errors import InputError
from vtw_core.generation.manager import ModelManager
from vtw_core.generation.types import SamplingConfig, StreamEvent
from vtw_core.models.defaults import require_model
from vtw_core.models.prompts import user_message
from vtw_core.serve.batching import Batcher, Job
from vtw_core.serve.errors import APIError

EXAMPLES = Path(__file__).resolve().parent.parent / "assets" / "examples"
REQUESTS = [
    ("easyvqa-0.png", "what is the red shape?"),
    ("easyvqa-1.png", "what is the color of the rectangle?"),
    ("easyvqa-2.png", "is there a rectangle?"),
    ("easyvqa-0.png", "is there a circle in the image?"),
]
SAMPLING = SamplingConfig(max_new_tokens=10)
STATS = ("new_tokens", "prompt_tokens", "vision_tokens", "prefill_flops", "decode_flops", "kv_cache_bytes",
         "vision_flops", "finish_reason", "k")  # fmt: skip


@pytest.fixture(scope="module")
def manager() -> ModelManager:
    return ModelManager.load(require_model(None), device="cpu")


class Collector:
    """A job's events, as the server's ticket would receive them."""

    def __init__(self) -> None:
        self.events: list[StreamEvent | BaseException] = []
        self.done = threading.Event()

    def deliver(self, item: StreamEvent | BaseException) -> None:
        self.events.append(item)
        if isinstance(item, BaseException) or item.finished:
            self.done.set()


def make_job(manager: ModelManager, image: str, text: str, method: str = "vtw:9", sampling=SAMPLING) -> tuple:
    collector = Collector()
    job = Job([user_message(text)], [Image.open(EXAMPLES / image).convert("RGB")],
              parse_method(method, manager.info.num_layers), sampling, collector.deliver)  # fmt: skip
    return job, collector


def run_jobs(manager: ModelManager, jobs: list[tuple], **options) -> None:
    batcher = Batcher(manager, **options)
    try:
        with manager.lock:  # every job is queued before the worker can start the first batch
            for job, _ in jobs:
                batcher.submit(job)
        for _, collector in jobs:
            assert collector.done.wait(120)
    finally:
        batcher.close()


@pytest.mark.parametrize("method", ["baseline", "vtw:9", "fastv:2:0.5"])
def test_batched_greedy_answers_equal_unbatched(manager, method):
    jobs = [make_job(manager, image, text, method) for image, text in REQUESTS]
    run_jobs(manager, jobs, max_batch_size=8, batch_wait_ms=200)
    spec = parse_method(method, manager.info.num_layers)
    for (job, collector), (image, text) in zip(jobs, REQUESTS, strict=True):
        assert job.batch_size == len(REQUESTS)
        alone = manager.generate([user_message(text)], [Image.open(EXAMPLES / image)], k=spec.k,
                                 schedule=spec.schedule, sampling=SAMPLING)  # fmt: skip
        final = collector.events[-1]
        assert final.finished and final.token_ids == alone.token_ids and final.text == alone.text
        assert "".join(event.text_delta for event in collector.events) == alone.text
        for key in STATS:
            assert getattr(final.stats, key) == getattr(alone.stats, key), key


def test_a_shrinking_batch_keeps_every_remaining_row_unbatched(manager):
    """Rows with their own max_tokens share one batch, and one client leaves after 2 tokens: the rows that go
    on give the tokens they give alone, each up to its own limit (the batch shrinks as they end)."""
    limits = [10, 4, 8, 6]
    jobs = [make_job(manager, image, text, sampling=SamplingConfig(max_new_tokens=limit))
            for (image, text), limit in zip(REQUESTS, limits, strict=True)]  # fmt: skip
    leaving, collector = jobs[2]

    def leave_after_two_tokens(item) -> None:
        collector.deliver(item)
        if isinstance(item, StreamEvent) and len(item.token_ids) == 2 and not item.finished:
            leaving.stop.set()

    leaving.deliver = leave_after_two_tokens
    run_jobs(manager, jobs, max_batch_size=8, batch_wait_ms=200)
    assert [job.batch_size for job, _ in jobs] == [4, 4, 4, 4]
    final = collector.events[-1]
    assert final.finished and final.stats.finish_reason == "stopped" and len(final.token_ids) == 2
    for index in (0, 1, 3):
        (job, collector), (image, text) = jobs[index], REQUESTS[index]
        alone = manager.generate([user_message(text)], [Image.open(EXAMPLES / image)], k=9, sampling=job.sampling)
        final = collector.events[-1]
        assert final.finished and final.token_ids == alone.token_ids and final.text == alone.text
        assert final.stats.finish_reason == alone.stats.finish_reason


def test_batches_hold_at_most_max_batch_size(manager):
    jobs = [make_job(manager, image, text) for image, text in REQUESTS]
    run_jobs(manager, jobs, max_batch_size=3, batch_wait_ms=200)
    assert sorted(job.batch_size for job, _ in jobs) == [1, 3, 3, 3]


def test_different_methods_and_sampled_requests_are_not_batched_together(manager):
    sampled = SamplingConfig(max_new_tokens=10, do_sample=True, seed=3)
    jobs = [make_job(manager, *REQUESTS[0], "vtw:9"), make_job(manager, *REQUESTS[1], "baseline"),
            make_job(manager, *REQUESTS[2], "vtw:9", sampled),
            make_job(manager, *REQUESTS[3], "vtw:9", sampled)]  # fmt: skip
    run_jobs(manager, jobs, max_batch_size=8, batch_wait_ms=100)
    assert [job.batch_size for job, _ in jobs] == [1, 1, 1, 1]
    alone = manager.generate([user_message(REQUESTS[2][1])], [Image.open(EXAMPLES / REQUESTS[2][0])], k=9,
                             sampling=sampled)  # fmt: skip
    assert jobs[2][1].events[-1].token_ids == alone.token_ids  # the seed gives the CLI's reply


def test_a_bad_request_fails_alone(manager):
    jobs = [make_job(manager, *REQUESTS[0]), make_job(manager, REQUESTS[1][0], "a " * 1990),
            make_job(manager, *REQUESTS[2])]  # fmt: skip
    run_jobs(manager, jobs, max_batch_size=8, batch_wait_ms=200)
    assert isinstance(jobs[1][1].events[-1], InputError) and "context" in str(jobs[1][1].events[-1])
    for job, collector in (jobs[0], jobs[2]):
        assert collector.events[-1].finished and job.batch_size == 1


def test_a_full_queue_is_refused_with_a_503(manager):
    batcher = Batcher(manager, max_queue=1, batch_wait_ms=0)
    jobs = [make_job(manager, *request) for request in REQUESTS[:3]]
    try:
        with manager.lock:
            batcher.submit(jobs[0][0])
            assert jobs[0][0].stop.is_set() is False
            while batcher._pending:  # the worker has taken the first job and waits for the device
                threading.Event().wait(0.01)
            batcher.submit(jobs[1][0])
            with pytest.raises(APIError) as caught:
                batcher.submit(jobs[2][0])
        assert caught.value.status == 503 and caught.value.code == "overloaded"
        assert jobs[0][1].done.wait(120) and jobs[1][1].done.wait(120)
    finally:
        batcher.close()


def test_a_request_given_up_before_its_turn_is_skipped(manager):
    jobs = [make_job(manager, *request) for request in REQUESTS[:2]]
    jobs[1][0].stop.set()
    batcher = Batcher(manager, batch_wait_ms=50)
    try:
        with manager.lock:
            for job, _ in jobs:
                batcher.submit(job)
        assert jobs[0][1].done.wait(120)
        assert jobs[0][0].batch_size == 1 and jobs[1][1].events == []
    finally:
        batcher.close()


@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_stream_batch_rows_equal_single_requests_on_every_family(tiny_model_path, sample_images, family):
    """Rows with different image counts and sizes: each row's tokens, text and own stats match it alone."""
    tiny = ModelManager.load(str(tiny_model_path(family)), device="cpu")
    conversations = [[user_message("Hi", num_images=1)], [user_message("What is it?", num_images=2)],
                     [user_message("Describe.", num_images=0)]]  # fmt: skip
    images = [[sample_images[0]], [sample_images[1], sample_images[2]], []]
    sampling = SamplingConfig(max_new_tokens=6)
    finals = {row: event for row, event in tiny.stream_batch(conversations, images, k=1, sampling=sampling)
              if event.finished}  # fmt: skip
    for row, (conversation, row_images) in enumerate(zip(conversations, images, strict=True)):
        alone = tiny.generate(conversation, row_images, k=1, sampling=sampling)
        assert finals[row].token_ids == alone.token_ids and finals[row].text == alone.text
        for key in STATS:
            assert getattr(finals[row].stats, key) == getattr(alone.stats, key), (family, row, key)


def test_the_server_takes_as_many_images_per_message_as_the_app():
    from app.media import MAX_IMAGES_PER_TURN
    from vtw_core.serve.protocol import MAX_IMAGES_PER_MESSAGE

    assert MAX_IMAGES_PER_MESSAGE == MAX_IMAGES_PER_TURN


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs thread affinity (Linux) and two cores to tell a pinned thread from a free one",
)
def test_the_worker_alone_is_pinned_to_the_compute_cores(manager):
    """`compute_cpus` pins the thread that computes; the caller's threads (the server's event loop) stay free."""
    allowed = os.sched_getaffinity(0)
    core = frozenset({max(allowed)})
    batcher = Batcher(manager, compute_cpus=core)
    try:
        deadline = time.monotonic() + 10
        while os.sched_getaffinity(batcher._worker.native_id) != core and time.monotonic() < deadline:
            time.sleep(0.01)
        assert os.sched_getaffinity(batcher._worker.native_id) == core
        assert os.sched_getaffinity(0) == allowed
    finally:
        batcher.close()


def test_a_group_that_comes_back_fills_the_batch_and_a_lone_client_never_waits(manager):
    """Closed-loop clients: after four were in the server at once, a batch that starts with two waits (up to
    batch_fill_ms) for the two that follow; with filling off they get batches of their own. A single client's
    request starts at once however long the fill may be, and answered rows leave the load."""
    for fill_ms, together in ((1000, True), (0, False)):
        batcher = Batcher(manager, max_batch_size=8, batch_wait_ms=0, batch_fill_ms=fill_ms)
        try:
            group = [make_job(manager, *request) for request in REQUESTS]
            with manager.lock:
                for job, _ in group:
                    batcher.submit(job)
            assert all(collector.done.wait(120) for _, collector in group)
            first = [make_job(manager, *request) for request in REQUESTS[:2]]
            later = [make_job(manager, *request) for request in REQUESTS[2:]]
            for job, _ in first:
                batcher.submit(job)
            time.sleep(0.05)
            for job, _ in later:
                batcher.submit(job)
            assert all(collector.done.wait(120) for _, collector in first + later)
            sizes = [job.batch_size for job, _ in first + later]
            assert (sizes == [4, 4, 4, 4]) if together else max(sizes) <= 2, (fill_ms, sizes)
            with batcher._condition:
                assert batcher._load == {}  # every answered row left the load
        finally:
            batcher.close()
    lone = Batcher(manager, max_batch_size=8, batch_fill_ms=1000)
    try:
        for request in REQUESTS[:3]:  # one client: one request after the other
            job, collector = make_job(manager, *request)
            lone.submit(job)
            assert collector.done.wait(120) and job.batch_size == 1
            assert job.queue_s < 0.5  # it did not wait the second batch_fill_ms allows
    finally:
        lone.close()


def test_a_batch_does_not_wait_to_fill_while_another_kind_of_request_waits(manager):
    batcher = Batcher(manager, max_batch_size=8, batch_fill_ms=1000)
    try:
        group = [make_job(manager, *request) for request in REQUESTS]
        with manager.lock:
            for job, _ in group:
                batcher.submit(job)
        assert all(collector.done.wait(120) for _, collector in group)  # the load says four VTW requests come
        vtw, baseline = make_job(manager, *REQUESTS[0]), make_job(manager, *REQUESTS[1], "baseline")
        with batcher._condition:  # both queued before the worker looks
            batcher.submit(vtw[0])
            batcher.submit(baseline[0])
        assert vtw[1].done.wait(120) and baseline[1].done.wait(120)
        assert vtw[0].batch_size == 1 and vtw[0].queue_s < 0.5  # it started without the second of filling
    finally:
        batcher.close()


def test_batch_fill_must_be_a_bounded_time(manager):
    for fill_ms in (-1.0, 5000.0):
        with pytest.raises(ValueError, match="batch_fill_ms"):
            Batcher(manager, batch_fill_ms=fill_ms)


class HandOff(Collector):
    """A job's events, and the server's side of the hand-off: its first text "goes out" `delay_s` after arriving."""

    def __init__(self, delay_s: float | None) -> None:
        super().__init__()
        self.handoff = threading.Event()
        self.delay_s = delay_s
        self.times: list[float] = []

    def deliver(self, item: StreamEvent | BaseException) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) == 1 and self.delay_s is not None:
            threading.Timer(self.delay_s, self.handoff.set).start()
        super().deliver(item)


def handoff_job(manager: ModelManager, image: str, text: str, delay_s: float | None) -> tuple:
    collector = HandOff(delay_s)
    job = Job([user_message(text)], [Image.open(EXAMPLES / image).convert("RGB")],
              parse_method("vtw:9", manager.info.num_layers), SAMPLING, collector.deliver,
              handoff=collector.handoff)  # fmt: skip
    return job, collector


@pytest.mark.parametrize("rows", [1, 3])
def test_the_worker_waits_for_the_first_tokens_to_go_out_before_computing_on(manager, monkeypatch, rows):
    """The second token is computed only once every row's first has been sent (here 0.3 s later)."""
    monkeypatch.setattr("vtw_core.serve.batching.HANDOFF_WAIT_S", 5.0)
    jobs = [handoff_job(manager, image, text, 0.3) for image, text in REQUESTS[:rows]]
    run_jobs(manager, jobs, max_batch_size=8, batch_wait_ms=200)
    assert [job.batch_size for job, _ in jobs] == [rows] * rows
    last_first = max(collector.times[0] for _, collector in jobs)
    for _, collector in jobs:
        assert len(collector.times) > 1
        assert collector.times[1] - last_first >= 0.29  # the decode steps take milliseconds: this is the wait
    alone = manager.generate([user_message(REQUESTS[0][1])], [Image.open(EXAMPLES / REQUESTS[0][0])], k=9,
                             sampling=SAMPLING)  # fmt: skip
    assert jobs[0][1].events[-1].token_ids == alone.token_ids


def test_a_first_token_that_never_goes_out_delays_the_rest_once_and_boundedly(manager, monkeypatch):
    monkeypatch.setattr("vtw_core.serve.batching.HANDOFF_WAIT_S", 0.3)
    job, collector = handoff_job(manager, *REQUESTS[0], None)  # nobody sends it: the client left, say
    run_jobs(manager, [(job, collector)])
    gaps = [b - a for a, b in itertools.pairwise(collector.times)]
    assert len(gaps) >= 2 and 0.29 <= gaps[0] < 2.0 and max(gaps[1:]) < 0.29  # once, after the first token


def test_the_server_hands_off_after_sending_a_streamed_first_token(manager, monkeypatch):
    """A streamed reply sets its job's hand-off once its first text has been sent; a reply sent whole has none."""
    import base64

    from fastapi.testclient import TestClient

    from vtw_core.serve import batching
    from vtw_core.serve.openai_api import ChatService, build_app

    monkeypatch.setattr(batching, "HANDOFF_WAIT_S", 30.0)  # a hand-off that never came would show as a long wait
    seen: list[tuple[bool | None, float]] = []
    original = batching.hand_off

    def recording_hand_off(jobs):
        started = time.perf_counter()
        original(jobs)
        seen.append((None if jobs[0].handoff is None else jobs[0].handoff.is_set(), time.perf_counter() - started))

    monkeypatch.setattr(batching, "hand_off", recording_hand_off)
    image = base64.b64encode((EXAMPLES / "easyvqa-0.png").read_bytes()).decode()
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
        {"type": "text", "text": "What shape is in the image?"}]}], "max_tokens": 4, "temperature": 0}  # fmt: skip
    service = ChatService(manager, model_id="default")
    try:
        with TestClient(build_app(service)) as client:
            streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
            whole = client.post("/v1/chat/completions", json=body)
    finally:
        service.close()
    assert streamed.status_code == 200 and whole.status_code == 200
    assert '"content"' in streamed.text and whole.json()["choices"][0]["message"]["content"]
    (streamed_set, streamed_wait), (whole_set, _) = seen
    assert streamed_set is True and streamed_wait < 10  # released by the server, not by the time limit
    assert whole_set is None
