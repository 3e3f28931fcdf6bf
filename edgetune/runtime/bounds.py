"""Upper bounds on every size an input declares, the memory budget a model must fit in, the cores to use.

A model file or a dataset from someone else states sizes (image side, batch, class count, feature
width, file and tensor lengths) before the data that backs them. Each has a limit here, checked
before anything of that size is allocated, so a lying number becomes one clear error instead of a
`MemoryError` traceback or the kernel's out-of-memory kill. The limits are far above any honest
input: EfficientNet-Lite0 takes 224x224 images in batches of 32 and gives 1000 features.

Standard library only: every layer (runtime, data, deploy) may use it.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Mapping
from typing import Any

from edgetune.errors import UserError

MAX_SIDE = 4096              # height / width of the images a model takes (Lite0: 224)
MAX_RESIZE = 2 * MAX_SIDE    # preprocessing.resize_shorter (Lite0: 256)
MAX_BATCH = 4096             # batch_size (the seed: 32)
MAX_BATCH_BYTES = 1 << 30    # one batch of input images as float32 (Lite0, 32 images: 19 MB)
MAX_CLASSES = 100_000        # num_classes (ImageNet-21k: 21841)
MAX_FEATURES = 1 << 18       # frozen feature width (Lite0: 1000, or 1280 pooled; VGG's flattened 7x7x512: 25088)
MAX_HEAD_LAYERS = 1024       # meta.head entries (the seed: 1; Lite0 last-stage: 51 nodes)
MAX_NAME = 1024              # characters of a class, tensor, entry or model name
MAX_ENTRIES = 4096           # entries of a .tod (Lite0: 5)

MAX_IMAGE_BYTES = 257 << 20  # one image file: a 32-bit BMP at dataset.MAX_PIXELS (64 Mpx) plus its headers
MAX_TEXT_BYTES = 64 << 20    # classes.txt, Places365 lists, feature-cache indexes
MAX_IDX_BYTES = 256 << 20    # an IDX file, also once gunzipped (Fashion-MNIST's largest: 47 MB)


class OverBudget(UserError):
    """Loading or running a model would need more memory than this process can get."""


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: a container's or `taskset`'s limit).

    `os.cpu_count()` counts the machine's cores, which overcommits a process pinned to fewer;
    platforms without `sched_getaffinity` (macOS, Windows) fall back to it.
    """
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def available_memory() -> tuple[int, str] | None:
    """Bytes this process can still allocate, and what limits it; None where nothing can be read.

    The smallest of: free RAM (`MemAvailable`), the address-space limit (`ulimit -v`) less what the
    process has mapped, and its cgroup's memory limit less the cgroup's use. Linux only (procfs,
    cgroup v2); elsewhere the address-space limit alone, if the process has one.
    """
    found: list[tuple[int, str]] = []
    meminfo = _proc_fields("/proc/meminfo")
    if "MemAvailable" in meminfo:
        found.append((meminfo["MemAvailable"], "free memory"))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        mapped = _proc_fields("/proc/self/status").get("VmSize", 0)
        found.append((max(0, soft - mapped), "address-space limit, ulimit -v"))
    cgroup = _cgroup_headroom()
    if cgroup is not None:
        found.append((cgroup, "cgroup memory limit"))
    return min(found) if found else None


def require_memory(nbytes: int, what: str) -> None:
    """Refuse, before allocating, work that needs more memory than `available_memory()`.

    Args:
        nbytes: the estimate of what the work allocates.
        what: the work, for the message ("loading the frozen graph ...").

    Raises:
        OverBudget: one line with both sizes and what limits the memory.
    """
    available = available_memory()
    if available is not None and nbytes > available[0]:
        raise OverBudget(f"{what} needs about {_size(nbytes)} of memory but {_size(available[0])} is available "
                         f"({available[1]}): refused")


def memory_limit(share: float = 0.5) -> int | None:
    """`share` of `available_memory()` in bytes (None when unknown): a cap for one file read into memory."""
    available = available_memory()
    return None if available is None else int(available[0] * share)


def check_meta_sizes(meta: Mapping[str, Any]) -> None:
    """Refuse a model meta that declares a size over the limits above, before anything is allocated.

    Only sizes are checked here, and only where the value has the right type: `meta.check_meta`
    owns the types and the consistency between keys.

    Raises:
        ValueError: the first size over its limit, naming the key.
    """
    _at_most(meta.get("num_classes"), MAX_CLASSES, "num_classes")
    _at_most(meta.get("batch_size"), MAX_BATCH, "batch_size")
    frozen = meta.get("frozen")
    if isinstance(frozen, dict):
        _at_most(frozen.get("features"), MAX_FEATURES, "frozen.features")
        for key in ("blob", "input", "output"):
            _name(frozen.get(key), f"frozen.{key}")
    spec = meta.get("input")
    shape = spec.get("shape") if isinstance(spec, dict) else None
    if isinstance(shape, list) and len(shape) == 4 and all(type(d) is int and d > 0 for d in shape):
        for d, what in zip(shape[2:], ("height", "width")):
            _at_most(d, MAX_SIDE, f"input.shape {what}")
        _at_most(shape[1], 4, "input.shape channels")
        batch_bytes = shape[0] * shape[1] * shape[2] * shape[3] * 4
        if batch_bytes > MAX_BATCH_BYTES:
            raise ValueError(f"input.shape {shape} makes batches of {batch_bytes} bytes, over the "
                             f"{MAX_BATCH_BYTES}-byte limit")
    preprocessing = meta.get("preprocessing")
    if isinstance(preprocessing, dict):
        size = preprocessing.get("size")
        if isinstance(size, list):
            for d in size:
                _at_most(d, MAX_SIDE, "preprocessing.size")
        shorter = preprocessing.get("resize_shorter")
        if shorter is not None and not (type(shorter) is int and 0 < shorter <= MAX_RESIZE):
            raise ValueError(f"preprocessing.resize_shorter must be null or an integer in 1..{MAX_RESIZE}, "
                             f"got {shorter!r:.40}")
    if isinstance(meta.get("head"), list) and len(meta["head"]) > MAX_HEAD_LAYERS:
        raise ValueError(f"head has {len(meta['head'])} layers, over the limit of {MAX_HEAD_LAYERS}")
    for key in ("class_names", "trainable"):
        if isinstance(meta.get(key), list):
            if len(meta[key]) > MAX_CLASSES:
                raise ValueError(f"{key} has {len(meta[key])} entries, over the limit of {MAX_CLASSES}")
            for value in meta[key]:
                _name(value, key)
    for key in ("input", "label"):
        if isinstance(meta.get(key), dict):
            _name(meta[key].get("name"), f"{key}.name")
    _name(meta.get("name"), "name")


def entries_problem(entries: Mapping[str, Any]) -> str | None:
    """Why a `.tod` header's entry table is over the limits (count, name length); None if it is not."""
    if len(entries) > MAX_ENTRIES:
        return f"{len(entries)} entries, over the limit of {MAX_ENTRIES}"
    long = next((name for name in entries if len(name) > MAX_NAME), None)
    return None if long is None else f"entry name of {len(long)} characters, over the limit of {MAX_NAME}"


def _at_most(value: Any, limit: int, what: str) -> None:
    if type(value) is int and value > limit:
        raise ValueError(f"{what} is {value}, over the limit of {limit}")


def _name(value: Any, what: str) -> None:
    if isinstance(value, str) and len(value) > MAX_NAME:
        raise ValueError(f"{what}: a name of {len(value)} characters, over the limit of {MAX_NAME}")


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} bytes"


def _proc_fields(path: str) -> dict[str, int]:
    """`Key: N kB` lines of a procfs file in bytes (MemAvailable, VmSize); {} where it cannot be read."""
    out: dict[str, int] = {}
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
                    out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def _cgroup_headroom() -> int | None:
    """cgroup v2: `memory.max - memory.current` of this process's cgroup; None without a limit."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            path = next((line.strip()[3:] for line in f if line.startswith("0::")), None)
        if path is None:
            return None
        base = os.path.join("/sys/fs/cgroup", path.lstrip("/"))
        with open(os.path.join(base, "memory.max"), encoding="ascii") as f:
            limit = f.read().strip()
        with open(os.path.join(base, "memory.current"), encoding="ascii") as f:
            current = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" or not limit.isdigit() else max(0, int(limit) - current)
