"""Batches that shrink: a row given up, past its own max_new_tokens or at its end token leaves the engine's batch.

The others go on alone and give their solo tokens. The engine's batch size per decode step is read from a spy
on the decode engine (`_Decoder.__call__`, the one entry of every decode step, whatever the engine).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import ClassVar

import pytest
import torch

from vtw_core.engine.decoder import prefill, withdrawal_selector
from vtw_core.engine.embed import embed_prompt
from vtw_core.engine.fast_decode import static_decode_step
from vtw_core.engine.methods import parse_method
from vtw_core.errors import InputError
from vtw_core.generation import generate as generate_module
from vtw_core.generation.batch_stream import stream_generate_batch
from vtw_core.generation.generate import _Decoder, generate_rows, generate_tokens
from vtw_core.generation.manager import ModelManager
from vtw_core.generation.types import SamplingConfig, StreamEvent
from vtw_core.models.prompts import build_model_inputs, user_message
from vtw_core.serve.batching import Batcher, Job

FAMILIES = ["llava", "llava_next", "qwen2_vl"]  # as the batched-rows test of test_serve_batching
PROMPTS = ["Hi", "What is it?", "Describe."]


@pytest.fixture(scope="module")
def managers(tiny_model_path):
    loaded: dict[str, ModelManager] = {}

    def get(family: str) -> ModelManager:
        if family not in loaded:
            loaded[family] = ModelManager.load(str(tiny_model_path(family)), device="cpu")
        return loaded[family]

    return get


@pytest.fixture
def decode_batches(monkeypatch) -> list[int]:
    """The number of rows fed to each decode step from now on."""
    sizes: list[int] = []
    original = _Decoder.__call__

    def spy(self, tokens: torch.Tensor) -> torch.Tensor:
        sizes.append(tokens.shape[0])
        return original(self, tokens)

    monkeypatch.setattr(_Decoder, "__call__", spy)
    return sizes


def rows_of(sample_images):
    """Three rows of different lengths; the middle one, with two images, is the longest (its padding goes too)."""
    conversations = [[user_message(PROMPTS[0], num_images=1)], [user_message(PROMPTS[1], num_images=2)],
                     [user_message(PROMPTS[2], num_images=0)]]  # fmt: skip
    return conversations, [[sample_images[0]], [sample_images[1], sample_images[2]], []]


def solo(manager: ModelManager, conversation, images, max_new_tokens: int, **options) -> list[int]:
    result = manager.generate(conversation, images, sampling=SamplingConfig(max_new_tokens=max_new_tokens), **options)
    return result.token_ids


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("engine", ["static", "plain"])
@pytest.mark.parametrize("method", ["vtw:1", "fastv:1:0.5"])
def test_a_row_given_up_leaves_the_batch_and_the_others_keep_their_solo_tokens(
    managers, sample_images, decode_batches, family, engine, method
):
    manager = managers(family)
    spec = parse_method(method, manager.info.num_layers)
    conversations, images = rows_of(sample_images)
    stops = [threading.Event() for _ in conversations]
    events: dict[int, list[StreamEvent]] = {0: [], 1: [], 2: []}
    for row, event in stream_generate_batch(manager.model, manager.processor, conversations, images, k=spec.k,
                                            schedule=spec.schedule, sampling=SamplingConfig(max_new_tokens=8),
                                            stop_events=stops, engine=engine):  # fmt: skip
        events[row].append(event)
        if row == 1 and len(events[1]) == 2:
            stops[1].set()  # the client of row 1 leaves after its 2nd token
    # Decode step 1 makes every row's 2nd token; from step 2 on, row 1 is out of the batch.
    assert decode_batches == [3] + [2] * 6
    for row in (0, 2):
        final = events[row][-1]
        alone = solo(manager, conversations[row], images[row], 8, k=spec.k, schedule=spec.schedule, engine=engine)
        assert final.finished and final.token_ids == alone, (family, row)
        assert len(alone) == 8 and final.stats.finish_reason == "length"
        assert [event.finished for event in events[row]] == [False] * 8 + [True]
    stopped = events[1][-1]
    assert stopped.finished and stopped.stats.finish_reason == "stopped"
    assert len(stopped.token_ids) == 2 and stopped.stats.new_tokens == 2


def test_when_every_row_is_given_up_the_call_ends(managers, sample_images, decode_batches):
    manager = managers("llava")
    conversations, images = rows_of(sample_images)
    stops = [threading.Event() for _ in conversations]
    finals = {}
    for row, event in manager.stream_batch(conversations, images, k=1, sampling=SamplingConfig(max_new_tokens=50),
                                           stop_events=stops):  # fmt: skip
        if event.finished:
            finals[row] = event
        elif len(event.token_ids) == 3:
            stops[row].set()
    assert decode_batches == [3, 3]  # the 3rd tokens were the last ones made
    assert sorted(finals) == [0, 1, 2]
    assert all(final.stats.finish_reason == "stopped" and final.stats.new_tokens == 3 for final in finals.values())


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_stop_at_their_own_max_new_tokens(managers, sample_images, decode_batches, family):
    manager = managers(family)
    conversations, images = rows_of(sample_images)
    limits = [3, 7, 5]
    finals = {}
    for row, event in manager.stream_batch(conversations, images, k=1, sampling=SamplingConfig(max_new_tokens=2),
                                           max_new_tokens=limits):  # fmt: skip
        if event.finished:
            finals[row] = event
    assert decode_batches == [3, 3, 2, 2, 1, 1]  # the static buffers hold 7 new tokens: the largest limit
    for row, limit in enumerate(limits):
        alone = solo(manager, conversations[row], images[row], limit, k=1)
        assert len(alone) == limit and finals[row].token_ids == alone, (family, row)
        assert finals[row].stats.finish_reason == "length" and finals[row].stats.new_tokens == limit


def test_generate_tokens_pads_the_rows_that_left(managers, sample_images, decode_batches):
    """`generate_tokens` keeps its full columns (pad for rows that ended); underneath, those rows are gone."""
    manager = managers("qwen2_vl")
    conversations, images = rows_of(sample_images)
    inputs = build_model_inputs(manager.processor, conversations, images, manager.model.device, manager.model.dtype)
    columns = list(generate_tokens(manager.model, inputs, k=1, max_new_tokens=[2, 4, 1], pad_token_id=-1))
    assert [column.tolist().count(-1) for column in columns] == [0, 1, 2, 2]
    assert decode_batches == [2, 1, 1]  # row 2 ends with its first token, row 0 with its second
    steps = list(generate_rows(manager.model, inputs, k=1, max_new_tokens=[2, 4, 1]))
    assert [rows for rows, _ in steps] == [[0, 1, 2], [0, 1], [1], [1]]
    for (rows, tokens), column in zip(steps, columns, strict=True):
        assert tokens.tolist() == column[rows].tolist()


def test_per_row_settings_are_checked(managers, sample_images):
    manager = managers("llava")
    conversations, images = rows_of(sample_images)
    with pytest.raises(InputError, match="max_new_tokens has 2 limits for 3 rows"):
        list(manager.stream_batch(conversations, images, max_new_tokens=[4, 4]))
    with pytest.raises(InputError, match="max_new_tokens"):
        list(manager.stream_batch(conversations, images, max_new_tokens=[4, 0, 4]))
    with pytest.raises(InputError, match="stop_events has 1 events for 3 rows"):
        list(manager.stream_batch(conversations, images, stop_events=[threading.Event()]))


class FakeGraph:
    """A stand-in for the CUDA-graph step on CPU: the eager step on the state it was "captured" for."""

    captured: ClassVar[list[int]] = []

    def __init__(self, model, state):
        self.model, self.state = model, state
        FakeGraph.captured.append(state.input_ids.shape[0])

    def __call__(self) -> torch.Tensor:
        return static_decode_step(self.model, self.state)


def test_the_graph_engine_captures_again_for_the_smaller_batch(managers, sample_images, monkeypatch):
    """The captured graph holds the old buffers; after rows leave, the next step captures a new one."""
    manager = managers("llava")
    model = manager.model
    conversations, images = rows_of(sample_images)
    inputs = build_model_inputs(manager.processor, conversations, images, model.device, model.dtype)

    def run(engine: str) -> list[list[int]]:
        logits, state = prefill(model, embed_prompt(model, inputs), withdrawal_selector(1, 4))
        decode = _Decoder(model, state, engine, 6, None)
        tokens, rows, made = logits.argmax(-1), [0, 1, 2], [[], [], []]
        for step in range(6):
            for place, row in enumerate(rows):
                made[row].append(int(tokens[place]))
            if step == 1:  # row 1 (the longest prompt) leaves, then row 0
                keep = torch.tensor([0, 2])
            elif step == 3:
                keep = torch.tensor([1])
            else:
                keep = None
            if keep is not None:
                decode.select_rows(keep)
                tokens, rows = tokens[keep], [rows[place] for place in keep.tolist()]
            tokens = decode(tokens).argmax(-1)
        return made

    monkeypatch.setattr(generate_module, "GraphedDecodeStep", FakeGraph)
    FakeGraph.captured = []
    assert run("graph") == run("static") == run("plain")
    assert FakeGraph.captured == [3, 2, 1]


def make_job(manager, images, text, sampling, deliver) -> Job:
    return Job([user_message(text, num_images=len(images))], images,
               parse_method("vtw:1", manager.info.num_layers), sampling, deliver)  # fmt: skip


def run_batched(manager, jobs: list[Job], done: list[threading.Event]) -> None:
    batcher = Batcher(manager, max_batch_size=8, batch_wait_ms=200)
    try:
        with manager.lock:  # every job is queued before the worker can start the first batch
            for job in jobs:
                batcher.submit(job)
        for event in done:
            assert event.wait(120)
    finally:
        batcher.close()


def collector() -> tuple[list, threading.Event, Callable]:
    events, done = [], threading.Event()

    def deliver(item):
        events.append(item)
        if isinstance(item, BaseException) or item.finished:
            done.set()

    return events, done, deliver


def test_the_batcher_batches_requests_that_differ_only_in_max_tokens(managers, sample_images, decode_batches,
                                                                     monkeypatch):  # fmt: skip
    manager = managers("llava")
    calls = []
    original = manager.stream_batch

    def counted(*args, **options):
        calls.append(options)
        return original(*args, **options)

    monkeypatch.setattr(manager, "stream_batch", counted)
    limits = [3, 7, 5]
    collected = [collector() for _ in limits]
    delivers = [deliver for _, _, deliver in collected]
    jobs = [make_job(manager, [image], text, SamplingConfig(max_new_tokens=limit), deliver)
            for image, text, limit, deliver in zip(sample_images, PROMPTS, limits, delivers, strict=True)]  # fmt: skip
    assert len({job.batch_key for job in jobs}) == 1
    run_batched(manager, jobs, [done for _, done, _ in collected])
    assert len(calls) == 1 and calls[0]["max_new_tokens"] == limits  # one engine call for the three
    assert decode_batches == [3, 3, 2, 2, 1, 1]
    for job, (events, _, _), image, text, limit in zip(jobs, collected, sample_images, PROMPTS, limits, strict=True):
        assert job.batch_size == 3
        alone = solo(manager, [user_message(text, num_images=1)], [image], limit, k=1)
        assert len(alone) == limit and events[-1].token_ids == alone
        assert events[-1].stats.finish_reason == "length"


def test_a_client_leaving_a_running_batch_costs_fewer_decode_steps(managers, sample_images, decode_batches):
    manager = managers("llava")
    collected = [collector() for _ in PROMPTS]
    sampling = SamplingConfig(max_new_tokens=8)
    jobs = [make_job(manager, [image], text, sampling, deliver)
            for image, text, (_, _, deliver) in zip(sample_images, PROMPTS, collected, strict=True)]  # fmt: skip
    leaving_events, _, leaving_deliver = collected[1]

    def leave_after_two_tokens(item) -> None:  # what the server does when the client disconnects
        leaving_deliver(item)
        if isinstance(item, StreamEvent) and len(item.token_ids) == 2 and not item.finished:
            jobs[1].stop.set()

    jobs[1].deliver = leave_after_two_tokens
    run_batched(manager, jobs, [done for _, done, _ in collected])
    assert [job.batch_size for job in jobs] == [3, 3, 3]
    assert leaving_events[-1].stats.finish_reason == "stopped" and len(leaving_events[-1].token_ids) == 2
    for index in (0, 2):
        assert len(collected[index][0][-1].token_ids) == 8
    # The longest rows took 7 decode steps; the one that left took part in one of them only.
    assert decode_batches == [3] + [2] * 6
