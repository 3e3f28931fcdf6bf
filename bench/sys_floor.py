"""System 5, the floor: ONNX Runtime inference of the frozen backbone over every image, once.

Decode + preprocess (edgetune's loader) + the ``.tod``'s own frozen graph, and nothing else: no
head, no optimizer, no checkpoint. No training system can do the same work unit faster than it
extracts each image's features once. Batches of 4, edgetune's ``Context.feature_batch``: on 2
threads Lite0 was fastest per image there (bench/profile_edgetune.py), and the same batch makes
edgetune / floor measure edgetune's own overhead.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

import common

BATCH = 4


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
