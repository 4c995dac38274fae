"""Batching inside one replica: concurrent requests with the same method go through one engine call.

One worker thread owns the model manager. It takes the oldest waiting request, then for up to
`batch_wait_ms` (default 0: those already waiting) gathers later requests with the same method and sampling
settings (up to `max_batch_size`; `max_tokens` may differ, each row stops at its own) and answers them with
`ModelManager.stream_batch` (left-padded). Greedy rows give the tokens they would give alone. Sampled requests
run one at a time, so a seed gives the same reply as the CLI. A request that arrives while a batch runs waits
for the next one: batches never grow mid-way, but they shrink: a row that ends (end token, its own limit) or
whose `Job.stop` is set (its client left) leaves the batch at the next decode step and costs nothing more. A
request given up while it waits never starts.

Filling batches: clients that each send their next request when the last one is answered (a closed loop) split
into groups that take turns at the device, since a batch starts with whoever is waiting; the groups' batches are
smaller and cost more per row (the default model's VTW prefill, two threads: 22.5 ms per prompt alone, 12.1-12.4
per row at 4-8). So when as many requests with the batch's key were in the server at once within the last second
(waiting or being answered) as would fill it further, a batch waits up to `batch_fill_ms` (default 10) more for
them: the group just answered comes back and joins. One client alone never waits, nor does a batch while requests
of another kind are waiting.

If a batch fails before its first token (say one prompt is beyond the context), each of its requests is run
alone, so only the bad one fails. Requests are delivered their events through `Job.deliver`, which must not
block (the server hands them to its event loop).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from PIL import Image

from vtw_core.engine.methods import Method
from vtw_core.generation.manager import ModelManager
from vtw_core.generation.types import SamplingConfig, StreamEvent
from vtw_core.models.prompts import Message
from vtw_core.runtime import pin_this_thread
from vtw_core.serve.errors import overloaded
from vtw_core.serve.limits import DEFAULT_BATCH_FILL_MS, MAX_BATCH_FILL_MS

Delivery = Callable[[StreamEvent | BaseException], None]

LOAD_WINDOW_S = 1.0  # how long a peak of concurrent requests counts as the current load
HANDOFF_WAIT_S = 0.005  # the longest the worker waits for the first tokens to go out (Job.handoff)
MAX_TRACKED_KEYS = 64


@dataclass(eq=False)
class Job:
    """One request for the batcher: what to answer, how, and where its events go."""

    messages: list[Message]
    images: list[Image.Image]
    method: Method
    sampling: SamplingConfig
    deliver: Delivery
    stop: threading.Event = field(default_factory=threading.Event)  # set when the client no longer wants it
    submitted_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    batch_size: int = 1
    left: bool = False  # answered, failed or given up: no longer counted in the server's load
    # Set by the server once the request's first text has gone out to its client. The worker waits for it (at
    # most HANDOFF_WAIT_S) before it computes the next token: where the computing threads take every core, the
    # server's event loop would otherwise wait for the scheduler's next slice (2-5 ms) to send the first token.
    # None: nothing to wait for (a reply sent whole at its end).
    handoff: threading.Event | None = None

    @property
    def batch_key(self) -> tuple[Any, ...] | None:
        """Requests with equal keys can share an engine call; sampled ones never do (one generator per call).
        `max_new_tokens` is not part of it: every row of a batch has its own limit."""
        if self.sampling.do_sample:
            return None
        return (
            self.method,
            *(getattr(self.sampling, f.name) for f in fields(SamplingConfig) if f.name != "max_new_tokens"),
        )

    @property
    def queue_s(self) -> float | None:
        return None if self.started_at is None else self.started_at - self.submitted_at


class Batcher:
    """Owns the device through the manager; `submit` queues a job, the worker answers it (maybe batched)."""

    def __init__(
        self,
        manager: ModelManager,
        *,
        max_batch_size: int = 8,
        batch_wait_ms: float = 0.0,
        max_queue: int = 64,
        compute_cpus: frozenset[int] | None = None,
        batch_fill_ms: float = DEFAULT_BATCH_FILL_MS,
    ):
        """`compute_cpus`: the cores the worker (the only thread that computes) is pinned to (None: any);
        `batch_fill_ms`: how long a batch may wait for requests the recent load says are coming (0: never)."""
        if max_batch_size < 1 or batch_wait_ms < 0 or max_queue < 1 or not 0 <= batch_fill_ms <= MAX_BATCH_FILL_MS:
            raise ValueError(f"max_batch_size and max_queue must be >= 1, batch_wait_ms >= 0, batch_fill_ms "
                             f"within 0-{MAX_BATCH_FILL_MS:g}")  # fmt: skip
        self.manager = manager
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_ms / 1000
        self.batch_fill_s = batch_fill_ms / 1000
        self._load: dict[Any, int] = {}  # per batch key: requests in the server (waiting or being answered)
        self._peaks: dict[Any, tuple[int, float]] = {}  # per batch key: the most at once lately, and when
        self.max_queue = max_queue
        self.compute_cpus = compute_cpus
        self._pending: deque[Job] = deque()
        self._condition = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="vtw-batcher", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> None:
        """Queue the job, or refuse it with a 503 when the queue is full (the client may retry)."""
        with self._condition:
            if self._closed:
                raise overloaded("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise overloaded(f"the server is busy ({self.max_queue} requests waiting); retry later")
            self._pending.append(job)
            self._arrive(job)
            self._condition.notify()

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify()
        self._worker.join(timeout=30)

    def _work(self) -> None:
        pin_this_thread(self.compute_cpus)
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            self._run(batch)
            for job in batch:
                self._leave(job)

    def _arrive(self, job: Job) -> None:
        """Count the job in its key's load and keep the peak (called with the condition held)."""
        key = job.batch_key
        if key is None:  # sampled requests run alone: nothing to fill
            return
        now = time.monotonic()
        load = self._load[key] = self._load.get(key, 0) + 1
        peak, when = self._peaks.get(key, (0, now))
        if load >= peak or now - when > LOAD_WINDOW_S:
            self._peaks[key] = (load, now)
        if len(self._peaks) > MAX_TRACKED_KEYS:  # many one-off keys: keep those seen within the window
            self._peaks = {k: p for k, p in self._peaks.items() if now - p[1] <= LOAD_WINDOW_S}

    def _leave(self, job: Job) -> None:
        """The job no longer counts in the load (idempotent; the condition's lock is re-entrant)."""
        with self._condition:
            if job.left:
                return
            job.left = True
            key = job.batch_key
            if key is not None and key in self._load:
                peak = self._peaks.get(key)
                if peak is not None and self._load[key] >= peak[0]:  # held its peak until now: the window starts here
                    self._peaks[key] = (peak[0], time.monotonic())
                self._load[key] -= 1
                if self._load[key] <= 0:
                    del self._load[key]

    def _deliver(self, job: Job, item: StreamEvent | BaseException) -> None:
        """Hand the job an event; once it has its last, it leaves the load (its client may already send the next)."""
        job.deliver(item)
        if isinstance(item, BaseException) or item.finished:
            self._leave(job)

    def _expected_rows(self, key: Any) -> int:
        """How many rows the recent load says a batch with this key could have (called with the condition held)."""
        peak, when = self._peaks.get(key, (1, 0.0))
        return min(self.max_batch_size, peak) if time.monotonic() - when <= LOAD_WINDOW_S else 1

    def _next_batch(self) -> list[Job] | None:
        with self._condition:
            while True:
                while not self._pending and not self._closed:
                    self._condition.wait()
                if self._closed:
                    return None
                first = self._pending.popleft()
                if not first.stop.is_set():  # a client that left before its turn costs nothing
                    break
                self._leave(first)
            batch = [first]
            key = first.batch_key
            if key is None or self.max_batch_size == 1:
                return batch
            start = time.monotonic()
            deadline, fill_deadline = start + self.batch_wait_s, start + self.batch_fill_s
            expected = self._expected_rows(key)
            while True:
                self._take_matching(key, batch)
                # Fill only while nothing else waits: requests of another kind would wait for the stragglers too.
                filling = len(batch) < expected and not self._pending
                until = max(deadline, fill_deadline) if filling else deadline
                remaining = until - time.monotonic()
                if len(batch) >= self.max_batch_size or remaining <= 0 or self._closed:
                    return batch
                self._condition.wait(remaining)

    def _take_matching(self, key: Any, batch: list[Job]) -> None:
        """Move waiting jobs with this key into the batch, oldest first; the others keep their order."""
        kept: deque[Job] = deque()
        while self._pending:
            job = self._pending.popleft()
            if job.stop.is_set():
                self._leave(job)
                continue
            if job.batch_key == key and len(batch) < self.max_batch_size:
                batch.append(job)
            else:
                kept.append(job)
        self._pending = kept

    def _run(self, batch: list[Job]) -> None:
        started = time.perf_counter()
        for job in batch:
            job.started_at, job.batch_size = started, len(batch)
        if len(batch) == 1:
            self._run_alone(batch[0])
            return
        first = batch[0]
        delivered = False
        try:
            events = self.manager.stream_batch(
                [job.messages for job in batch],
                [job.images for job in batch],
                k=first.method.k,
                schedule=first.method.schedule,
                sampling=first.sampling,
                stop_events=[job.stop for job in batch],
                max_new_tokens=[job.sampling.max_new_tokens for job in batch],
            )
            started_rows: set[int] = set()
            for row, event in events:
                delivered = True
                self._deliver(batch[row], event)
                if row not in started_rows:
                    started_rows.add(row)
                    if len(started_rows) == len(batch):  # every row's first token is out: let them be sent
                        hand_off(batch)
        except Exception as error:  # handed to the requests; the worker keeps serving
            if delivered:
                for job in batch:
                    self._deliver(job, error)
                return
            for job in batch:  # nothing was answered yet: find the culprit by running each alone
                job.batch_size = 1
                if not job.stop.is_set():  # a client that left meanwhile costs nothing
                    self._run_alone(job)

    def _run_alone(self, job: Job) -> None:
        """The same call the app and the CLI make for one request."""
        first = True
        try:
            for event in self.manager.stream(
                job.messages,
                job.images,
                k=job.method.k,
                schedule=job.method.schedule,
                sampling=job.sampling,
                stop_event=job.stop,
            ):
                self._deliver(job, event)
                if first:
                    first = False
                    hand_off([job])
        except Exception as error:
            self._deliver(job, error)


def hand_off(jobs: list[Job]) -> None:
    """Wait until the server has sent these jobs' first tokens (Job.handoff), at most HANDOFF_WAIT_S in all."""
    deadline = time.perf_counter() + HANDOFF_WAIT_S
    for job in jobs:
        if job.handoff is not None and not job.handoff.wait(max(0.0, deadline - time.perf_counter())):
            return
