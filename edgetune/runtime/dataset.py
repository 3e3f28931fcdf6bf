"""The device-side dataset loader: a class-per-folder image tree split 60/20/20, numpy (+ Pillow if needed).

Layout (written by `edgetune prepare-data`): `DIR/classes.txt` (UTF-8, one line per class,
`<folder>\\t<class name>`; line k is label k) and `DIR/<folder>/*` images. Labels come from the
class file's order, never from the order the file system lists folders in, and `classes.txt` is the
one source of truth: without it the loader refuses the directory rather than guess.

Split rule (the seed's, applied per class so it stays stratified): a class's usable images sorted by
file name, the image at index i goes to validation when i % 5 == 0, to test when i % 5 == 1 and to
train otherwise. With 100 images per class that is 60 train / 20 test / 20 validation.

Every file is checked once at load time (read, sha256 of its bytes as the per-sample key, then a
full decode), so an unreadable, truncated, empty or non-image file is skipped with a warning there
and never surfaces mid-training. Images that claim more than `MAX_PIXELS` pixels (decompression
bombs) are refused the same way. `Split.images` decodes only the files asked for, so memory stays
at one batch.

Decoding (`decode_image`): BMPs, what `edgetune prepare-data` writes, are read by the numpy-only
`edgetune.runtime.bmp` (as the seed's device code reads its BMPs itself), so the device needs no
image library. Pillow is imported only for other formats (PNG, JPEG, ...), BMP kinds that reader
does not handle, and images not already at the model's size (resize/crop); without Pillow such a
file is skipped at load time with a reason that says `pip install pillow`.

Preprocessing follows the model's `meta["preprocessing"]` (docs/FORMAT.md): resize the shorter
side to `resize_shorter` (skipped when null, and skipped altogether for an image already at
`size`), center crop to `size` [H, W], then `(p * scale - mean[c]) / std[c]` per RGB channel, NCHW.
Only the crop window is ever resized (`resize_and_crop`), so memory stays at the crop's size.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetune.errors import UserError
from edgetune.runtime.bmp import BmpError, BmpUnsupported, decode_bmp
from edgetune.runtime.bounds import MAX_IMAGE_BYTES, MAX_TEXT_BYTES
from edgetune.runtime.safe_read import UnsafeFile, read_file

if TYPE_CHECKING:
    from PIL import Image

CLASS_FILE = "classes.txt"
MAX_PIXELS = 64 * 1024 * 1024  # refuse images over 64 Mpx: any real photo fits, a bomb does not
SPLITS = ("train", "test", "validation")


class BadImage(Exception):
    """A file that cannot be used as an image; the message is the reason shown to the user."""


def pillow() -> ModuleType:
    """`PIL.Image`, imported on first need: the device decodes its BMPs without it.

    Raises:
        BadImage: Pillow is not installed (the file needing it is skipped, with this reason).
    """
    try:
        from PIL import Image
    except ImportError:
        raise BadImage("needs Pillow (not installed) to decode or resize it: "
                       "pip install pillow (or edgetune[images])") from None
    return Image


def read_bytes(data: bytes | str | os.PathLike, root: str | os.PathLike | None = None) -> bytes:
    """The file's bytes (`data` itself when already bytes); `BadImage` if unreadable, refused or empty.

    A path is read by `safe_read.read_file`: a regular file of at most `MAX_IMAGE_BYTES`, inside
    `root` once links are resolved (when given), opened so that nothing can block.
    """
    if not isinstance(data, bytes):
        try:
            data = read_file(data, max_bytes=MAX_IMAGE_BYTES, root=root)
        except UnsafeFile as e:
            raise BadImage(e.reason) from None
        except OSError as e:
            raise BadImage(f"unreadable ({e.strerror or e})") from e
    if not data:
        raise BadImage("empty file")
    return data


def decode_image(data: bytes | str | os.PathLike) -> np.ndarray:
    """Decode one image to RGB pixels: BMPs with the numpy reader, anything else with Pillow.

    Args:
        data: the file's bytes, or its path.

    Returns:
        (height, width, 3) uint8 RGB; for a BMP identical to Pillow's `open_image`.

    Raises:
        BadImage: unreadable, empty, malformed, too large, or not a BMP while Pillow is missing.
    """
    data = read_bytes(data)
    if data[:2] == b"BM":
        try:
            return decode_bmp(data, MAX_PIXELS)
        except BmpUnsupported:
            pass  # a valid BMP kind the reader skips (RLE, 16-bit, ...): Pillow's
        except BmpError as e:
            raise BadImage(str(e)) from None
    return np.asarray(open_image(data))


def open_image(data: bytes | str | os.PathLike) -> Image.Image:
    """Open, check and fully decode one image as 3-channel RGB.

    Decompression bombs are refused before decoding: the pixel count from the header is checked
    against `MAX_PIXELS`, and Pillow's own `DecompressionBombWarning` is raised as an error.
    Grey, palette, CMYK and alpha images become RGB the way torchvision's ImageFolder loader does
    (`convert("RGB")`, alpha dropped), so prepared data matches what the usual pipeline sees;
    16-bit grey is scaled to 8 bits first (`to_rgb`), where that loader clips it to white.

    Args:
        data: the file's bytes, or its path.

    Returns:
        The decoded RGB image.

    Raises:
        BadImage: empty, truncated, not an image, or too large.
    """
    data = read_bytes(data)
    pil = pillow()
    with warnings.catch_warnings():
        warnings.simplefilter("error", pil.DecompressionBombWarning)
        warnings.simplefilter("ignore", UserWarning)  # "palette images with transparency" etc.
        try:
            with pil.open(io.BytesIO(data)) as probe:
                check_size(probe.size)
                probe.verify()
            img = pil.open(io.BytesIO(data))
            img.load()
            return img if img.mode == "RGB" else to_rgb(img)
        except (pil.DecompressionBombError, pil.DecompressionBombWarning) as e:
            raise BadImage(f"refused: decompression bomb ({e})") from e
        except BadImage:
            raise
        except pil.UnidentifiedImageError as e:
            raise BadImage("not an image") from e
        except Exception as e:  # Pillow's decoders raise many types on corrupt data (OSError, SyntaxError,
            # struct.error, ValueError, ...): each means the same, this file cannot be used
            raise BadImage(f"corrupt or truncated ({type(e).__name__}: {e})") from e


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to 8-bit RGB.

    16-bit grey (PNG, TIFF: modes `I;16*`, and `I`, which Pillow also uses for them) is scaled down
    to 8 bits (`>> 8`) first: Pillow's own `convert("RGB")` clips those values at 255, so a
    16-bit photo would come out as flat white. Values of a 32-bit `I` image outside 0..65535 are
    clipped to that range (no camera makes them).
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        pixels = np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8
        img = pillow().fromarray(pixels.astype(np.uint8), "L")
    return img.convert("RGB")


def check_size(size: tuple[int, int]) -> None:
    """Raise `BadImage` for an image whose header claims more than `MAX_PIXELS` pixels."""
    width, height = size
    if width * height > MAX_PIXELS:
        raise BadImage(f"refused: {width}x{height} pixels is over the {MAX_PIXELS} limit (decompression bomb?)")


def shorter_side_size(size: tuple[int, int], shorter: int) -> tuple[int, int]:
    """(width, height) with the shorter side at `shorter`, aspect ratio kept (torchvision's rounding)."""
    w, h = size
    return (shorter, int(shorter * h / w)) if w <= h else (int(shorter * w / h), shorter)


def resize_shorter(img: Image.Image, shorter: int, resample: int | None = None) -> Image.Image:
    """Scale `img` so its shorter side is `shorter`, keeping the aspect ratio (torchvision's rounding).

    `resample` is a Pillow filter; None means bilinear.
    """
    if min(img.size) == shorter:
        return img
    return img.resize(shorter_side_size(img.size, shorter), pillow().BILINEAR if resample is None else resample)


def center_crop(img: Image.Image, height: int, width: int) -> Image.Image:
    """Cut the central `height` x `width` window (torchvision's offsets: round((size - crop) / 2))."""
    w, h = img.size
    if (w, h) == (width, height):
        return img
    if w < width or h < height:
        raise BadImage(f"{w}x{h} is smaller than the {width}x{height} crop")
    left, top = int(round((w - width) / 2.0)), int(round((h - height) / 2.0))
    return img.crop((left, top, left + width, top + height))


def resize_and_crop(img: Image.Image, shorter: int | None, height: int, width: int,
                    resample: int | None = None) -> Image.Image:
    """`resize_shorter(img, shorter)` then `center_crop(..., height, width)`, resizing only the window.

    The shorter side goes to `shorter` (None: size kept); an image still smaller than the crop has
    its shorter side scaled to cover it instead (`max(height, width)`). Only the crop window is
    computed, through Pillow's `resize(box=...)`: the same filter taps at the same source
    positions as resizing the whole image and cropping (equal within 1 grey level, float
    rounding), but memory is that of the crop. Resizing the whole image first is a memory bomb
    for a strip: 100000x4 pixels (0.4 Mpx) at a 256 shorter side would be 6.4 Gpx. `resample` is a
    Pillow filter; None means bilinear.
    """
    w, h = img.size
    new = shorter_side_size((w, h), shorter) if shorter and min(w, h) != shorter else (w, h)
    if new[0] < width or new[1] < height:
        new = shorter_side_size((w, h), max(height, width))
    if new == (w, h):
        return center_crop(img, height, width)
    left, top = int(round((new[0] - width) / 2.0)), int(round((new[1] - height) / 2.0))
    sx, sy = w / new[0], h / new[1]  # source pixels per resized pixel
    box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
    return img.resize((width, height), pillow().BILINEAR if resample is None else resample, box=box)


def read_class_file(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Read `classes.txt`: one `<folder>\\t<class name>` line per class, line k = label k.

    Args:
        path: the class file.

    Returns:
        `(folder, name)` pairs in label order.

    Raises:
        UserError: missing file, a line without a tab, an empty field, a repeated folder.
    """
    path = Path(os.fspath(path))
    try:
        text = read_file(path, max_bytes=MAX_TEXT_BYTES, root=path.parent).decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} not found: prepare the dataset with `edgetune prepare-data`") from None
    except UnsafeFile as e:
        raise UserError(f"cannot read {path}: {e.reason}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    pairs: list[tuple[str, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        folder, tab, name = line.partition("\t")
        if not tab or not folder or not name or "/" in folder or folder in (".", ".."):
            raise UserError(f"{path}:{number}: expected `<folder>\\t<class name>`, got {line!r}")
        if any(folder == f for f, _ in pairs):
            raise UserError(f"{path}:{number}: folder {folder!r} listed twice")
        pairs.append((folder, name))
    if not pairs:
        raise UserError(f"{path} lists no classes")
    return pairs


def preprocess(img: Image.Image | np.ndarray, preprocessing: dict[str, Any]) -> np.ndarray:
    """Turn one RGB image into a (3, H, W) float32 array as the model's `preprocessing` says.

    Args:
        img: an RGB image (see `open_image`) or its (H, W, 3) uint8 pixels (see `decode_image`);
            pixels already at the model's size need no Pillow.
        preprocessing: `meta["preprocessing"]` of the model (docs/FORMAT.md).

    Returns:
        `(p * scale - mean[c]) / std[c]` per channel, after resize and center crop.
    """
    height, width = (int(v) for v in preprocessing["size"])
    if isinstance(img, np.ndarray) and img.shape[:2] != (height, width):
        img = pillow().fromarray(img)
    if not isinstance(img, np.ndarray) and img.size != (width, height):
        shorter = preprocessing.get("resize_shorter")
        img = resize_and_crop(img, int(shorter) if shorter else None, height, width)
    pixels = np.asarray(img, dtype=np.uint8)
    lut = _normalize_table(preprocessing)
    return np.stack([lut[c][pixels[..., c]] for c in range(3)])


def _normalize_table(preprocessing: dict[str, Any]) -> np.ndarray:
    """(3, 256) float32: `(p * scale - mean[c]) / std[c]` for every 8-bit value `p`.

    A lookup gives the same float32 numbers as computing each pixel (the same operations on the
    same inputs) at a third of the cost, which matters when every image of a dataset is decoded.
    """
    scale = np.float32(preprocessing.get("scale", 1.0))
    mean = np.asarray(preprocessing["mean"], np.float32).reshape(3, 1)
    std = np.asarray(preprocessing["std"], np.float32).reshape(3, 1)
    return (np.arange(256, dtype=np.float32) * scale - mean) / std


def check_preprocessing(preprocessing: dict[str, Any]) -> None:
    """Refuse a `preprocessing` dict this loader cannot honour, before any image is read."""
    try:
        if preprocessing.get("layout", "NCHW") != "NCHW" or preprocessing.get("channels", "RGB") != "RGB":
            raise UserError(f"only NCHW RGB input is supported, the model asks for "
                            f"{preprocessing.get('layout')} {preprocessing.get('channels')}")
        if preprocessing.get("crop", "center") not in ("center", None):
            raise UserError(f"unknown crop {preprocessing['crop']!r} (known: center)")
        size = [int(v) for v in preprocessing["size"]]
        if len(size) != 2 or min(size) <= 0 or len(preprocessing["mean"]) != 3 or len(preprocessing["std"]) != 3:
            raise UserError(f"bad preprocessing size/mean/std: {preprocessing}")
        if any(float(s) == 0 for s in preprocessing["std"]):
            raise UserError("preprocessing std must not be 0")
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"bad preprocessing metadata ({e!r}): {preprocessing}") from None


@dataclass
class Split:
    """One of the three splits: which files, their labels and keys; images decoded on demand.

    Attributes:
        name: "train", "test" or "validation".
        paths: image file paths.
        labels: (N,) int64 class ids, from the class file's order.
        keys: per-sample sha256 hex of the file bytes (the feature-cache key).
        preprocessing: the model's `meta["preprocessing"]`.
    """

    name: str
    paths: list[str]
    labels: np.ndarray
    keys: list[str]
    preprocessing: dict[str, Any] = field(repr=False)

    def __len__(self) -> int:
        return len(self.paths)

    def images(self, indices: Iterable[int] | slice | None = None) -> np.ndarray:
        """Decode and preprocess the chosen samples only (a streaming batch).

        Args:
            indices: sample indices (any int sequence or a slice); None means all.

        Returns:
            (len(indices), 3, H, W) float32.

        Raises:
            UserError: a file changed or vanished since the dataset was loaded.
        """
        if indices is None:
            indices = range(len(self))
        elif isinstance(indices, slice):
            indices = range(*indices.indices(len(self)))
        height, width = (int(v) for v in self.preprocessing["size"])
        chosen = [int(i) for i in np.asarray(list(indices), dtype=np.int64).reshape(-1)]
        out = np.empty((len(chosen), 3, height, width), np.float32)
        for row, i in enumerate(chosen):
            try:
                out[row] = preprocess(decode_image(self.paths[i]), self.preprocessing)
            except BadImage as e:
                raise UserError(f"{self.paths[i]}: {e} (it changed since the dataset was loaded)") from None
        return out


@dataclass
class Dataset:
    """A loaded dataset: class names, the three splits and what was skipped.

    Attributes:
        root: the dataset directory.
        class_names: names in label order.
        train, test, validation: the 60/20/20 splits.
        skipped: `(path, reason)` for every file left out.
    """

    root: str
    class_names: list[str]
    train: Split
    test: Split
    validation: Split
    skipped: list[tuple[str, str]]

    def split(self, name: str) -> Split:
        """The split called `name` ("train", "test" or "validation")."""
        if name not in SPLITS:
            raise UserError(f"unknown split {name!r} (known: {', '.join(SPLITS)})")
        return getattr(self, name)


def list_files(folder: Path) -> list[Path]:
    """Candidate image files of one class folder, sorted by name; hidden files (temp files) ignored."""
    return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)


def check_file(path: Path, size: tuple[int, int], root: str | os.PathLike | None = None) -> str:
    """Read and fully check one image file; return the sha256 hex of its bytes (`BadImage` if unusable).

    The file must be a regular file inside `root` (the dataset folder) once links are resolved
    (`read_bytes`). An image not at the model's `size` (H, W) also needs Pillow for its resize:
    that is checked here too, so a missing Pillow shows at load time, never mid-training.
    """
    data = read_bytes(path, root)
    if decode_image(data).shape[:2] != size:
        pillow()
    return hashlib.sha256(data).hexdigest()


def load_dataset(data_dir: str | os.PathLike, preprocessing: dict[str, Any], *,
                 num_classes: int | None = None) -> Dataset:
    """Load a prepared dataset directory and split it 60/20/20 per class (see the module docstring).

    Args:
        data_dir: directory with `classes.txt` and one folder per class.
        preprocessing: the model's `meta["preprocessing"]`; used as is, never re-typed.
        num_classes: the model's class count; a dataset with another count is refused before any
            image is read.

    Returns:
        The dataset; skipped files are listed in `skipped` and summarised on stderr.

    Raises:
        UserError: no such directory, no `classes.txt`, a class count that does not fit the model,
            a missing or empty class folder.
    """
    root = Path(os.fspath(data_dir))
    if not root.is_dir():
        raise UserError(f"dataset directory {root} not found: prepare it with `edgetune prepare-data`")
    check_preprocessing(preprocessing)
    classes = read_class_file(root / CLASS_FILE)
    if num_classes is not None and len(classes) != num_classes:
        raise UserError(f"{root} has {len(classes)} classes but the model has {num_classes}: "
                        f"export the model with --num-classes {len(classes)} or use another dataset")
    size = tuple(int(v) for v in preprocessing["size"])
    parts: dict[str, tuple[list[str], list[int], list[str]]] = {s: ([], [], []) for s in SPLITS}
    skipped: list[tuple[str, str]] = []
    for label, (folder, name) in enumerate(classes):
        class_dir = root / folder
        if not class_dir.is_dir():
            raise UserError(f"class folder {class_dir} (class {name!r}) is missing")
        usable: list[tuple[Path, str]] = []
        for path in list_files(class_dir):
            try:
                usable.append((path, check_file(path, size, root)))
            except BadImage as e:
                skipped.append((str(path), str(e)))
                print(f"warning: skipped {path}: {e}", file=sys.stderr)
        if not usable:
            raise UserError(f"class folder {class_dir} (class {name!r}) has no usable images")
        for index, (path, key) in enumerate(usable):
            split = "validation" if index % 5 == 0 else "test" if index % 5 == 1 else "train"
            paths, labels, keys = parts[split]
            paths.append(str(path))
            labels.append(label)
            keys.append(key)
    if skipped:
        total = sum(len(p[0]) for p in parts.values()) + len(skipped)
        print(f"warning: skipped {len(skipped)} of {total} files in {root} (unreadable or not images)",
              file=sys.stderr)
    splits = {s: Split(s, p, np.asarray(lab, np.int64), k, preprocessing) for s, (p, lab, k) in parts.items()}
    return Dataset(str(root), [n for _, n in classes], skipped=skipped, **splits)

