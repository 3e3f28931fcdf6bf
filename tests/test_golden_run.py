"""The golden run: net_runner on the demo data, recorded before the runtime was restructured (issue 10).

Three runs of the seed's Lite0 model on Fashion-MNIST (100 images per class), with a fixed seed:
the seed's own head (Dense 1000 -> 10, SGD with momentum), an MLP head with dropout trained with
Adam, and a resume of that MLP from its step-50 checkpoint. `tests/golden_run.json` holds every
line they print on stdout and, for every model file they write, the sha256 of each tensor
(parameters and optimizer slots), the training record and the optimizer settings. The test runs
them again and demands the same bytes: a restructuring must not change any result.

Recorded with `python -m tests.test_golden_run` (see `main`) on the commit before the change.
Exactness is defined on one onnxruntime build and one set of BLAS kernels: the backbone's float32
output differs in the last bits across kernels, so the test first compares a digest of the frozen
features and skips, saying so, where they differ (the head's numbers cannot be compared then).
The head's matrix products go through numpy's OpenBLAS, which picks its kernels by CPU (Haswell's
on AVX2, SkylakeX's on AVX-512: another summation order, other last bits). The runs are recorded
and replayed in a child process with `OPENBLAS_CORETYPE=Haswell`, so any x86-64 CPU with AVX2
reproduces the recording.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

GOLDEN = Path(__file__).with_name("golden_run.json")
KERNELS = {"OPENBLAS_CORETYPE": "Haswell"}  # read when OpenBLAS loads: set for a child process, never here

# an MLP head that uses every op of meta["head"] (dense with and without bias, relu, dropout, flatten, identity)
MLP_HEAD = [{"op": "dense", "weight": "head.0.weight", "bias": "head.0.bias"}, {"op": "relu"},
            {"op": "dropout", "p": 0.2}, {"op": "flatten"}, {"op": "identity"},
            {"op": "dense", "weight": "head.5.weight", "bias": None}]
MLP_WIDTH = 64
ADAM = {"name": "adam", "lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-08, "weight_decay": 0.0001}

# (model file, net_runner options); a model named *_trained_50.tod is the checkpoint of an earlier run
RUNS = [
    ("seed.tod", ["-c", "100", "--seed", "3", "-s", "50"]),
    ("mlp.tod", ["-c", "100", "--seed", "3", "-s", "50", "--test-every", "25"]),
    ("mlp_trained_50.tod", ["-c", "50", "--seed", "11", "--test-every", "25"]),
]


def make_mlp_model(seed_model: Path, out: Path) -> Path:
    """The seed's model with an MLP head (seeded N(0, 0.05) weights) and Adam, via the file format only."""
    from edgetune.runtime import format as tod_format

    tod = tod_format.load_file(seed_model)
    features = tod.meta["frozen"]["features"]
    rng = np.random.default_rng(2024)
    params = {"head.0.weight": rng.normal(0, 0.05, (MLP_WIDTH, features)),
              "head.0.bias": rng.normal(0, 0.05, (MLP_WIDTH,)),
              "head.5.weight": rng.normal(0, 0.05, (tod.meta["num_classes"], MLP_WIDTH))}
    tensors = {}
    for name, value in params.items():
        tensors[f"param/{name}"] = value.astype(np.float32)
        for slot in ("exp_avg", "exp_avg_sq"):
            tensors[f"optim/{name}/{slot}"] = np.zeros(value.shape, np.float32)
    meta = {**tod.meta, "head": MLP_HEAD, "trainable": sorted(params), "optimizer": ADAM, "optimizer_step": 0}
    return Path(tod_format.save_file(tod_format.TodFile(meta=meta, tensors=tensors, blobs=tod.blobs), out))


def features_digest(model: Path, data: Path, cache: Path) -> str:
    """sha256 of the frozen features of the three splits (filling the disk cache the runs then read)."""
    from edgetune.runtime import Context, Trainer, TrainSession
    from edgetune.runtime.dataset import load_dataset

    session = TrainSession.create(model, Context(cache_dir=cache))
    dataset = load_dataset(data, session.preprocessing, num_classes=session.num_classes)
    trainer = Trainer(session, dataset.train)
    digest = hashlib.sha256()
    for split in (dataset.train, dataset.test, dataset.validation):
        digest.update(trainer.features(split).tobytes())
    return digest.hexdigest()


def model_summary(path: Path) -> dict[str, Any]:
    """What a written model holds that training decides: tensor digests, training record, optimizer."""
    from edgetune.runtime import format as tod_format

    tod = tod_format.load_file(path)
    return {"tensors": {name: hashlib.sha256(np.ascontiguousarray(t).tobytes()).hexdigest()
                        for name, t in sorted(tod.tensors.items())},
            "training": tod.meta["training"], "optimizer": tod.meta["optimizer"],
            "optimizer_step": tod.meta.get("optimizer_step", 0)}


def golden_runs(seed_model: Path, data: Path, work: Path) -> dict[str, Any]:
    """Run RUNS in `work` (in-process net_runner); return the record `golden_run.json` holds."""
    from edgetune.cli import net_runner

    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(seed_model, work / "seed.tod")
    make_mlp_model(work / "seed.tod", work / "mlp.tod")
    cache = work / "cache"
    result: dict[str, Any] = {"features_sha256": features_digest(work / "seed.tod", data, cache), "runs": []}
    for model, options in RUNS:
        before = {p.name for p in work.glob("*.tod")}
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = net_runner.main(["-f", os.fspath(work / model), "-d", os.fspath(data),
                                      "--cache-dir", os.fspath(cache), *options])
        if status != 0:
            raise RuntimeError(f"net_runner {model} {options} exited {status}: {err.getvalue()}")
        written = sorted({p.name for p in work.glob("*.tod")} - before)
        result["runs"].append({"model": model, "options": options, "stdout": out.getvalue().splitlines(),
                               "written": {name: model_summary(work / name) for name in written}})
    return result


@pytest.mark.slow
def test_golden_run_is_reproduced_exactly(lite0_tod: Path, fashion_dir: Path, tmp_path: Path) -> None:
    golden = json.loads(GOLDEN.read_text(encoding="utf-8"))
    from edgetune.runtime import format as tod_format

    if not haswell_kernels_run_here():
        pytest.skip("the recording's BLAS kernels (OpenBLAS Haswell) need an x86-64 CPU with AVX2 and FMA")
    shutil.copy(lite0_tod, tmp_path / "probe.tod")
    digest = features_digest(tmp_path / "probe.tod", fashion_dir, tmp_path / "probe-cache")
    if digest != golden["features_sha256"]:
        import onnxruntime

        pytest.skip(f"the backbone's features differ in their last bits from the recording's "
                    f"(onnxruntime {onnxruntime.__version__} here, {golden['environment']['onnxruntime']} "
                    f"there, or other CPU kernels): the head's numbers cannot be compared exactly")
    replay = tmp_path / "replay.json"
    assert run_with_kernels(["--model", os.fspath(lite0_tod), "--data", os.fspath(fashion_dir),
                             "--work", os.fspath(tmp_path / "work"), "--replay", os.fspath(replay)]) == 0
    got = json.loads(replay.read_text(encoding="utf-8"))
    assert tod_format.load_file(tmp_path / "work" / "seed.tod").meta["optimizer"]["name"] == "sgd"
    for want, have in zip(golden["runs"], got["runs"], strict=True):
        assert have["stdout"] == want["stdout"], f"{want['model']} {want['options']}"
        assert have["written"] == want["written"], f"{want['model']} {want['options']}"
    assert got["features_sha256"] == golden["features_sha256"]


def haswell_kernels_run_here() -> bool:
    """Whether this CPU runs OpenBLAS's Haswell kernels (x86-64 with AVX2 and FMA)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


def run_with_kernels(argv: list[str]) -> int:
    """`python -m tests.test_golden_run ARGV` in a child process with the recording's BLAS kernels (`KERNELS`):
    OpenBLAS reads them only when it loads. Returns the child's exit code."""
    return subprocess.run([sys.executable, "-m", "tests.test_golden_run", *argv], cwd=Path(__file__).parents[1],
                          env={**os.environ, **KERNELS}, check=False, timeout=600).returncode


def main(argv: list[str] | None = None) -> int:
    """Record `golden_run.json`: `python -m tests.test_golden_run --model lite0.tod --data fm100 --work DIR
    --commit SHA` (or, with `--replay OUT`, write the same record to OUT: what the test compares).

    Runs itself again with the recording's BLAS kernels (`KERNELS`) when they are not set."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", type=Path, required=True, help="the seed's Lite0 .tod (as the lite0_tod fixture)")
    parser.add_argument("--data", type=Path, required=True, help="Fashion-MNIST, 100 per class (as fashion_dir)")
    parser.add_argument("--work", type=Path, required=True, help="an empty scratch folder")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--commit", help="record: the commit the recording is made on")
    what.add_argument("--replay", type=Path, help="replay: write the record here instead")
    args = parser.parse_args(argv)
    if any(os.environ.get(k) != v for k, v in KERNELS.items()):
        return run_with_kernels(sys.argv[1:] if argv is None else argv)
    record = golden_runs(args.model, args.data, args.work)
    if args.replay is not None:
        args.replay.write_text(json.dumps(record), encoding="utf-8")
        return 0
    import onnxruntime

    record = {"recorded_on": args.commit, "environment": {"onnxruntime": onnxruntime.__version__,
                                                          "numpy": np.__version__}, **record}
    GOLDEN.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {GOLDEN}: {sum(len(r['stdout']) for r in record['runs'])} lines, "
          f"{sum(len(r['written']) for r in record['runs'])} models")
    return 0


if __name__ == "__main__":
    sys.exit(main())
