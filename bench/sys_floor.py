"""System 5, the floor: ONNX Runtime inference of the frozen backbone over every image, once.

Decode + preprocess (edgetune's loader) + the ``.tod``'s own frozen graph in batches of 32, and
nothing else: no head, no optimizer, no checkpoint. No training system can do the same work unit
faster than it extracts each image's features once.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

import common

BATCH = 32


def main() -> None:
    """Extract the features of all splits and print how many."""
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    meta, _, frozen = common.load_model_meta(args.model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(frozen, opts, providers=["CPUExecutionProvider"])
    name = meta["frozen"]["input"]
    n = 0
    for split in common.load_splits(args.data, meta):
        for start in range(0, len(split), BATCH):
            idx = np.arange(start, min(start + BATCH, len(split)))
            n += len(sess.run(None, {name: split.images(idx)})[0])
    print(f"features: {n}", flush=True)


if __name__ == "__main__":
    main()
