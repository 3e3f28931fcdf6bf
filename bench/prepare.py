"""Build what the benchmark runs on, once, into a work directory (not timed).

- ``data/``: the Fashion-MNIST demo set, 100 images per class, by edgetune's own preparer;
- ``transfer_learning_tod.tod``: Lite0 exported with the seed's SGD settings and converted, through
  the ``edgetune export`` / ``edgetune convert`` commands as shipped;
- ``transfer_learning_tod_int8.tod``: the same training graph converted with ``--quantize int8``,
  calibrated on the demo set's train split (the command's defaults);
- ``lite0_head.onnx``: the same network (pretrained Lite0 + the ``.tod``'s head and its initial
  weights) exported by torch with a dynamic batch, for ONNX Runtime training;
- ``ort/``: ONNX Runtime training artifacts, built in the onnxruntime-training venv.

Every step is skipped when its output exists, so repeated benchmark runs start at once.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
EXPORT_ARGS = ["--backbone", "efficientnet-lite0", "--num-classes", "10", "--batch-size", "32",
               "--optimizer", "sgd", "--lr", "0.0015", "--momentum", "0.9", "--dampening", "0.01"]
# a fine-tuned cut with the recipe the choice carries (issue 11): the scaling run's deeper system
EXPORT_LAST_BLOCK_ARGS = ["--backbone", "efficientnet-lite0", "--num-classes", "10", "--batch-size", "32",
                          "--trainable", "last-block"]


@dataclass
class Work:
    """Paths of the prepared inputs; ``ort`` is None when system 4 cannot run (``ort_why``)."""

    data: Path
    model: Path
    model_int8: Path
    model_last_block: Path
    lite0_head: Path
    ort: Path | None
    ort_why: str


def _say(msg: str) -> None:
    print(f"[prepare] {msg}", file=sys.stderr, flush=True)


def prepare(work: Path, ort_python: Path) -> Work:
    """Create every input under ``work`` that is not there yet.

    Args:
        work: The work directory (created).
        ort_python: The onnxruntime-training venv's Python; when missing, system 4 is skipped.

    Returns:
        The paths, and why system 4 is skipped if it is.
    """
    from edgetune.data.prepare import prepare_fashion_mnist

    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not (data / "classes.txt").exists():
        _say(f"Fashion-MNIST demo set -> {data}")
        prepare_fashion_mnist(data, per_class=100)
    model = work / "transfer_learning_tod.tod"
    model_int8 = work / "transfer_learning_tod_int8.tod"
    edgetune = str(Path(sys.executable).parent / "edgetune")
    onnx_path = work / "transfer_learning_tod.onnx"
    if not onnx_path.exists():
        _say("edgetune export (Lite0, seed SGD settings)")
        subprocess.run([edgetune, "export", *EXPORT_ARGS, "--class-names-from",
                        str(data / "classes.txt"), "-o", str(onnx_path)], check=True)
    if not model.exists():
        _say("edgetune convert")
        subprocess.run([edgetune, "convert", "--model", str(onnx_path), "--output",
                        str(model)], check=True)
    if not model_int8.exists():
        _say("edgetune convert --quantize int8 (calibrated on the demo set)")
        subprocess.run([edgetune, "convert", "--model", str(onnx_path), "--output", str(model_int8),
                        "--quantize", "int8", "--calibration", str(data)], check=True)
    model_last_block = work / "transfer_learning_tod_last_block.tod"
    if not model_last_block.exists():
        _say("edgetune export --trainable last-block, convert")
        last_block_onnx = work / "transfer_learning_tod_last_block.onnx"
        subprocess.run([edgetune, "export", *EXPORT_LAST_BLOCK_ARGS, "--class-names-from",
                        str(data / "classes.txt"), "-o", str(last_block_onnx)], check=True)
        subprocess.run([edgetune, "convert", "--model", str(last_block_onnx), "--output",
                        str(model_last_block)], check=True)
    lite0_head = work / "lite0_head.onnx"
    if not lite0_head.exists():
        _say("torch export of Lite0 + head for ONNX Runtime training")
        export_lite0_head(model, lite0_head)
    ort = work / "ort"
    if not ort_python.exists():
        return Work(data, model, model_int8, model_last_block, lite0_head, None,
                    f"no onnxruntime-training venv at {ort_python.parent.parent} "
                    "(create it: see bench/run.py --help)")
    if not (ort / "optimizer_model.onnx").exists():
        _say("onnxruntime-training artifacts")
        done = subprocess.run([str(ort_python), str(BENCH / "ort_artifacts.py"), str(lite0_head),
                               str(ort)], capture_output=True, text=True)
        if done.returncode != 0:
            return Work(data, model, model_int8, model_last_block, lite0_head, None,
                        "generate_artifacts failed: " + done.stderr.strip().splitlines()[-1])
        (ort / "patch.txt").write_text(done.stdout)
    return Work(data, model, model_int8, model_last_block, lite0_head, ort, "")


def prepare_fashion(root: Path, per_class: int) -> Path:
    """``root/fm<per_class>``: Fashion-MNIST at ``per_class`` images per class, prepared once.

    Above 1000 per class the train split is used too; 7000 per class is about 10.5 GB of BMPs, so
    the free space is checked first (a full disk half-way would waste an hour).
    """
    from edgetune.data.prepare import prepare_fashion_mnist

    out = root / f"fm{per_class}"
    if (out / "classes.txt").exists():
        return out
    need = per_class * 10 * 150_582 * 1.02  # a 224x224 24-bit BMP, plus the file system's share
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < need:
        raise SystemExit(f"{out} needs about {need / 1e9:.1f} GB, {root} has {free / 1e9:.1f} GB free: "
                         f"pass --scaling-root on a larger disk")
    _say(f"Fashion-MNIST {per_class} per class -> {out}")
    prepare_fashion_mnist(out, per_class=per_class)
    return out


def export_lite0_head(model: Path, out: Path) -> None:
    """Export pretrained Lite0 + the ``.tod``'s head (same initial weights) to ONNX, batch dynamic.

    Torch is imported here only: the rest of this module runs without it.
    """
    import torch

    sys.path.insert(0, str(BENCH))
    import common
    import torch_model

    meta, params, _ = common.load_model_meta(model)
    net = torch_model.TransferNet(torch_model.backbone(), torch_model.head(meta, params)).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(net, (torch.zeros(2, 3, 224, 224),), str(out), dynamo=True,
                      input_names=["data"], output_names=["logits"], opset_version=18,
                      dynamic_shapes=({0: batch},), external_data=False,
                      optimize=False)
