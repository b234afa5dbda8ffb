"""Training and evaluation: seed-compatible config, losses, metrics, schedules and the trainer."""

from .callbacks import Callback, CancelToken, EpochInfo, FunctionCallback, StepInfo, TqdmProgress
from .config import TrainConfig, config_from_dict, default_config_path, load_config
from .losses import LOSSES, build_loss
from .metrics import ConfusionMeter, bootstrap_intervals, confusion_matrix, metrics_from_confusion
from .optim import OPTIMIZERS, build_optimizer
from .runner import build_annotation_trainer, build_datasets, train_from_config, train_on_annotations
from .schedulers import SCHEDULERS, build_scheduler
from .trainer import Trainer, TrainEvent, TrainingError, TrainResult

__all__ = [
    "LOSSES",
    "OPTIMIZERS",
    "SCHEDULERS",
    "Callback",
    "CancelToken",
    "ConfusionMeter",
    "EpochInfo",
    "FunctionCallback",
    "StepInfo",
    "TqdmProgress",
    "TrainConfig",
    "TrainEvent",
    "TrainResult",
    "Trainer",
    "TrainingError",
    "bootstrap_intervals",
    "build_annotation_trainer",
    "build_datasets",
    "build_loss",
    "build_optimizer",
    "build_scheduler",
    "config_from_dict",
    "confusion_matrix",
    "default_config_path",
    "load_config",
    "metrics_from_confusion",
    "train_from_config",
    "train_on_annotations",
]
