"""A browser session's state around a chat turn: the chat itself, per-session tickets, Stop and Clear, and the device.

`ChatState` is one session's conversation (plain data, so Gradio can copy it per session); `Sessions` issues a
ticket per request and answers whether Stop or Clear has cancelled it; `DeviceActivity` says what holds the
device now. Everything here is plain Python: no Gradio objects, no tensors.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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
    eta: float | None = None  # the K search threshold on the page when the turn was asked

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

    def display(self, side: str) -> list[dict[str, Any]]:
        """The side's chat as Gradio messages: each turn's images, its question, then the answer and its footer."""
        messages: list[dict[str, Any]] = []
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


class StopFlag:
    """`is_set()` for one request: true once Stop or Clear was pressed after the request was made."""

    def __init__(self, sessions: Sessions, session: str, ticket: int):
        self.sessions, self.session, self.ticket = sessions, session, ticket

    def is_set(self) -> bool:
        return self.sessions.stopped(self.session, self.ticket)


class Sessions:
    """Per browser session: request tickets, Stop and Clear, and whether a chat turn is in flight.

    A ticket is issued when the user acts, not when the queue starts the work, so a Stop pressed while the
    request still waits in the queue cancels it as well as a running one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._issued: dict[str, int] = {}
        self._stopped: dict[str, int] = {}
        self._cleared: dict[str, int] = {}
        self._busy: dict[str, int] = {}
        self._refused: set[str] = set()

    def refuse(self, session: str) -> None:
        """A question sent while a turn ran was refused (and kept in the box): say so when the turn ends."""
        with self._lock:
            self._refused.add(session)

    def take_refused(self, session: str) -> bool:
        with self._lock:
            refused = session in self._refused
            self._refused.discard(session)
            return refused

    def issue(self, session: str, turn: bool = False) -> int | None:
        """A new ticket; for a chat turn (`turn=True`) None while another turn of the session is in flight."""
        with self._lock:
            if turn and session in self._busy:
                return None
            ticket = self._issued[session] = self._issued.get(session, 0) + 1
            if turn:
                self._busy[session] = ticket
            return ticket

    def finish(self, session: str, ticket: int | None) -> None:
        with self._lock:
            if ticket is not None and self._busy.get(session) == ticket:
                del self._busy[session]

    def busy(self, session: str) -> bool:
        with self._lock:
            return session in self._busy

    def stop(self, session: str) -> None:
        """Cancel every request of the session made so far, running or queued."""
        with self._lock:
            self._stopped[session] = self._issued.get(session, 0)

    def clear(self, session: str) -> None:
        """Stop, and tell running turns that their chat is gone (they must not write to the page again)."""
        with self._lock:
            self._stopped[session] = self._cleared[session] = self._issued.get(session, 0)

    def stopped(self, session: str, ticket: int) -> bool:
        with self._lock:
            return ticket <= self._stopped.get(session, 0)

    def cleared(self, session: str, ticket: int) -> bool:
        with self._lock:
            return ticket <= self._cleared.get(session, 0)

    def flag(self, session: str, ticket: int) -> StopFlag:
        return StopFlag(self, session, ticket)


class DeviceActivity:
    """What holds the device now, for the page to say why a request waits."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: dict[int, tuple[str, float]] = {}
        self._next = 0

    @contextmanager
    def running(self, label: str) -> Iterator[None]:
        with self._lock:
            self._next += 1
            key = self._next
            self._running[key] = (label, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                self._running.pop(key, None)

    def describe(self) -> str:
        with self._lock:
            items = list(self._running.values())
        if not items:
            return "the device is free"
        now = time.monotonic()
        return "running now: " + ", ".join(f"{label} ({now - start:.0f} s)" for label, start in items)
