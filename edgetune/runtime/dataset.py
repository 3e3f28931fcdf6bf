"""The dataset: the class list, the seed's 60/20/20 split and the loader (decode -> geometry -> normalize).

Layout (written by `edgetune prepare-data`): `DIR/classes.txt` (UTF-8, one line per class,
`<folder>\\t<class name>`; line k is label k) and `DIR/<folder>/*` images. Labels come from the
class file's order, never from the order the file system lists folders in, and `classes.txt` is the
one source of truth: without it the loader refuses the directory rather than guess.

Split rule (the seed's, applied per class so it stays stratified): a class's usable images sorted by
file name, the image at index i goes to validation when i % 5 == 0, to test when i % 5 == 1 and to
train otherwise. With 100 images per class that is 60 train / 20 test / 20 validation.

Every file is checked once at load time (read, sha256 of its bytes as the per-sample key, then a
full decode), so an unreadable, truncated, empty, oversized or non-image file is skipped with a
warning there and never surfaces mid-training. `Split.images` decodes only the files asked for, so
memory stays at one batch. Each image goes through `decode` (bytes to RGB pixels; BMPs without
Pillow), `geometry` (resize and center crop, only for images not already at the model's size) and
`normalize` (the model's `meta["preprocessing"]`, docs/FORMAT.md).
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgetune.errors import UserError
from edgetune.runtime.bounds import MAX_TEXT_BYTES
from edgetune.runtime.decode import BadImage, decode_image, pillow, read_bytes
from edgetune.runtime.geometry import resize_and_crop
from edgetune.runtime.normalize import check_preprocessing, normalize
from edgetune.runtime.safe_read import UnsafeFile, read_file

if TYPE_CHECKING:
    from PIL import Image

CLASS_FILE = "classes.txt"
SPLITS = ("train", "test", "validation")


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
    return normalize(np.asarray(img, dtype=np.uint8), preprocessing)


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

