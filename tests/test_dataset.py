"""The runtime loader: split rule, labels from classes.txt, preprocessing numbers, bad input."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from edgetune.errors import UserError
from edgetune.runtime import dataset as dataset_module
from edgetune.runtime.dataset import load_dataset, preprocess, read_class_file
from edgetune.runtime.decode import BadImage, open_image
from edgetune.runtime.geometry import shorter_side_size
from tests.fixtures_data import png_claiming, random_image

LITE0 = {"resize_shorter": 256, "crop": "center", "size": [224, 224], "layout": "NCHW", "channels": "RGB",
         "scale": 1.0, "mean": [127.0, 127.0, 127.0], "std": [128.0, 128.0, 128.0]}
IMAGENET = {**LITE0, "scale": 1 / 255, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def small_pre(size: int = 8, resize: int | None = None) -> dict:
    return {**LITE0, "resize_shorter": resize, "size": [size, size]}


def make_dataset(root: Path, classes: list[tuple[str, str]], per_class: int, size: int = 8) -> Path:
    """classes.txt in the given order + `per_class` random BMPs per folder, folders made in reverse order."""
    root.mkdir(parents=True, exist_ok=True)
    for i, (folder, _) in reversed(list(enumerate(classes))):
        (root / folder).mkdir()
        for j in range(per_class):
            random_image(root / folder / f"img_{j:03d}.bmp", (size, size), seed=100 * i + j)
    (root / "classes.txt").write_text("".join(f"{f}\t{n}\n" for f, n in classes), encoding="utf-8")
    return root


def test_fashion_split_is_60_20_20_per_class_by_the_seed_rule(fashion_dir: Path) -> None:
    ds = load_dataset(fashion_dir, LITE0, num_classes=10)
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    assert (len(ds.train), len(ds.test), len(ds.validation)) == (600, 200, 200)
    for split, per_class in ((ds.train, 60), (ds.test, 20), (ds.validation, 20)):
        assert np.bincount(split.labels, minlength=10).tolist() == [per_class] * 10
    all_paths = ds.train.paths + ds.test.paths + ds.validation.paths
    assert len(set(all_paths)) == 1000 and ds.skipped == []
    # the rule, by hand, for class 3: its sorted listing, index % 5
    files = sorted(os.listdir(fashion_dir / "3"))
    expect = {"validation": files[0::5], "test": files[1::5]}
    expect["train"] = [f for i, f in enumerate(files) if i % 5 > 1]
    for name, want in expect.items():
        split = ds.split(name)
        got = [Path(p).name for p, lab in zip(split.paths, split.labels) if lab == 3]
        assert got == want
    # the key is the sha256 of the file's bytes
    assert ds.test.keys[7] == hashlib.sha256(Path(ds.test.paths[7]).read_bytes()).hexdigest()


def test_fashion_images_are_preprocessed_as_lite0_wants(fashion_dir: Path) -> None:
    ds = load_dataset(fashion_dir, LITE0)
    batch = ds.validation.images([0, 5])
    assert batch.shape == (2, 3, 224, 224) and batch.dtype == np.float32
    pixels = np.asarray(Image.open(ds.validation.paths[5]), np.float64)  # 224x224 already: no resize
    np.testing.assert_allclose(batch[1], (pixels.transpose(2, 0, 1) - 127) / 128, rtol=0, atol=1e-6)


def test_labels_follow_the_class_file_not_the_directory_listing(tmp_path: Path) -> None:
    classes = [("b", "bee"), ("c", "cat"), ("a", "ant")]  # sorted listing would be a, b, c
    root = make_dataset(tmp_path / "ds", classes, per_class=5)
    ds = load_dataset(root, small_pre())
    assert ds.class_names == ["bee", "cat", "ant"]
    for split in (ds.train, ds.test, ds.validation):
        for path, label in zip(split.paths, split.labels):
            assert Path(path).parent.name == classes[label][0]
    # with 5 per class: 1 validation, 1 test, 3 train each
    assert ds.validation.labels.tolist() == [0, 1, 2] and ds.train.labels.tolist() == [0] * 3 + [1] * 3 + [2] * 3


def test_preprocessing_matches_a_hand_computation(tmp_path: Path) -> None:
    # exact size: no resize, only (p * scale - mean) / std with ImageNet numbers
    pixels = random_image(tmp_path / "a.bmp", (224, 224), seed=1)
    out = preprocess(Image.open(tmp_path / "a.bmp"), IMAGENET)
    for c, y, x in ((0, 0, 0), (1, 100, 37), (2, 223, 223)):
        hand = (pixels[y, x, c] / 255 - IMAGENET["mean"][c]) / IMAGENET["std"][c]
        assert out[c, y, x] == pytest.approx(hand, abs=1e-5)
    # no resize_shorter: a pure center crop at torchvision's offsets round((300-224)/2)=38, round((260-224)/2)=18
    pixels = random_image(tmp_path / "b.bmp", (300, 260), seed=2)
    out = preprocess(Image.open(tmp_path / "b.bmp"), {**LITE0, "resize_shorter": None})
    np.testing.assert_allclose(out, (pixels[18:242, 38:262].transpose(2, 0, 1) - 127.0) / 128.0, atol=1e-6)
    # resize_shorter 256 of a 512x384 image: 341x256 (torchvision's int()), then a crop; a flat colour stays flat
    img = Image.new("RGB", (512, 384), (200, 10, 127))
    assert shorter_side_size(img.size, 256) == (341, 256)
    out = preprocess(img, LITE0)
    assert out.shape == (3, 224, 224)
    for c, value in enumerate((73 / 128, -117 / 128, 0.0)):
        np.testing.assert_allclose(out[c], value, atol=1e-6)


@pytest.mark.parametrize("size, pre", [((512, 384), LITE0), ((1000, 257), LITE0), ((100, 50), LITE0),
                                       ((300, 260), {**LITE0, "resize_shorter": None}),
                                       ((640, 480), {**LITE0, "size": [200, 240]})])
def test_only_the_crop_window_is_resized(size: tuple[int, int], pre: dict) -> None:
    """`preprocess` resizes only the crop window: within 1 grey level of resizing the whole image
    with Pillow and cutting torchvision's center crop from it (the reference)."""
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    height, width = pre["size"]
    def resize_shorter(shorter: int) -> Image.Image:  # the whole image, as torchvision's Resize
        return img.resize(shorter_side_size(img.size, shorter), Image.BILINEAR)

    full = img if pre["resize_shorter"] is None else resize_shorter(pre["resize_shorter"])
    if min(full.size[0] - width, full.size[1] - height) < 0:
        full = resize_shorter(max(height, width))
    left, top = round((full.size[0] - width) / 2), round((full.size[1] - height) / 2)
    reference = np.asarray(full.crop((left, top, left + width, top + height)), np.float32).transpose(2, 0, 1)
    out = preprocess(img, {**pre, "mean": [0.0] * 3, "std": [1.0] * 3})
    assert out.shape == (3, height, width)
    assert np.abs(out - reference).max() <= 1


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_grey_is_scaled_to_8_bits(mode: str) -> None:
    """Pillow's convert("RGB") clips 16-bit values at 255 (flat white); each must become v >> 8."""
    values = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)  # 0..64491
    out = io.BytesIO()
    if mode == "I;16":
        Image.fromarray(values).save(out, "PNG")
    else:  # 32-bit grey, as Pillow also opens some 16-bit files
        Image.fromarray(values.astype(np.int32)).save(out, "TIFF")
    img = open_image(out.getvalue())
    assert img.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(img), np.repeat((values >> 8).astype(np.uint8)[..., None], 3, axis=2))


def test_images_decodes_only_the_requested_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_dataset(tmp_path / "ds", [("0", "x"), ("1", "y")], per_class=10)
    ds = load_dataset(root, small_pre())
    opened: list[str] = []
    real = dataset_module.decode_image
    monkeypatch.setattr(dataset_module, "decode_image", lambda p: (opened.append(p), real(p))[1])
    batch = ds.train.images(np.array([4, 1]))
    assert opened == [ds.train.paths[4], ds.train.paths[1]]
    assert batch.shape == (2, 3, 8, 8)
    assert ds.train.images(slice(0, 3)).shape == (3, 3, 8, 8)
    np.testing.assert_array_equal(ds.train.images(None)[[4, 1]], batch)


@pytest.mark.parametrize("width,height", [(9000, 8000), (10000, 10000), (20000, 20000)],
                         ids=["over-our-limit", "pillow-warning", "pillow-error"])
def test_decompression_bombs_are_refused(width: int, height: int) -> None:
    with pytest.raises(BadImage, match="decompression bomb"):
        open_image(png_claiming(width, height))


def test_bad_files_are_skipped_with_warnings_and_one_summary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = make_dataset(tmp_path / "ds", [("0", "x"), ("1", "y")], per_class=5)
    good = (root / "0" / "img_000.bmp").read_bytes()
    (root / "0" / "empty.bmp").write_bytes(b"")
    (root / "0" / "truncated.bmp").write_bytes(good[: len(good) // 2])
    (root / "0" / "notes.txt").write_text("not an image")
    (root / "1" / "bomb.png").write_bytes(png_claiming(20000, 20000))
    (root / "1" / "dir.bmp").mkdir()
    (root / "1" / "loop.bmp").symlink_to("loop.bmp")
    (root / "1" / ".hidden.tmp").write_bytes(b"junk")  # temp files are not candidates at all
    jpeg = tmp_path / "t.jpg"
    random_image(jpeg, (64, 64), seed=3, fmt="JPEG")
    (root / "1" / "truncated.jpg").write_bytes(jpeg.read_bytes()[:300])
    ds = load_dataset(root, small_pre())
    reasons = {Path(p).name: r for p, r in ds.skipped}
    assert set(reasons) == {"empty.bmp", "truncated.bmp", "notes.txt", "bomb.png", "dir.bmp", "loop.bmp",
                            "truncated.jpg"}
    assert reasons["empty.bmp"] == "empty file" and reasons["notes.txt"] == "not an image"
    assert "decompression bomb" in reasons["bomb.png"] and "truncated" in reasons["truncated.bmp"]
    assert reasons["dir.bmp"] == "a directory, not a file" and reasons["loop.bmp"] == "broken or looping symlink"
    assert len(ds.train) + len(ds.test) + len(ds.validation) == 10
    err = capsys.readouterr().err
    assert err.count("warning: skipped ") == 8 and "skipped 7 of 17 files" in err


def test_unreadable_file_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_dataset(tmp_path / "ds", [("0", "x")], per_class=3)
    real = os.open

    def refusing_open(path, flags, *args):  # chmod 0 does not stop root, so refuse the open here
        if os.fspath(path).endswith("img_001.bmp"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    ds = load_dataset(root, small_pre())
    assert [(Path(p).name, r) for p, r in ds.skipped] == [("img_001.bmp", "unreadable (Permission denied)")]


def test_class_count_mismatch_is_refused_before_reading_images(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_dataset(tmp_path / "ds", [("0", "x"), ("1", "y")], per_class=2)
    monkeypatch.setattr(dataset_module, "check_file", lambda p: pytest.fail("decoded an image"))
    with pytest.raises(UserError, match="has 2 classes but the model has 10"):
        load_dataset(root, small_pre(), num_classes=10)


def test_dataset_structure_errors(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", [("0", "x"), ("1", "y")], per_class=2)
    (root / "2").mkdir()
    (root / "classes.txt").write_text("0\tx\n1\ty\n2\tz\n")
    with pytest.raises(UserError, match=r"class folder .*2 \(class 'z'\) has no usable images"):
        load_dataset(root, small_pre())
    (root / "classes.txt").write_text("0\tx\n3\tw\n")
    with pytest.raises(UserError, match=r"class folder .*3 \(class 'w'\) is missing"):
        load_dataset(root, small_pre())
    (root / "classes.txt").unlink()
    with pytest.raises(UserError, match="prepare-data"):
        load_dataset(root, small_pre())
    with pytest.raises(UserError, match="not found"):
        load_dataset(tmp_path / "nothing", small_pre())
    with pytest.raises(UserError, match="only NCHW RGB"):
        load_dataset(root, {**small_pre(), "layout": "NHWC"})


@pytest.mark.parametrize("text,message", [
    ("0 x\n", "expected `<folder>"), ("0\tx\n0\ty\n", "listed twice"), ("\n\n", "lists no classes"),
    ("../up\tx\n", "expected `<folder>"),
])
def test_class_file_errors(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "classes.txt").write_text(text)
    with pytest.raises(UserError, match=message):
        read_class_file(tmp_path / "classes.txt")


def test_class_file_reads_names_with_spaces_and_unicode(tmp_path: Path) -> None:
    (tmp_path / "classes.txt").write_text("0\tT-shirt/top\n\n1\tAnkle boot é\n", encoding="utf-8")
    assert read_class_file(tmp_path / "classes.txt") == [("0", "T-shirt/top"), ("1", "Ankle boot é")]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["BMP", "PNG", "JPEG", "GIF"]), cut=st.integers(0, 2000),
       flips=st.lists(st.tuples(st.integers(0, 5000), st.integers(1, 255)), max_size=4))
def test_damaged_files_give_an_image_or_bad_image_never_another_error(fmt: str, cut: int,
                                                                      flips: list[tuple[int, int]]) -> None:
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(out, format=fmt)
    data = bytearray(out.getvalue())
    for at, xor in flips:
        data[at % len(data)] ^= xor
    data = data[: len(data) - cut] if cut < len(data) else data
    try:
        img = open_image(bytes(data))
    except BadImage:
        return
    assert img.mode == "RGB"
