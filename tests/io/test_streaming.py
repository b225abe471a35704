"""A background producer read as an iterator: order, bounded memory, early stop, errors."""

from __future__ import annotations

import threading
import time

import pytest

from medhier.io.streaming import stream_threads


def _counting(n: int, produced: list[int], stopped: threading.Event | None = None):
    def produce(put, stop):
        for i in range(n):
            if stop.is_set():
                if stopped is not None:
                    stopped.set()
                return
            produced.append(i)
            put(i)

    return produce


def test_items_arrive_in_order_and_complete():
    produced: list[int] = []
    assert list(stream_threads(_counting(1000, produced), maxsize=4, name="t")) == list(range(1000))


def test_a_producer_ahead_of_its_consumer_waits_instead_of_filling_memory():
    produced: list[int] = []
    stream = stream_threads(_counting(10_000, produced), maxsize=8, name="t")
    assert next(stream) == 0
    time.sleep(0.3)  # the producer runs ahead as far as the queue lets it
    assert len(produced) <= 8 + 2  # queue + the item in flight + the one taken
    stream.close()


def test_a_consumer_that_stops_early_stops_the_producer_and_its_thread():
    produced: list[int] = []
    stopped = threading.Event()
    stream = stream_threads(_counting(10_000_000, produced, stopped), maxsize=4, name="medhier-test-stream")
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    assert stopped.wait(5)
    assert not any(t.name == "medhier-test-stream" for t in threading.enumerate())
    assert len(produced) < 100


def test_a_producer_error_is_raised_after_the_items_before_it():
    def produce(put, stop):
        put("a")
        put("b")
        raise ConnectionError("archive stopped answering")

    seen = []
    with pytest.raises(ConnectionError, match="stopped answering"):
        for item in stream_threads(produce, maxsize=1, name="t"):
            seen.append(item)
    assert seen == ["a", "b"]
