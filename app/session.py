"""A browser session's state around a chat turn: the chat itself, the turn's state machine, Stop and Clear.

`ChatState` is one session's conversation (plain data, so Gradio can copy it per session); `Sessions` runs one
small state machine per session for its chat turn (`Phase` x `Event` -> `TRANSITIONS`) and issues the tickets
that Stop and Clear cancel; `DeviceActivity` says what holds the device now. Everything here is plain Python:
no Gradio objects, no tensors.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from vtw_core.models.prompts import Message, assistant_message, user_message
from vtw_core.models.videos import LIMITS, Video, read_video

SIDES = ("baseline", "vtw")
RunMode = Literal["sequential", "race"]
SKIPPED = "_skipped: Stop was pressed before this side ran_"
WAITING = "_waiting for the device…_"


@dataclass
class Turn:
    text: str
    image_paths: list[str]
    video_paths: list[str] = field(default_factory=list)
    # Frames sampled from each of the turn's videos, fixed when the turn is asked: later turns and Regenerate
    # show the model the same frames, whatever the control says by then.
    num_frames: int = LIMITS.default_frames


@dataclass(frozen=True)
class TurnSettings:
    """What the accelerated side runs for one turn, recorded with its answer (so a label can never go stale)."""

    method: str  # "vtw", "fastv:R" or "schedule:NAME", as the method control gives it
    k: int
    num_layers: int
    eta: float | None = None  # the eta of the session's K search that chose K; None for a K set by hand

    def label(self) -> str:
        """Short name of the accelerated side: "VTW K=9", "FastV K=3 R=0.5", "schedule g-search"."""
        if self.method == "vtw":
            return f"VTW K={self.k}"
        if self.method.startswith("fastv:"):
            return f"FastV K={fastv_layer(self.k, self.num_layers)} R={float(self.method.split(':', 1)[1]):g}"
        return f"schedule {Path(self.method.split(':', 1)[1]).stem}"

    def spoken(self) -> str:
        """The label for people: "VTW K = 9", "FastV K = 3 · R = 0.5"."""
        return self.label().replace("K=", "K = ").replace(" R=", " · R = ")


def fastv_layer(k: int, num_layers: int) -> int:
    """FastV prunes after a layer 1..N-1: the slider's K, clamped (K = 0 or N has no FastV meaning)."""
    return min(max(k, 1), num_layers - 1)


@dataclass
class ChatState:
    """One browser session's conversation. Plain data, so Gradio can copy it per session.

    A chat is a list of user turns (text, image paths and video paths) and, per side, the answers given so far.
    Each side sees its own earlier answers, as a user chatting with that model alone would.
    """

    turns: list[Turn] = field(default_factory=list)
    answers: dict[str, list[str]] = field(default_factory=lambda: {side: [] for side in SIDES})
    # Per answer: "waiting", "running", "done", "stopped" or "skipped", and the footer that names its settings.
    status: dict[str, list[str]] = field(default_factory=lambda: {side: [] for side in SIDES})
    footers: dict[str, list[str]] = field(default_factory=lambda: {side: [] for side in SIDES})
    results: dict[str, dict[str, Any] | None] = field(default_factory=lambda: {side: None for side in SIDES})
    settings: TurnSettings | None = None  # of the last answered turn
    k_used: int | None = None
    runs: int = 0  # turns answered so far: the side that runs first alternates with it
    first: str = "baseline"  # the side that ran first in the last turn
    timings: list[dict[str, Any]] = field(default_factory=list)  # one row per answered side: the timing chart
    notice: str = ""  # a note at the top of both panes, e.g. why this conversation started afresh

    def display(self, side: str) -> list[dict[str, Any]]:
        """The side's chat as Gradio messages: each turn's images, its question, then the answer and its footer."""
        messages: list[dict[str, Any]] = [{"role": "assistant", "content": self.notice}] if self.notice else []
        for index, turn in enumerate(self.turns):
            media = [*turn.image_paths, *turn.video_paths]
            messages.extend({"role": "user", "content": {"path": path}} for path in media)
            messages.append({"role": "user", "content": turn.text})
            if index < len(self.answers[side]):
                messages.append({"role": "assistant", "content": self._answer_markdown(side, index)})
        return messages

    def _answer_markdown(self, side: str, index: int) -> str:
        status = self.status[side][index] if index < len(self.status[side]) else "done"
        text = self.answers[side][index]
        if status == "skipped":
            text = SKIPPED
        elif status == "waiting":
            text = WAITING
        elif not text:
            text = "…"
        note = self.footers[side][index] if index < len(self.footers[side]) else ""
        return f"{text}\n\n<sub>⚙ {note}</sub>" if note else text

    def still_answering(self, side: str) -> bool:
        """Whether the side's last answer still waits for the device or streams."""
        return bool(self.status[side]) and self.status[side][-1] in ("waiting", "running")

    def answered(self) -> bool:
        """Whether the last turn's answers have all ended (done, stopped or skipped)."""
        return not any(self.still_answering(side) for side in SIDES)

    def conversation(self, side: str) -> tuple[list[Message], list[str]]:
        """The model's view of the chat for one side: messages ending with the last user turn, and image paths."""
        messages: list[Message] = []
        paths: list[str] = []
        for index, turn in enumerate(self.turns):
            messages.append(user_message(turn.text, num_images=len(turn.image_paths), num_videos=len(turn.video_paths)))
            paths.extend(turn.image_paths)
            if index < len(self.turns) - 1:
                messages.append(assistant_message(self.answers[side][index]))
        return messages, paths

    def has_video(self) -> bool:
        return any(turn.video_paths for turn in self.turns)

    def videos(self) -> list[Video]:
        """The chat's videos in prompt order, decoded with each turn's frame count (the same for both sides)."""
        return [read_video(path, turn.num_frames) for turn in self.turns for path in turn.video_paths]


class Phase(str, Enum):
    """Where a session's chat turn stands. Exactly one turn per session is queued, running or stopping."""

    IDLE = "idle"  # no turn in flight: a question or Regenerate is taken at once
    QUEUED = "queued"  # a turn was taken and its job waits for the device
    RUNNING = "running"  # the turn's job holds the device and streams the answers
    STOPPING = "stopping"  # Stop, Clear or a closed tab asked the running job to end; it ends at its next token


class Event(str, Enum):
    """What can happen to a session's turn: the user's actions, then the reports of the turn's queued job."""

    SEND = "send"
    REGENERATE = "regenerate"
    STOP = "stop"
    CLEAR = "clear"
    TAB_CLOSED = "tab-closed"
    DEVICE_GRANTED = "device-granted"  # the job of a turn starts on the device
    FINISHED = "finished"  # ... answered (or stopped: the answers end early)
    FAILED = "failed"  # ... failed, and said why
    CANCELLED = "cancelled"  # ... ended without answering, or the session's job was lost (see `Sessions`)


# Events a turn's job reports about itself: they carry its ticket, and one from an older turn changes nothing.
JOB_EVENTS = frozenset({Event.DEVICE_GRANTED, Event.FINISHED, Event.FAILED, Event.CANCELLED})
# Events that start a turn: taken in IDLE only, refused (the state unchanged) in every other state.
TURN_EVENTS = frozenset({Event.SEND, Event.REGENERATE})

_IDLE, _QUEUED, _RUNNING, _STOPPING = Phase
# The whole machine: the next phase for every phase and event. Nothing waits on anything outside the table:
# a queued turn that Stop, Clear or a closed tab cancels is IDLE at once (its job, when the device reaches it,
# finds its ticket gone and does nothing), and every job ends in FINISHED, FAILED or CANCELLED.
TRANSITIONS: dict[Phase, dict[Event, Phase]] = {
    _IDLE: {
        Event.SEND: _QUEUED,
        Event.REGENERATE: _QUEUED,
        Event.STOP: _IDLE,
        Event.CLEAR: _IDLE,
        Event.TAB_CLOSED: _IDLE,
        Event.DEVICE_GRANTED: _IDLE,  # a job whose turn was cancelled while it waited: nothing to run
        Event.FINISHED: _IDLE,
        Event.FAILED: _IDLE,
        Event.CANCELLED: _IDLE,
    },
    _QUEUED: {
        Event.SEND: _QUEUED,  # refused: the question stays in the box
        Event.REGENERATE: _QUEUED,  # refused
        Event.STOP: _IDLE,  # the turn is skipped before it ran
        Event.CLEAR: _IDLE,
        Event.TAB_CLOSED: _IDLE,
        Event.DEVICE_GRANTED: _RUNNING,
        Event.FINISHED: _IDLE,
        Event.FAILED: _IDLE,  # e.g. a bad parameter, found before any model work
        Event.CANCELLED: _IDLE,
    },
    _RUNNING: {
        Event.SEND: _RUNNING,  # refused
        Event.REGENERATE: _RUNNING,  # refused
        Event.STOP: _STOPPING,
        Event.CLEAR: _STOPPING,  # and the job never writes the page again
        Event.TAB_CLOSED: _STOPPING,
        Event.DEVICE_GRANTED: _RUNNING,  # a second report of the same start changes nothing
        Event.FINISHED: _IDLE,
        Event.FAILED: _IDLE,
        Event.CANCELLED: _IDLE,
    },
    _STOPPING: {
        Event.SEND: _STOPPING,  # refused until the job has let go of the device (its next token)
        Event.REGENERATE: _STOPPING,  # refused
        Event.STOP: _STOPPING,
        Event.CLEAR: _STOPPING,
        Event.TAB_CLOSED: _STOPPING,
        Event.DEVICE_GRANTED: _STOPPING,
        Event.FINISHED: _IDLE,
        Event.FAILED: _IDLE,
        Event.CANCELLED: _IDLE,
    },
}

# A job that should hold the device but has not for this long while the device sat idle is gone (e.g. the
# browser never delivered it, or the queue was full); the next action of its session cancels it.
LOST_AFTER_S = 1.0


def next_phase(phase: Phase, event: Event) -> Phase:
    return TRANSITIONS[phase][event]


@dataclass(frozen=True)
class Step:
    """One event applied to a session: the phases around it and what the handler must do."""

    event: Event
    before: Phase
    after: Phase
    ticket: int | None  # the turn concerned: a new ticket for a send taken, else the turn in flight (or None)
    accepted: bool  # False: a send refused (a turn is in flight) or a job event of an older turn (stale)
    recovered: bool = False  # the turn before was lost and has just been cancelled (its answers say so)


@dataclass
class _Record:
    phase: Phase = Phase.IDLE
    turn: int | None = None  # the ticket of the turn queued, running or stopping
    since: float = 0.0  # when the phase was entered
    refused: bool = False  # a question was refused while the turn ran: say so when it ends


class StopFlag:
    """`is_set()` for one request: true once Stop or Clear was pressed after the request was made."""

    def __init__(self, sessions: Sessions, session: str, ticket: int):
        self.sessions, self.session, self.ticket = sessions, session, ticket

    def is_set(self) -> bool:
        return self.sessions.stopped(self.session, self.ticket)


class Sessions:
    """Per browser session: the chat turn's state machine (`TRANSITIONS`), request tickets, Stop and Clear.

    Every handler moves a session's turn only through `fire`. A ticket is issued when the user acts, not when
    the queue starts the work, so Stop cancels a request that still waits in the queue as well as a running
    one; a K search or a benchmark (`issue`) is cancelled by the same Stop, Clear or closed tab.

    `device_idle_s` says how long the device has been idle: a turn still queued or running after the device
    sat idle for `LOST_AFTER_S` has lost its job, and the session's next action cancels it first.
    """

    def __init__(self, device_idle_s: Callable[[], float] = lambda: 0.0, clock: Callable[[], float] = time.monotonic):
        self._lock = threading.Lock()
        self._device_idle_s, self._clock = device_idle_s, clock
        self._records: dict[str, _Record] = {}
        self._issued: dict[str, int] = {}
        self._stopped: dict[str, int] = {}
        self._cleared: dict[str, int] = {}

    def fire(self, session: str, event: Event, ticket: int | None = None) -> Step:
        """Apply `event` to the session's turn. Job events name their turn's `ticket`; user events take none."""
        with self._lock:
            record = self._records.setdefault(session, _Record(since=self._clock()))
            recovered = False
            if event not in JOB_EVENTS and self._lost(record):
                self._move(session, record, Event.CANCELLED)
                recovered = True
            before = record.phase
            if event in JOB_EVENTS and (ticket is None or ticket != record.turn):
                return Step(event, before, before, record.turn, False, recovered)  # an older turn's job
            if event in TURN_EVENTS and before is not Phase.IDLE:
                record.refused = record.refused or event is Event.SEND  # a question kept in the box
                return Step(event, before, before, record.turn, False, recovered)
            concerned = record.turn
            self._move(session, record, event)
            return Step(event, before, record.phase, record.turn or concerned, True, recovered)

    def _move(self, session: str, record: _Record, event: Event) -> None:
        after = next_phase(record.phase, event)
        if event in TURN_EVENTS:
            record.turn = self._issue(session)
            record.refused = False
        if event in (Event.STOP, Event.CLEAR, Event.TAB_CLOSED):
            self._stopped[session] = self._issued.get(session, 0)  # every request so far, queued or running
        if event in (Event.CLEAR, Event.TAB_CLOSED):
            self._cleared[session] = self._issued.get(session, 0)  # running turns never write the page again
        if after is Phase.IDLE:
            record.turn = None
        if after is not record.phase:
            record.phase, record.since = after, self._clock()

    def _lost(self, record: _Record) -> bool:
        if record.phase is Phase.IDLE:
            return False
        waited = self._clock() - record.since
        return waited >= LOST_AFTER_S and self._device_idle_s() >= LOST_AFTER_S

    def phase(self, session: str) -> Phase:
        with self._lock:
            record = self._records.get(session)
            return record.phase if record else Phase.IDLE

    def take_refused(self, session: str) -> bool:
        """Whether a question was refused during the turn that just ended (then the page says it is kept)."""
        with self._lock:
            record = self._records.get(session)
            refused = bool(record and record.refused)
            if record:
                record.refused = False
            return refused

    def _issue(self, session: str) -> int:
        ticket = self._issued[session] = self._issued.get(session, 0) + 1
        return ticket

    def issue(self, session: str) -> int:
        """A ticket for a request outside the chat's turns (a K search, a benchmark): Stop and Clear reach it."""
        with self._lock:
            return self._issue(session)

    def stop(self, session: str) -> Step:
        """Cancel every request of the session made so far, running or queued."""
        return self.fire(session, Event.STOP)

    def clear(self, session: str) -> Step:
        """Stop, and tell running turns that their chat is gone (they must not write to the page again)."""
        return self.fire(session, Event.CLEAR)

    def close(self, session: str) -> Step:
        """The page is gone: cancel its turn, K search or benchmark; its turn's job ends quietly."""
        return self.fire(session, Event.TAB_CLOSED)

    def stopped(self, session: str, ticket: int) -> bool:
        with self._lock:
            return ticket <= self._stopped.get(session, 0)

    def cleared(self, session: str, ticket: int) -> bool:
        with self._lock:
            return ticket <= self._cleared.get(session, 0)

    def flag(self, session: str, ticket: int) -> StopFlag:
        return StopFlag(self, session, ticket)


class DeviceActivity:
    """What holds the device now, and whose it is, for the page to say why a request waits.

    `whose` names the session of the request being handled (None outside one); the page says "your K search"
    for the viewer's own work.
    """

    def __init__(self, whose: Callable[[], str | None] = lambda: None, clock: Callable[[], float] = time.monotonic):
        self._lock = threading.Lock()
        self._whose, self._clock = whose, clock
        self._running: dict[int, tuple[str, str | None, float]] = {}
        self._next = 0
        self._free_since = clock()

    @contextmanager
    def running(self, label: str) -> Iterator[None]:
        """Hold the device for `label` ("a K search"): the page names it while other requests wait."""
        with self._lock:
            self._next += 1
            key = self._next
            self._running[key] = (label, self._whose(), self._clock())
        try:
            yield
        finally:
            with self._lock:
                self._running.pop(key, None)
                if not self._running:
                    self._free_since = self._clock()

    def idle_for(self) -> float:
        """Seconds since the device was last released; 0 while a request holds it."""
        with self._lock:
            return 0.0 if self._running else self._clock() - self._free_since

    def describe(self) -> str:
        """What runs now, the viewer's own work named as such ("your K search (12 s)"); "" when the device is free."""
        viewer = self._whose()
        with self._lock:
            items = list(self._running.values())
        now = self._clock()
        parts = []
        for label, owner, start in items:
            if viewer is not None and owner == viewer:
                label = "your " + label.split(" ", 1)[-1]  # "a K search" -> "your K search"
            parts.append(f"{label} ({now - start:.0f} s)")
        return ", ".join(parts)
