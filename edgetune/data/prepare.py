"""Prepare a class-per-folder dataset for the loader: Places365 (the seed's), any image folder tree, or
Fashion-MNIST (the demo's default: Debian's `dataset-fashion-mnist`, no download).

Output (what `edgetune.runtime.dataset.load_dataset` reads): `OUT/classes.txt` (`<folder>\\t<name>`
per line, line k = label k) and `OUT/<k>/<name>.bmp` (or .png), RGB, for k = 0..N-1.

Re-running is safe. Output names are derived from the source names, each image is written to a
hidden temp file and renamed into place, and `classes.txt` is written last (atomically), so:
an interrupted run is completed by the next one without duplicates, a complete output is left alone,
and an output made with other options is refused (it would mix two datasets).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from edgetune.data.idx import find_idx, read_idx
from edgetune.data.progress import Progress
from edgetune.errors import UserError
from edgetune.runtime.atomic import TEMP_SUFFIX, write_atomic
from edgetune.runtime.bounds import MAX_TEXT_BYTES
from edgetune.runtime.dataset import CLASS_FILE, read_class_file
from edgetune.runtime.decode import BadImage, open_image, read_bytes
from edgetune.runtime.geometry import resize_and_crop
from edgetune.runtime.safe_read import UnsafeFile, check_inside, read_file

# Places365 ids of the seed's classes, in the order of its folders 0..9: alley, cockpit,
# amusement_arcade, amusement_park, aqueduct, arena/hockey, arena/rodeo, bus_interior, attic, badlands
SEED_CLASSES = (4, 98, 6, 7, 10, 15, 17, 70, 26, 30)
FASHION_SOURCE = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FORMATS = ("bmp", "png")
CROP = 224


@dataclass
class PrepareReport:
    """What a preparation run did.

    Attributes:
        out: the output directory.
        class_names: names in label order (as in classes.txt).
        written: images written by this run.
        existing: images already there from an earlier run (kept, not rewritten).
        skipped: `(source, reason)` for every unusable source image.
        up_to_date: True when the output was already complete and nothing was done.
    """

    out: str
    class_names: list[str]
    written: int = 0
    existing: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    up_to_date: bool = False

    @property
    def total(self) -> int:
        """Images in the output."""
        return self.written + self.existing


@dataclass(frozen=True)
class Candidate:
    """One possible output image: where it would go and how to make it (decoded only when needed)."""

    name: str                          # output file name inside the class folder
    source: str                        # shown in warnings
    make: Callable[[], Image.Image]    # decode + transform; raises BadImage


def prepare_places365(src: str | os.PathLike, out: str | os.PathLike, classes: Sequence[int] = SEED_CLASSES,
                      fmt: str = "bmp", *, per_class: int | None = 100) -> PrepareReport:
    """Prepare Places365 validation images as the seed's prepare_dataset.sh did.

    Reads `SRC/val_256/*.jpg` and `places365_val.txt` (`<file> <class id>` lines; looked for in SRC
    and SRC/filelist_places365-standard), and `categories_places365.txt` for names when present.
    Class `classes[k]` goes to folder `k`; each image is center-cropped to 224x224 (a source smaller
    than that has its shorter side resized to 224 first).

    Args:
        src: the Places365 directory.
        out: output directory.
        classes: Places365 class ids, in label order (default: the seed's ten).
        fmt: "bmp" (as the seed) or "png".
        per_class: the first N usable images of each class in list order (seed: 100); None for all.

    Returns:
        The run's report.

    Raises:
        UserError: missing files, unknown or repeated class ids, a class without usable images.
    """
    src = Path(os.fspath(src))
    images_dir = src / "val_256"
    if not images_dir.is_dir():
        raise UserError(f"{images_dir} not found: --places365 wants the directory holding val_256/")
    val_list = find_list(src, "places365_val.txt", required=True)
    names = read_categories(find_list(src, "categories_places365.txt", required=False))
    classes = [int(c) for c in classes]
    if not classes:
        raise UserError("no classes chosen")
    if len(set(classes)) != len(classes):
        raise UserError(f"--classes lists an id twice: {classes}")
    known = len(names) if names else 365
    bad = [c for c in classes if not 0 <= c < known]
    if bad:
        raise UserError(f"class ids {bad} are out of range 0..{known - 1}")
    by_class: dict[int, list[Candidate]] = {c: [] for c in classes}
    for number, line in enumerate(read_text(val_list, src).splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[1].isdigit():
            raise UserError(f"{val_list}:{number}: expected `<file> <class id>`, got {line!r}")
        if int(fields[1]) in by_class:
            path = images_dir / fields[0]
            by_class[int(fields[1])].append(
                Candidate(Path(fields[0]).stem, str(path), lambda p=path: crop_image(p, None, CROP, root=images_dir)))
    class_names = [names[c] if names else str(c) for c in classes]
    return write_dataset(out, class_names, [by_class[c] for c in classes], fmt, per_class)


def prepare_image_folder(src: str | os.PathLike, out: str | os.PathLike, resize_shorter: int | None = 256,
                         crop: int = 224, fmt: str = "bmp", *, per_class: int | None = None) -> PrepareReport:
    """Prepare any class-per-folder tree (torchvision ImageFolder: class = subfolder name, sorted).

    Files are found recursively (following symlinks, each real directory once, so a link loop
    cannot hang it, and never out of the class folder), sorted by path; output names come from the
    path inside the class folder. Each is read as the device loader reads (`safe_read`): entries
    that are not regular files (FIFOs, devices, broken links) or lead out of the class folder are
    never opened, but skipped and counted with the unusable images.

    Args:
        src: the tree's root.
        out: output directory.
        resize_shorter: shorter side before the crop; None to crop the original.
        crop: side of the square center crop.
        fmt: "bmp" or "png".
        per_class: at most N images per class, in sorted path order; None for all.

    Returns:
        The run's report.

    Raises:
        UserError: no class folders, an empty class folder, a class without usable images.
    """
    src = Path(os.fspath(src))
    if not src.is_dir():
        raise UserError(f"{src} is not a directory")
    class_dirs = sorted((p for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")),
                        key=lambda p: p.name)
    if not class_dirs:
        raise UserError(f"{src} has no class folders (expected SRC/<class name>/<images>)")
    candidates = []
    for class_dir in class_dirs:
        entries = walk_files(class_dir)
        if not entries:
            raise UserError(f"class folder {class_dir} is empty")
        used: set[str] = set()
        found = []
        for path, problem in entries:
            rel = path.relative_to(class_dir)
            name = "__".join(rel.with_suffix("").parts)
            if name in used:  # a.jpg next to a.png: keep both, deterministically
                name = "__".join(rel.parts).replace(".", "_")
            used.add(name)
            make = (functools.partial(crop_image, path, resize_shorter, crop, root=class_dir) if problem is None
                    else functools.partial(refuse, problem))  # skipped and counted like a bad image
            found.append(Candidate(name, str(path), make))
        candidates.append(found)
    return write_dataset(out, [p.name for p in class_dirs], candidates, fmt, per_class)


def prepare_fashion_mnist(out: str | os.PathLike, per_class: int = 100, source: str | os.PathLike = FASHION_SOURCE,
                          fmt: str = "bmp") -> PrepareReport:
    """Prepare Fashion-MNIST test-split product photos, upscaled 28 -> 224 (bicubic) to RGB.

    The pick is deterministic: the first `per_class` images of each class in file order.

    Args:
        out: output directory.
        per_class: images per class (at most 1000, the test split's count).
        source: directory with `t10k-images-idx3-ubyte(.gz)` and `t10k-labels-idx1-ubyte(.gz)`.
        fmt: "bmp" or "png".

    Returns:
        The run's report.

    Raises:
        UserError: the files are missing (with the apt-get command that installs them) or broken.
    """
    images_path = find_idx(source, "t10k-images-idx3-ubyte")
    labels_path = find_idx(source, "t10k-labels-idx1-ubyte")
    if images_path is None or labels_path is None:
        raise UserError(f"Fashion-MNIST not found in {source}: apt-get install dataset-fashion-mnist")
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.shape != images.shape[:1] or images.dtype != np.uint8:
        raise UserError(f"{images_path} and {labels_path} do not match ({images.shape} images, {labels.shape} labels)")
    candidates: list[list[Candidate]] = [[] for _ in FASHION_CLASSES]
    for index in range(len(labels)):
        label = int(labels[index])
        if not 0 <= label < len(FASHION_CLASSES):
            raise UserError(f"{labels_path}: label {label} at {index} is not a Fashion-MNIST class")
        if len(candidates[label]) < per_class:
            candidates[label].append(Candidate(f"t10k_{index:05d}", f"{images_path}[{index}]",
                                               lambda a=images[index]: upscale(a, CROP)))
    return write_dataset(out, list(FASHION_CLASSES), candidates, fmt, per_class)


def upscale(pixels: np.ndarray, size: int) -> Image.Image:
    """A grey uint8 image scaled to size x size with bicubic interpolation, as 3-channel RGB."""
    return Image.fromarray(pixels, "L").resize((size, size), Image.BICUBIC).convert("RGB")


def crop_image(path: Path, shorter: int | None, crop: int, root: str | os.PathLike | None = None) -> Image.Image:
    """Open a photo as RGB (EXIF rotation applied), resize its shorter side, center crop a square.

    The file is read as the loader reads (`read_bytes`): a regular file under the size cap, inside
    `root` (the class or image folder) once links are resolved. With `shorter` None only sources
    smaller than the crop are resized (up to the crop size). Only the crop window is resized
    (`resize_and_crop`), so a long thin strip cannot blow up memory.
    """
    img = ImageOps.exif_transpose(open_image(read_bytes(path, root)))
    return resize_and_crop(img, shorter, crop, crop)


def find_list(src: Path, name: str, required: bool) -> Path | None:
    """A Places365 list file in SRC or SRC/filelist_places365-standard."""
    for place in (src, src / "filelist_places365-standard"):
        if (place / name).is_file():
            return place / name
    if required:
        raise UserError(f"{name} not found in {src} or {src / 'filelist_places365-standard'}")
    return None


def read_categories(path: Path | None) -> list[str]:
    """Class names by id from `categories_places365.txt` (`/a/alley 0` -> "alley"); [] without a file."""
    if path is None:
        return []
    names: dict[int, str] = {}
    for number, line in enumerate(read_text(path, path.parent).splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or not fields[1].isdigit():
            raise UserError(f"{path}:{number}: expected `/x/name <class id>`, got {line!r}")
        parts = fields[0].strip("/").split("/")
        names[int(fields[1])] = "/".join(parts[1:] if len(parts) > 1 else parts)
    if sorted(names) != list(range(len(names))):
        raise UserError(f"{path}: class ids are not 0..{len(names) - 1}")
    return [names[i] for i in range(len(names))]


def read_text(path: Path, root: Path) -> str:
    """A source list file (Places365) as UTF-8 text, read by the one safe reader, inside `root`."""
    try:
        return read_file(path, max_bytes=MAX_TEXT_BYTES, root=root).decode("utf-8")
    except (UnsafeFile, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e.reason if isinstance(e, UnsafeFile) else e}") from None


def walk_files(top: Path) -> list[tuple[Path, str | None]]:
    """Every non-hidden entry under `top` that is not a directory walked into, sorted by path.

    A directory link leading out of `top` comes with its reason (it is not walked); every other
    entry with None: whether it is a regular file inside `top` is decided when it is read
    (`crop_image`, by `safe_read`), so the caller counts and reports it instead of dropping it
    silently or blocking on it (a FIFO or /dev/zero never ends). Symlinked directories are
    followed once each (a link loop cannot hang the walk) and only while they stay inside `top`:
    a link out of the class folder (e.g. `cats/all -> ..`) would pull in other classes' images
    under this class's label.
    """
    seen: set[tuple[int, int]] = set()
    entries: list[tuple[Path, str | None]] = []
    for root, dirs, names in os.walk(top, followlinks=True):
        st = os.stat(root)
        if (st.st_dev, st.st_ino) in seen:  # reached again through a link inside `top`: already listed
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        inside = []
        for d in dirs:
            if d.startswith("."):
                continue
            try:
                check_inside(os.path.join(root, d), top)
                inside.append(d)
            except UnsafeFile as e:
                entries.append((Path(root, d), e.reason))
        dirs[:] = inside
        entries += [(Path(root, name), None) for name in names if not name.startswith(".")]
    return sorted(entries, key=lambda e: e[0].relative_to(top).parts)


def refuse(reason: str) -> Image.Image:
    """A candidate's `make` for an entry never read (a folder link out of the class): always `BadImage(reason)`."""
    raise BadImage(reason)


def write_dataset(out: str | os.PathLike, class_names: list[str], candidates: list[list[Candidate]],
                  fmt: str, per_class: int | None) -> PrepareReport:
    """Write (or complete) OUT: the first `per_class` usable candidates of each class, then classes.txt.

    Args:
        out: output directory.
        class_names: names in label order; class k goes to folder `k`.
        candidates: per class, the possible images in priority order.
        fmt: "bmp" or "png".
        per_class: images per class; None for all.

    Returns:
        The run's report.

    Raises:
        UserError: OUT holds another dataset, or a class ends up with no usable image.
    """
    if fmt not in FORMATS:
        raise UserError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    if per_class is not None and per_class < 1:
        raise UserError(f"--per-class must be at least 1, got {per_class}")
    bad = [n for n in class_names if not n.strip() or "\t" in n or "\n" in n or "\r" in n]
    if bad:
        raise UserError(f"class name {bad[0]!r} cannot go in {CLASS_FILE} (empty, or has a tab or line break)")
    out = Path(os.fspath(out))
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    wanted = [(str(k), name) for k, name in enumerate(class_names)]
    class_file = out / CLASS_FILE
    was_complete = class_file.exists()
    if was_complete and read_class_file(class_file) != wanted:
        raise UserError(f"{out} already holds a dataset with other classes: remove it or choose another -o")
    for k, found in enumerate(candidates):  # refuse a foreign output before writing anything into it
        names = {f"{c.name}.{fmt}" for c in found}
        if (out / str(k)).is_dir():
            check_no_extra(out, out / str(k), names)
    report = PrepareReport(str(out), list(class_names))
    limit = per_class or max(map(len, candidates), default=0)
    progress = Progress(f"prepare {out}", sum(min(limit, len(c)) for c in candidates))
    for k, found in enumerate(candidates):
        folder = out / str(k)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f".*{TEMP_SUFFIX}"):  # left by an interrupted run
            stale.unlink()
        chosen: set[str] = set()
        for candidate in found:
            if len(chosen) == limit:
                break
            dest = folder / f"{candidate.name}.{fmt}"
            if dest.is_file():
                report.existing += 1
            else:
                try:
                    save_atomic(candidate.make(), dest, fmt)
                except BadImage as e:
                    report.skipped.append((candidate.source, str(e)))
                    progress.note(f"warning: skipped {candidate.source}: {e}")
                    continue
                report.written += 1
            chosen.add(dest.name)
            progress.update()
        if not chosen:
            raise UserError(f"class {class_names[k]!r} has no usable images in the source")
        check_no_extra(out, folder, chosen)
    progress.close()
    if report.skipped:
        print(f"warning: skipped {len(report.skipped)} unusable source images", file=sys.stderr)
    if was_complete and report.written == 0:
        report.up_to_date = True
        print(f"{out}: already complete ({report.total} images), nothing to do", file=sys.stderr)
    else:
        text = "".join(f"{folder}\t{name}\n" for folder, name in wanted)
        write_atomic(class_file, text.encode("utf-8"))  # durable: it marks the output complete
    return report


def check_no_extra(out: Path, folder: Path, expected: set[str]) -> None:
    """Refuse a class folder holding files this run would not write: two datasets must not mix."""
    extra = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".") and p.name not in expected)
    if extra:
        raise UserError(f"{folder} holds {len(extra)} files this preparation would not write (e.g. {extra[0]}): "
                        f"it was made with other options; remove {out} or choose another -o")


def save_atomic(img: Image.Image, dest: Path, fmt: str) -> None:
    """Save an image under a hidden temp name in the same folder, then rename it into place.

    A killed run leaves either no file or a whole one, never a torn image. No fsync per image:
    this guards against an interrupted process, and a lost file after a power cut is re-made.
    """
    write_atomic(dest, lambda f: img.save(f, format=fmt.upper()), durable=False)
