"""The chat turn's state machine (app.session): every state x event, and the session bookkeeping around it.

Plain Python, no model and no browser: the whole file runs in well under a second.
"""

from __future__ import annotations

import pytest

from app.session import JOB_EVENTS, LOST_AFTER_S, TRANSITIONS, DeviceActivity, Event, Phase, Sessions, next_phase

IDLE, QUEUED, RUNNING, STOPPING = Phase.IDLE, Phase.QUEUED, Phase.RUNNING, Phase.STOPPING
EVENTS = [
    Event.SEND,
    Event.REGENERATE,
    Event.STOP,
    Event.CLEAR,
    Event.TAB_CLOSED,
    Event.DEVICE_GRANTED,
    Event.FINISHED,
    Event.FAILED,
    Event.CANCELLED,
]
# The expected table, written out independently of the code: one row per state, one column per event above.
EXPECTED = {
    IDLE: [QUEUED, QUEUED, IDLE, IDLE, IDLE, IDLE, IDLE, IDLE, IDLE],
    QUEUED: [QUEUED, QUEUED, IDLE, IDLE, IDLE, RUNNING, IDLE, IDLE, IDLE],
    RUNNING: [RUNNING, RUNNING, STOPPING, STOPPING, STOPPING, RUNNING, IDLE, IDLE, IDLE],
    STOPPING: [STOPPING, STOPPING, STOPPING, STOPPING, STOPPING, STOPPING, IDLE, IDLE, IDLE],
}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_table_covers_every_state_and_event():
    assert set(TRANSITIONS) == set(Phase) and set(EVENTS) == set(Event)
    for phase in Phase:
        assert set(TRANSITIONS[phase]) == set(Event), phase


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("event", EVENTS)
def test_every_state_and_event_has_its_next_state(phase, event):
    assert next_phase(phase, event) is EXPECTED[phase][EVENTS.index(event)]


def test_no_state_is_absorbing_and_idle_is_reachable_from_every_state():
    for phase in Phase:
        assert any(next_phase(phase, event) is not phase for event in Event), phase
    # Idle is one event away from every state: a page can always take a new question again.
    for phase in Phase:
        assert any(next_phase(phase, event) is IDLE for event in Event), phase
    # ... and every state is reachable from idle.
    seen, frontier = {IDLE}, [IDLE]
    while frontier:
        phase = frontier.pop()
        for event in Event:
            after = next_phase(phase, event)
            if after not in seen:
                seen.add(after)
                frontier.append(after)
    assert seen == set(Phase)


def enter(sessions: Sessions, phase: Phase, session: str = "a") -> int | None:
    """Drive a session into `phase` through its events; returns the turn's ticket (None when idle)."""
    if phase is IDLE:
        return None
    ticket = sessions.fire(session, Event.SEND).ticket
    if phase in (RUNNING, STOPPING):
        assert sessions.fire(session, Event.DEVICE_GRANTED, ticket).accepted
    if phase is STOPPING:
        sessions.fire(session, Event.STOP)
    assert sessions.phase(session) is phase
    return ticket


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("event", EVENTS)
def test_sessions_follow_the_table(phase, event):
    """Through `Sessions.fire`, with the job events naming the turn in flight: the table, for every pair."""
    sessions = Sessions()
    ticket = enter(sessions, phase)
    step = sessions.fire("a", event, ticket if event in JOB_EVENTS else None)
    expected = EXPECTED[phase][EVENTS.index(event)]
    if event in JOB_EVENTS and ticket is None:
        expected = IDLE  # idle: no turn to report on, the event is stale
    assert (step.before, step.after, sessions.phase("a")) == (phase, expected, expected)
    taken = event in (Event.SEND, Event.REGENERATE) and phase is IDLE
    refused = event in (Event.SEND, Event.REGENERATE) and phase is not IDLE
    assert step.accepted is (not refused and not (event in JOB_EVENTS and ticket is None))
    if taken:
        assert step.ticket is not None and step.ticket != ticket  # a new turn, a new ticket
    assert sessions.phase("b") is IDLE  # other sessions never move


def test_a_job_of_an_older_turn_changes_nothing():
    """The freeze: a turn cancelled while queued, then a new one; the old turn's job arrives first."""
    sessions = Sessions()
    old = sessions.fire("a", Event.SEND).ticket
    stopped = sessions.fire("a", Event.STOP)
    assert (stopped.before, stopped.after, stopped.ticket) == (QUEUED, IDLE, old)
    new = sessions.fire("a", Event.SEND).ticket  # a question after Stop is taken at once
    assert new != old and sessions.phase("a") is QUEUED
    late = sessions.fire("a", Event.DEVICE_GRANTED, old)  # the cancelled turn's job reaches the device
    assert not late.accepted and sessions.phase("a") is QUEUED
    assert not sessions.fire("a", Event.FINISHED, old).accepted and sessions.phase("a") is QUEUED
    assert not sessions.fire("a", Event.DEVICE_GRANTED, None).accepted  # a refused send's job: no ticket
    assert sessions.fire("a", Event.DEVICE_GRANTED, new).accepted and sessions.phase("a") is RUNNING
    assert sessions.fire("a", Event.FINISHED, new).after is IDLE


def test_refused_sends_are_remembered_until_the_turn_ends():
    sessions = Sessions()
    ticket = enter(sessions, RUNNING)
    refused = sessions.fire("a", Event.SEND)
    assert not refused.accepted and refused.ticket == ticket and sessions.phase("a") is RUNNING
    sessions.fire("a", Event.FINISHED, ticket)
    assert sessions.take_refused("a") and not sessions.take_refused("a")


def test_stop_and_clear_reach_queued_requests_and_jobs():
    sessions = Sessions()
    turn = enter(sessions, RUNNING)
    search = sessions.issue("a")  # e.g. a K search waiting behind the turn
    other = sessions.fire("b", Event.SEND).ticket
    sessions.stop("a")
    assert sessions.stopped("a", turn) and sessions.flag("a", search).is_set()
    assert not sessions.cleared("a", turn) and not sessions.stopped("b", other)
    later = sessions.issue("a")
    assert not sessions.stopped("a", later)  # Stop cancels what was asked before it, not after
    sessions.clear("a")
    assert sessions.cleared("a", later) and sessions.phase("a") is STOPPING
    sessions.fire("a", Event.FINISHED, turn)
    assert sessions.phase("a") is IDLE and sessions.phase("b") is QUEUED
    closed = sessions.close("b")  # the tab is gone: its queued turn is dropped
    assert (closed.before, closed.after) == (QUEUED, IDLE) and sessions.cleared("b", other)


def test_a_lost_job_is_cancelled_by_the_next_action_once_the_device_sat_idle():
    clock, idle = Clock(), {"s": 0.0}
    sessions = Sessions(device_idle_s=lambda: idle["s"], clock=clock)
    ticket = enter(sessions, QUEUED)
    clock.now += 10 * LOST_AFTER_S
    refused = sessions.fire("a", Event.SEND)  # the device is busy (another tab's search): still waiting
    assert not refused.accepted and not refused.recovered and sessions.phase("a") is QUEUED
    idle["s"] = LOST_AFTER_S / 2
    assert not sessions.fire("a", Event.SEND).accepted  # idle, but not for long: the job may be starting
    idle["s"] = LOST_AFTER_S
    taken = sessions.fire("a", Event.SEND)  # idle for a while and never granted: the job is lost
    assert taken.accepted and taken.recovered and taken.before is IDLE and taken.ticket != ticket
    assert not sessions.fire("a", Event.DEVICE_GRANTED, ticket).accepted  # should it ever arrive
    # A turn that just changed phase is never taken for lost, however long the device was idle.
    assert not sessions.fire("a", Event.SEND).accepted


def test_device_activity_names_what_runs_and_whose_it_is():
    clock, viewer = Clock(), {"session": None}
    activity = DeviceActivity(whose=lambda: viewer["session"], clock=clock)
    assert activity.describe() == ""
    clock.now += 3
    assert activity.idle_for() == 3
    viewer["session"] = "a"
    with activity.running("a K search"):
        clock.now += 12
        assert activity.idle_for() == 0
        assert activity.describe() == "your K search (12 s)"  # the viewer's own search
        viewer["session"] = "b"
        assert activity.describe() == "a K search (12 s)"
    clock.now += 2
    assert activity.idle_for() == 2 and activity.describe() == ""
