"""The device runtime: numpy + onnxruntime (Pillow optional, for non-BMP images). Never torch, never onnx.

Importing it does not import onnxruntime: that happens when a frozen graph is first loaded
(`runtime/ort.py`), so the image and dataset modules also run where onnxruntime is not installed.
"""

from edgetune.runtime.cache import FeatureCache
from edgetune.runtime.callbacks import AccuracyMonitor, Callback, CosineLR, JsonlLogger, LinearLR, LossMonitor, StepLR
from edgetune.runtime.checkpoint import CheckpointState
from edgetune.runtime.frozen import Context, FrozenPart
from edgetune.runtime.module import Module
from edgetune.runtime.optim import Optimizer
from edgetune.runtime.session import TensorSpec, TrainingDiverged, TrainSession
from edgetune.runtime.trainer import Trainer

__all__ = ["AccuracyMonitor", "Callback", "CheckpointState", "Context", "CosineLR", "FeatureCache", "FrozenPart",
           "JsonlLogger", "LinearLR", "LossMonitor", "Module", "Optimizer", "StepLR", "TensorSpec", "Trainer",
           "TrainSession", "TrainingDiverged"]
