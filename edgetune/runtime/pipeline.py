"""`prefetch`: a bounded producer/consumer pipeline, so decoding overlaps with backbone inference.

Computing features has two stages per batch: decode + preprocess the images (numpy, in Python) and
run the frozen graph (onnxruntime, which releases the GIL while it runs). In series the cores wait
on each other; here one producer thread prepares the next batches while the caller runs the current
one. The queue holds at most `depth` prepared batches, so memory stays bounded (Lite0: one batch
of 4 images is 2.4 MB), and results come out in the order of the inputs, each computed by the same
function as in series: the features are bit-identical (tests/test_pipeline.py).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

__all__ = ["prefetch"]

In = TypeVar("In")
Out = TypeVar("Out")

_DONE = object()  # the producer's last message


def prefetch(items: Iterable[In], produce: Callable[[In], Out], depth: int) -> Iterator[tuple[In, Out]]:
    """Yield `(item, produce(item))` in order, `produce` running up to `depth` items ahead in a thread.

    Args:
        items: the work, in order.
        produce: called once per item, in order, in one background thread (depth > 0).
        depth: how many produced results may wait; 0 runs everything in series in the caller.

    Yields:
        `(item, result)` pairs in the order of `items`.

    Raises:
        Whatever `produce` raised, in the caller, at the item that raised it (earlier results are
        yielded first). Closing the generator early (break, an exception in the caller) stops the
        producer and joins its thread.
    """
    if depth <= 0:
        for item in items:
            yield item, produce(item)
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(message: tuple) -> bool:
        """Put unless the consumer has gone; True when the producer should go on."""
        while not stop.is_set():
            try:
                ready.put(message, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in items:
                if stop.is_set() or not put((item, produce(item), None)):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            put((None, None, e))
            return
        put((_DONE, None, None))

    thread = threading.Thread(target=work, name="edgetune-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, result, error = ready.get()
            if error is not None:
                raise error
            if item is _DONE:
                return
            yield item, result
    finally:
        stop.set()
        thread.join()
