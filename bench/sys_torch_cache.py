"""System: PyTorch with a user-written feature cache (backbone once per image, torch head).

Plain PyTorch as the tutorials write it: every image of the three splits goes through the frozen
backbone once under ``torch.inference_mode`` in batches of 32 (64 was 2x slower per image on 2
cores: 160 vs 81 ms), eager mode, BatchNorm unfused; training and all evaluations then touch only
the head (``torch_cached.train_head``).
"""

from __future__ import annotations

import torch

import common
import torch_cached
import torch_model

EXTRACT_BATCH = 32


def main() -> None:
    """Run the work unit the arguments describe and print the seed-style log."""
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    meta, params, _ = common.load_model_meta(args.model)
    splits = common.load_splits(args.data, meta)
    backbone = torch_model.backbone()

    def run(images):
        with torch.inference_mode():
            return backbone(torch.from_numpy(images)).numpy()

    cached = {s.name: torch_cached.extract(s, run, EXTRACT_BATCH) for s in splits}
    torch_cached.train_head(args, meta, params, cached, splits)


if __name__ == "__main__":
    main()
