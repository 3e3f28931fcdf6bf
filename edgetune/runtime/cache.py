"""The feature cache: a frozen backbone's output per sample, computed once and reused every epoch.

The backbone never changes while the head trains, so a sample's features are a pure function of
(the frozen graph, the preprocessing, the sample). The cache is keyed by a `namespace` digest of
the first two and a per-sample key (the image file's sha256, or the sha256 of the input array), so
a stale entry cannot be found: a different model or preprocessing is a different namespace.

On disk (`directory` given) new rows are buffered and written `segment_rows` at a time (and on
`flush()`) as one segment: `<id>.f32` (rows of float32) and `<id>.json` (the keys, shape and the
data's sha256). Rows not yet flushed when the process dies are simply computed again next time.
The index is written atomically *after* the data is on disk, and a segment whose data does not
match its index is ignored, so a crash or a torn file can never feed wrong features to training.
A segment that cannot be read at all (no permission, an I/O error) is ignored too, and the warning
says that, not "damaged": its rows are computed again.

In memory (no `directory`), a `budget` bounds the bytes of rows held: the put that would exceed it
moves every row to disk (`spill`), into segments written the same crash-safe way, in `spill_dir`
or else a private temporary folder removed with the cache. Training reads the same float32 values
either way.

Rows on disk are read with plain positional reads, not memory-mapped: where the kernel keeps file
pages in large folios, touching one mapped 37.6 KB row maps up to a megabyte around it into the
process (measured on Linux 6.18, ext4: 32 random rows of a 200 MB file mapped 44.8 MB of resident
memory, against 1.2 MB read), so a mapped cache on disk crept back into RSS batch by batch. A read
copies exactly the row's bytes; the pages stay in the kernel's page cache, outside the process. A
segment that shrinks or vanishes after it was checked (another process) is a read that comes up
short: the segment is dropped with one warning and its rows are computed again, never a SIGBUS.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import weakref
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from edgetune.runtime.atomic import write_atomic
from edgetune.runtime.bounds import MAX_TEXT_BYTES
from edgetune.runtime.safe_read import UnsafeFile, open_regular, read_file


class FeatureCache:
    """Rows of features by sample key, in memory or in segment files on disk.

    Args:
        namespace: hex digest identifying the frozen model and preprocessing (see `namespace_for`).
        directory: a cache root directory; None keeps everything in memory. The namespace becomes
            a subdirectory, so one root can serve many models.
        width: the feature count, if known: segments with rows of another width are rejected.
        segment_rows: buffered rows that trigger a write (fewer, larger files; 1000 Lite0 rows = 4 MB);
            at most `SEGMENT_BYTES` of rows, so wide features (a fine-tuned cut) buffer few.
        budget: in memory, the most bytes of rows to hold before every row goes to disk (None: no
            limit). Ignored with a `directory`: rows are on disk already.
        spill_dir: the cache root to spill to; None: a private temporary folder, removed when the
            cache is garbage-collected or the process exits.
    """

    SEGMENT_BYTES = 8 << 20

    def __init__(self, namespace: str, directory: str | os.PathLike | None = None, width: int | None = None,
                 segment_rows: int = 256, budget: int | None = None,
                 spill_dir: str | os.PathLike | None = None) -> None:
        self.namespace, self.width, self.segment_rows = namespace, width, int(segment_rows)
        self.budget, self.spill_dir = budget, spill_dir
        self._pending: list[tuple[str, np.ndarray]] = []
        self.directory = os.path.join(os.fspath(directory), namespace) if directory is not None else None
        self._rows: dict[str, np.ndarray] = {}  # in memory: every row; on disk: the rows not written yet
        self._disk: dict[str, tuple[int, int]] = {}  # key -> (segment number, row in it)
        self._segments: list[tuple[str, tuple[int, int], tuple[int, int]]] = []  # data file, shape, (dev, inode)
        self._memory_bytes = 0  # rows held in memory (in-memory mode)
        self.spilled = False
        self.rejected: list[str] = []  # segments ignored: damaged, or unreadable (the warning says which)
        if self.directory is not None:
            os.makedirs(self.directory, exist_ok=True)
            self._load_segments()

    def __len__(self) -> int:
        return len(self._rows) + len(self._disk)

    def __contains__(self, key: str) -> bool:
        return key in self._rows or key in self._disk

    def get_many(self, keys: Sequence[str]) -> list[np.ndarray | None]:
        """The cached row of each key, or None where there is none.

        Rows on disk are read into a new array (the caller may keep them); a segment that can no
        longer be read as it was checked gives None for its rows (they are computed again).
        """
        rows = [self._rows.get(k) for k in keys]
        wanted: dict[int, list[tuple[int, int]]] = defaultdict(list)  # segment -> (row, position in keys)
        for i, k in enumerate(keys):
            if rows[i] is None and k in self._disk:
                seg, row = self._disk[k]
                wanted[seg].append((row, i))
        for seg, items in wanted.items():
            for (_, i), row in zip(items, self._read(seg, [r for r, _ in items])):
                rows[i] = row
        return rows

    def _read(self, seg: int, rows: list[int], recheck: bool = True) -> list[np.ndarray | None]:
        """Rows of one segment, read from its file in file order; all None if it no longer reads as checked."""
        path, shape, identity = self._segments[seg]
        out = np.empty((len(rows), shape[1]), dtype=np.float32)
        row_bytes, size = out[0].nbytes, shape[0] * out[0].nbytes
        try:
            with open_regular(path, max_bytes=size, root=self.directory) as f:
                st = os.fstat(f.fileno())
                if (st.st_dev, st.st_ino) != identity:
                    if not (recheck and self._recheck(seg)):
                        raise DamagedSegment("another file took its place")
                    return self._read(seg, rows, recheck=False)
                if st.st_size != size:
                    raise DamagedSegment(f"data file now has {st.st_size} bytes, not {size}")
                for j in sorted(range(len(rows)), key=rows.__getitem__):
                    f.seek(rows[j] * row_bytes)
                    if f.readinto(memoryview(out[j]).cast("B")) != row_bytes:
                        raise DamagedSegment("a row read came up short")
        except (DamagedSegment, OSError) as e:  # UnsafeFile is an OSError
            self._drop(seg, f"{e.reason if isinstance(e, UnsafeFile) else e}")
            return [None] * len(rows)
        return list(out)

    def _recheck(self, seg: int) -> bool:
        """A segment file replaced since it was checked (another process wrote the same segment, which
        edgetune does by rename): check the new file, and read it if it holds the same keys and shape."""
        path, shape, _ = self._segments[seg]
        try:
            keys, again, identity = _verified_segment(path[:-len(".f32")], self.width)
        except DamagedSegment:
            return False
        if again != shape or any(keys[r] != k for k, (s, r) in self._disk.items() if s == seg):
            return False
        self._segments[seg] = (path, shape, identity)
        return True

    def _drop(self, seg: int, why: str) -> None:
        """Forget a segment that changed after it was checked: its rows become misses."""
        path = self._segments[seg][0]
        self.rejected.append(path[:-len(".f32")])
        self._disk = {k: v for k, v in self._disk.items() if v[0] != seg}
        print(f"feature cache: segment {path} can no longer be read ({why}); its rows are computed again",
              file=sys.stderr)

    def put_many(self, keys: Sequence[str], rows: np.ndarray) -> None:
        """Store rows (one per key, float32): usable at once, on disk once `segment_rows` are buffered."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[0] != len(keys) or (self.width is not None and rows.shape[1] != self.width):
            raise ValueError(f"expected {len(keys)} rows of {self.width or 'N'} features, got shape {rows.shape}")
        new = [i for i, k in enumerate(keys) if k not in self]
        if not new:
            return
        if (self.directory is None and self.budget is not None
                and self._memory_bytes + len(new) * rows[0].nbytes > self.budget):
            self.spill()
        for i in new:
            if keys[i] in self._rows:  # the same key twice in one call
                continue
            row = rows[i].copy()
            self._rows[keys[i]] = row
            if self.directory is not None:
                self._pending.append((keys[i], row))
            else:
                self._memory_bytes += row.nbytes
            if self._pending and len(self._pending) >= self._segment_limit(row.nbytes):
                self.flush()

    def _segment_limit(self, row_bytes: int) -> int:
        return max(1, min(self.segment_rows, self.SEGMENT_BYTES // max(1, row_bytes)))

    def spill(self) -> None:
        """Move every row to disk now (segments in `spill_dir` or a temporary folder); later rows follow.

        Called by `put_many` when the in-memory rows would exceed `budget`; a no-op on disk already.
        """
        if self.directory is not None:
            return
        root = os.fspath(self.spill_dir) if self.spill_dir is not None else tempfile.mkdtemp(prefix="edgetune-features-")
        if self.spill_dir is None:
            weakref.finalize(self, shutil.rmtree, root, True)
        self.directory = os.path.join(root, self.namespace)
        os.makedirs(self.directory, exist_ok=True)
        held, self._rows = self._rows, {}
        self._load_segments()  # a spill folder may already hold some of this namespace's rows
        held = [(k, row) for k, row in held.items() if k not in self._disk]
        self._rows.update(held)
        step = self._segment_limit(held[0][1].nbytes) if held else 1
        while held:  # each batch of rows leaves memory as it is written
            self._pending, held = held[:step], held[step:]
            self.flush()
        self._memory_bytes, self.spilled = 0, True

    def flush(self) -> None:
        """Write the buffered rows as one crash-safe segment (no-op in memory or with nothing buffered)."""
        if not self._pending:
            return
        keys = [k for k, _ in self._pending]
        seg = self._write_segment(keys, [r for _, r in self._pending])
        self._pending = []
        for row, k in enumerate(keys):  # the buffered copies are freed: rows now live in the file
            del self._rows[k]
            self._disk[k] = (seg, row)

    def _write_segment(self, keys: list[str], rows: list[np.ndarray]) -> int:
        """Write rows as one segment, straight from the buffered arrays (no stacked copy of 8 MB)."""
        digest = hashlib.sha256()
        for row in rows:
            digest.update(row)
        digest = digest.hexdigest()
        seg = hashlib.sha256(digest.encode() + "\n".join(keys).encode()).hexdigest()[:24]
        base = os.path.join(self.directory, seg)
        write_atomic(base + ".f32", lambda f: [f.write(row) for row in rows])  # data first ...
        shape = (len(rows), rows[0].size)
        index = {"version": 1, "keys": keys, "shape": list(shape), "dtype": "float32", "sha256": digest}
        write_atomic(base + ".json", json.dumps(index).encode())  # ... then the index that vouches for it
        st = os.stat(base + ".f32")
        self._segments.append((base + ".f32", shape, (st.st_dev, st.st_ino)))
        return len(self._segments) - 1

    def _load_segments(self) -> None:
        for name in sorted(os.listdir(self.directory)):
            if not name.endswith(".json"):
                continue
            base = os.path.join(self.directory, name[:-5])
            try:
                keys, shape, identity = _verified_segment(base, self.width)
            except DamagedSegment as e:
                self.rejected.append(base)
                print(f"feature cache: ignoring damaged segment {base}.json ({e})", file=sys.stderr)
                continue
            except OSError as e:  # permission, I/O error: the file may be fine, this process cannot read it
                self.rejected.append(base)
                print(f"feature cache: cannot read segment {base}.json ({e.strerror or e}); ignoring it",
                      file=sys.stderr)
                continue
            self._segments.append((base + ".f32", shape, identity))
            seg = len(self._segments) - 1
            for row, k in enumerate(keys):
                if k not in self:
                    self._disk[k] = (seg, row)


class DamagedSegment(Exception):
    """A cache segment whose index or data is not what a complete write leaves; the message says what."""


def _verified_segment(base: str, width: int | None) -> tuple[list[str], tuple[int, int], tuple[int, int]]:
    """The segment's keys, shape and file identity, if its index parses and its data matches size and sha256.

    Both files are read by `safe_read` (regular files inside the cache folder, never blocking, the
    index under a size cap), and the data's size is checked against the index on the descriptor
    whose bytes are hashed. The identity (device, inode) of that file is what later reads must
    find again (`FeatureCache._read`): a file put in its place since is not read.

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
            st = os.fstat(f.fileno())
            return keys, (shape[0], shape[1]), (st.st_dev, st.st_ino)
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
