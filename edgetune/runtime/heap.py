"""The C heap under numpy's arrays: what glibc keeps after a large tensor is freed.

Both calls are best effort (glibc only; musl, bionic, macOS and Windows keep their defaults):
the results never depend on them, only the peak memory a run reaches.
"""

from __future__ import annotations

import ctypes

_M_ARENA_MAX = -8  # mallopt parameter (glibc's malloc.h)


def trim() -> None:
    """Return the heap's free memory to the operating system (`malloc_trim`)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (AttributeError, OSError, TypeError):
        pass


def one_arena() -> None:
    """Let threads started from now on allocate from the heap the process already has.

    glibc gives each new thread an arena of its own, and a thread's freed tensors stay in its
    arena for that thread alone: the training step's pass threads (`Module`) then held a second
    copy of a pass's activations, +33 MB peak on Lite0's last-stage seed run (315 -> 281 MB
    measured with `MALLOC_ARENA_MAX=1`). The few large allocations a pass makes do not contend.
    """
    try:
        ctypes.CDLL(None).mallopt(_M_ARENA_MAX, 1)
    except (AttributeError, OSError, TypeError):
        pass
