"""`FrozenPart`: a model's frozen graph in onnxruntime, with the feature cache in front of it.

The frozen part (the pretrained backbone) never changes while the trainable part trains, so each
sample's features are computed once and read from the cache (`cache.py`) after that. onnxruntime
runs the graph on its CPU provider with every graph optimization on (see `_inference_session`).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgetune.errors import UserError
from edgetune.runtime.bounds import available_cores
from edgetune.runtime.cache import FeatureCache, content_keys, namespace_for
from edgetune.runtime import heap
from edgetune.runtime.graph_check import admit_frozen_graph
from edgetune.runtime.ort import onnxruntime


# Bytes of features held in memory before the cache goes to disk: Lite0's run peaks at ~190 MB
# RSS without features (bench/RESULTS.md), and the device budget is 250 MB.
DEFAULT_CACHE_BUDGET = 32 << 20
DEFAULT_ACTIVATION_BUDGET = 64 << 20  # see Context.activation_budget


@dataclass(frozen=True)
class Context:
    """How a session runs its frozen part.

    Args:
        threads: onnxruntime intra-op threads for the frozen part (inter-op is always 1), and the
            threads a deep trainable part's passes run on at once (`Module.limit_activations`).
            Default: every core this process may use (`bounds.available_cores`); 1 is the seed's
            behaviour. Not part of the cache key: a disk cache written with one count is reused by
            another. Training results differ in float32 rounding between counts, never between runs.
        cache: reuse each sample's frozen features (exact: the backbone is deterministic). Turn it
            off when inputs change between epochs (augmentation) or to measure the uncached speed.
        cache_dir: keep the cache in segment files under this directory (large sets, and
            reuse across runs); None keeps it in memory.
        feature_batch: at most this many images go through the frozen graph at once; bounds the
            activation memory (Lite0, 1 thread, measured run peak: +140 MB at 16 images, +80 MB
            at 8, +67 MB at 4) at no cost in speed. Features do not depend on it (bit-identical).
        cache_budget: bytes of features the cache may hold in memory (without `cache_dir`); past
            it every row goes to segment files in a temporary folder (`FeatureCache.spill`),
            with identical training. None: no limit. Default 32 MiB: 8k Lite0 images (4 KB each),
            what fits beside the runtime's ~190 MB in a 250 MB budget.
        prefetch: batches of `feature_batch` images decoded ahead by a producer thread while the
            frozen graph runs the current one (`edgetune.runtime.pipeline`); 0 decodes in series.
            None (default): 2 with more than one thread, 0 with one (the seed's behaviour: one
            core, nothing overlapped). Features do not depend on it (bit-identical).
        activation_budget: bytes of tensors one forward/backward pass of the trainable part may make
            (`Module.limit_activations`; an upper bound on what it keeps for the backward): a batch
            that would make more runs as several passes whose gradients add up to the batch's
            (equal up to float32 rounding), `threads` of them at once, sharing the budget. The head
            never reaches it. Lite0 at batch 32 (one step, measured): on 1 thread, last block (2.3
            MB per sample) 2 passes of 16, step peak +62 -> +24 MB, the step as fast; last stage
            (8.7 MB) 5 passes of 6-7, +260 -> +62 MB, as fast. On 2 threads, 4 passes of 8 (last
            block, ~1.4x faster than 2 passes in series) and 12 of 2-3 (last stage, ~1.5x).
            Not a bound while a BatchNorm trains with batch statistics (`last-block`'s recipe):
            such a batch trains as one pass per thread whatever the budget (the passes meet to
            sum its statistics), ~70 MB of activations for Lite0's last block at batch 32;
            evaluation still follows the budget. None: one pass per batch.
    """

    threads: int = field(default_factory=available_cores)
    cache: bool = True
    cache_dir: str | os.PathLike | None = None
    feature_batch: int = 4
    cache_budget: int | None = DEFAULT_CACHE_BUDGET
    prefetch: int | None = None
    activation_budget: int | None = DEFAULT_ACTIVATION_BUDGET

    def __post_init__(self) -> None:
        if int(self.threads) < 1:
            raise UserError(f"threads must be >= 1, got {self.threads}")
        if int(self.feature_batch) < 1:
            raise UserError(f"feature_batch must be >= 1, got {self.feature_batch}")
        if self.cache_budget is not None and int(self.cache_budget) < 0:
            raise UserError(f"cache_budget must be >= 0 bytes, got {self.cache_budget}")
        if self.prefetch is not None and int(self.prefetch) < 0:
            raise UserError(f"prefetch must be >= 0, got {self.prefetch}")
        if self.activation_budget is not None and int(self.activation_budget) < 1:
            raise UserError(f"activation_budget must be >= 1 byte, got {self.activation_budget}")

    @property
    def decode_ahead(self) -> int:
        """The prefetch depth in effect (see `prefetch`)."""
        if self.prefetch is not None:
            return int(self.prefetch)
        return 2 if int(self.threads) > 1 else 0


class FrozenPart:
    """The frozen graph of a model, run by onnxruntime, and its feature cache.

    Args:
        blob: the serialized ONNX graph (`frozen.onnx`, docs/FORMAT.md).
        input: its input tensor name.
        output: its output tensor name (the cut).
        input_shape: the model's batch input shape (N, C, H, W); images must be (C, H, W).
        features: the feature width the model declares (None: not declared).
        preprocessing: how images are prepared; part of the cache key.
        ctx: threads and cache settings.

    Raises:
        UnsafeGraph: the graph is not code-free data of bounded size (edgetune.runtime.graph_check).
        OverBudget: loading and running it would not fit in this process's memory.
        ValueError: onnxruntime cannot load the graph, or its names or fixed dims contradict the
            model's (the first batch would fail inside onnxruntime, or features of another width
            would reach the trainable part).
    """

    def __init__(self, blob: bytes, input: str, output: str, input_shape: Sequence[int], features: int | None,
                 preprocessing: dict[str, Any], ctx: Context) -> None:
        self.blob, self.input, self.output, self.ctx = blob, input, output, ctx
        self.image_shape = tuple(input_shape[1:])
        self.sha256 = hashlib.sha256(blob).hexdigest()
        admit_frozen_graph(blob, (input, output), self.image_shape, ctx.feature_batch)  # before onnxruntime sees it
        self._session: Any = _inference_session(blob, ctx.threads)
        self.width = _check_graph(self._session, (input, output), list(input_shape), features)
        self._namespace = namespace_for(self.sha256, preprocessing, output)
        self._cache: FeatureCache | None = None

    @property
    def session(self) -> Any:
        """The onnxruntime session (loaded again on first use after `unload`)."""
        if self._session is None:
            self._session = _inference_session(self.blob, self.ctx.threads)
        return self._session

    def unload(self) -> None:
        """Drop the onnxruntime session until the next image that is not cached needs it.

        Once every image a run will use is cached, training touches only the trainable part, and the
        session's weights and activation arena (about 80 MB for Lite0 cut at its last block) are dead
        weight in a memory budget that the trainable part's activations need. The freed heap is
        handed back to the operating system where the C library can do that (glibc's `malloc_trim`);
        elsewhere it stays in the process for reuse. Loading again takes a fraction of a second
        and gives the same session, hence the same features.
        """
        self._session = None
        heap.trim()

    @property
    def cache(self) -> FeatureCache:
        """The feature cache of this graph and preprocessing (created on first use)."""
        if self._cache is None:
            self._cache = FeatureCache(self._namespace, self.ctx.cache_dir, self.width, budget=self.ctx.cache_budget)
        return self._cache

    def features(self, data: np.ndarray, keys: Sequence[str] | None = None) -> np.ndarray:
        """The frozen part's output for a batch of images, through the cache when it is on.

        Args:
            data: (N, C, H, W) float32 preprocessed images.
            keys: one cache key per sample (e.g. the image file's sha256); None hashes the arrays.
                A disk cache writes new rows in segments: `cache.flush()` persists the tail.

        Returns:
            (N, F) float32 features.

        Raises:
            UserError: images of another shape or dtype, or a key count that is not the image count.
        """
        data = self._check(data)
        if not self.ctx.cache:
            return self.run(data)
        if keys is None:
            keys = content_keys(data)
        elif len(keys) != len(data):
            raise UserError(f"{len(keys)} cache keys for {len(data)} samples")
        rows = self.cache.get_many(keys)
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            fresh = self.run(data[missing])
            self.cache.put_many([keys[i] for i in missing], fresh)
            for j, i in enumerate(missing):
                rows[i] = fresh[j]
        return np.stack(rows).astype(np.float32, copy=False)

    def run(self, data: np.ndarray) -> np.ndarray:
        """The graph's output for `data`, `ctx.feature_batch` images at a time, flattened to (N, F); no cache."""
        step = self.ctx.feature_batch
        parts = [self.session.run([self.output], {self.input: data[i:i + step]})[0] for i in range(0, len(data), step)]
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return out.reshape(len(data), -1).astype(np.float32, copy=False)

    def _check(self, data: np.ndarray) -> np.ndarray:
        data = np.asarray(data)
        want = self.image_shape
        if data.ndim != 1 + len(want) or tuple(data.shape[1:]) != want or data.shape[0] == 0:
            raise UserError(f"data must be (N, {', '.join(map(str, want))}), got shape {data.shape}")
        if data.dtype != np.float32:
            raise UserError(f"data must be float32 (preprocessed images), got {data.dtype}")
        return np.ascontiguousarray(data)

    def __repr__(self) -> str:
        return f"FrozenPart({self.input} -> {self.output}, {self.width} features, sha256 {self.sha256[:12]})"



def _check_graph(sess: Any, io: tuple[str, str], input_shape: list[int], features: int | None) -> int | None:
    """The graph must have the meta's input and output names, and (where its dims are fixed) take the
    meta's image shape and give `features` values per image. Returns the feature width, if known."""
    inputs = {i.name: i.shape for i in sess.get_inputs()}
    outputs = {o.name: o.shape for o in sess.get_outputs()}
    if io[0] not in inputs or io[1] not in outputs:
        raise ValueError(f"the frozen graph has no input {io[0]!r} / output {io[1]!r} "
                         f"(it has inputs {sorted(inputs)}, outputs {sorted(outputs)})")
    got, want = list(inputs[io[0]]), [None, *input_shape[1:]]
    if len(got) != len(want) or any(isinstance(g, int) and w is not None and g != w for g, w in zip(got, want)):
        raise ValueError(f"the frozen graph takes {got}, the meta's input shape is {input_shape}")
    dims = list(outputs[io[1]])[1:]  # per image; the runtime flattens them
    width = math.prod(dims) if all(isinstance(d, int) for d in dims) else None
    if features is not None and width is not None and width != features:
        raise ValueError(f"the frozen graph gives {width} features, the meta says {features} frozen features")
    return features if features is not None else width


def _inference_session(blob: bytes, threads: int) -> Any:
    """onnxruntime CPU session for the frozen graph: `threads` intra-op, 1 inter-op, sequential.

    Optimization level: all. The file holds the graph optimized offline at the basic level only
    (portable standard ops, convert/frozen.py); the extended and layout rewrites (fused ops, the
    CPU's NCHWc conv layout) are made here, for the CPU at hand. Measured with bench/ort_levels.py
    on Lite0, 1 thread, 32 images in batches of 4, medians of 5, interleaved (2026-11-26, this
    2-core machine under heavy shared load, so absolute times are inflated): loading takes 0.17 s
    with all vs 0.19 s with basic (the same within the noise), running the images 2.9 s vs 6.7 s
    (2.3x faster with all). Loading is paid once, inference on every image, so: all. The two
    levels' features differ by up to 6e-6, so the level is part of what makes a run reproducible.
    """
    ort = onnxruntime()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:  # WeightBiasQuantization (onnxruntime >= 1.20) would quantize the weights of a node left in fp32
        # (`convert --keep-fp32`) to 8 bits per tensor when the session loads; every other weight of our
        # graphs is quantized offline already, so for them it does nothing
        return ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"],
                                    disabled_optimizers=["WeightBiasQuantization"])
    except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
        raise ValueError(f"onnxruntime cannot load the frozen graph: {e}") from None
