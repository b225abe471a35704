"""A producer on background threads read as an iterator, with flat memory.

Archive listings (S3 sub-prefixes, a PACS's studies) come fastest from several threads at once,
while their consumer (the manifest writer) wants one ordered stream it can stop at any point.
:func:`stream_threads` runs the producer on a thread of its own (which may start a pool) and
yields what it puts through a bounded queue: a producer that runs ahead blocks instead of
holding the whole listing in memory.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

Producer = Callable[[Callable[[Any], None], threading.Event], None]


def stream_threads(produce: Producer, *, maxsize: int, name: str) -> Iterator[Any]:
    """Run ``produce(put, stop)`` on a background thread named ``name`` and yield each item it
    ``put``\\ s, in the order put, with at most ``maxsize`` items waiting.

    When the consumer stops early (``close()``, ``break``, an exception) ``stop`` is set and the
    queue drained until the producer's thread ends, so that its pool can finish; producers check
    ``stop`` between requests. An exception raised by ``produce`` is raised here, after the
    items put before it.
    """
    items: queue.Queue = queue.Queue(maxsize=maxsize)
    done = object()
    errors: list[BaseException] = []
    stop = threading.Event()

    def run() -> None:
        try:
            produce(items.put, stop)
        except BaseException as exc:  # surfaced in the consumer
            errors.append(exc)
            stop.set()
        finally:
            items.put(done)

    runner = threading.Thread(target=run, name=name, daemon=True)
    runner.start()
    try:
        while True:
            item = items.get()
            if item is done:
                break
            yield item
    finally:
        stop.set()
        while runner.is_alive():  # unblock the producer so that it (and its pool) can finish
            try:
                items.get(timeout=0.1)
            except queue.Empty:
                pass
    if errors:
        raise errors[0]
