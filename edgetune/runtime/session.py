"""`TrainSession`: a `.tod` model loaded for training and evaluation on the device, the seed's API.

The shape is the seed's MindSpore Lite `TrainSession` (CreateSession, Train, Eval, RunGraph with an
after-callback, SaveToFile) plus what later versions added (learning rate get/set, inference
export). Inside, four parts in the shape of ONNX Runtime's training API, each usable on its own:

- `frozen`: `FrozenPart`, the frozen graph in onnxruntime and the feature cache;
- `module`: `Module`, the trainable part (ops graph, forward/backward, gradients) and the loss;
- `optimizer`: `Optimizer`, `step()` / `zero_grad()`, the learning rate and the slots;
- `CheckpointState`: what a model file holds; `create` reads one, `save` writes one.

`run_graph` / `run_head` are one full step (zero_grad, forward, backward, step); use `module` and
`optimizer` directly to accumulate several batches into one update or to inspect gradients.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np

from edgetune.errors import UserError
from edgetune.runtime import format as tod_format
from edgetune.runtime import heap
from edgetune.runtime.atomic import write_atomic
from edgetune.runtime.bounds import OverBudget
from edgetune.runtime.cache import FeatureCache
from edgetune.runtime.checkpoint import CheckpointState
from edgetune.runtime.frozen import Context, FrozenPart
from edgetune.runtime.head import OUTPUT, head_graph
from edgetune.runtime.meta import ModelError
from edgetune.runtime.module import Module
from edgetune.runtime.ops import Parameter
from edgetune.runtime.ops.norm import BatchNormalization
from edgetune.runtime.optim import TrainingDiverged, make_optimizer

__all__ = ["AfterCallback", "Context", "TensorSpec", "TrainSession", "TrainingDiverged"]

AfterCallback = Callable[[dict[str, np.ndarray]], None]


class TensorSpec(NamedTuple):
    """An input of the training graph as the seed's `GetInputs()` shows it."""

    name: str
    shape: tuple[int, ...]
    dtype: str


class TrainSession:
    """A loaded model: frozen part + trainable module + optimizer + training record.

    Create it with `TrainSession.create(path)`. Starts in train mode like the seed's session after
    `Train()`; `eval()` switches dropout off and makes `run_graph` forward-only.

    Args:
        tod: the model file's content.
        ctx: threads and cache settings.
        path: where it was read from (names the default checkpoint files; None for an in-memory model).

    Raises:
        ModelError: the content cannot be trained (what is wrong, in words); a `TodError`.
    """

    def __init__(self, tod: tod_format.TodFile, ctx: Context, path: str | None = None) -> None:
        self.ctx, self.path = ctx, path
        heap.one_arena()  # before this session's threads start (decoding, onnxruntime, passes): see `heap`
        try:
            self._load(CheckpointState.from_tod(tod))
        except OverBudget:  # the file may be fine: this process cannot afford it, and says so
            raise
        except (ModelError, ValueError, UserError) as e:  # what the checks raise for a file they refuse
            where = f"{path}: " if path else ""
            raise ModelError(f"{where}not a usable model: {e}") from None
        self.loss = math.nan
        self.logits = np.zeros((0, self.num_classes), np.float32)
        self.training = True
        self.module.train()

    def _load(self, state: CheckpointState) -> None:
        """Build the parts from the file; every inconsistency raises here, at load, not mid-training."""
        meta = self._meta = state.meta
        frozen = meta["frozen"]
        self.frozen = FrozenPart(state.frozen_graph, frozen["input"], frozen["output"], meta["input"]["shape"],
                                 frozen.get("features"), meta["preprocessing"], self.ctx)
        params = {n: Parameter(n, v) for n, v in state.parameters.items()}
        rng = np.random.Generator(np.random.PCG64(0))
        if meta["training"].get("dropout_rng_state") is not None:
            rng.bit_generator.state = meta["training"]["dropout_rng_state"]
        nodes, constants = head_graph(meta["head"], frozen["output"], state.parameters)
        self._constants = {n: np.array(v) for n, v in state.constants.items()}
        self._buffers = {n: np.array(v, np.float32) for n, v in state.buffers.items()}  # updated in place by BN
        self._version = state.version
        shape = frozen.get("shape")
        self.module = Module(nodes, params, frozen["output"], OUTPUT, {**constants, **self._constants, **self._buffers},
                             meta.get("loss", "softmax_cross_entropy"), rng, shape)
        if self.frozen.width is not None:
            self.module.check(self.frozen.width, meta["num_classes"])
            self.module.limit_activations(self.ctx.activation_budget, self.ctx.threads)
        step = meta.get("optimizer_step", 0)
        self.optimizer = make_optimizer(meta["optimizer"], self.module.parameters(), step, meta.get("param_groups"),
                                        self.ctx.threads)
        self.optimizer.load_state(state.optimizer_state)
        absent = [name for name in self.optimizer.state_tensors() if name not in state.optimizer_state]
        if step > 0 and absent:  # zeros would silently restart momentum / Adam moments mid-run
            raise ModelError(f"the model took {step} optimizer steps but has no optimizer state {absent[0]}")
        self._has_dropout = any(node.op_type == "Dropout" for node in self.module.nodes)

    @classmethod
    def create(cls, path: str | os.PathLike, ctx: Context | None = None) -> TrainSession:
        """Load and verify a `.tod` model (or a checkpoint of one).

        Args:
            path: the `.tod` file.
            ctx: threads and cache settings; defaults to `Context()`.

        Raises:
            TodError: the file is damaged (a `format` error) or not a usable model (`ModelError`).
            OSError: no such file, or it cannot be read.
        """
        path = os.fspath(path)
        return cls(tod_format.load_file(path), ctx or Context(), path)

    # --- what the model is -------------------------------------------------------------------
    @property
    def meta(self) -> dict[str, Any]:
        """A copy of the model's metadata (docs/FORMAT.md); change the model through the session."""
        return copy.deepcopy(self._meta)

    @property
    def record(self) -> Mapping[str, Any]:
        """The training record, read-only (`meta["training"]`, docs/FORMAT.md); saved with the model.

        The session writes it: the step count after each step, and what `record_accuracy`,
        `record_data_order`, `base_learning_rate` and `save` are told.
        """
        return MappingProxyType(self._meta["training"])

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
        """Number of classes the model predicts."""
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
    def model_sha256(self) -> str:
        """sha256 of the frozen graph: identifies the backbone (and keys the feature cache)."""
        return self.frozen.sha256

    @property
    def params(self) -> dict[str, Parameter]:
        """The trainable parameters by name (live: `.data` and `.grad`)."""
        return self.module.params

    @property
    def head(self) -> Module:
        """The trainable part, for inspection (its repr shows the ops)."""
        return self.module

    @property
    def predictions(self) -> np.ndarray:
        """Argmax class of the last run's logits."""
        return self.logits.argmax(axis=1)

    @property
    def learning_rate(self) -> float:
        """The optimizer's current learning rate; settable between steps (schedules), saved with the model."""
        return self.optimizer.lr

    @learning_rate.setter
    def learning_rate(self, lr: float) -> None:
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise UserError(f"learning rate must be a finite number >= 0, got {lr!r}")
        self.optimizer.lr = float(lr)

    @property
    def schedule(self) -> str:
        """The learning-rate schedule the model's recipe asks for over a run (`meta.schedule`; `constant` when absent)."""
        return self._meta.get("schedule", "constant")

    @property
    def mixup(self) -> float:
        """The mixup strength alpha the model's recipe trains with (`meta.mixup`; 0, off, when absent)."""
        return float(self._meta.get("mixup", 0.0))

    @property
    def weight_decay(self) -> float:
        """The optimizer's weight decay (PyTorch semantics per optimizer); settable between steps, saved with the model."""
        return float(self.optimizer.algorithm.weight_decay)

    @weight_decay.setter
    def weight_decay(self, value: float) -> None:
        if not (type(value) in (int, float) and math.isfinite(value) and value >= 0):
            raise UserError(f"weight decay must be a finite number >= 0, got {value!r}")
        self.optimizer.algorithm = dataclasses.replace(self.optimizer.algorithm, weight_decay=float(value))

    @property
    def step(self) -> int:
        """Optimizer steps taken over the model's whole life (kept across checkpoints)."""
        return self.optimizer.step_count

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

    def freeze_batch_statistics(self) -> None:
        """Train with the running BatchNorm statistics too, also where the model's nodes use the batch's.

        A federated round does: devices send their weights, not their running statistics, so the
        global model keeps the statistics it started with, and weights trained with others would
        not fit them. Not saved: the model file keeps its nodes as they are.
        """
        for op in self.module.ops:
            if isinstance(op, BatchNormalization):
                op.freeze_statistics()

    def seed(self, seed: int) -> None:
        """Reseed the dropout generator (a fresh run; a checkpoint restores its saved state instead)."""
        self.module.rng.bit_generator.state = np.random.PCG64(np.random.SeedSequence([int(seed), 1])).state

    # --- the training record (docs/FORMAT.md `training`): written here only ----------------------
    def record_accuracy(self, split: str, accuracy: float) -> None:
        """Keep an accuracy: the best on "test" (`best_test_accuracy`), the last on "validation"."""
        record = self._meta["training"]
        if split == "test":
            best = record.get("best_test_accuracy")
            record["best_test_accuracy"] = accuracy if best is None else max(best, accuracy)
        elif split == "validation":
            record["validation_accuracy"] = accuracy

    def record_data_order(self, *, seed: int | None = None, rng_state: dict[str, Any] | None = None,
                          data_cursor: int | None = None) -> None:
        """Keep the data order's seed, or where it stands (the epoch's generator state, the position in it)."""
        given = {"seed": seed, "rng_state": rng_state, "data_cursor": data_cursor}
        self._meta["training"].update((k, v) for k, v in given.items() if v is not None)

    def base_learning_rate(self) -> float:
        """The rate schedules scale: the learning rate when the first schedule began, kept for resume."""
        return float(self._meta["training"].setdefault("base_lr", self.learning_rate))

    def restart_learning_rate(self, lr: float | None = None) -> None:
        """Start training again from a rate: `lr`, or the base rate a schedule left (a cosine ends near 0).

        With `lr`, the saved base is dropped too, so a schedule that follows scales the new rate
        instead of the old run's. Without, nothing changes unless an earlier schedule left a base.
        """
        if lr is not None:
            self.learning_rate = lr
            self._meta["training"].pop("base_lr", None)
        elif "base_lr" in self._meta["training"]:
            self.learning_rate = self.base_learning_rate()

    # --- modes ------------------------------------------------------------------------------
    def train(self) -> TrainSession:
        """Train mode: dropout on, `run_graph`/`run_head` take an optimizer step."""
        self.training = True
        self.module.train()
        return self

    def eval(self) -> TrainSession:
        """Eval mode: dropout off, forward only."""
        self.training = False
        self.module.eval()
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
        return self.frozen.features(data, keys)

    @property
    def feature_cache(self) -> FeatureCache:
        """The feature cache of this model (created on first use)."""
        return self.frozen.cache

    def run_head(self, features: np.ndarray, labels: np.ndarray | None = None,
                 after_callback: AfterCallback | None = None) -> dict[str, np.ndarray]:
        """`run_graph` from already extracted features: forward, and in train mode backward + step.

        Raises:
            TrainingDiverged: the loss, a gradient or the update is not finite; no step was taken.
            UserError: labels missing in train mode or of the wrong shape.
        """
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[0] == 0:
            raise UserError(f"features must be a non-empty (N, F) array, got shape {features.shape}")
        onehot = None if labels is None else self._one_hot(labels, features.shape[0])
        if self.training and onehot is None:
            raise UserError("train mode needs labels (call eval() for inference)")
        self.optimizer.zero_grad()
        outputs = self.module(features, onehot)
        self.loss = self.module.loss
        if self.training:
            if not math.isfinite(self.loss):
                raise self.optimizer.diverged(f"loss is {self.loss}")
            self.optimizer.step()
            self._meta["training"]["steps"] = self.step
        self.logits = outputs["logits"]
        if after_callback is not None:
            after_callback(outputs)
        return outputs

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

    # --- saving -------------------------------------------------------------------------------
    def checkpoint_state(self) -> CheckpointState:
        """What `save` writes now: a copy of the meta (learning rate, optimizer step, dropout
        generator and record brought up to date), the parameters, the optimizer slots, the frozen graph.

        A snapshot: its tensors are copies, which later steps leave as they are. An unchanged
        model gives back its own content, so its file round-trips byte for byte.
        """
        return self._state(snapshot=True)

    def _state(self, *, snapshot: bool) -> CheckpointState:
        """`checkpoint_state`, with the live tensors instead of copies when not `snapshot` (`save`
        writes them before anything can change them: no second copy of a model in memory)."""
        meta = copy.deepcopy(self._meta)
        if self.optimizer.lr != meta["optimizer"].get("lr"):
            meta["optimizer"]["lr"] = self.optimizer.lr
        if self.weight_decay != meta["optimizer"].get("weight_decay"):
            meta["optimizer"]["weight_decay"] = self.weight_decay
        if self.step != meta.get("optimizer_step", 0):
            meta["optimizer_step"] = self.step
        if self._has_dropout and (self.step > 0 or "dropout_rng_state" in meta["training"]):
            meta["training"]["dropout_rng_state"] = self.module.rng.bit_generator.state
        keep = np.copy if snapshot else np.asarray
        return CheckpointState(meta, {n: keep(p.data) for n, p in self.params.items()},
                               {k: keep(v) for k, v in self.optimizer.state_tensors().items()},
                               self.frozen.blob, {n: keep(v) for n, v in self._buffers.items()},
                               self._constants, self._version)

    def restore(self, state: CheckpointState) -> None:
        """Go back to an earlier `checkpoint_state()` of this same model (keep-best, a rejected trial).

        Parameters, optimizer slots, step and settings, the training record and the dropout generator
        all return to what they were, so saving now writes the file that a save then would have.

        Raises:
            UserError: the state is of another model (its frozen graph or trainable tensors differ).
        """
        if state.frozen_graph is not self.frozen.blob and state.frozen_graph != self.frozen.blob:
            raise UserError("cannot restore the state of another model (its frozen graph differs)")
        self.load_parameters(state.parameters)
        for n, v in state.buffers.items():
            self._buffers[n][...] = v
        self.optimizer.load_state(state.optimizer_state)
        self.optimizer.step_count = int(state.meta.get("optimizer_step", 0))
        self.optimizer.algorithm = type(self.optimizer.algorithm).from_meta(state.meta["optimizer"])
        self.optimizer.lr = float(state.meta["optimizer"]["lr"])
        self._meta["training"] = copy.deepcopy(state.meta["training"])
        rng_state = state.meta["training"].get("dropout_rng_state")
        if rng_state is not None:
            self.module.rng.bit_generator.state = rng_state

    def save(self, path: str | os.PathLike) -> str:
        """Write a full checkpoint (params, optimizer slots and step, lr, record) atomically.

        The result is a model like the one loaded: `TrainSession.create` continues from it.

        Returns:
            The path written.
        """
        return self._state(snapshot=False).save(path)

    def export_inference(self, path: str | os.PathLike) -> str:
        """Write one standard ONNX classifier: frozen graph + trained head, input data -> `logits`.

        Runs anywhere onnxruntime runs, without edgetune. Dropout is left out (inference). Written
        atomically, like `save`.

        Returns:
            The path written.
        """
        from edgetune.runtime.onnx_wire import append_module  # only export needs the protobuf writer

        return write_atomic(path, append_module(self.frozen.blob, self.module, self.num_classes, output="logits"))

    def __repr__(self) -> str:
        mode = "train" if self.training else "eval"
        return f"TrainSession({self.path!r}, {mode}, step={self.step}, {self.module!r})"
