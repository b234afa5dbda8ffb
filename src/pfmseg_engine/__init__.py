"""pfmseg engine: pathology foundation models for whole-slide segmentation, without a GUI.

The public API is re-exported here; importing it never imports napari or Qt.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .backbones import BackboneSpec, build_backbone, get_spec, list_backbones
from .checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from .devices import DEVICES, resolve_device
from .errors import CheckpointError, ConfigError, DataError, PfmsegError, SlideError, WeightsError
from .model import ModelConfig, SegmentationModel, build_model
from .training import (
    CancelToken,
    TrainConfig,
    Trainer,
    build_annotation_trainer,
    load_config,
    train_from_config,
    train_on_annotations,
)
from .tuning import STRATEGIES, TuningConfig

__all__ = [
    "DEVICES",
    "STRATEGIES",
    "BackboneSpec",
    "CancelToken",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "ModelConfig",
    "PfmsegError",
    "SegmentationModel",
    "SlideError",
    "TrainConfig",
    "Trainer",
    "TuningConfig",
    "WeightsError",
    "__version__",
    "build_annotation_trainer",
    "build_backbone",
    "build_model",
    "get_spec",
    "list_backbones",
    "load_checkpoint",
    "load_config",
    "read_checkpoint",
    "resolve_device",
    "save_checkpoint",
    "train_from_config",
    "train_on_annotations",
]
