"""Hostile images through `edgetune prepare-data --images` and through the device loader.

Each case is either converted (into a 224x224 RGB BMP by prepare-data; into a finite (3, H, W)
array by the loader), or skipped and counted with its reason, or refused with a clear error; which
one is pinned here and listed in docs/RELIABILITY.md. Nothing may hang, blow up memory or leak
one class's images into another through a symlink.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetune.data.prepare import prepare_image_folder
from edgetune.runtime.dataset import load_dataset
from tests.fixtures_data import png_claiming

LITE0 = {"resize_shorter": 256, "crop": "center", "size": [224, 224], "layout": "NCHW", "channels": "RGB",
         "scale": 1.0, "mean": [127.0] * 3, "std": [128.0] * 3}


def _photo(seed: int, size: tuple[int, int] = (64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _save(img: Image.Image, path: Path, fmt: str, **kw) -> None:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    path.write_bytes(buf.getvalue())


def write_hostile(folder: Path) -> dict[str, str]:
    """The hostile files in `folder`; returns name -> what must happen ("converted" or "skipped")."""
    folder.mkdir(parents=True, exist_ok=True)
    # a real bomb: 12000 x 6000 1-bit PNG (72 Mpx, 9 MB as bits; 216 MB once RGB), a few KB on disk
    _save(Image.new("1", (12000, 6000)), folder / "bomb.png", "PNG")
    (folder / "bomb_header.png").write_bytes(png_claiming(40000, 40000))
    _save(_photo(1, (1, 1)), folder / "one_pixel.png", "PNG")
    _save(_photo(2, (10000, 10)), folder / "wide.png", "PNG")
    _save(_photo(3).convert("CMYK"), folder / "cmyk.jpg", "JPEG")
    deep = (np.arange(48 * 64, dtype=np.uint16).reshape(48, 64) * 21).astype(np.uint16)  # 0..64491
    Image.fromarray(deep).save(folder / "deep16.png")  # mode I;16
    frames = [_photo(10 + i).convert("P") for i in range(3)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    full = io.BytesIO()
    _photo(4, (200, 150)).save(full, "JPEG")
    (folder / "truncated.jpg").write_bytes(full.getvalue()[:len(full.getvalue()) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("not an image")
    (folder / "x.jpg").mkdir()
    (folder / "self.jpg").symlink_to("self.jpg")  # a link to itself: ELOOP on open
    (folder / "dev.jpg").symlink_to("/dev/zero")  # a device: would read forever
    os.mkfifo(folder / "fifo.jpg")  # a FIFO: would block forever
    for i in range(5):
        _save(_photo(20 + i), folder / f"good{i}.jpg", "JPEG")
    return {"bomb.png": "skipped", "bomb_header.png": "skipped", "one_pixel.png": "converted",
            "wide.png": "converted", "cmyk.jpg": "converted", "deep16.png": "converted",
            "animated.gif": "converted", "truncated.jpg": "skipped", "empty.jpg": "skipped",
            "text.jpg": "skipped", **{f"good{i}.jpg": "converted" for i in range(5)}}


@pytest.fixture(scope="module")
def hostile_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """SRC/a: the hostile files + a symlink loop back to SRC; SRC/b: five good photos."""
    src = tmp_path_factory.mktemp("hostile") / "src"
    expect = write_hostile(src / "a")
    (src / "a" / "loop").symlink_to("..")  # SRC/a/loop -> SRC: a loop through the tree
    (src / "b").mkdir()
    for i in range(5):
        _save(_photo(40 + i), src / "b" / f"other{i}.jpg", "JPEG")
    return src, expect


def test_prepare_data_images(hostile_tree: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    src, expect = hostile_tree
    out = tmp_path / "out"
    start = time.monotonic()
    report = prepare_image_folder(src, out)
    seconds = time.monotonic() - start
    skipped = {Path(source).name: reason for source, reason in report.skipped}
    written_a = sorted(p.stem for p in (out / "0").iterdir())
    written_b = sorted(p.stem for p in (out / "1").iterdir())
    converted = sorted(Path(n).stem for n, what in expect.items() if what == "converted")
    assert written_a == converted, "class a must hold exactly its own convertible images"
    assert written_b == [f"other{i}" for i in range(5)]
    assert sorted(n for n in skipped if n in expect) == sorted(n for n, w in expect.items() if w == "skipped")
    assert "decompression bomb" in skipped["bomb.png"] and "decompression bomb" in skipped["bomb_header.png"]
    assert "truncated" in skipped["truncated.jpg"] and skipped["empty.jpg"] == "empty file"
    for path in (out / "0").iterdir():
        with Image.open(path) as img:
            assert img.size == (224, 224) and img.mode == "RGB"
    deep = np.asarray(Image.open(out / "0" / "deep16.bmp"), np.float32)
    assert deep.std() > 10, "a 16-bit gradient must stay a gradient, not clip to flat white"
    assert seconds < 30


def test_prepare_data_cli_exit_and_summary(hostile_tree: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """The CLI run finishes (exit 0) with one warning per skipped file and a closing count."""
    src, expect = hostile_tree
    done = subprocess.run([sys.executable, "-m", "edgetune.cli.main", "prepare-data", "--images", os.fspath(src),
                           "-o", os.fspath(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    n_converted = sum(w == "converted" for w in expect.values()) + 5
    assert f"{n_converted} images in 2 classes" in done.stderr


def test_loader(hostile_tree: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    """The same files dropped into a prepared dataset's class folder: the loader skips and counts the
    bad ones at load time and decodes the rest to finite (3, 224, 224) arrays."""
    data = tmp_path / "data"
    expect = write_hostile(data / "0")
    (data / "0" / "loop").symlink_to("..")
    (data / "1").mkdir()
    for i in range(5):
        _save(_photo(40 + i, (224, 224)), data / "1" / f"other{i}.bmp", "BMP")
    (data / "classes.txt").write_text("0\ta\n1\tb\n", encoding="utf-8")
    ds = load_dataset(data, LITE0, num_classes=2)
    skipped = {Path(p).name for p, _ in ds.skipped}
    bad = {n for n, w in expect.items() if w == "skipped"}
    assert bad <= skipped
    assert skipped - bad <= {"x.jpg", "self.jpg", "dev.jpg", "fifo.jpg", "loop"}
    used = sorted(Path(p).name for s in (ds.train, ds.test, ds.validation) for p in s.paths)
    assert used == sorted([n for n, w in expect.items() if w == "converted"] + [f"other{i}.bmp" for i in range(5)])
    for split in (ds.train, ds.test, ds.validation):
        batch = split.images(range(len(split)))
        assert batch.shape == (len(split), 3, 224, 224) and np.isfinite(batch).all()


ASPECT_BOMB = textwrap.dedent("""
    import resource, sys
    import numpy as np
    from PIL import Image
    with open("/proc/self/status") as s:
        vm = next(int(l.split()[1]) * 1024 for l in s if l.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + 2**30, vm + 2**30))
    from edgetune.runtime.dataset import preprocess
    from edgetune.runtime.decode import BadImage, open_image
    from edgetune.data.prepare import crop_image
    path, way = sys.argv[1], sys.argv[2]
    try:
        if way == "prepare":
            size = crop_image(path, 256, 224).size
        else:
            size = preprocess(open_image(path), {preprocessing!r}).shape
    except BadImage as e:
        print("skipped:", e)
    else:
        print("converted:", size)
""").format(preprocessing=LITE0)


@pytest.mark.parametrize("way", ["prepare", "loader"])
def test_aspect_ratio_bomb_stays_bounded(way: str, tmp_path: Path) -> None:
    """A 100000x4 PNG (1.2 MB, 0.4 Mpx: passes the pixel limit) whose shorter side resized to 256
    would be 6.4 Gpx / 4.9 GB: prepare and the loader must convert it (only the crop window needs
    resizing) or skip it, within 1 GiB of address space, never die of MemoryError."""
    path = tmp_path / "wide_bomb.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (4, 100000, 3), dtype=np.uint8)).save(path)
    done = subprocess.run([sys.executable, "-c", ASPECT_BOMB, os.fspath(path), way], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OPENBLAS_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-600:]
    assert done.stdout.startswith(("converted: (224, 224)", "converted: (3, 224, 224)", "skipped:")), done.stdout
