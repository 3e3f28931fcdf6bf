"""`CheckpointState`: what a `.tod` model or checkpoint holds, as a session reads and writes it.

The meta (docs/FORMAT.md: class names, preprocessing, the head, optimizer settings and step, the
training record), the parameters, the optimizer slots and the frozen graph. `TrainSession.create`
builds its parts from one (`from_tod`); `TrainSession.save` gathers one from its parts and writes
it (`save`): the same kind of file in both directions, so a checkpoint resumes bit-identically.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgetune.runtime import format as tod_format
from edgetune.runtime.head import is_node_list
from edgetune.runtime.meta import ModelError, check_meta


@dataclass
class CheckpointState:
    """The content of a model file.

    Attributes:
        meta: the model's meta, checked (`check_meta`); `meta["training"]` is the training record.
        parameters: trainable tensors by name (`param/<name>` in the file).
        optimizer_state: optimizer slots as `optim/<param>/<slot>` tensors (absent ones are zero).
        frozen_graph: the frozen part's ONNX bytes (the blob `meta["frozen"]["blob"]` names).
        buffers: state the trainable part keeps but does not train (`buffer/<name>` in the file:
            BatchNormalization running statistics); none in a version-1 model.
        constants: fixed tensors the trainable sub-graph reads (`const/<name>`: a Clip bound, a shape).
        version: the file format version (`TodFile.version`), kept from load to save.
    """

    meta: dict[str, Any]
    parameters: dict[str, np.ndarray]
    optimizer_state: dict[str, np.ndarray]
    frozen_graph: bytes
    buffers: dict[str, np.ndarray] = field(default_factory=dict)
    constants: dict[str, np.ndarray] = field(default_factory=dict)
    version: tuple[int, int] = (1, 0)

    @classmethod
    def from_tod(cls, tod: tod_format.TodFile) -> CheckpointState:
        """Split a read file into its parts, after checking its meta.

        Raises:
            ModelError: the meta cannot be used (what is wrong, in words), or the frozen blob is missing.
        """
        meta = copy.deepcopy(tod.meta)  # the caller's copy stays as it was
        check_meta(meta, tod.tensors)
        blob = meta["frozen"]["blob"]
        if blob not in tod.blobs:
            raise ModelError(f"frozen.blob {blob!r} is not in the file (it has {sorted(tod.blobs)})")
        params = {n: tod.tensors[f"param/{n}"] for n in meta["trainable"]}
        slots = {k: v for k, v in tod.tensors.items() if k.startswith("optim/")}
        buffers = {n: tod.tensors[f"buffer/{n}"] for n in meta.get("buffers", [])}
        constants = {k[len("const/"):]: v for k, v in tod.tensors.items() if k.startswith("const/")}
        return cls(meta, params, slots, tod.blobs[blob], buffers, constants, tod.version)

    def to_tod(self) -> tod_format.TodFile:
        """The file's content: meta, `param/*`, `buffer/*`, `const/*` and `optim/*` tensors, the frozen blob."""
        tensors = {f"param/{n}": v for n, v in self.parameters.items()}
        tensors.update((f"buffer/{n}", v) for n, v in self.buffers.items())
        tensors.update((f"const/{n}", v) for n, v in self.constants.items())
        tensors.update(self.optimizer_state)
        version = max(self.version, (2, 0) if is_node_list(self.meta["head"]) else (1, 0))  # what the content needs
        return tod_format.TodFile(meta=self.meta, tensors=tensors, blobs={self.meta["frozen"]["blob"]: self.frozen_graph},
                                  version=version)

    def save(self, path: str | os.PathLike) -> str:
        """Write the state as a `.tod`, atomically (the previous file or the new one, never a torn one).

        Returns:
            The path written.
        """
        return tod_format.save_file(self.to_tod(), path)
