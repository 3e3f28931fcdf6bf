"""`run_workers`: one function on several threads at once, the caller's thread being worker 0.

The training step's passes (`Module`) and the optimizer's blocks (`Optimizer.step`) split their work
this way: numpy releases the GIL in its loops and matrix products, so the threads use every core.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


def run_workers(work: Callable[[int], None], count: int) -> None:
    """Call `work(0)` on this thread and `work(1)` ... `work(count - 1)` on threads of their own; wait for all.

    The first error a worker raised is raised here, once every worker has finished, so the caller
    can undo what the others did.
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
        raise errors[0]
