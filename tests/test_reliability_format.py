"""Hostile `.tod` bytes: whatever the input, `format.load` returns a file or raises `TodError`.

Every example is loaded with an audit hook that records any write, process start, pickle or exec
(none is allowed: a reader only parses JSON and slices bytes) and under tracemalloc, whose peak must
stay within a small multiple of the input size (a lying header must not make the reader allocate
what the file does not hold). A file that loads must save again and load back equal, so a model that
opens can always be checkpointed. Examples are derandomized: the same inputs on every run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgetune.runtime import format as tod_format
from edgetune.runtime.format import PREAMBLE, TodError, TodFile

FUZZ = settings(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MEMORY_FACTOR, MEMORY_SLACK = 64, 4 * 1024 * 1024  # peak allowed: 64 x input bytes + 4 MiB

# --- what the reader must never do ----------------------------------------------------------------

_FORBIDDEN_EVENTS = ("os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod", "os.truncate", "os.symlink",
                     "os.link", "os.system", "os.exec", "os.posix_spawn", "os.fork", "subprocess.Popen",
                     "pickle.find_class", "marshal.loads", "exec", "ctypes.dlopen", "socket.connect", "shutil.")
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_watch: dict[str, Any] = {"on": False, "seen": []}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if not _watch["on"]:
        return
    if event == "open":
        mode, flags = args[1], args[2]
        if (isinstance(mode, str) and set(mode) & set("wax+")) or (isinstance(flags, int) and flags & _WRITE_FLAGS):
            _watch["seen"].append((event, args))
    elif event.startswith(_FORBIDDEN_EVENTS):
        _watch["seen"].append((event, args))


sys.addaudithook(_audit)


def check(data: bytes) -> TodFile | None:
    """Load `data` under the audit hook and tracemalloc; TodError is fine, anything else fails."""
    _watch["seen"] = []
    tracemalloc.start()
    _watch["on"] = True
    try:
        tod = tod_format.load(data)
    except TodError:
        tod = None
    finally:
        _watch["on"] = False
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert _watch["seen"] == [], f"the reader did something it must not: {_watch['seen'][:3]}"
    assert peak <= MEMORY_FACTOR * len(data) + MEMORY_SLACK, f"peak {peak} bytes for a {len(data)}-byte input"
    if tod is not None:  # what loads must save again and come back equal
        assert_same(tod_format.load(tod_format.save(tod)), tod)
    return tod


def assert_same(got: TodFile, want: TodFile) -> None:
    """Equal meta, blobs and tensors (same names, dtypes, shapes and values, bit for bit)."""
    assert got.meta == want.meta and got.blobs == want.blobs
    assert got.tensors.keys() == want.tensors.keys()
    for name, arr in want.tensors.items():
        assert got.tensors[name].dtype == arr.dtype and got.tensors[name].shape == arr.shape, name
        assert got.tensors[name].tobytes() == arr.tobytes(), name


def seal(header: bytes | dict[str, Any], body: bytes, *, major: int = 1, minor: int = 0, reserved: int = 0,
         hlen: int | None = None) -> bytes:
    """A file around `header` (JSON object or raw bytes) and `body`, with a correct header checksum."""
    raw = header if isinstance(header, bytes) else json.dumps(header, sort_keys=True).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    pre = PREAMBLE.pack(tod_format.MAGIC, major, minor, reserved, len(raw) if hlen is None else hlen,
                        hashlib.sha256(raw).digest())
    return pre + raw + body


def split(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(header object, data section) of a valid file."""
    hlen = PREAMBLE.unpack_from(data, 0)[4]
    return json.loads(data[PREAMBLE.size:PREAMBLE.size + hlen]), data[PREAMBLE.size + hlen:]


# --- strategies ---------------------------------------------------------------------------------------

PATHLIKE = ["../../../../tmp/pwned", "/etc/passwd", "a/../../b", "", "\x00", "C:\\Windows\\x", "~/.ssh/id_rsa",
            "frozen.onnx", "param/head.weight", "optim/head.weight/momentum_buffer", "\u202e", "." * 300]
names = st.one_of(st.sampled_from(PATHLIKE), st.text(max_size=20))
ints = st.one_of(st.integers(-3, 300), st.integers(-2**70, 2**70), st.sampled_from([2**31, 2**32, 2**40, 2**63, 2**64]))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), ints, st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12)),
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=6), kids, max_size=4)),
    max_leaves=20)

dtypes = st.sampled_from(sorted(tod_format.DTYPES))


@st.composite
def tod_files(draw: st.DrawFn) -> TodFile:
    """A valid TodFile: a few tensors of every dtype and shape rank 0..3, a blob, some meta."""
    tensors = {}
    for i in range(draw(st.integers(0, 3))):
        dtype = draw(dtypes)
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        seed = draw(st.integers(0, 2**16))
        tensors[f"param/t{i}"] = (np.random.default_rng(seed).normal(0, 50, shape)).astype(dtype)
    blobs = {"frozen.onnx": draw(st.binary(max_size=40))} if draw(st.booleans()) else {}
    meta = draw(st.dictionaries(st.text(max_size=6), json_values, max_size=4))
    return TodFile(meta=meta, tensors=tensors, blobs=blobs)


valid_bytes = tod_files().map(tod_format.save)


# --- the fuzz tests (the example counts add up to 1300) -------------------------------------------------


@settings(FUZZ, max_examples=150)
@given(tod=tod_files())
def test_valid_files_round_trip(tod: TodFile) -> None:
    loaded = check(tod_format.save(tod))
    assert loaded is not None
    assert_same(loaded, tod)


@settings(FUZZ, max_examples=150)
@given(data=valid_bytes, cut=st.floats(0, 1, exclude_max=True))
def test_truncated(data: bytes, cut: float) -> None:
    with pytest.raises(TodError):
        tod_format.load(data[:int(len(data) * cut)])
    check(data[:int(len(data) * cut)])


@settings(FUZZ, max_examples=200)
@given(data=valid_bytes, flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
                                        min_size=1, max_size=4))
def test_bit_flips(data: bytes, flips: list[tuple[float, int]]) -> None:
    buf = bytearray(data)
    for where, bit in flips:
        buf[int(where * len(buf))] ^= 1 << bit
    changed = {i for i in range(len(data)) if buf[i] != data[i]}
    loaded = check(bytes(buf))
    # every byte is covered by a check except the minor version (bytes 10-11), read by design
    assert loaded is None or changed <= {10, 11}


@settings(FUZZ, max_examples=200)
@given(data=valid_bytes, flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
                                        min_size=1, max_size=6))
def test_header_bit_flips_resealed(data: bytes, flips: list[tuple[float, int]]) -> None:
    """Flip header bits and fix its checksum, so the JSON parser and the entry checks see the damage."""
    header, body = split(data)
    raw = bytearray(json.dumps(header, sort_keys=True).encode("utf-8"))
    for where, bit in flips:
        raw[int(where * len(raw))] ^= 1 << bit
    check(seal(bytes(raw), body))


@settings(FUZZ, max_examples=200)
@given(header=json_values, body=st.binary(max_size=64))
def test_arbitrary_header_json(header: Any, body: bytes) -> None:
    check(seal(json.dumps(header).encode("utf-8"), body))


def _lie(entry: dict[str, Any], field: str, value: Any) -> None:
    if value is _DROP:
        entry.pop(field, None)
    else:
        entry[field] = value


_DROP = object()
entry_lies = st.one_of(
    st.tuples(st.just("offsets"), st.one_of(st.lists(ints, max_size=3), json_values)),
    st.tuples(st.just("shape"), st.one_of(st.lists(ints, max_size=9), json_values)),
    st.tuples(st.just("dtype"), st.one_of(dtypes, json_values, st.sampled_from(["object", "O", "<f8", "complex128"]))),
    st.tuples(st.just("sha256"), st.one_of(json_values, st.text(alphabet="0123456789abcdef", min_size=64, max_size=64))),
    st.tuples(st.sampled_from(["offsets", "shape", "dtype", "sha256"]), st.just(_DROP)),
)


@settings(FUZZ, max_examples=250)
@given(data=valid_bytes, lies=st.lists(st.tuples(st.integers(0, 10), entry_lies), min_size=1, max_size=3),
       rename=st.one_of(st.none(), names), extra=st.one_of(st.none(), st.tuples(names, json_values)))
def test_lying_entries(data: bytes, lies: list[tuple[int, tuple[str, Any]]], rename: str | None,
                       extra: tuple[str, Any] | None) -> None:
    """Valid files whose entries then lie: wrong types, negative, overlapping or huge offsets and shapes,
    path-like names, entries that are not objects; the checksum is resealed so only the checks stop them."""
    header, body = split(data)
    entries = header["entries"]
    if rename is not None and entries:
        old = sorted(entries)[0]
        entries[rename] = entries.pop(old)
    if extra is not None:
        entries[extra[0]] = extra[1]
    for index, (field, value) in lies:
        objects = [e for e in entries.values() if isinstance(e, dict)]
        if objects:
            _lie(objects[index % len(objects)], field, value)
    check(seal(header, body))


raw_headers = st.one_of(
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 5000).map(lambda n: b'{"meta":' + b'{"a":' * n + b"1" + b"}" * n + b',"entries":{}}'),
    st.integers(1, 6000).map(lambda n: b'{"meta":{"n":' + b"9" * n + b'},"entries":{}}'),
    st.sampled_from([b'{"meta":{"x":NaN},"entries":{}}', b'{"meta":{"x":-Infinity},"entries":{}}',
                     b'{"meta":{"x":1e999},"entries":{}}', b'{"meta":{"x":"\\ud800"},"entries":{}}',
                     b'\xef\xbb\xbf{"meta":{},"entries":{}}', b'{"meta":{},"entries":{}', b"\xff\xfe",
                     b'{"meta":{},"entries":{},"meta":[]}', b'{"meta":[],"entries":{}}', b"null", b"",
                     b'{"meta":{},"entries":{"x":{"offsets":[0,0],"dtype":[1],"shape":[]}}}']),
    st.binary(max_size=200),
)


@settings(FUZZ, max_examples=150)
@given(raw=raw_headers, body=st.binary(max_size=16))
def test_raw_header_text(raw: bytes, body: bytes) -> None:
    """Deep nesting, huge numbers, NaN, lone surrogates, a BOM, bad UTF-8, duplicate keys."""
    check(seal(raw, body))


@settings(FUZZ, max_examples=150)
@given(data=valid_bytes, major=st.integers(0, 2**16 - 1), minor=st.integers(0, 2**16 - 1),
       reserved=st.sampled_from([0, 0, 1, 2**32 - 1]),
       hlen=st.one_of(st.none(), st.integers(0, 2**64 - 1), st.sampled_from([tod_format.MAX_HEADER, 2**63])))
def test_lying_preamble(data: bytes, major: int, minor: int, reserved: int, hlen: int | None) -> None:
    header, body = split(data)
    loaded = check(seal(header, body, major=major, minor=minor, reserved=reserved, hlen=hlen))
    if loaded is not None:
        assert 1 <= major <= tod_format.MAJOR and reserved == 0 and loaded.version == (major, minor)


# --- hand-written worst cases, in a subprocess with a hard address-space cap ---------------------------

HUGE_CASES: dict[str, Callable[[], bytes]] = {
    "64 MiB header declared, 0 present": lambda: seal(b"{}", b"", hlen=tod_format.MAX_HEADER),
    "2^63-byte header declared": lambda: seal(b"{}", b"", hlen=2**63),
    "tensor of 2^39 x 2^39 float64": lambda: seal({"meta": {}, "entries": {"t": {
        "dtype": "float64", "shape": [2**39, 2**39], "offsets": [0, 8], "sha256": hashlib.sha256(bytes(8)).hexdigest()}}},
        bytes(8)),
    "entry ending at 2^62": lambda: seal({"meta": {}, "entries": {"t": {
        "offsets": [0, 2**62], "sha256": "0" * 64}}}, bytes(8)),
    "shape product overflowing int64": lambda: seal({"meta": {}, "entries": {"t": {
        "dtype": "uint8", "shape": [2**40 - 1] * 8, "offsets": [0, 0], "sha256": hashlib.sha256(b"").hexdigest()}}}, b""),
}


@pytest.mark.parametrize("case", sorted(HUGE_CASES))
def test_huge_declared_sizes_under_address_space_cap(case: str, tmp_path: os.PathLike) -> None:
    """Run load in a child whose address space is capped at 1 GiB over its start-up: a reader that
    believed the header would hit MemoryError (which is not a TodError) instead of refusing."""
    path = os.path.join(tmp_path, "huge.tod")
    with open(path, "wb") as f:
        f.write(HUGE_CASES[case]())
    code = textwrap.dedent(f"""
        import resource, sys
        from edgetune.runtime import format as f
        with open("/proc/self/status") as s:
            vm = next(int(l.split()[1]) * 1024 for l in s if l.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, vm + 2**30))
        try:
            f.load_file({path!r})
        except f.TodError as e:
            print("TodError:", e)
            sys.exit(0)
        sys.exit(3)
    """)
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    assert out.stdout.startswith("TodError:")
    assert os.listdir(tmp_path) == ["huge.tod"]


def test_load_file_refuses_non_regular_files(tmp_path: os.PathLike) -> None:
    """A FIFO would block open() forever and /dev/zero would be read until memory runs out."""
    fifo = os.path.join(tmp_path, "model.tod")
    os.mkfifo(fifo)
    link = os.path.join(tmp_path, "zero.tod")
    os.symlink("/dev/zero", link)
    for path in (fifo, link):
        with pytest.raises(TodError, match="not a regular file"):
            tod_format.load_file(path)
    with pytest.raises(IsADirectoryError):
        tod_format.load_file(tmp_path)


def test_audit_hook_catches_a_write(tmp_path: os.PathLike) -> None:
    """The guard itself works: a write during a watched call is recorded."""
    _watch["seen"], _watch["on"] = [], True
    try:
        with open(os.path.join(tmp_path, "x"), "wb"):
            pass
    finally:
        _watch["on"] = False
    assert [e for e, _ in _watch["seen"]] == ["open"]


@pytest.mark.parametrize("damage", ["truncated", "bit flip", "fifo", "empty"])
def test_net_runner_on_a_damaged_model_is_one_clear_line(damage: str, tmp_path: os.PathLike) -> None:
    """The user-facing end: a damaged model gives exit 2 and one `net_runner: error:` line naming it."""
    from tests.fixtures_runtime import tiny_model

    path = os.path.join(tmp_path, "model.tod")
    data = tod_format.save(tiny_model())
    if damage == "fifo":
        os.mkfifo(path)
    else:
        with open(path, "wb") as f:
            f.write({"truncated": data[:len(data) // 2], "empty": b"",
                     "bit flip": data[:-9] + bytes([data[-9] ^ 4]) + data[-8:]}[damage])
    os.mkdir(os.path.join(tmp_path, "data"))
    done = subprocess.run([sys.executable, "-m", "edgetune.cli.net_runner", "-f", path, "-d",
                           os.path.join(tmp_path, "data"), "-c", "1"], capture_output=True, text=True, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("net_runner: error: ") and path in lines[0]


def test_saved_file_permissions(tmp_path: os.PathLike) -> None:
    """A new file gets 0644 less the umask (not mkstemp's private 0600); a replaced file keeps its mode."""
    path = os.path.join(tmp_path, "m.tod")
    old = os.umask(0o027)
    try:
        tod_format.save_file(TodFile(meta={}), path)
        assert os.stat(path).st_mode & 0o777 == 0o640
        os.chmod(path, 0o604)
        tod_format.save_file(TodFile(meta={"again": True}), path)
        assert os.stat(path).st_mode & 0o777 == 0o604
    finally:
        os.umask(old)
