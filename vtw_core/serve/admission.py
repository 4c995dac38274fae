"""Admission control for one server: what a request must get before it may cost memory or compute.

A request whose structure, texts and image headers passed (cheap: no pixel decoded) takes a `Slot` at once
or gets a 503 at once:
- at most `max_waiting` requests wait (admitted, not yet running in the batcher), images being read or
  decoded included: the `--max-queue` of the model is also the queue of image decoding;
- the images of the admitted requests may hold at most `max_image_memory` bytes together (encoded bytes plus
  3 bytes per decoded pixel, counted from the headers; an image URL not read yet counts as the most it may be).
Then at most `max_decoding` requests decode their images at a time (`decoding`, an asyncio semaphore), so
that many clients at once cannot multiply the decoders' working memory. The slot is released when the
request ends: answered, refused, or left by its client.

Before all that, the bodies being received hold memory too: `BodyBudget` bounds their bytes in one process
(a body that would pass it gets a 503 at once).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from vtw_core.serve.errors import overloaded


class Slot:
    """One admitted request; `job` (the batcher's) is set once it is queued there."""

    def __init__(self, admission: Admission, memory: int):
        self.admission, self.memory = admission, memory
        self.job: Any = None
        self.released = False

    @property
    def waiting(self) -> bool:
        """Not running yet: reading or decoding images, or queued in the batcher."""
        return self.job is None or getattr(self.job, "started_at", None) is None

    def release(self) -> None:
        self.admission._release(self)


class Admission:
    def __init__(self, *, max_waiting: int = 64, max_decoding: int = 2, max_image_memory: int):
        if max_waiting < 1 or max_decoding < 1 or max_image_memory < 0:
            raise ValueError("max_waiting and max_decoding must be >= 1, max_image_memory >= 0")
        self.max_waiting, self.max_decoding, self.max_image_memory = max_waiting, max_decoding, max_image_memory
        self._decoding: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = None
        self._slots: set[Slot] = set()
        self._lock = threading.Lock()
        self.counts = {"admitted": 0, "refused": 0, "released": 0}

    def admit(self, memory: int) -> Slot:
        """A slot for a request whose images may hold `memory` bytes, or a 503 now (the client may retry)."""
        with self._lock:
            waiting = sum(slot.waiting for slot in self._slots)
            held = sum(slot.memory for slot in self._slots)
            if waiting >= self.max_waiting:
                self.counts["refused"] += 1
                raise overloaded(f"the server is busy ({waiting} requests waiting); retry later")
            if memory and held + memory > self.max_image_memory:
                self.counts["refused"] += 1
                raise overloaded(f"the server is busy (the images of the requests it holds take {held / 2**20:.0f} "
                                 "MB); retry later")  # fmt: skip
            slot = Slot(self, memory)
            self._slots.add(slot)
            self.counts["admitted"] += 1
            return slot

    @property
    def decoding(self) -> asyncio.Semaphore:
        """The decoders' semaphore, in the running event loop (a server has one; tests may start several)."""
        loop = asyncio.get_running_loop()
        if self._decoding is None or self._decoding[0] is not loop:
            self._decoding = (loop, asyncio.Semaphore(self.max_decoding))
        return self._decoding[1]

    @property
    def held_memory(self) -> int:
        with self._lock:
            return sum(slot.memory for slot in self._slots)

    def _release(self, slot: Slot) -> None:
        with self._lock:
            if not slot.released:
                slot.released = True
                self._slots.discard(slot)
                self.counts["released"] += 1


class BodyBudget:
    """Bytes of the request bodies being received at once, in one process: `take` them or get a 503 now."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.held = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> None:
        with self._lock:
            if self.held + size > self.max_bytes:
                raise overloaded(f"the server is busy receiving other requests ({self.held / 2**20:.0f} MB); "
                                 "retry later")  # fmt: skip
            self.held += size

    def give(self, size: int) -> None:
        with self._lock:
            self.held -= size
