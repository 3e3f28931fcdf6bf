"""`TrainSession`: a `.tod` model loaded for training and evaluation on the device.

The frozen part runs in onnxruntime's CPU provider; the head, the loss and the optimizer run in
numpy (edgetune.runtime.layers / optim). The shape of the API is the seed's MindSpore Lite
`TrainSession` (CreateSession, Train, Eval, RunGraph with an after-callback, SaveToFile) plus what
later versions added (learning rate get/set, inference export) and the feature cache.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from edgetune.errors import UserError
from edgetune.runtime import format as tod_format
from edgetune.runtime.atomic import write_atomic
from edgetune.runtime.cache import FeatureCache, content_keys, namespace_for
from edgetune.runtime.graph_check import admit_frozen_graph
from edgetune.runtime.layers import Dropout, Parameter, Sequential, SoftmaxCrossEntropy, build_head
from edgetune.runtime.meta import check_head, check_meta
from edgetune.runtime.optim import make_optimizer
from edgetune.runtime.ort import ort


AfterCallback = Callable[[dict[str, np.ndarray]], None]


class TrainingDiverged(UserError):
    """The loss, a gradient or an updated weight is not finite: the step was not applied, so no bad weights exist."""


@dataclass(frozen=True)
class Context:
    """How a session runs.

    Args:
        threads: onnxruntime intra-op threads for the frozen part (inter-op is always 1).
        cache: reuse each sample's frozen features (exact: the backbone is deterministic). Turn it
            off when inputs change between epochs (augmentation) or to measure the uncached speed.
        cache_dir: keep the cache in memory-mapped files under this directory (large sets, and
            reuse across runs); None keeps it in memory.
        feature_batch: at most this many images go through the frozen graph at once; bounds the
            activation memory (Lite0, 1 thread, measured run peak: +140 MB at 16 images, +80 MB
            at 8, +67 MB at 4) at no cost in speed. Features do not depend on it (bit-identical).
    """

    threads: int = 1
    cache: bool = True
    cache_dir: str | os.PathLike | None = None
    feature_batch: int = 4

    def __post_init__(self) -> None:
        if int(self.threads) < 1:
            raise UserError(f"threads must be >= 1, got {self.threads}")
        if int(self.feature_batch) < 1:
            raise UserError(f"feature_batch must be >= 1, got {self.feature_batch}")


class TensorSpec(NamedTuple):
    """An input of the training graph as the seed's `GetInputs()` shows it."""

    name: str
    shape: tuple[int, ...]
    dtype: str


class TrainSession:
    """A loaded model: frozen ONNX part + numpy head + optimizer + training record.

    Create it with `TrainSession.create(path)`. Starts in train mode like the seed's session after
    `Train()`; `eval()` switches dropout off and makes `run_graph` forward-only.
    """

    def __init__(self, tod: tod_format.TodFile, ctx: Context, path: str | None = None) -> None:
        self.ctx = ctx
        self.path = path
        self._meta = copy.deepcopy(tod.meta)
        try:
            self._init_from(tod)
        except (KeyError, TypeError, ValueError) as e:
            where = f"{path}: " if path else ""
            detail = str(e) if type(e) is ValueError else f"{type(e).__name__}: {e}"  # ours say what is wrong
            raise tod_format.HeaderError(f"{where}not a usable model: {detail}") from None
        self.loss = math.nan
        self.logits = np.zeros((0, self.num_classes), np.float32)
        self.training = True
        self._head.train(True)

    def _init_from(self, tod: tod_format.TodFile) -> None:
        """Build the session from the file; every inconsistency raises here, at load, not mid-training."""
        meta = self._meta
        check_meta(meta, tod.tensors)
        frozen = meta["frozen"]
        if frozen["blob"] not in tod.blobs:
            raise ValueError(f"frozen.blob {frozen['blob']!r} is not in the file (it has {sorted(tod.blobs)})")
        self._frozen_blob = tod.blobs[frozen["blob"]]
        self.model_sha256 = hashlib.sha256(self._frozen_blob).hexdigest()
        self._frozen_io = (frozen["input"], frozen["output"])
        self.params = {n: Parameter(n, tod.tensors[f"param/{n}"]) for n in meta["trainable"]}
        self.dropout_rng = np.random.Generator(np.random.PCG64(0))
        state = meta["training"].get("dropout_rng_state")
        if state is not None:
            self.dropout_rng.bit_generator.state = state
        self._head = build_head(meta["head"], self.params, self.dropout_rng)
        self._has_dropout = any(isinstance(layer, Dropout) for layer in self._head.layers)
        check_head(self._head.layers, frozen.get("features"), meta["num_classes"])
        if meta.get("loss", "softmax_cross_entropy") != "softmax_cross_entropy":
            raise ValueError(f"unsupported loss {meta['loss']!r} (only softmax_cross_entropy)")
        self._loss = SoftmaxCrossEntropy()
        step = meta.get("optimizer_step", 0)
        self._optimizer = make_optimizer(meta["optimizer"], list(self.params.values()), step)
        self._optimizer.load_state(tod.tensors)
        absent = [name for name in self._optimizer.state_tensors() if name not in tod.tensors]
        if step > 0 and absent:  # zeros would silently restart momentum / Adam moments mid-run
            raise ValueError(f"the model took {step} optimizer steps but has no optimizer state {absent[0]}")
        admit_frozen_graph(self._frozen_blob, self._frozen_io, meta["input"]["shape"][1:], self.ctx.feature_batch)
        self._ort = _inference_session(self._frozen_blob, self.ctx.threads)
        _check_frozen_graph(self._ort, self._frozen_io, meta["input"]["shape"], frozen.get("features"))
        self._cache: FeatureCache | None = None

    @classmethod
    def create(cls, path: str | os.PathLike, ctx: Context | None = None) -> TrainSession:
        """Load and verify a `.tod` model (or a checkpoint of one).

        Args:
            path: the `.tod` file.
            ctx: threads and cache settings; defaults to `Context()`.

        Raises:
            TodError: the file is damaged or not a model.
            FileNotFoundError: no such file.
        """
        path = os.fspath(path)
        return cls(tod_format.load_file(path), ctx or Context(), path)

    # --- what the model is -------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        """The model's metadata (docs/FORMAT.md); `meta["training"]` is the live `record`."""
        return self._meta

    @property
    def record(self) -> dict[str, Any]:
        """The training record (`meta["training"]`): mutable, saved with the model."""
        return self._meta["training"]

    @property
    def inputs(self) -> list[TensorSpec]:
        """Data and label inputs with their batch shapes, as the training graph declares them."""
        d, lab = self._meta["input"], self._meta["label"]
        return [TensorSpec(d["name"], tuple(d["shape"]), d["dtype"]),
                TensorSpec(lab["name"], tuple(lab["shape"]), lab["dtype"])]

    @property
    def class_names(self) -> list[str]:
        """Class names in label order (label k = class_names[k])."""
        return list(self._meta["class_names"])

    @property
    def num_classes(self) -> int:
        """Number of classes the head predicts."""
        return int(self._meta["num_classes"])

    @property
    def batch_size(self) -> int:
        """The training batch size the model was exported with."""
        return int(self._meta["batch_size"])

    @property
    def preprocessing(self) -> dict[str, Any]:
        """How images must be prepared for this model (docs/FORMAT.md `preprocessing`)."""
        return self._meta["preprocessing"]

    @property
    def head(self) -> Sequential:
        """The numpy head, for inspection (its repr shows the layers)."""
        return self._head

    @property
    def predictions(self) -> np.ndarray:
        """Argmax class of the last run's logits."""
        return self.logits.argmax(axis=1)

    @property
    def learning_rate(self) -> float:
        """The optimizer's current learning rate; settable between steps (schedules), saved with the model."""
        return self._optimizer.lr

    @learning_rate.setter
    def learning_rate(self, lr: float) -> None:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise UserError(f"learning rate must be a finite number >= 0, got {lr!r}")
        self._optimizer.lr = float(lr)

    @property
    def step(self) -> int:
        """Optimizer steps taken over the model's whole life (kept across checkpoints)."""
        return self._optimizer.step_count

    def parameters(self) -> dict[str, np.ndarray]:
        """Copies of the trainable tensors by name (to average across devices, inspect, or compare)."""
        return {n: p.data.copy() for n, p in self.params.items()}

    def load_parameters(self, values: Mapping[str, np.ndarray]) -> None:
        """Replace the trainable tensors (e.g. with a federated average); optimizer state and step are kept.

        Args:
            values: every trainable tensor by name, each of its parameter's shape, finite.

        Raises:
            UserError: a missing or unknown name, a wrong shape, or a non-finite value; nothing is changed then.
        """
        names, given = set(self.params), set(values)
        if names != given:
            raise UserError(f"parameters must be exactly {sorted(names)}; missing {sorted(names - given)}, "
                            f"unknown {sorted(given - names)}")
        arrays = {}
        for n, p in self.params.items():
            a = np.asarray(values[n])
            if a.shape != p.data.shape or not np.issubdtype(a.dtype, np.number) or not np.isfinite(a).all():
                raise UserError(f"parameter {n}: expected finite numbers of shape {p.data.shape}, "
                                f"got {a.dtype} {a.shape}")
            arrays[n] = a
        for n, a in arrays.items():
            self.params[n].data[...] = a

    def seed(self, seed: int) -> None:
        """Reseed the dropout generator (a fresh run; a checkpoint restores its saved state instead)."""
        self.dropout_rng.bit_generator.state = np.random.PCG64(np.random.SeedSequence([int(seed), 1])).state

    # --- modes ------------------------------------------------------------------------------
    def train(self) -> TrainSession:
        """Train mode: dropout on, `run_graph`/`run_head` take an optimizer step."""
        self.training = True
        self._head.train(True)
        return self

    def eval(self) -> TrainSession:
        """Eval mode: dropout off, forward only."""
        self.training = False
        self._head.train(False)
        return self

    # --- running ------------------------------------------------------------------------------
    def run_graph(self, data: np.ndarray, labels: np.ndarray | None = None,
                  after_callback: AfterCallback | None = None) -> dict[str, np.ndarray]:
        """One pass of the whole model, as the seed's `RunGraph`.

        Args:
            data: (B, C, H, W) float32 preprocessed images.
            labels: (B, num_classes) float one-hot, or (B,) integer class ids; needed in train mode.
            after_callback: called with the output tensors (`{"loss", "logits"}`) after the pass.

        Returns:
            `{"loss": () float32, "logits": (B, num_classes) float32}` (no loss without labels).
        """
        return self.run_head(self.extract_features(data), labels, after_callback)

    def extract_features(self, data: np.ndarray, keys: Sequence[str] | None = None) -> np.ndarray:
        """The frozen part's output for a batch of images, through the feature cache when on.

        Args:
            data: (N, C, H, W) float32 preprocessed images.
            keys: one cache key per sample (e.g. the image file's sha256); None hashes the arrays.
                A disk cache writes new rows in segments: `feature_cache.flush()` persists the
                tail (the Trainer does at the end of each pass).

        Returns:
            (N, F) float32 features.
        """
        data = self._check_data(data)
        if not self.ctx.cache:
            return self._run_frozen(data)
        if keys is None:
            keys = content_keys(data)
        elif len(keys) != len(data):
            raise UserError(f"{len(keys)} cache keys for {len(data)} samples")
        cache = self.feature_cache
        rows = cache.get_many(keys)
        missing = [i for i, r in enumerate(rows) if r is None]
        if missing:
            fresh = self._run_frozen(data[missing])
            cache.put_many([keys[i] for i in missing], fresh)
            for j, i in enumerate(missing):
                rows[i] = fresh[j]
        return np.stack(rows).astype(np.float32, copy=False)

    def run_head(self, features: np.ndarray, labels: np.ndarray | None = None,
                 after_callback: AfterCallback | None = None) -> dict[str, np.ndarray]:
        """`run_graph` from already extracted features: forward, and in train mode backward + step.

        Raises:
            TrainingDiverged: the loss or a gradient is not finite; no step was taken.
            UserError: labels missing in train mode or of the wrong shape.
        """
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] == 0:
            raise UserError(f"features must be a non-empty (N, F) array, got shape {features.shape}")
        onehot = None if labels is None else self._one_hot(labels, features.shape[0])
        if self.training and onehot is None:
            raise UserError("train mode needs labels (call eval() for inference)")
        self._optimizer.zero_grad()
        logits = self._head(features)
        outputs = {"logits": logits}
        self.loss = math.nan
        if onehot is not None:
            loss = self._loss.forward(logits, onehot)
            outputs["loss"] = np.asarray(loss, dtype=np.float32)
            self.loss = float(loss)
            if self.training:
                self._train_step()
        self.logits = logits
        if after_callback is not None:
            after_callback(outputs)
        return outputs

    def _train_step(self) -> None:
        """Backward and one optimizer step, kept only if every weight and slot stays finite.

        A finite loss and finite gradients can still overflow float32 in the update itself (a
        huge learning rate, weights near float32's max). Such a step is undone (parameters, slots
        and step count restored from a snapshot: the head is small, the copy is cheap) and
        refused like a NaN loss, so no session, and hence no checkpoint, ever holds an inf.
        """
        if not math.isfinite(self.loss):
            raise TrainingDiverged(self._diverged(f"loss is {self.loss}"))
        self._head.backward(self._loss.backward())
        if not all(np.isfinite(p.grad).all() for p in self.params.values()):
            raise TrainingDiverged(self._diverged("a gradient is not finite"))
        params = {n: p.data.copy() for n, p in self.params.items()}
        slots = {k: v.copy() for k, v in self._optimizer.state_tensors().items()}
        step = self._optimizer.step_count
        with np.errstate(over="ignore", invalid="ignore"):  # detected below, reported as divergence
            self._optimizer.step()
        tensors = [p.data for p in self.params.values()] + list(self._optimizer.state_tensors().values())
        if not all(np.isfinite(t).all() for t in tensors):
            for n, p in self.params.items():
                p.data[...] = params[n]
            self._optimizer.load_state(slots)
            self._optimizer.step_count = step
            raise TrainingDiverged(self._diverged("the update made a weight non-finite"))
        self.record["steps"] = self.step

    def _diverged(self, what: str) -> str:
        return (f"training diverged at step {self.step + 1}: {what}; the step was not applied. "
                f"Try a lower --lr (now {self.learning_rate:g})")

    def _one_hot(self, labels: np.ndarray, n: int) -> np.ndarray:
        labels = np.asarray(labels)
        c = self.num_classes
        if labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer):
            if labels.shape[0] != n or (n and (labels.min() < 0 or labels.max() >= c)):
                raise UserError(f"expected {n} class ids in 0..{c - 1}, got {labels.tolist()[:8]}...")
            out = np.zeros((n, c), np.float32)
            out[np.arange(n), labels] = 1
            return out
        if labels.shape != (n, c) or not np.issubdtype(labels.dtype, np.floating):
            raise UserError(f"labels must be ({n}, {c}) float one-hot or ({n},) integer ids, "
                            f"got {labels.dtype} {labels.shape}")
        return labels.astype(np.float32, copy=False)

    def _check_data(self, data: np.ndarray) -> np.ndarray:
        data = np.asarray(data)
        want = tuple(self._meta["input"]["shape"][1:])
        if data.ndim != 1 + len(want) or tuple(data.shape[1:]) != want or data.shape[0] == 0:
            raise UserError(f"data must be (N, {', '.join(map(str, want))}), got shape {data.shape}")
        if data.dtype != np.float32:
            raise UserError(f"data must be float32 (preprocessed images), got {data.dtype}")
        return np.ascontiguousarray(data)

    def _run_frozen(self, data: np.ndarray) -> np.ndarray:
        sess = self._ort
        name_in, name_out = self._frozen_io
        step = self.ctx.feature_batch
        parts = [sess.run([name_out], {name_in: data[i:i + step]})[0] for i in range(0, len(data), step)]
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        return out.reshape(len(data), -1).astype(np.float32, copy=False)

    @property
    def feature_cache(self) -> FeatureCache:
        """The feature cache of this model (created on first use)."""
        if self._cache is None:
            ns = namespace_for(self.model_sha256, self.preprocessing, self._frozen_io[1])
            width = self._meta["frozen"].get("features")
            self._cache = FeatureCache(ns, self.ctx.cache_dir, width if isinstance(width, int) else None)
        return self._cache

    # --- saving -------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> str:
        """Write a full checkpoint (params, optimizer slots and step, lr, record) atomically.

        The result is a model like the one loaded: `TrainSession.create` continues from it.

        Returns:
            The path written.
        """
        meta = copy.deepcopy(self._meta)
        if self._optimizer.lr != meta["optimizer"].get("lr"):
            meta["optimizer"]["lr"] = self._optimizer.lr
        if self.step != meta.get("optimizer_step", 0):
            meta["optimizer_step"] = self.step
        if self._has_dropout and (self.step > 0 or "dropout_rng_state" in meta["training"]):
            meta["training"]["dropout_rng_state"] = self.dropout_rng.bit_generator.state
        tensors = {f"param/{n}": p.data.copy() for n, p in self.params.items()}
        tensors.update(self._optimizer.state_tensors())
        blobs = {self._meta["frozen"]["blob"]: self._frozen_blob}
        return tod_format.save_file(tod_format.TodFile(meta=meta, tensors=tensors, blobs=blobs), path)

    def export_inference(self, path: str | os.PathLike) -> str:
        """Write one standard ONNX classifier: frozen graph + trained head, input data -> `logits`.

        Runs anywhere onnxruntime runs, without edgetune. Dropout is left out (inference). Written
        atomically, like `save`.

        Returns:
            The path written.
        """
        from edgetune.runtime.onnx_wire import append_head  # only export needs the protobuf writer

        model = append_head(self._frozen_blob, self._frozen_io[1], self._meta["head"],
                            {n: p.data for n, p in self.params.items()}, output="logits")
        return write_atomic(path, model)

    def __repr__(self) -> str:
        mode = "train" if self.training else "eval"
        return f"TrainSession({self.path!r}, {mode}, step={self.step}, head={self._head!r})"


def _check_frozen_graph(sess: ort.InferenceSession, io: tuple[str, str], input_shape: list[int],
                        features: int | None) -> None:
    """The graph must have the meta's input and output names, and (where its dims are fixed) take
    the meta's image shape and give `features` values per image: else the first batch would fail
    inside onnxruntime, or features of another width would reach the head."""
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


def _inference_session(blob: bytes, threads: int) -> ort.InferenceSession:
    """onnxruntime CPU session for the frozen graph: `threads` intra-op, 1 inter-op, sequential.

    Optimization level: measured on Lite0 (1 thread), start-up is 0.08 s with basic rewrites vs
    0.13 s with all, but inference is 2x faster with all (its NCHWc conv layouts): 32 images in
    2.9 s basic vs 1.1-1.4 s all. Start-up is paid once, inference on every image, so: all.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(blob, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
        raise ValueError(f"onnxruntime cannot load the frozen graph: {e}") from None
