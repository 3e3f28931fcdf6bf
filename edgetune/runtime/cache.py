"""The feature cache: a frozen backbone's output per sample, computed once and reused every epoch.

The backbone never changes while the head trains, so a sample's features are a pure function of
(the frozen graph, the preprocessing, the sample). The cache is keyed by a `namespace` digest of
the first two and a per-sample key (the image file's sha256, or the sha256 of the input array), so
a stale entry cannot be found: a different model or preprocessing is a different namespace.

On disk (`directory` given) new rows are buffered and written `segment_rows` at a time (and on
`flush()`) as one segment: `<id>.f32` (rows of float32, memory-mapped once written) and `<id>.json`
(the keys, shape and the data's sha256). Rows not yet flushed when the process dies are simply
computed again next time.
The index is written atomically *after* the data is on disk, and a segment whose data does not
match its index is ignored, so a crash or a torn file can never feed wrong features to training.
A segment that cannot be read at all (no permission, an I/O error) is ignored too, and the warning
says that, not "damaged": its rows are computed again.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Sequence

import numpy as np

from edgetune.runtime.atomic import write_atomic
from edgetune.runtime.bounds import MAX_TEXT_BYTES
from edgetune.runtime.safe_read import UnsafeFile, open_regular, read_file


class FeatureCache:
    """Rows of features by sample key, in memory or memory-mapped segments on disk.

    Args:
        namespace: hex digest identifying the frozen model and preprocessing (see `namespace_for`).
        directory: a cache root directory; None keeps everything in memory. The namespace becomes
            a subdirectory, so one root can serve many models.
        width: the feature count, if known: segments with rows of another width are rejected.
        segment_rows: buffered rows that trigger a write (fewer, larger files; 1000 Lite0 rows = 4 MB).
    """

    def __init__(self, namespace: str, directory: str | os.PathLike | None = None, width: int | None = None,
                 segment_rows: int = 256) -> None:
        self.namespace, self.width, self.segment_rows = namespace, width, int(segment_rows)
        self._pending: list[tuple[str, np.ndarray]] = []
        self.directory = os.path.join(os.fspath(directory), namespace) if directory is not None else None
        self._rows: dict[str, np.ndarray] = {}
        self.rejected: list[str] = []  # segments ignored: damaged, or unreadable (the warning says which)
        if self.directory is not None:
            os.makedirs(self.directory, exist_ok=True)
            self._load_segments()

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def get_many(self, keys: Sequence[str]) -> list[np.ndarray | None]:
        """The cached row of each key, or None where there is none."""
        return [self._rows.get(k) for k in keys]

    def put_many(self, keys: Sequence[str], rows: np.ndarray) -> None:
        """Store rows (one per key, float32): usable at once, on disk once `segment_rows` are buffered."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[0] != len(keys) or (self.width is not None and rows.shape[1] != self.width):
            raise ValueError(f"expected {len(keys)} rows of {self.width or 'N'} features, got shape {rows.shape}")
        new = [i for i, k in enumerate(keys) if k not in self._rows]
        if not new:
            return
        for i in new:
            row = rows[i].copy()
            self._rows[keys[i]] = row
            if self.directory is not None:
                self._pending.append((keys[i], row))
        if len(self._pending) >= self.segment_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as one crash-safe segment (no-op in memory or with nothing buffered)."""
        if not self._pending:
            return
        keys = [k for k, _ in self._pending]
        mapped = self._write_segment(keys, np.stack([r for _, r in self._pending]))
        self._pending = []
        for k, row in zip(keys, mapped):  # the buffered copies are freed: rows now live in the file
            self._rows[k] = row

    def _write_segment(self, keys: list[str], rows: np.ndarray) -> np.ndarray:
        data = rows.tobytes()
        digest = hashlib.sha256(data).hexdigest()
        seg = hashlib.sha256(digest.encode() + "\n".join(keys).encode()).hexdigest()[:24]
        base = os.path.join(self.directory, seg)
        write_atomic(base + ".f32", data)  # data first ...
        index = {"version": 1, "keys": keys, "shape": list(rows.shape), "dtype": "float32", "sha256": digest}
        write_atomic(base + ".json", json.dumps(index).encode())  # ... then the index that vouches for it
        return np.memmap(base + ".f32", dtype=np.float32, mode="r", shape=rows.shape)

    def _load_segments(self) -> None:
        for name in sorted(os.listdir(self.directory)):
            if not name.endswith(".json"):
                continue
            base = os.path.join(self.directory, name[:-5])
            try:
                keys, rows = _verified_segment(base, self.width)
            except DamagedSegment as e:
                self.rejected.append(base)
                print(f"feature cache: ignoring damaged segment {base}.json ({e})", file=sys.stderr)
                continue
            except OSError as e:  # permission, I/O error: the file may be fine, this process cannot read it
                self.rejected.append(base)
                print(f"feature cache: cannot read segment {base}.json ({e.strerror or e}); ignoring it",
                      file=sys.stderr)
                continue
            for k, row in zip(keys, rows):
                self._rows.setdefault(k, row)


class DamagedSegment(Exception):
    """A cache segment whose index or data is not what a complete write leaves; the message says what."""


def _verified_segment(base: str, width: int | None) -> tuple[list[str], np.memmap]:
    """The segment's keys and rows (memory-mapped), if its index parses and its data matches size and sha256.

    Both files are read by `safe_read` (regular files inside the cache folder, never blocking, the
    index under a size cap), and the data is mapped from the very descriptor whose size was checked
    against the index and whose bytes were hashed: a short file is refused before it is mapped,
    so a truncated segment is ignored, never a SIGBUS when its missing rows are touched.

    Raises:
        DamagedSegment: the index is not valid JSON of the expected shape, a file is missing, not a
            regular file inside the cache folder, or the data's size or sha256 is not the index's.
        OSError: a file cannot be read (permissions, I/O).
    """
    folder = os.path.dirname(base)
    try:
        index = json.loads(read_file(base + ".json", max_bytes=MAX_TEXT_BYTES, root=folder))
    except UnsafeFile as e:
        raise DamagedSegment(f"index refused: {e.reason}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedSegment(f"index is not JSON: {e}") from None
    shape = index.get("shape") if isinstance(index, dict) else None
    keys = index.get("keys") if isinstance(index, dict) else None
    if not (isinstance(shape, list) and len(shape) == 2 and all(type(d) is int and d > 0 for d in shape)
            and isinstance(keys, list) and len(keys) == shape[0] and index.get("dtype") == "float32"
            and all(isinstance(k, str) for k in keys)):
        raise DamagedSegment("index has no valid keys, shape and dtype")
    if width is not None and shape[1] != width:
        raise DamagedSegment(f"rows of {shape[1]} features, the model gives {width}")
    expected = shape[0] * shape[1] * 4
    try:
        with open_regular(base + ".f32", max_bytes=expected, root=folder) as f:
            size = os.fstat(f.fileno()).st_size
            if size != expected:
                raise DamagedSegment(f"data file has {size} bytes, the index says {expected}")
            h = hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            if h.hexdigest() != index.get("sha256"):
                raise DamagedSegment("data does not match the index's sha256")
            return keys, np.memmap(f, dtype=np.float32, mode="r", shape=tuple(shape))
    except FileNotFoundError:
        raise DamagedSegment("data file missing") from None
    except UnsafeFile as e:
        raise DamagedSegment(f"data file refused: {e.reason}") from None


def namespace_for(model_sha256: str, preprocessing: dict, output: str) -> str:
    """The cache namespace of a frozen graph, its preprocessing and the output name it is read at."""
    text = json.dumps({"model": model_sha256, "preprocessing": preprocessing, "output": output}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def content_keys(data: np.ndarray) -> list[str]:
    """One key per sample: the sha256 of its shape, dtype and bytes (used when no file hash is given)."""
    head = f"{data.dtype.str}{data.shape[1:]}".encode()
    return [hashlib.sha256(head + np.ascontiguousarray(x).tobytes()).hexdigest() for x in data]
