"""net_runner end to end on a real Lite0 .tod and 100 Fashion-MNIST images: the seed's output format,
early stop, checkpoints, `-c 0`, resume, the log and plot, and one-line user errors."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgetune.cli import net_runner

G = r"(?:-?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]\d\d+)?|-?inf|nan)"  # C++ iostream default (%g)
LOSS = re.compile(rf"^(\d+): Loss is ({G}) \[min=({G})\]$")
TEST = re.compile(rf"^accuracy on test data = ({G}) max accuracy = ({G})$")
VALIDATION = re.compile(rf"^accuracy on validation data = ({G})$")


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory: pytest.TempPathFactory, lite0_tod: Path, mini_fashion_dir: Path) -> Path:
    """A feature cache of the mini dataset, filled once: later runs only train the head."""
    cache = tmp_path_factory.mktemp("features")
    assert net_runner.main(["-f", os.fspath(lite0_tod), "-d", os.fspath(mini_fashion_dir), "-c", "0",
                            "-q", "--cache-dir", os.fspath(cache)]) == 0
    return cache


@pytest.fixture
def model(tmp_path: Path, lite0_tod: Path) -> Path:
    """A private copy of the fresh model: checkpoints land next to it."""
    return Path(shutil.copy(lite0_tod, tmp_path / "transfer_learning_tod.tod"))


def run(capsys, model: Path, data: Path, cache: Path, *options: str) -> list[str]:
    """net_runner in-process; returns its stdout lines (exit status must be 0)."""
    capsys.readouterr()
    assert net_runner.main(["-f", os.fspath(model), "-d", os.fspath(data), "--cache-dir", os.fspath(cache),
                            *options]) == 0
    return capsys.readouterr().out.splitlines()


def sig_digits(number: str) -> int:
    mantissa = number.split("e")[0].lstrip("-").replace(".", "").lstrip("0")
    return len(mantissa)


def test_output_format_every_line(capsys, model, mini_fashion_dir, feature_cache) -> None:
    lines = run(capsys, model, mini_fashion_dir, feature_cache, "-c", "45", "--target-accuracy", "1.01")
    steps, min_loss = 0, math.inf
    for i, line in enumerate(lines[:-1]):
        if m := LOSS.match(line):
            steps += 1
            assert int(m[1]) == steps
            loss, shown_min = float(m[2]), float(m[3])
            min_loss = min(min_loss, loss)
            assert shown_min == float(f"{min_loss:g}")
            assert sig_digits(m[2]) <= 6 and sig_digits(m[3]) <= 6
        else:
            m = TEST.match(line)
            assert m, f"line {i}: {line!r}"
            assert steps % 20 == 0 and LOSS.match(lines[i - 1])  # right after steps 20, 40
            assert 0 <= float(m[1]) <= float(m[2]) <= 1
    assert steps == 45
    assert sum(bool(TEST.match(ln)) for ln in lines) == 2
    m = VALIDATION.match(lines[-1])
    assert m and 0 <= float(m[1]) <= 1
    assert {p.name for p in model.parent.iterdir()} == {model.name, "transfer_learning_tod_trained.tod"}


def test_training_beats_chance_on_the_mini_set(capsys, model, mini_fashion_dir, feature_cache) -> None:
    """100 steps at lr 0.01 over 60 images lift validation from chance to 0.7-0.8 (seeds 0-3, measured)."""
    before = run(capsys, model, mini_fashion_dir, feature_cache, "-c", "0")
    after = run(capsys, model, mini_fashion_dir, feature_cache, "-c", "100", "--lr", "0.01", "-q",
                "--target-accuracy", "1.01")
    untrained = float(VALIDATION.match(before[-1])[1])
    trained = float(VALIDATION.match(after[-1])[1])
    assert untrained <= 0.4  # 0.3 for the seed-0 head on these 20 images
    assert trained >= 0.6 and trained - untrained >= 0.3


def test_c0_prints_only_the_validation_line_and_saves_nothing(capsys, model, mini_fashion_dir, feature_cache) -> None:
    lines = run(capsys, model, mini_fashion_dir, feature_cache, "-c", "0", "-s", "1")
    assert len(lines) == 1 and VALIDATION.match(lines[0])
    assert [p.name for p in model.parent.iterdir()] == [model.name]


def test_e_is_the_cycles_flag_too(capsys, model, mini_fashion_dir, feature_cache) -> None:
    lines = run(capsys, model, mini_fashion_dir, feature_cache, "-e", "3", "-q")
    assert lines == [lines[-1]] and VALIDATION.match(lines[-1])  # quiet: no loss lines
    assert (model.parent / "transfer_learning_tod_trained.tod").is_file()


def test_early_stop_at_the_first_evaluation(capsys, model, mini_fashion_dir, feature_cache) -> None:
    lines = run(capsys, model, mini_fashion_dir, feature_cache, "-c", "100", "--test-every", "5",
                "--target-accuracy", "0.0")
    assert [bool(LOSS.match(ln)) for ln in lines] == [True] * 5 + [False, False]
    assert TEST.match(lines[5]) and VALIDATION.match(lines[6])


def test_checkpoint_names_and_steps(capsys, model, mini_fashion_dir, feature_cache) -> None:
    from edgetune.runtime import TrainSession

    run(capsys, model, mini_fashion_dir, feature_cache, "-c", "10", "-s", "4", "-q")
    names = {p.name for p in model.parent.iterdir()}
    assert names == {model.name, "transfer_learning_tod_trained_4.tod", "transfer_learning_tod_trained_8.tod",
                     "transfer_learning_tod_trained.tod"}
    for name, step in (("_trained_4", 4), ("_trained_8", 8), ("_trained", 10)):
        assert TrainSession.create(model.parent / f"transfer_learning_tod{name}.tod").step == step


def test_resume_from_a_checkpoint_continues_bit_identically(capsys, model, mini_fashion_dir, feature_cache,
                                                             tmp_path) -> None:
    whole = run(capsys, model, mini_fashion_dir, feature_cache, "-c", "40", "-s", "20", "--seed", "7",
                "--target-accuracy", "1.01")
    first = model.parent / "transfer_learning_tod_trained_20.tod"
    resumed = run(capsys, first, mini_fashion_dir, feature_cache, "-c", "20", "--seed", "99",
                  "--target-accuracy", "1.01")
    losses = lambda lines: [LOSS.match(ln)[2] for ln in lines if LOSS.match(ln)]  # noqa: E731
    assert [LOSS.match(ln)[1] for ln in resumed if LOSS.match(ln)] == [str(i) for i in range(21, 41)]
    assert losses(resumed) == losses(whole)[20:]  # the checkpoint's data order wins over --seed
    assert resumed[-1] == whole[-1]
    assert (model.parent / "transfer_learning_tod_trained_20_trained.tod").is_file()


def test_no_cache_gives_the_cached_numbers(capsys, model, mini_fashion_dir, feature_cache) -> None:
    """The cache is exact: running the backbone for every batch gives the same losses (float32 noise
    from other batch compositions in onnxruntime aside: 1e-4 relative)."""
    cached = run(capsys, model, mini_fashion_dir, feature_cache, "-c", "2", "--test-every", "100")
    assert net_runner.main(["-f", os.fspath(model), "-d", os.fspath(mini_fashion_dir), "-c", "2",
                            "--no-cache", "--test-every", "100"]) == 0
    uncached = capsys.readouterr().out.splitlines()
    losses = lambda lines: [float(LOSS.match(ln)[2]) for ln in lines if LOSS.match(ln)]  # noqa: E731
    assert len(losses(uncached)) == 2
    assert losses(uncached) == pytest.approx(losses(cached), rel=1e-4)
    assert uncached[-1] == cached[-1]


def test_log_and_plot(capsys, model, mini_fashion_dir, feature_cache, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    log, plot = tmp_path / "run.jsonl", tmp_path / "run.png"
    lines = run(capsys, model, mini_fashion_dir, feature_cache, "-c", "25", "--test-every", "10",
                "--target-accuracy", "1.01", "--log", os.fspath(log), "--plot", os.fspath(plot))
    records = net_runner.read_log(log)
    steps = [r for r in records if r["event"] == "step"]
    evals = [r for r in records if r["event"] == "evaluate"]
    assert [r["step"] for r in steps] == list(range(1, 26))
    printed = [float(LOSS.match(ln)[2]) for ln in lines if LOSS.match(ln)]
    assert [float(f"{r['loss']:g}") for r in steps] == printed
    assert [(r["split"], r["step"]) for r in evals] == [("test", 10), ("test", 20), ("validation", 25)]
    assert f"{evals[-1]['accuracy']:g}" == VALIDATION.match(lines[-1])[1]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_verbose_prints_the_output_tensors(capsys, model, mini_fashion_dir, feature_cache) -> None:
    lines = run(capsys, model, mini_fashion_dir, feature_cache, "-c", "2", "-v")
    assert lines[:2] == ["data size: 602112", "batch size: 32"]  # 3*224*224 float32, as the seed
    assert sum(ln.startswith("logits: shape (32, 10) =") for ln in lines) == 2
    assert sum(bool(LOSS.match(ln)) for ln in lines) == 2


def _user_error(tmp_path: Path, *argv: str, env: dict | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "edgetune.cli.net_runner", *argv], capture_output=True,
                          text=True, cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("net_runner: error: "), done.stderr
    return lines[0]


def _dataset(root: Path, src: Path, folders: int, per_class: int) -> Path:
    root.mkdir()
    classes = (src / "classes.txt").read_text(encoding="utf-8").splitlines()[:folders]
    (root / "classes.txt").write_text("".join(ln + "\n" for ln in classes), encoding="utf-8")
    for line in classes:
        folder = line.split("\t")[0]
        (root / folder).mkdir()
        for f in sorted((src / folder).iterdir())[:per_class]:
            shutil.copy(f, root / folder / f.name)
    return root


def test_user_errors_are_one_line_exit_2(tmp_path, model, mini_fashion_dir) -> None:
    data = os.fspath(mini_fashion_dir)
    assert "no such model file" in _user_error(tmp_path, "-f", "missing.tod", "-d", data)
    (tmp_path / "m.onnx").write_bytes(b"x")
    assert "not a .tod model" in _user_error(tmp_path, "-f", "m.onnx", "-d", data)
    (tmp_path / "broken.tod").write_bytes(b"not a model at all")
    _user_error(tmp_path, "-f", "broken.tod", "-d", data)
    assert "no such dataset folder" in _user_error(tmp_path, "-f", os.fspath(model), "-d", "nowhere")
    three = _dataset(tmp_path / "three", mini_fashion_dir, 3, 10)
    assert "3" in _user_error(tmp_path, "-f", os.fspath(model), "-d", os.fspath(three))
    tiny = _dataset(tmp_path / "tiny", mini_fashion_dir, 10, 1)  # one image per class: validation only
    assert "split is empty" in _user_error(tmp_path, "-f", os.fspath(model), "-d", os.fspath(tiny), "-c", "5")
    assert "--cycles must be >= 0" in _user_error(tmp_path, "-f", os.fspath(model), "-d", data, "-c", "-1")
    assert "--weight-decay must be a finite number >= 0" in _user_error(
        tmp_path, "-f", os.fspath(model), "-d", data, "--weight-decay", "-0.1")
    assert "--mixup must be a number in [0, 10] (0: off), got -1" in _user_error(
        tmp_path, "-f", os.fspath(model), "-d", data, "--mixup", "-1")
    assert "--warmup" in _user_error(tmp_path, "-f", os.fspath(model), "-d", data, "-c", "5", "--warmup", "5")
    assert "--auto-budget must be a finite number of seconds > 0" in _user_error(
        tmp_path, "-f", os.fspath(model), "-d", data, "--auto", "--auto-budget", "0")
    assert "--auto-budget goes with --auto" in _user_error(tmp_path, "-f", os.fspath(model), "-d", data,
                                                           "--auto-budget", "5")
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".tod") == ["broken.tod", model.name]


def test_keep_best_schedule_and_decay_from_the_command_line(capsys, model, mini_fashion_dir, feature_cache,
                                                           tmp_path) -> None:
    """--keep-best says which step it kept; the saved model is that step's (its record and step count)."""
    from edgetune.runtime import TrainSession

    lines = run(capsys, model, mini_fashion_dir, feature_cache, "-c", "60", "--lr", "0.05", "--target-accuracy",
                "1.01", "--schedule", "cosine", "--warmup", "5", "--weight-decay", "0.01", "--keep-best",
                "--log", os.fspath(tmp_path / "log.jsonl"))
    tests = [(i, float(TEST.match(x).group(1))) for i, x in enumerate(lines) if TEST.match(x)]
    kept = [x for x in lines if x.startswith("kept the weights of step")]
    trained = TrainSession.create(model.with_name(model.stem + "_trained.tod"))
    assert trained.weight_decay == 0.01 and len(tests) == 3
    best = max(a for _, a in tests)
    if kept:
        step = int(kept[0].split()[5])
        assert trained.step == step < 60 and f"(best test accuracy {best:g})" in kept[0]
    else:
        assert trained.step == 60 and tests[-1][1] == best


def test_the_models_schedule_is_the_default_and_the_flag_overrides_it(capsys, model, mini_fashion_dir,
                                                                      feature_cache, tmp_path) -> None:
    """A model whose recipe carries `schedule: cosine` anneals over the run with no option given;
    `--schedule constant` keeps the rate; a model without the key (the seed's) keeps it too."""
    from edgetune.runtime import format as tod_format
    from edgetune.runtime.callbacks import CosineLR

    tod = tod_format.load_file(model)
    base = tod.meta["optimizer"]["lr"]
    tod.meta["schedule"] = "cosine"
    cosine = Path(tod_format.save_file(tod, tmp_path / "cosine.tod"))

    def rates(path: Path, *options: str) -> list[float]:
        log = tmp_path / f"{path.stem}{len(options)}.jsonl"
        run(capsys, path, mini_fashion_dir, feature_cache, "-c", "12", "-q", "--log", os.fspath(log), *options)
        return [e["lr"] for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "step"]

    assert rates(cosine) == pytest.approx([CosineLR(12).rate(s, base) for s in range(1, 13)])
    annealed = Path(shutil.copy(tmp_path / "cosine_trained.tod", tmp_path / "annealed.tod"))
    assert tod_format.load_file(annealed).meta["optimizer"]["lr"] == pytest.approx(0, abs=1e-12)  # the cosine's end
    assert rates(cosine, "--schedule", "constant") == [base] * 12
    assert rates(model) == [base] * 12
    # continuing the annealed model: constant trains at the cosine's base rate, not at its last (0)
    continued = Path(shutil.copy(annealed, tmp_path / "continued.tod"))
    assert rates(continued, "--schedule", "constant") == [base] * 12
    # --lr is the base of the schedule that follows (the old run's base is dropped), also on resume
    again = Path(shutil.copy(annealed, tmp_path / "again.tod"))
    assert rates(again, "--lr", "0.5") == pytest.approx([CosineLR(24).rate(s, 0.5) for s in range(13, 25)])
    resumed = Path(shutil.copy(tmp_path / "again_trained.tod", tmp_path / "resumed.tod"))
    assert rates(resumed) == pytest.approx([CosineLR(36).rate(s, 0.5) for s in range(25, 37)])


def test_auto_prints_its_search_logs_it_and_trains_the_choice(capsys, model, mini_fashion_dir, feature_cache,
                                                              tmp_path) -> None:
    """--auto: the search table, then the seed's lines for the chosen step count; deterministic per seed."""
    log = tmp_path / "auto.jsonl"
    lines = run(capsys, model, mini_fashion_dir, feature_cache, "--auto", "--seed", "1", "-q", "--log", os.fspath(log))
    choice = [x for x in lines if x.startswith("auto: chose lr")]
    assert len(choice) == 1 and VALIDATION.match(lines[-1])
    events = [json.loads(x)["event"] for x in log.read_text().splitlines()]
    assert "auto_choice" in events and events.count("auto_trial") >= 2
    again = run(capsys, model, mini_fashion_dir, feature_cache, "--auto", "--seed", "1", "-q")
    strip = re.compile(r" +\d+\.\d(?=  [a-z])|in \d+\.\d s")  # seconds differ between runs, nothing else may
    assert [strip.sub("", x) for x in again] == [strip.sub("", x) for x in lines]
    # the run trained what the search measured: a fresh model, so from a zero classifier, to the chosen step
    searched = float(re.search(r"test accuracy ([0-9.]+)", choice[0]).group(1))
    assert "classifier from zero" in choice[0]
    from edgetune.runtime import Context, Trainer, TrainSession
    from edgetune.runtime.dataset import load_dataset

    trained = TrainSession.create(os.fspath(model)[: -len(".tod")] + "_trained.tod", Context())
    data = load_dataset(mini_fashion_dir, trained.preprocessing, num_classes=trained.num_classes)
    assert Trainer(trained, data.train, data.test).evaluate("test") == pytest.approx(searched, abs=5e-5)


def test_an_interrupted_auto_run_resumes_to_the_same_model_as_the_readme_says(capsys, model, mini_fashion_dir,
                                                                               feature_cache, tmp_path) -> None:
    """README: a checkpoint of an --auto run from a fresh model, resumed with `--schedule cosine`, the
    steps left and `--target-accuracy 1`, ends at the very file the uninterrupted run wrote."""
    fresh = Path(shutil.copy(model, tmp_path / "fresh.tod"))
    lines = run(capsys, fresh, mini_fashion_dir, feature_cache, "--auto", "--seed", "1", "-q", "-s", "2")
    steps = int(re.search(r"auto: chose lr \S+, weight decay \S+, (\d+) steps", "\n".join(lines)).group(1))
    assert steps > 2, lines  # a checkpoint before the end exists
    checkpoint = Path(shutil.copy(tmp_path / "fresh_trained_2.tod", tmp_path / "resumed.tod"))
    run(capsys, checkpoint, mini_fashion_dir, feature_cache, "--schedule", "cosine", "-c", str(steps - 2),
        "--target-accuracy", "1", "-q")
    assert (tmp_path / "resumed_trained.tod").read_bytes() == (tmp_path / "fresh_trained.tod").read_bytes()


def test_auto_on_a_trained_model_anneals_its_own_rate_from_the_models_step(capsys, model, mini_fashion_dir,
                                                                          feature_cache, tmp_path) -> None:
    """--auto continuing a cosine-trained model (step 12, its base rate saved, its rate ended at 0): the
    final run anneals the chosen rate over the chosen steps from step 12, and ends where the search said."""
    from edgetune.runtime import Context, Trainer, TrainSession
    from edgetune.runtime import format as tod_format
    from edgetune.runtime.callbacks import CosineLR
    from edgetune.runtime.dataset import load_dataset

    tod = tod_format.load_file(model)
    tod.meta["schedule"] = "cosine"
    tod.meta["optimizer"]["lr"] = 5.0  # the base the cosine saves: the search's rates must replace it
    run(capsys, Path(tod_format.save_file(tod, tmp_path / "cosine.tod")), mini_fashion_dir, feature_cache,
        "-c", "12", "-q")
    annealed = tod_format.load_file(tmp_path / "cosine_trained.tod")
    assert (annealed.meta["training"]["base_lr"], annealed.meta["optimizer"]["lr"]) == (5.0, pytest.approx(0, abs=1e-9))
    log = tmp_path / "auto.jsonl"
    lines = run(capsys, tmp_path / "cosine_trained.tod", mini_fashion_dir, feature_cache, "--auto", "-q",
                "--log", os.fspath(log))
    choice = re.search(r"auto: chose lr ([0-9.e-]+), weight decay \S+, (\d+) steps \(cosine\), "
                       r"test accuracy ([0-9.]+)", "\n".join(lines))
    assert choice is not None, lines  # a trained model keeps its classifier: no "from zero"
    lr, steps, searched = float(choice.group(1)), int(choice.group(2)), float(choice.group(3))
    rates = [e["lr"] for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "step"]
    assert rates == pytest.approx([CosineLR(steps, start=12).rate(s, lr) for s in range(13, 13 + steps)])
    trained = TrainSession.create(os.fspath(tmp_path / "cosine_trained_trained.tod"), Context())
    data = load_dataset(mini_fashion_dir, trained.preprocessing, num_classes=trained.num_classes)
    assert trained.step == 12 + steps
    assert Trainer(trained, data.train, data.test).evaluate("test") == pytest.approx(searched, abs=5e-5)


def test_plot_without_matplotlib_is_a_user_error(tmp_path, model, mini_fashion_dir) -> None:
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['matplotlib'] = None\n")
    env = {**os.environ, "PYTHONPATH": os.fspath(blocker)}
    line = _user_error(tmp_path, "-f", os.fspath(model), "-d", os.fspath(mini_fashion_dir), "--plot", "x.png",
                       env=env)
    assert "needs matplotlib" in line
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("cycles", ["1", "30"])  # 1 step draws 32 of the 60 train images; 30 draw them all
def test_training_runs_without_onnxruntime_once_every_image_is_cached(capsys, model, mini_fashion_dir, tmp_path,
                                                                      monkeypatch, cycles) -> None:
    """The images a run will use (the train images its seeded batches draw, test, validation) are
    extracted up front; then the frozen graph's session is dropped (its weights and arena are memory
    the trainable part needs) and nothing loads it again: every step and evaluation is cached."""
    from edgetune.runtime import frozen

    loads = []
    make = frozen._inference_session
    monkeypatch.setattr(frozen, "_inference_session", lambda *a: loads.append(1) or make(*a))
    unloads = []
    unload = frozen.FrozenPart.unload
    monkeypatch.setattr(frozen.FrozenPart, "unload", lambda self: unloads.append(1) or unload(self))
    run(capsys, model, mini_fashion_dir, tmp_path / "cache", "-c", cycles, "-q")  # a cold cache
    assert (len(loads), len(unloads)) == (1, 1)  # loaded to check the model, dropped before training


def test_an_unloaded_frozen_part_loads_again_for_an_image_it_has_not_seen(lite0_tod) -> None:
    from edgetune.runtime.session import Context, TrainSession

    session = TrainSession.create(lite0_tod, Context(threads=1))
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 224, 224)).astype(np.float32)
    first = session.extract_features(x[:1])
    session.frozen.unload()
    assert session.frozen._session is None
    np.testing.assert_array_equal(session.extract_features(x[:1]), first)  # cached: no session needed
    assert session.frozen._session is None
    fresh = session.extract_features(x[1:])  # not cached: loaded again, the same graph
    assert session.frozen._session is not None
    np.testing.assert_array_equal(fresh, TrainSession.create(lite0_tod, Context(threads=1, cache=False))
                                  .extract_features(x[1:]))


def test_the_models_mixup_is_the_default_and_the_flag_overrides_it(capsys, model, mini_fashion_dir,
                                                                  feature_cache, tmp_path) -> None:
    """A model whose recipe carries `mixup` trains on mixes with no option given; `--mixup 0` turns
    it off; `--mixup A` on a model without the key (the seed's) trains as the model carrying A."""
    from edgetune.runtime import format as tod_format

    tod = tod_format.load_file(model)
    tod.meta["mixup"] = 0.4
    mixing = Path(tod_format.save_file(tod, tmp_path / "mixing.tod"))

    def losses(path: Path, *options: str) -> list[str]:
        lines = run(capsys, path, mini_fashion_dir, feature_cache, "-c", "6", "--test-every", "100", *options)
        return [LOSS.match(ln)[2] for ln in lines if LOSS.match(ln)]

    mixed = losses(mixing)
    assert len(mixed) == 6 and mixed == losses(model, "--mixup", "0.4")
    assert losses(mixing, "--mixup", "0") == losses(model) != mixed
