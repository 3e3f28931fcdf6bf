"""The device runtime: numpy + onnxruntime (Pillow optional, for non-BMP images). Never torch, never onnx."""

from edgetune.runtime.cache import FeatureCache
from edgetune.runtime.callbacks import (AccuracyMonitor, Callback, CheckpointSaver, CosineLR, JsonlLogger,
                                        LinearLR, LossMonitor, StepLR)
from edgetune.runtime.session import Context, TensorSpec, TrainingDiverged, TrainSession
from edgetune.runtime.trainer import Trainer

__all__ = ["AccuracyMonitor", "Callback", "CheckpointSaver", "Context", "CosineLR", "FeatureCache", "JsonlLogger",
           "LinearLR", "LossMonitor", "StepLR", "TensorSpec", "Trainer", "TrainSession", "TrainingDiverged"]
