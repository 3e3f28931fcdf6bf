"""System: edgetune's design in PyTorch: a torch head over features cached from onnxruntime.

The features come from the very frozen graph the ``.tod`` holds, run by onnxruntime as edgetune runs
it (ORT_ENABLE_ALL, the given threads, batches of 4 = ``Context.feature_batch``), once per image;
the head, its optimizer and the loop are PyTorch's (``torch_cached.train_head``, the same loop as
the PyTorch + cache system). Against that system this row shows what onnxruntime wins over
PyTorch's backbone; against edgetune it shows what edgetune's own runtime (numpy head, loader,
process) wins or costs over PyTorch with the same design.
"""

from __future__ import annotations

import onnxruntime as ort
import torch

import common
import torch_cached

EXTRACT_BATCH = 4


def main() -> None:
    """Run the work unit the arguments describe and print the seed-style log."""
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    meta, params, frozen = common.load_model_meta(args.model)
    splits = common.load_splits(args.data, meta)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(frozen, opts, providers=["CPUExecutionProvider"])
    name = meta["frozen"]["input"]

    def run(images):
        return sess.run(None, {name: images})[0]

    cached = {s.name: torch_cached.extract(s, run, EXTRACT_BATCH) for s in splits}
    torch_cached.train_head(args, meta, params, cached, splits)


if __name__ == "__main__":
    main()
