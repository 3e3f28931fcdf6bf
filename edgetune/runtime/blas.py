"""numpy's BLAS thread count, set at run time through OpenBLAS's own C function.

Why a library needs it: `OPENBLAS_NUM_THREADS` is read once, when numpy loads, so `--threads 1`
could not limit numpy's matrix products, and the training step's passes, which run on one thread
each (`Module.workers`), need each product to stay on its own thread: with OpenBLAS's pool of two,
two passes would share it, and its idle workers spin for a while after every product, taking the
core the other pass needs. numpy's wheels (Linux x86-64 and aarch64) bundle OpenBLAS as
scipy-openblas with prefixed symbols; a numpy built against a system OpenBLAS has the plain ones.
Where neither is found (macOS Accelerate, MKL, a platform without `/proc`), `threads()` is None
and `set_threads` does nothing: results are the same, only the speed differs.

OpenBLAS's count is one per process (`openblas_set_num_threads_local` is the same setter in its
pthreads build), so `limited` sets it for everyone while it is active.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import numpy as np

_SETTERS = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
            ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
            ("openblas_set_num_threads", "openblas_get_num_threads"))
_lock = threading.Lock()


@cache
def _functions() -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr] | None:
    """OpenBLAS's (set, get) thread-count functions in the library numpy loaded; None if not found."""
    np.dot(np.ones((2, 2)), np.ones((2, 2)))  # numpy loads its BLAS with its first product at the latest
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split(maxsplit=5)[-1].strip() for line in maps if "openblas" in line.lower()}
    except OSError:
        return None
    for path in sorted(p for p in paths if p.startswith("/")):
        try:
            lib = ctypes.CDLL(path)  # already loaded: the same handle, nothing runs again
        except OSError:
            continue
        for set_name, get_name in _SETTERS:
            setter, getter = getattr(lib, set_name, None), getattr(lib, get_name, None)
            if setter is not None and getter is not None:
                setter.argtypes, setter.restype, getter.restype = [ctypes.c_int], None, ctypes.c_int
                return setter, getter
    return None


def threads() -> int | None:
    """The threads numpy's matrix products use now; None where the BLAS is not OpenBLAS."""
    functions = _functions()
    return None if functions is None else int(functions[1]())


def set_threads(count: int) -> int | None:
    """Let numpy's matrix products use `count` threads; the previous count (None: cannot be set)."""
    functions = _functions()
    if functions is None:
        return None
    with _lock:
        previous = int(functions[1]())
        functions[0](max(1, int(count)))
    return previous


@contextmanager
def limited(count: int) -> Iterator[None]:
    """numpy's matrix products on at most `count` threads while the block runs, as before after it."""
    previous = threads()
    if previous is None or previous <= count:
        yield
        return
    set_threads(count)
    try:
        yield
    finally:
        set_threads(previous)
