"""`run_workers`: one function on several threads at once, the caller's thread being worker 0.

The training step's passes (`Module`) and the optimizer's blocks (`Optimizer.step`) split their work
this way: numpy releases the GIL in its loops and matrix products, so the threads use every core.
`Meeting` is where the passes of one batch sum what an op needs from all of them (a BatchNorm's
batch statistics), as `torch.distributed.all_reduce` does across processes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class Meeting:
    """Where `count` threads, each running part of one batch, sum a value each and all get the total.

    The total is added in thread order whoever arrives first, so a run repeats bit for bit. Every
    thread must call `sum` the same number of times; one that fails calls `abort`, which raises
    `threading.BrokenBarrierError` in the threads waiting for it instead of leaving them waiting.
    """

    def __init__(self, count: int) -> None:
        self._parts: list[Any] = [None] * count
        self._barrier = threading.Barrier(count)

    def sum(self, index: int, value: Any) -> Any:
        """Thread `index`'s `value` plus every other thread's (numpy arrays of one shape, or numbers)."""
        self._parts[index] = value
        self._barrier.wait()
        total = self._parts[0]
        for part in self._parts[1:]:
            total = total + part
        self._barrier.wait()  # no thread writes its next part before every thread has read this one
        return total

    def abort(self) -> None:
        """Stop the meeting: threads waiting in `sum`, and any that come later, get `BrokenBarrierError`."""
        self._barrier.abort()


class Peers:
    """One thread's seat at a `Meeting`: what an op that mixes samples holds while a split batch runs."""

    def __init__(self, meeting: Meeting, index: int) -> None:
        self.meeting, self.index = meeting, index

    def sum(self, value: Any) -> Any:
        """`value` summed over the batch's threads (see `Meeting.sum`)."""
        return self.meeting.sum(self.index, value)


def run_workers(work: Callable[[int], None], count: int) -> None:
    """Call `work(0)` on this thread and `work(1)` ... `work(count - 1)` on threads of their own; wait for all.

    The first error a worker raised is raised here, once every worker has finished, so the caller
    can undo what the others did; a `threading.BrokenBarrierError` (a worker stopped because another
    failed, see `Meeting.abort`) only when no worker raised anything else.
    """
    errors: list[BaseException] = []

    def guarded(w: int) -> None:
        try:
            work(w)
        except BaseException as e:  # re-raised by the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=guarded, args=(w,), daemon=True) for w in range(1, count)]
    for t in threads:
        t.start()
    guarded(0)
    for t in threads:
        t.join()
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
