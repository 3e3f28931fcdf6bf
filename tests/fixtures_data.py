"""Shared pytest fixtures for the data layer's tests.

`fashion_dir`: Fashion-MNIST prepared once per run (100 per class, 1000 BMPs, ~3 s), the demo's data.
`places_src`: a generated Places365-layout source tree (see `make_places_tree`); read-only, copy it
before adding files. Writers other layers' tests share: `write_dataset` (a prepared dataset separable
by colour), `make_tiny_dataset` (one for the tiny model, in whole and partial blocks of 5),
`png_claiming` (a decompression bomb by header).
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetune.data.prepare import FASHION_SOURCE, SEED_CLASSES
from tests.fixtures_runtime import TINY_SHAPE

# real Places365 names of the seed's classes; the other ids get made-up names
PLACES_NAMES = {4: "/a/alley", 98: "/c/cockpit", 6: "/a/amusement_arcade", 7: "/a/amusement_park",
                10: "/a/aqueduct", 15: "/a/arena/hockey", 17: "/a/arena/rodeo", 70: "/b/bus_interior",
                26: "/a/attic", 30: "/b/badlands"}
PLACES_PER_CLASS = 6  # images per seed class in the generated tree
PLACES_OTHER = (0, 364)  # classes present in the list but not chosen by default


def class_color(class_id: int) -> tuple[int, int, int]:
    """A distinct RGB colour per class id, so a test can tell classes apart by their pixels."""
    return (class_id * 37 % 256, class_id * 91 % 256, class_id * 53 % 256)


def places_image(class_id: int, index: int) -> tuple[Image.Image, str]:
    """One source image and the format to save it in: a mix of sizes and modes, as in the wild.

    Index 0 is grey, 1 CMYK, 2 RGBA (PNG bytes under a .jpg name), 3 palette (GIF bytes),
    4 a smaller 200x150 RGB (resized up before the crop), others 256x256 RGB (cropped only).
    A 16-pixel border in another colour marks what the 224 center crop must cut away.
    """
    color = class_color(class_id)
    size = (200, 150) if index == 4 else (256, 256)
    img = Image.new("RGB", size, (255 - color[0], 255 - color[1], 255 - color[2]))
    img.paste(Image.new("RGB", (size[0] - 32, size[1] - 32), color), (16, 16))
    if index == 0:
        return img.convert("L"), "JPEG"
    if index == 1:
        return img.convert("CMYK"), "JPEG"
    if index == 2:
        return img.convert("RGBA"), "PNG"
    if index == 3:
        return img.convert("P", palette=Image.ADAPTIVE, colors=8), "GIF"
    return img, "JPEG"


def make_places_tree(root: Path, per_class: int = PLACES_PER_CLASS) -> Path:
    """Write a Places365-layout tree: val_256/*.jpg, places365_val.txt, categories_places365.txt.

    The list interleaves classes (as the real one does, sorted by file name) and includes
    classes that are not in the seed's selection.
    """
    (root / "val_256").mkdir(parents=True)
    lines = []
    number = 0
    for index in range(per_class):
        for class_id in (*SEED_CLASSES, *PLACES_OTHER):
            number += 1
            name = f"Places365_val_{number:08d}.jpg"
            img, fmt = places_image(class_id, index)
            img.save(root / "val_256" / name, format=fmt, quality=95)
            lines.append(f"{name} {class_id}\n")
    (root / "places365_val.txt").write_text("".join(lines))
    categories = [f"{PLACES_NAMES.get(i, f'/x/class_{i}')} {i}\n" for i in range(365)]
    (root / "categories_places365.txt").write_text("".join(categories))
    return root


@pytest.fixture(scope="session")
def places_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated Places365 source tree (6 images for each seed class + 2 other classes)."""
    return make_places_tree(tmp_path_factory.mktemp("places365"))


@pytest.fixture(scope="session")
def fashion_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fashion-MNIST prepared as the demo uses it: 100 per class, 224x224 RGB BMPs + classes.txt."""
    if not os.path.isdir(FASHION_SOURCE):
        pytest.skip(f"{FASHION_SOURCE} absent: apt-get install dataset-fashion-mnist")
    from edgetune.data.prepare import prepare_fashion_mnist

    out = tmp_path_factory.mktemp("fashion") / "dataset"
    prepare_fashion_mnist(out, per_class=100)
    return out


def random_image(path: Path, size: tuple[int, int], seed: int, fmt: str = "BMP") -> np.ndarray:
    """Save a random RGB image and return its pixels (H, W, 3) uint8: a test image with known content."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").save(path, format=fmt)
    return pixels


def write_dataset(root: Path, classes: int = 3, per_class: int = 10, size: int = 8) -> Path:
    """A prepared dataset (classes.txt + BMP folders) of size x size images, separable by colour."""
    rng = np.random.default_rng(0)
    lines = []
    for c in range(classes):
        (root / str(c)).mkdir(parents=True)
        lines.append(f"{c}\tclass {c}")
        for i in range(per_class):
            px = np.clip(rng.normal(60 + 70 * c, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / str(c) / f"{i:03d}.bmp")
    (root / "classes.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR (checksum fixed) claims width x height: a decompression bomb in 70 bytes."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    return bytes(data)


TINY_CLASSES = 3


def make_tiny_dataset(root: Path, per_class: int = 23, seed: int = 0) -> Path:
    """A prepared dataset for the tiny model: `classes.txt` + 8x8 RGB BMPs, a class-dependent colour + noise.

    23 per class = 4 whole blocks of 5 and a partial one, so the shards' edge case is exercised.
    """
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    lines = []
    for label in range(TINY_CLASSES):
        folder = root / f"c{label}"
        folder.mkdir()
        lines.append(f"c{label}\tclass {label}")
        base = np.array([60 + 70 * label, 200 - 60 * label, 90 + 40 * (label % 2)], np.float64)
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 40, (*TINY_SHAPE[1:], 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / f"img_{i:03d}.bmp", format="BMP")
    (root / "classes.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root
