"""Training and evaluation: seed-compatible config, losses, metrics, schedules and the trainer."""

from ..metrics import ConfusionMeter, bootstrap_intervals, confusion_matrix, metrics_from_confusion
from .callbacks import Callback, CancelToken, EpochInfo, FunctionCallback, StepInfo, TqdmProgress
from .config import TrainConfig, config_from_dict, default_config_path, load_config
from .losses import LOSSES, build_loss
from .optim import OPTIMIZERS, build_optimizer
from .protocols import PROTOCOLS
from .runner import (
    SeedsResult,
    build_annotation_trainer,
    build_datasets,
    train_from_config,
    train_on_annotations,
    train_seeds,
)
from .schedulers import SCHEDULERS, build_scheduler
from .seed_keys import SEED_KEYS
from .slides import build_slide_trainer, train_on_slides
from .trainer import Trainer, TrainEvent, TrainingError, TrainResult

__all__ = [
    "LOSSES",
    "OPTIMIZERS",
    "PROTOCOLS",
    "SCHEDULERS",
    "SEED_KEYS",
    "Callback",
    "CancelToken",
    "ConfusionMeter",
    "EpochInfo",
    "FunctionCallback",
    "SeedsResult",
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
    "build_slide_trainer",
    "config_from_dict",
    "confusion_matrix",
    "default_config_path",
    "load_config",
    "metrics_from_confusion",
    "train_from_config",
    "train_on_annotations",
    "train_on_slides",
    "train_seeds",
]
