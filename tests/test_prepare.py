"""`edgetune prepare-data`: Places365, image folders, Fashion-MNIST; idempotence, completion, bad input."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetune.cli.main import main
from edgetune.data import prepare as prepare_module
from edgetune.data.idx import find_idx, read_idx
from edgetune.data.prepare import (FASHION_CLASSES, FASHION_SOURCE, prepare_fashion_mnist, prepare_image_folder,
                                   prepare_places365)
from edgetune.errors import UserError
from edgetune.runtime.dataset import read_class_file
from tests.fixtures_data import PLACES_PER_CLASS, class_color, make_places_tree, png_claiming, random_image

SEED_NAMES = ["alley", "cockpit", "amusement_arcade", "amusement_park", "aqueduct", "arena/hockey",
              "arena/rodeo", "bus_interior", "attic", "badlands"]
JPEG_TOL = 10  # JPEG loses a little colour; flat patches stay within this of the original


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "RGB" and img.size == (224, 224)
        return np.asarray(img, np.int16)


def snapshot(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.rglob("*")}


def test_places365_end_to_end(places_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    report = prepare_places365(places_src, out)
    assert (report.written, report.existing, report.skipped) == (10 * PLACES_PER_CLASS, 0, [])
    assert read_class_file(out / "classes.txt") == [(str(k), n) for k, n in enumerate(SEED_NAMES)]
    assert sorted(os.listdir(out)) == sorted([*map(str, range(10)), "classes.txt"])
    for k, class_id in enumerate(prepare_module.SEED_CLASSES):
        files = sorted((out / str(k)).iterdir())
        assert len(files) == PLACES_PER_CLASS and all(f.suffix == ".bmp" for f in files)
        color = np.array(class_color(class_id))
        border = 255 - color
        grey = round(color @ [0.299, 0.587, 0.114])  # ITU-R 601-2, Pillow's "L"
        for index, f in enumerate(files):  # list order = file order: index i is places_image(.., i)
            p = pixels(f)
            want = np.full(3, grey) if index == 0 else color
            # 256x256 sources: the 16 px border is exactly what the 224 crop cuts off
            assert np.abs(p[112, 112] - want).max() <= JPEG_TOL, (f, index)
            if index == 4:  # 200x150 -> 298x224 -> crop from x=37: border kept top and bottom only
                assert np.abs(p[2, 112] - border).max() <= JPEG_TOL
                assert np.abs(p[112, 2] - color).max() <= JPEG_TOL
            else:
                assert np.abs(p[2, 2] - want).max() <= JPEG_TOL
            if index == 0:
                assert (p[..., 0] == p[..., 1]).all() and (p[..., 1] == p[..., 2]).all()


def test_places365_options(places_src: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(places_src, src, symlinks=True)
    (src / "filelist_places365-standard").mkdir()
    (src / "places365_val.txt").rename(src / "filelist_places365-standard" / "places365_val.txt")
    (src / "categories_places365.txt").unlink()
    report = prepare_places365(src, tmp_path / "out", classes=[364, 4], fmt="png", per_class=3)
    assert report.class_names == ["364", "4"]  # no categories file: ids as names
    listed = [line.split() for line in (src / "filelist_places365-standard" / "places365_val.txt").read_text()
              .splitlines()]
    first3 = sorted(Path(f).stem + ".png" for f, c in listed if c == "364")[:3]
    assert sorted(os.listdir(tmp_path / "out" / "0")) == first3
    assert np.abs(pixels(tmp_path / "out" / "0" / first3[2])[112, 112] - class_color(364)).max() <= JPEG_TOL
    for bad, message in (([4, 4], "twice"), ([365], "out of range"), ([], "no classes")):
        with pytest.raises(UserError, match=message):
            prepare_places365(src, tmp_path / "bad", classes=bad)
    with pytest.raises(UserError, match="val_256"):
        prepare_places365(tmp_path, tmp_path / "bad")
    with pytest.raises(UserError, match="unknown format"):
        prepare_places365(src, tmp_path / "bad", fmt="gif")


def test_places365_bad_sources_are_skipped_and_replaced(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = make_places_tree(tmp_path / "src", per_class=4)
    lines = (src / "places365_val.txt").read_text().splitlines()
    alley = [line.split()[0] for line in lines if line.endswith(" 4")]
    (src / "val_256" / alley[0]).write_bytes(b"")                        # zero bytes
    data = (src / "val_256" / alley[1]).read_bytes()
    (src / "val_256" / alley[1]).write_bytes(data[: len(data) // 3])    # truncated
    (src / "val_256" / alley[2]).unlink()
    (src / "val_256" / alley[2]).mkdir()                                # a directory named x.jpg
    extra = ["bomb.jpg 4", "text.jpg 4", "missing.jpg 4", "Places365_val_99999999.jpg 4"]
    (src / "val_256" / "bomb.jpg").write_bytes(png_claiming(20000, 20000))
    (src / "val_256" / "text.jpg").write_text("hello")
    Image.new("RGB", (256, 256), class_color(4)).save(src / "val_256" / "Places365_val_99999999.jpg")
    (src / "places365_val.txt").write_text("\n".join(lines[:20] + extra + lines[20:]) + "\n")
    capsys.readouterr()
    report = prepare_places365(src, tmp_path / "out", per_class=2)
    reasons = {Path(s).name: r for s, r in report.skipped}
    assert reasons.keys() == {alley[0], alley[1], alley[2], "bomb.jpg", "text.jpg", "missing.jpg"}
    assert reasons[alley[0]] == "empty file" and "decompression bomb" in reasons["bomb.jpg"]
    assert reasons["missing.jpg"].startswith("unreadable") and reasons["text.jpg"] == "not an image"
    # two usable alley images remain: alley[3] and the extra one, in list order
    assert sorted(os.listdir(tmp_path / "out" / "0")) == sorted([Path(alley[3]).stem + ".bmp",
                                                                 "Places365_val_99999999.bmp"])
    assert report.total == 20
    err = capsys.readouterr().err
    assert err.count("warning: skipped") == 7 and "skipped 6 unusable source images" in err
    (src / "places365_val.txt").write_text("just-a-name\n")
    with pytest.raises(UserError, match=r"places365_val.txt:1: expected"):
        prepare_places365(src, tmp_path / "out2")


def test_rerun_is_a_no_op_and_a_half_written_output_is_completed(places_src: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "dataset"
    prepare_places365(places_src, out, per_class=3)
    before = snapshot(out)
    capsys.readouterr()
    again = prepare_places365(places_src, out, per_class=3)
    assert again.up_to_date and (again.written, again.existing) == (0, 30)
    assert snapshot(out) == before and "already complete (30 images), nothing to do" in capsys.readouterr().err
    # an interrupted run: killed while writing the 8th image of a fresh output
    fresh = tmp_path / "fresh"
    real_save, calls = prepare_module.save_atomic, []

    def dying_save(img: Image.Image, dest: Path, fmt: str) -> None:
        calls.append(dest)
        if len(calls) == 8:
            (dest.parent / f".{dest.name}.x.partial").write_bytes(b"torn")  # what a kill mid-write leaves
            raise KeyboardInterrupt
        real_save(img, dest, fmt)

    monkeypatch.setattr(prepare_module, "save_atomic", dying_save)
    with pytest.raises(KeyboardInterrupt):
        prepare_places365(places_src, fresh, per_class=3)
    monkeypatch.setattr(prepare_module, "save_atomic", real_save)
    assert not (fresh / "classes.txt").exists()
    assert sum(1 for p in fresh.rglob("*.bmp")) == 7
    done = prepare_places365(places_src, fresh, per_class=3)
    assert (done.written, done.existing, done.up_to_date) == (23, 7, False)
    assert not list(fresh.rglob(".*.partial"))
    assert snapshot(fresh).keys() == before.keys()
    for name in before:
        if name.endswith(".bmp"):
            assert (fresh / name).read_bytes() == (out / name).read_bytes()
    # a complete output with a file deleted afterwards: only that file is made again
    (fresh / "5" / sorted(os.listdir(fresh / "5"))[1]).unlink()
    assert prepare_places365(places_src, fresh, per_class=3).written == 1


def test_output_made_with_other_options_is_refused(places_src: Path, tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    prepare_places365(places_src, out, per_class=3)
    before = snapshot(out)
    with pytest.raises(UserError, match="other classes"):
        prepare_places365(places_src, out, classes=[4, 98], per_class=3)
    with pytest.raises(UserError, match="other options"):
        prepare_places365(places_src, out, per_class=2)
    with pytest.raises(UserError, match="other options"):
        prepare_places365(places_src, out, per_class=3, fmt="png")
    assert snapshot(out) == before  # refused before writing anything


def test_image_folder_tree(tmp_path: Path) -> None:
    src = tmp_path / "photos"
    for name in ("zebra", "apple"):
        (src / name / "sub").mkdir(parents=True)
    wide = random_image(src / "apple" / "a.png", (400, 300), seed=1, fmt="PNG")
    random_image(src / "apple" / "a.jpg", (300, 300), seed=2, fmt="JPEG")   # same stem as a.png
    random_image(src / "apple" / "sub" / "b.bmp", (256, 256), seed=3)
    (src / "apple" / "sub" / "loop").symlink_to("..")                       # a symlink loop
    (src / "apple" / "dir.jpg").mkdir()                                    # a directory named x.jpg
    (src / "apple" / "readme.txt").write_text("not an image")
    random_image(src / "zebra" / "z.bmp", (224, 224), seed=4)
    report = prepare_image_folder(src, tmp_path / "out", resize_shorter=None, crop=224)
    assert report.class_names == ["apple", "zebra"] and report.total == 4
    assert [Path(s).name for s, _ in report.skipped] == ["readme.txt"]
    assert sorted(os.listdir(tmp_path / "out" / "0")) == ["a.bmp", "a_png.bmp", "sub__b.bmp"]
    # resize_shorter None: a pure crop of the 400x300 PNG at round(176 / 2) = 88, round(76 / 2) = 38
    np.testing.assert_array_equal(pixels(tmp_path / "out" / "0" / "a_png.bmp"), wide[38:262, 88:312])
    report = prepare_image_folder(src, tmp_path / "out256", per_class=1)  # default: 256 then 224
    with Image.open(src / "apple" / "a.jpg") as jpg:  # first in sorted order; 300x300 -> 256x256 -> crop at 16
        expect = jpg.convert("RGB").resize((256, 256), Image.BILINEAR).crop((16, 16, 240, 240))
    np.testing.assert_array_equal(pixels(tmp_path / "out256" / "0" / "a.bmp"), np.asarray(expect))
    assert report.total == 2
    (src / "empty").mkdir()
    with pytest.raises(UserError, match=r"class folder .*empty is empty"):
        prepare_image_folder(src, tmp_path / "out3")


def test_image_folder_skips_and_counts_what_is_not_a_file(tmp_path: Path) -> None:
    """FIFOs, devices, broken links and links out of the class folder are listed in `skipped` (never
    read: a FIFO would block), and a link to another class never brings its images along."""
    src = tmp_path / "photos"
    for name in ("cat", "dog"):
        (src / name).mkdir(parents=True)
        for i in range(2):
            random_image(src / name / f"{name}{i}.bmp", (240, 240), seed=i + 10 * len(name))
    os.mkfifo(src / "cat" / "fifo.jpg")
    (src / "cat" / "zero.jpg").symlink_to("/dev/zero")
    (src / "cat" / "gone.jpg").symlink_to("nowhere.jpg")
    (src / "cat" / "dogs").symlink_to("../dog")       # another class: must not become cats
    (src / "cat" / "all").symlink_to("..")            # the whole tree
    report = prepare_image_folder(src, tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out" / "0")) == ["cat0.bmp", "cat1.bmp"]
    assert sorted(os.listdir(tmp_path / "out" / "1")) == ["dog0.bmp", "dog1.bmp"]
    reasons = {Path(s).name: r for s, r in report.skipped}
    assert sorted(reasons) == ["all", "dogs", "fifo.jpg", "gone.jpg", "zero.jpg"]
    assert reasons["gone.jpg"] == "broken or looping symlink"
    assert reasons["fifo.jpg"] == "not a regular file (a FIFO)"
    assert reasons["zero.jpg"] == f"a link to /dev/zero, outside {src / 'cat'}: not followed"
    assert reasons["dogs"] == f"a link to {src / 'dog'}, outside {src / 'cat'}: not followed"
    assert reasons["all"] == f"a link to {src}, outside {src / 'cat'}: not followed"


def test_fashion_mnist_prepared_from_the_idx_files(fashion_dir: Path) -> None:
    assert read_class_file(fashion_dir / "classes.txt") == [(str(k), n) for k, n in enumerate(FASHION_CLASSES)]
    images = read_idx(find_idx(FASHION_SOURCE, "t10k-images-idx3-ubyte"))
    labels = read_idx(find_idx(FASHION_SOURCE, "t10k-labels-idx1-ubyte"))
    for k in range(10):
        files = sorted(os.listdir(fashion_dir / str(k)))
        first = np.flatnonzero(labels == k)[:100]  # the first 100 of class k in file order
        assert files == [f"t10k_{i:05d}.bmp" for i in first]
    i = int(np.flatnonzero(labels == 8)[37])
    want = np.asarray(Image.fromarray(images[i]).resize((224, 224), Image.BICUBIC), np.int16)
    got = pixels(fashion_dir / "8" / f"t10k_{i:05d}.bmp")
    for c in range(3):
        np.testing.assert_array_equal(got[..., c], want)


def test_fashion_mnist_missing_files_say_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        prepare_fashion_mnist(tmp_path / "out", source=tmp_path)


def write_idx(path: Path, array: np.ndarray, code: int = 0x08, compress: bool = False) -> None:
    data = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data += array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


def fake_fashion(src: Path, test_per_class: int, train_per_class: int | None) -> dict[str, np.ndarray]:
    """IDX files of a small Fashion-MNIST: classes interleaved, each image filled with its index."""
    src.mkdir(parents=True, exist_ok=True)
    made = {}
    for split, per in (("t10k", test_per_class), ("train", train_per_class)):
        if per is None:
            continue
        labels = np.tile(np.arange(10, dtype=np.uint8), per)
        images = np.repeat(np.arange(len(labels), dtype=np.uint8)[:, None, None], 28, 1).repeat(28, 2)
        write_idx(src / f"{split}-images-idx3-ubyte.gz", images, compress=True)
        write_idx(src / f"{split}-labels-idx1-ubyte.gz", labels, compress=True)
        made[split] = labels
    return made


def test_fashion_mnist_takes_the_train_split_only_beyond_the_test_split(tmp_path: Path) -> None:
    src = tmp_path / "src"
    fake_fashion(src, test_per_class=2, train_per_class=None)  # no train files: not needed for 2 per class
    prepare_fashion_mnist(tmp_path / "small", per_class=2, source=src)
    assert sorted(os.listdir(tmp_path / "small" / "3")) == ["t10k_00003.bmp", "t10k_00013.bmp"]
    with pytest.raises(UserError, match="train split not found.*apt-get install dataset-fashion-mnist"):
        prepare_fashion_mnist(tmp_path / "big", per_class=3, source=src)
    fake_fashion(src, test_per_class=2, train_per_class=3)
    report = prepare_fashion_mnist(tmp_path / "big", per_class=4, source=src)
    assert report.total == 40
    # the test split first, then the train split, each in file order
    assert sorted(os.listdir(tmp_path / "big" / "3")) == ["t10k_00003.bmp", "t10k_00013.bmp",
                                                          "train_00003.bmp", "train_00013.bmp"]
    assert pixels(tmp_path / "big" / "3" / "train_00013.bmp").max() == 13  # train image 13, not test image 13
    assert pixels(tmp_path / "big" / "3" / "t10k_00013.bmp").min() == 13
    with pytest.raises(UserError, match="holds 5 images of some class.*--per-class 6"):
        prepare_fashion_mnist(tmp_path / "huge", per_class=6, source=src)
    assert not (tmp_path / "huge").exists()  # refused before writing anything


def test_fashion_mnist_grows_in_place_from_test_only_to_both_splits(tmp_path: Path) -> None:
    src = tmp_path / "src"
    fake_fashion(src, test_per_class=2, train_per_class=3)
    out = tmp_path / "out"
    prepare_fashion_mnist(out, per_class=2, source=src)
    before = snapshot(out / "0")
    report = prepare_fashion_mnist(out, per_class=5, source=src)
    assert (report.existing, report.written) == (20, 30)
    after = snapshot(out / "0")
    assert {k: after[k] for k in before} == before  # the test-split images were kept, not rewritten
    assert len(after) == 5


def test_idx_reader(tmp_path: Path) -> None:
    grid = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a-idx3-ubyte.gz", grid, compress=True)
    assert find_idx(tmp_path, "a-idx3-ubyte") == tmp_path / "a-idx3-ubyte.gz"
    np.testing.assert_array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), grid)
    floats = np.array([[1.5, -2.0]], np.float32)
    write_idx(tmp_path / "f", floats, code=0x0D)
    got = read_idx(tmp_path / "f")
    assert got.dtype == np.float32 and got.tolist() == [[1.5, -2.0]]
    (tmp_path / "t").write_bytes((tmp_path / "f").read_bytes()[:-1])
    with pytest.raises(UserError, match="declares"):
        read_idx(tmp_path / "t")
    (tmp_path / "n").write_bytes(b"\x89PNG....")
    with pytest.raises(UserError, match="not an IDX file"):
        read_idx(tmp_path / "n")
    assert find_idx(tmp_path, "missing-idx1-ubyte") is None


def test_cli(places_src: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ds"
    assert main(["prepare-data", "--places365", str(places_src), "-o", str(out), "--per-class", "2",
                 "--classes", "4", "30", "--format", "png"]) == 0
    assert f"{out}: 4 images in 2 classes (4 written" in capsys.readouterr().err
    assert [len(os.listdir(out / k)) for k in "01"] == [2, 2]
    assert main(["prepare-data", "--places365", str(places_src), "-o", str(out), "--per-class", "2",
                 "--classes", "4", "30", "--format", "png"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert main(["prepare-data", "--fashion-mnist", "--fashion-source", str(tmp_path), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("edgetune prepare-data: error:") and "apt-get install" in err[0]
    assert main(["prepare-data", "--images", str(tmp_path / "none"), "-o", str(out)]) == 2
    assert main(["prepare-data", "--places365", str(places_src), "-o", str(tmp_path / "p0"), "--per-class", "0"]) == 2
    assert "--per-class must be at least 1" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["prepare-data", "--places365", str(places_src), "-o", str(tmp_path / "file")]) == 2
    assert "is not a directory" in capsys.readouterr().err
