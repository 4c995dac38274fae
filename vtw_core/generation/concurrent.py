"""Several streams at once, merged into one: what race mode needs, in-process or against a server."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

Item = TypeVar("Item")
StreamStarter = Callable[["AnyEvent"], Iterator[Item]]


class AnyEvent:
    """Set when any of the given events is set: the engine reads only `is_set()`."""

    def __init__(self, *events: threading.Event | AnyEvent | None):
        self.events = [event for event in events if event is not None]

    def is_set(self) -> bool:
        return any(event.is_set() for event in self.events)


def interleave(streams: dict[str, tuple[StreamStarter, threading.Event | None]]) -> Iterator[tuple[str, Any]]:
    """Run every stream in its own thread and yield (name, item) as items come.

    Each stream is started with a stop flag that is set when its own stop event is, or when the consumer
    stops reading (closing this iterator stops every stream and waits for them). The first error in any
    stream is raised here.
    """
    items: queue.Queue = queue.Queue()
    abandon = threading.Event()
    done = object()

    def run(name: str, start: StreamStarter, stop: threading.Event | None) -> None:
        try:
            for item in start(AnyEvent(abandon, stop)):
                items.put((name, item))
        except Exception as error:  # handed to the consumer, which re-raises it
            items.put((name, error))
        finally:
            items.put((name, done))

    threads = [
        threading.Thread(target=run, args=(name, start, stop), daemon=True) for name, (start, stop) in streams.items()
    ]
    for thread in threads:
        thread.start()
    try:
        running = len(threads)
        while running:
            name, item = items.get()
            if item is done:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield name, item
    finally:
        abandon.set()
        for thread in threads:
            thread.join()
