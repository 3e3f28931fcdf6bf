"""The numpy BMP reader: bit-identical to Pillow on what prepare-data writes and on hand-made variants,
strict on malformed headers, and the loader working with Pillow blocked (the device install)."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from edgetune.runtime import decode as decode_module
from edgetune.runtime.bmp import BmpError, BmpUnsupported, decode_bmp
from edgetune.runtime.dataset import load_dataset
from edgetune.runtime.decode import MAX_PIXELS, BadImage, decode_image

LITE0 = {"resize_shorter": 256, "crop": "center", "size": [224, 224], "layout": "NCHW", "channels": "RGB",
         "scale": 1.0, "mean": [127.0] * 3, "std": [128.0] * 3}


def make_bmp(pixels: np.ndarray, bits: int = 24, *, top_down: bool = False, header: int = 40,
             compression: int = 0, masks: tuple[int, ...] = (), palette: np.ndarray | None = None,
             fourth: int = 0) -> bytes:
    """A BMP written by hand: (H, W, 3) RGB pixels, or (H, W) palette indices with `palette` (N, 3).

    `masks` go after a 40-byte header, or into a longer one (R, G, B, A at header offset 40).
    `fourth` fills the 4th byte of 32-bit pixels (ignored by readers: BGRX).
    """
    height, width = pixels.shape[:2]
    if bits == 8:
        rows = pixels.astype(np.uint8)
        table = np.concatenate([palette[:, ::-1], np.zeros((len(palette), 1), np.uint8)], 1).tobytes()
    else:
        bgr = pixels[:, :, ::-1]
        rows = bgr if bits == 24 else np.concatenate([bgr, np.full((height, width, 1), fourth, np.uint8)], 2)
        rows = rows.reshape(height, -1)
        table = b""
    stride = (width * bits + 31) // 32 * 4
    padded = np.zeros((height, stride), np.uint8)
    padded[:, :rows.shape[1]] = rows
    data = (padded if top_down else padded[::-1]).tobytes()
    info = struct.pack("<IiiHHIIiiII", header, width, -height if top_down else height, 1, bits, compression,
                       len(data), 2835, 2835, len(palette) if palette is not None else 0, 0)
    extra = struct.pack(f"<{len(masks)}I", *masks)
    if header > 40:
        info = (info + extra).ljust(header, b"\0")
    else:
        table = extra + table
    offset = 14 + len(info) + len(table)
    return b"BM" + struct.pack("<IHHI", offset + len(data), 0, 0, offset) + info + table + data


def pillow_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def random_pixels(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_prepared_fashion_bmps_decode_bit_identical_to_pillow(fashion_dir: Path) -> None:
    files = sorted(fashion_dir.glob("*/*.bmp"))
    assert len(files) == 1000
    for path in files:
        data = path.read_bytes()
        ours = decode_bmp(data, MAX_PIXELS)
        assert ours.dtype == np.uint8 and ours.shape == (224, 224, 3)
        np.testing.assert_array_equal(ours, pillow_rgb(data), err_msg=str(path))


@pytest.mark.parametrize("width", [1, 2, 3, 5, 7, 224])
@pytest.mark.parametrize("top_down", [False, True])
@pytest.mark.parametrize("bits, compression, header, masks", [
    (24, 0, 40, ()), (32, 0, 40, ()), (32, 0, 124, ()),
    (32, 3, 40, (0xFF0000, 0xFF00, 0xFF)), (32, 3, 108, (0xFF0000, 0xFF00, 0xFF, 0xFF000000)),
    (32, 3, 56, (0xFF0000, 0xFF00, 0xFF, 0)), (24, 3, 52, (0xFF0000, 0xFF00, 0xFF)),
])
def test_hand_made_variants_match_pillow(width: int, top_down: bool, bits: int, compression: int, header: int,
                                         masks: tuple[int, ...]) -> None:
    pixels = random_pixels(5, width, seed=width)
    data = make_bmp(pixels, bits, top_down=top_down, header=header, compression=compression, masks=masks,
                    fourth=77)
    ours = decode_bmp(data, MAX_PIXELS)
    np.testing.assert_array_equal(ours, pixels)
    np.testing.assert_array_equal(ours, pillow_rgb(data))


@pytest.mark.parametrize("colors", [256, 16, 3])
@pytest.mark.parametrize("width", [1, 3, 6])
def test_8_bit_palette_matches_pillow(colors: int, width: int) -> None:
    rng = np.random.default_rng(colors + width)
    palette = rng.integers(0, 256, (colors, 3), dtype=np.uint8)
    indices = rng.integers(0, 256 if colors < 256 else colors, (4, width), dtype=np.uint8)  # past the palette too
    data = make_bmp(indices, 8, palette=palette)
    ours = decode_bmp(data, MAX_PIXELS)
    np.testing.assert_array_equal(ours, pillow_rgb(data))
    inside = indices < colors
    np.testing.assert_array_equal(ours[inside], palette[indices[inside]])
    assert (ours[~inside] == 0).all()
    # a grey ramp palette, as Pillow writes for mode L (which it reads back without a palette)
    grey = np.asarray(Image.fromarray(rng.integers(0, 256, (4, width), dtype=np.uint8), "L"))
    out = io.BytesIO()
    Image.fromarray(grey, "L").save(out, "BMP")
    np.testing.assert_array_equal(decode_bmp(out.getvalue(), MAX_PIXELS), np.repeat(grey[..., None], 3, 2))


def with_field(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


GOOD = make_bmp(random_pixels(6, 5))  # 24-bit, 40-byte header, offset 54, rows of 16 bytes
MALFORMED = {
    "truncated pixels": (GOOD[:-1], "truncated"),
    "truncated header": (GOOD[:30], "truncated"),
    "only the magic": (b"BM", "not a BMP"),
    "offset past the end": (with_field(GOOD, 10, "<I", 10_000), "truncated"),
    "offset inside the header": (with_field(GOOD, 10, "<I", 40), "inside the header"),
    "header larger than the file": (make_bmp(random_pixels(1, 1), header=124)[:100], "truncated"),
    "zero width": (with_field(GOOD, 18, "<i", 0), "bad BMP header"),
    "zero height": (with_field(GOOD, 22, "<i", 0), "bad BMP header"),
    "negative width": (with_field(GOOD, 18, "<i", -5), "bad BMP header"),
    "two planes": (with_field(GOOD, 26, "<H", 2), "bad BMP header"),
    "height larger than the data": (with_field(GOOD, 22, "<i", 7), "truncated"),
    "huge dims": (with_field(with_field(GOOD, 18, "<i", 100_000), 22, "<i", 100_000), "decompression bomb"),
    "huge top-down dims": (with_field(with_field(GOOD, 18, "<i", 2**31 - 1), 22, "<i", -(2**31)),
                           "decompression bomb"),
    "too many palette colours": (with_field(make_bmp(np.zeros((2, 2), np.uint8), 8, palette=np.zeros((4, 3),
                                                                                                     np.uint8)),
                                            46, "<I", 300), "palette colours"),
    "palette cut": (make_bmp(np.zeros((2, 2), np.uint8), 8, palette=np.zeros((256, 3), np.uint8))[:300],
                    "truncated"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_files_are_refused_with_a_reason(name: str) -> None:
    data, reason = MALFORMED[name]
    with pytest.raises(BmpError, match=reason) as caught:
        decode_bmp(data, MAX_PIXELS)
    assert not isinstance(caught.value, BmpUnsupported)
    with pytest.raises(BadImage, match=reason):  # the loader's error, never Pillow's opinion
        decode_image(data)


def test_huge_declared_dims_allocate_nothing() -> None:
    """Under the pixel limit but far beyond the file: refused as truncated before any allocation."""
    lying = with_field(with_field(GOOD, 18, "<i", 8000), 22, "<i", 8000)  # 64 Mpx, 192 MB of rows
    tracemalloc.start()
    try:
        with pytest.raises(BmpError, match="truncated"):
            decode_bmp(lying, MAX_PIXELS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100_000


@pytest.mark.parametrize("data", [
    make_bmp(random_pixels(3, 3), 24, compression=1),  # an RLE compression code
    make_bmp(random_pixels(3, 3), 32, compression=3, masks=(0xFF, 0xFF00, 0xFF0000)),
])
def test_other_kinds_are_left_to_pillow(data: bytes) -> None:
    with pytest.raises(BmpUnsupported):
        decode_bmp(data, MAX_PIXELS)


def test_unsupported_bmp_kinds_fall_back_to_pillow() -> None:
    """A 1-bit BMP (Pillow writes mode "1" so) is not the reader's: the loader hands it to Pillow."""
    bits = np.random.default_rng(3).integers(0, 2, (9, 13)).astype(bool)
    out = io.BytesIO()
    Image.fromarray(bits).save(out, "BMP")
    with pytest.raises(BmpUnsupported):
        decode_bmp(out.getvalue(), MAX_PIXELS)
    np.testing.assert_array_equal(decode_image(out.getvalue()), np.repeat(bits[..., None] * 255, 3, 2))


@settings(max_examples=150, deadline=None)
@given(cut=st.integers(0, 200), flips=st.lists(st.tuples(st.integers(0, 200), st.integers(1, 255)), max_size=4))
def test_damaged_bmps_give_pixels_or_bmp_error(cut: int, flips: list[tuple[int, int]]) -> None:
    data = bytearray(make_bmp(random_pixels(7, 9), 32, header=108, compression=3,
                              masks=(0xFF0000, 0xFF00, 0xFF, 0)))
    for at, xor in flips:
        data[at % len(data)] ^= xor
    data = data[: len(data) - cut]
    try:
        pixels = decode_bmp(bytes(data), MAX_PIXELS)
    except BmpError:
        return
    assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    assert pixels.shape[0] * pixels.shape[1] <= MAX_PIXELS


NO_PILLOW = textwrap.dedent("""
    import importlib.abc, json, sys
    import numpy as np

    class NoPillow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "PIL" or name.startswith("PIL."):
                raise ImportError(f"No module named {name!r} (blocked)")
            return None

    sys.meta_path.insert(0, NoPillow())
    from edgetune.runtime.dataset import load_dataset
    preprocessing = json.loads(sys.argv[2])
    ds = load_dataset(sys.argv[1], preprocessing, num_classes=2)
    batch = np.concatenate([ds.train.images(range(len(ds.train))), ds.test.images([0]), ds.validation.images(None)])
    np.save(sys.argv[3], batch)
    json.dump({"skipped": ds.skipped, "pil": sorted(m for m in sys.modules if m.split(".")[0] == "PIL")},
              sys.stdout)
""")


def test_loader_works_with_pillow_blocked(fashion_dir: Path, tmp_path: Path) -> None:
    """The device install has no Pillow: prepared BMPs load and decode exactly as with Pillow; a PNG and a
    BMP that would need resizing are skipped at load time with a reason that says `pip install pillow`."""
    root = tmp_path / "data"
    for label in ("0", "1"):
        (root / label).mkdir(parents=True)
        for path in sorted((fashion_dir / label).glob("*.bmp"))[:6]:
            shutil.copy(path, root / label / path.name)
    (root / "classes.txt").write_text("".join((fashion_dir / "classes.txt").read_text().splitlines(True)[:2]))
    Image.fromarray(random_pixels(224, 224)).save(root / "0" / "zz_photo.png")
    (root / "1" / "zz_small.bmp").write_bytes(make_bmp(random_pixels(100, 120)))
    out = tmp_path / "batch.npy"
    done = subprocess.run([sys.executable, "-c", NO_PILLOW, os.fspath(root), json.dumps(LITE0), os.fspath(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-800:]
    report = json.loads(done.stdout)
    assert report["pil"] == []
    skipped = {Path(p).name: reason for p, reason in report["skipped"]}
    assert set(skipped) == {"zz_photo.png", "zz_small.bmp"}
    assert all("pip install pillow" in reason for reason in skipped.values())
    # the same set with Pillow present (the PNG and the resize now fine): the BMPs give the same batch
    with_pillow = load_dataset(root, LITE0, num_classes=2)
    assert with_pillow.skipped == []
    expected = np.concatenate([with_pillow.train.images([i for i, p in enumerate(with_pillow.train.paths)
                                                         if not Path(p).name.startswith("zz_")]),
                               with_pillow.test.images([0]), with_pillow.validation.images(None)])
    np.testing.assert_array_equal(np.load(out), expected)


def test_decode_image_of_a_prepared_bmp_needs_no_pillow(fashion_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process twin of the subprocess test: a prepared BMP through `Split.images` never calls Pillow."""
    monkeypatch.setattr(decode_module, "pillow", lambda: pytest.fail("Pillow was needed"))
    for module in ("dataset", "geometry"):  # each module that may reach for Pillow
        monkeypatch.setattr(f"edgetune.runtime.{module}.pillow", lambda: pytest.fail("Pillow was needed"))
    ds = load_dataset(fashion_dir, LITE0, num_classes=10)
    batch = ds.test.images([0, 1])
    pixels = np.asarray(Image.open(ds.test.paths[1]), np.float32).transpose(2, 0, 1)
    np.testing.assert_array_equal(batch[1], (pixels - 127) / 128)
