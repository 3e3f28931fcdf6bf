"""The floors: ONNX Runtime inference of the ``.tod``'s frozen graph over every image, once.

No head, no optimizer, no checkpoint: no training system can do the same work unit faster than it
extracts each image's features once. Two variants:

- default (``floor-loader`` in the table): decode + preprocess through edgetune's own loader in
  series with inference, batch by batch: what edgetune's seed run costs at best with today's loader.
- ``--predecoded`` (the true floor): every image is decoded and preprocessed into memory first, then
  the backbone alone runs over the in-memory tensors; that part is timed in-process and reported as
  ``bench: backbone_s=...``. No loader, however well overlapped, can beat it on these threads.

Batches of 4, edgetune's ``Context.feature_batch``: on 2 threads Lite0 was fastest per image there
(bench/profile_edgetune.py), and the same batch makes edgetune / floor measure edgetune's overhead.
The model may be the fp32 or the int8 ``.tod``: the floor runs whatever frozen graph it holds.
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort

import common

BATCH = 4


def main() -> None:
    """Extract the features of all splits and print how many (and the timed part with --predecoded)."""
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--predecoded", action="store_true",
                   help="decode every image into memory first, then time the backbone alone")
    args = p.parse_args()
    meta, _, frozen = common.load_model_meta(args.model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # as edgetune's session
    sess = ort.InferenceSession(frozen, opts, providers=["CPUExecutionProvider"])
    name = meta["frozen"]["input"]
    splits = common.load_splits(args.data, meta)
    n = 0
    if args.predecoded:
        images = np.concatenate([split.images(None) for split in splits])
        start = time.perf_counter()
        for i in range(0, len(images), BATCH):
            n += len(sess.run(None, {name: images[i:i + BATCH]})[0])
        print(f"bench: backbone_s={time.perf_counter() - start:.3f}", flush=True)
    else:
        for split in splits:
            for start in range(0, len(split), BATCH):
                idx = np.arange(start, min(start + BATCH, len(split)))
                n += len(sess.run(None, {name: split.images(idx)})[0])
    print(f"features: {n}", flush=True)


if __name__ == "__main__":
    main()
