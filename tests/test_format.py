"""The `.tod` format (docs/FORMAT.md): golden bytes, order independence, and every reader error path."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgetune.runtime.format import (PREAMBLE, ChecksumError, HeaderError, MagicError, TodError, TodFile,
                                     TruncatedError, VersionError, load, load_file, save, save_file)

# save() of `_tiny()`: preamble (magic, 1.0, reserved, header length 0x190, header sha256), the
# sorted-key JSON header padded with one space, then entries b, i, w at 8-aligned offsets.
GOLDEN = bytes.fromhex(
    "45444745544f44000100000000000000900100000000000029d53bf4b79883ac40aca3273248361ca88a16b213d76b8b"
    "46afb5109b88469d7b22656e7472696573223a7b2262223a7b226f666673657473223a5b302c335d2c22736861323536"
    "223a22626137383136626638663031636665613431343134306465356461653232323362303033363161333936313737"
    "61396362343130666636316632303031356164227d2c2269223a7b226474797065223a22696e743634222c226f666673"
    "657473223a5b382c31365d2c22736861323536223a226161653839666330663033653239353961653464373031613830"
    "6363333931353931386339353062313539663661626236633932633134333362316138353334222c227368617065223a"
    "5b312c315d7d2c2277223a7b226474797065223a22666c6f61743332222c226f666673657473223a5b31362c32345d2c"
    "22736861323536223a223235326233333138313739636332343939386633363730393133643532643339303835636636"
    "3562306466613938666135323366666561623462363638336665222c227368617065223a5b325d7d7d2c226d65746122"
    "3a7b226e223a322c226e616d65223a2274696e79227d7d20616263000000000007000000000000000000c03f000000c0")


def _tiny() -> TodFile:
    return TodFile(meta={"name": "tiny", "n": 2},
                   tensors={"w": np.array([1.5, -2.0], np.float32), "i": np.array([[7]], np.int64)},
                   blobs={"b": b"abc"})


def _resign(header: dict, data: bytes, major: int = 1, minor: int = 0) -> bytes:
    """A file with an arbitrary (possibly lying) header and a *valid* header checksum."""
    raw = json.dumps(header, sort_keys=True).encode()
    raw += b" " * (-len(raw) % 8)
    return PREAMBLE.pack(b"EDGETOD\x00", major, minor, 0, len(raw), hashlib.sha256(raw).digest()) + raw + data


def _parts(blob: bytes) -> tuple[dict, bytes]:
    hlen = PREAMBLE.unpack_from(blob)[4]
    return json.loads(blob[PREAMBLE.size:PREAMBLE.size + hlen]), blob[PREAMBLE.size + hlen:]


def test_golden_bytes():
    assert save(_tiny()) == GOLDEN
    back = load(GOLDEN)
    assert back.meta == {"name": "tiny", "n": 2} and back.blobs == {"b": b"abc"}
    np.testing.assert_array_equal(back.tensors["w"], [1.5, -2.0])
    assert back.tensors["i"].dtype == np.int64 and back.tensors["i"].tolist() == [[7]]


def test_bytes_do_not_depend_on_dict_order():
    t = _tiny()
    shuffled = TodFile(meta={"n": 2, "name": "tiny"}, tensors={"i": t.tensors["i"], "w": t.tensors["w"]},
                       blobs=dict(t.blobs))
    assert save(shuffled) == GOLDEN


def test_save_file_roundtrip_and_atomic(tmp_path):
    path = save_file(_tiny(), tmp_path / "m.tod")
    assert path == str(tmp_path / "m.tod") and (tmp_path / "m.tod").read_bytes() == GOLDEN
    assert [p.name for p in tmp_path.iterdir()] == ["m.tod"]  # no temp file left
    assert load_file(path).meta["name"] == "tiny"


def test_save_file_writes_every_layout_of_tensor_as_save_does(tmp_path):
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    tod = TodFile(meta={"n": 1}, tensors={"big_endian": base.astype(">f8"), "fortran": np.asfortranarray(base),
                                          "strided": base[:, ::2], "scalar": np.array(3, np.int32),
                                          "empty": np.zeros((0, 5), np.float32)},
                  blobs={"blob": bytearray(b"xyz")})
    path = save_file(tod, tmp_path / "m.tod")
    assert (tmp_path / "m.tod").read_bytes() == save(tod)
    back = load_file(path)
    np.testing.assert_array_equal(back.tensors["big_endian"], base)
    np.testing.assert_array_equal(back.tensors["strided"], base[:, ::2])
    assert back.tensors["scalar"].shape == () and back.blobs["blob"] == b"xyz"


def test_save_file_writes_the_tensors_without_copying_them(tmp_path):
    """A checkpoint is written from the tensors' own memory: saving never holds a second copy."""
    weights = np.ones((4, 1 << 20), np.float32)  # 16 MiB
    tod = TodFile(meta={"n": 1}, tensors={"w": weights})
    tracemalloc.start()
    try:
        save_file(tod, tmp_path / "m.tod")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < weights.nbytes // 16, f"saving a {weights.nbytes} B tensor allocated {peak} B"
    np.testing.assert_array_equal(load_file(tmp_path / "m.tod").tensors["w"], weights)


@pytest.mark.parametrize("cut", [0, 10, PREAMBLE.size, PREAMBLE.size + 100, len(GOLDEN) - 1])
def test_truncated(cut):
    with pytest.raises(TruncatedError):
        load(GOLDEN[:cut])


@pytest.mark.parametrize("offset, error", [(30, ChecksumError), (PREAMBLE.size + 5, ChecksumError),
                                           (len(GOLDEN) - 3, ChecksumError),
                                           (len(GOLDEN) - 20, HeaderError)])  # a byte of the zero gap
def test_corrupt_bit(offset, error):
    data = bytearray(GOLDEN)
    data[offset] ^= 0x04
    with pytest.raises(error):
        load(bytes(data))


def test_wrong_magic():
    with pytest.raises(MagicError):
        load(b"PK\x03\x04" + GOLDEN[4:])


def test_newer_major_version_refused_newer_minor_read():
    header, data = _parts(GOLDEN)
    with pytest.raises(VersionError, match="newer"):
        load(_resign(header, data, major=3))
    header["meta"]["future_key"] = 1
    newer = load(_resign(header, data, minor=7))
    assert newer.meta["future_key"] == 1 and newer.version == (1, 7)


def test_version_is_the_files_own_and_kept_on_save():
    assert load(GOLDEN).version == (1, 0)  # what this tiny file needs: written as 1.0, the golden bytes above
    two = _tiny()
    two.version = (2, 0)
    assert load(save(two)).version == (2, 0)
    assert save(load(save(two))) == save(two)
    two.version = (3, 0)
    with pytest.raises(ValueError, match="cannot write format version 3.0"):
        save(two)


def test_lying_sizes():
    header, data = _parts(GOLDEN)
    big = json.loads(json.dumps(header))
    big["entries"]["w"]["offsets"] = [16, 16 + 8 * 10**12]  # claims 8 TB: refused before any allocation
    with pytest.raises(TruncatedError):
        load(_resign(big, data))
    shape = json.loads(json.dumps(header))
    shape["entries"]["w"]["shape"] = [1000]
    with pytest.raises(HeaderError, match="needs 4000 bytes"):
        load(_resign(shape, data))
    gap = json.loads(json.dumps(header))
    gap["entries"]["i"]["offsets"] = [4, 12]  # not aligned / overlapping the previous entry
    with pytest.raises(HeaderError):
        load(_resign(gap, data))
    with pytest.raises(HeaderError, match="after the last entry"):
        load(_resign(header, data + b"\x00" * 8))
    pre = bytearray(GOLDEN)
    pre[16:24] = (2**62).to_bytes(8, "little")  # header length beyond the limit
    with pytest.raises(HeaderError):
        load(bytes(pre))


def test_header_not_json_shape():
    header, data = _parts(GOLDEN)
    with pytest.raises(HeaderError):
        load(_resign({"meta": [], "entries": header["entries"]}, data))
    with pytest.raises(HeaderError, match="bad offsets"):
        load(_resign({"meta": {}, "entries": {"b": {"offsets": "x"}}}, data))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, len(GOLDEN) - 1), st.integers(1, 255))
def test_any_single_byte_change_is_a_tod_error_or_harmless(offset, xor):
    data = bytearray(GOLDEN)
    data[offset] ^= xor
    try:
        back = load(bytes(data))
    except TodError:
        return
    # only the header's space padding or the zero gaps can change unnoticed; content must be intact
    assert back.meta == {"name": "tiny", "n": 2} and back.blobs == {"b": b"abc"}


def test_cli_bad_tod_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.tod"
    bad.write_bytes(GOLDEN[:-5])
    (tmp_path / "data").mkdir()
    proc = subprocess.run([sys.executable, "-m", "edgetune.cli.main", "run", "-f", str(bad), "-d",
                           str(tmp_path / "data"), "-e", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgetune run: error:") and "bad.tod" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
