"""System: PyTorch as a speed-minded user runs it, with its own feature cache.

The same work as the PyTorch + cache system (every image through the backbone once, then a torch
head on the cached features, ``torch_cached.train_head``), with the backbone tuned the way
PyTorch's performance guides say:

- ``torch.inference_mode`` (no autograd bookkeeping at all);
- BatchNorm folded into the convolutions (``fuse_batchnorm``: torch.fx traces the model and every
  Conv2d -> BatchNorm2d pair becomes one Conv2d, ``torch.nn.utils.fusion.fuse_conv_bn_eval``, as
  ``torch.fx.experimental.optimization.fuse`` does; that one matches exact types only, and Lite0's
  convolutions are a Conv2d subclass with "same" padding, so it would fold nothing);
- channels-last memory format for the weights and the inputs (oneDNN's preferred layout);
- ``torch.compile`` (inductor, C++ code generated and built with the machine's compiler), with one
  input shape: the last partial batch of a split is padded, so nothing recompiles.

Compile time is measured separately (the ``torch.compile`` call plus the first run on a batch of
zeros, where the compilation happens) and reported as ``bench: compile_s=...``; it is included in the
wall time, as a user pays it on every run (inductor's on-disk cache is pointed at a fresh directory).
"""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

import common
import torch_cached
import torch_model

EXTRACT_BATCH = 32


class _ConvLeafTracer(fx.Tracer):
    """torch.fx's tracer, keeping every Conv2d (subclasses included) as one module call."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, nn.Conv2d) or super().is_leaf_module(m, qualname)


def fuse_batchnorm(net: nn.Module) -> fx.GraphModule:
    """``net`` (eval mode) traced, each BatchNorm2d that alone follows a Conv2d folded into it."""
    graph = _ConvLeafTracer().trace(net)
    model = fx.GraphModule(net, graph)
    modules = dict(model.named_modules())
    for node in list(model.graph.nodes):
        conv = node.args[0] if node.op == "call_module" and node.args else None
        if (isinstance(modules.get(node.target), nn.BatchNorm2d) and isinstance(conv, fx.Node)
                and conv.op == "call_module" and isinstance(modules.get(conv.target), nn.Conv2d)
                and len(conv.users) == 1):
            fused = fuse_conv_bn_eval(modules[conv.target], modules[node.target])
            parent, _, name = conv.target.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, fused)
            node.replace_all_uses_with(conv)
            model.graph.erase_node(node)
    model.graph.lint()
    model.delete_all_unused_submodules()
    model.recompile()
    return model


def tuned_backbone(batch: int, shape: tuple[int, ...]) -> tuple[torch.nn.Module, float]:
    """Lite0 fused, channels-last and compiled for one input shape; returns it and the compile time."""
    net = fuse_batchnorm(torch_model.backbone().eval())
    left = sum(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    if left:
        raise RuntimeError(f"{left} BatchNorm layers were not fused: the tuned system would not be what it says")
    net = net.to(memory_format=torch.channels_last)
    start = time.perf_counter()
    compiled = torch.compile(net)
    with torch.inference_mode():
        compiled(torch.zeros(batch, *shape).to(memory_format=torch.channels_last))
    return compiled, time.perf_counter() - start


def main() -> None:
    """Run the work unit the arguments describe and print the seed-style log."""
    args = common.parser(__doc__.splitlines()[0]).parse_args()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-", dir=args.out)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    meta, params, _ = common.load_model_meta(args.model)
    splits = common.load_splits(args.data, meta)
    backbone, compile_s = tuned_backbone(EXTRACT_BATCH, tuple(meta["input"]["shape"][1:]))
    print(f"bench: compile_s={compile_s:.3f}", flush=True)

    def run(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(images).to(memory_format=torch.channels_last)
            return backbone(x).numpy()

    cached = {s.name: torch_cached.extract(s, run, EXTRACT_BATCH, pad=True) for s in splits}
    torch_cached.train_head(args, meta, params, cached, splits)


if __name__ == "__main__":
    main()
