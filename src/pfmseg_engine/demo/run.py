"""The end-to-end demo: annotate, fine-tune, segment the whole sample slide, score, explain.

It runs offline in a few minutes on a laptop CPU and goes through exactly the code paths of real
use: the slide reader, sparse-annotation training with the CNN adapter, the whole-slide tiled
predictor writing OME-Zarr, and the confusion-matrix metrics. Only the backbone is not real: with
no pretrained weights available offline it is a small randomly initialised variant, which the
output says plainly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .sample import DEMO_CLASS_NAMES, DEMO_MPP, demo_annotation, demo_slide_path

log = logging.getLogger(__name__)

DEMO_BACKBONE = "kaiko-vits16"
DEMO_TRAINING: dict[str, Any] = {
    "dataset": {"num_classes": len(DEMO_CLASS_NAMES), "class_names": list(DEMO_CLASS_NAMES)},
    "system": {"num_workers": 0, "seed": 0},
    "model": {"pfm_name": DEMO_BACKBONE, "tiny": True, "finetune_mode": {"type": "cnn_adapter_small"},
              "mpp": DEMO_MPP},
    "training": {
        "batch_size": 8,
        "epochs": 5,
        "learning_rate": 2e-3,
        "weight_decay": 1e-4,
        "samples_per_epoch": 96,
        "use_amp": False,
        "augmentation": {"RandomResizedCropSize": 128, "scale": None},
        "optimizer": {"type": "AdamW"},
        "scheduler": {"type": "cosine", "warmup_epochs": 1},
        "loss": {"type": "ce_dice"},
    },
    "validation": {"eval_interval": 5, "batch_size": 8, "augmentation": {"ResizedSize": 128}},
    "visualization": {"save_interval": 5, "num_vis_samples": 1},
}
# The sample is one field of view with pale (barely saturated) stroma and no glass: tissue detection,
# made for whole slides, would call that stroma background, so the demo predicts every pixel.
SLIDE_SETTINGS: dict[str, Any] = {"window": 128, "overlap": 0.25, "batch_size": 8, "chunk": 256, "tissue": False}


@dataclass
class DemoResult:
    slide: Path
    prediction: Path
    overlay: Path
    training_curve: Path
    checkpoint: Path
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    baseline_pixel_accuracy: float = 0.0
    seconds_training: float = 0.0
    seconds_inference: float = 0.0


def training_config(output_dir: Path, epochs: int | None = None, device: str = "auto") -> Any:
    """The demo's training config, validated like any user config."""
    from ..training.config import config_from_dict

    # running the demo again redoes it, training included (as its prediction is redone)
    data = {**DEMO_TRAINING, "logging": {"log_dir": str(output_dir), "experiment_name": "training", "overwrite": True}}
    data["system"] = {**data["system"], "device": device}
    if epochs is not None:
        data["training"] = {**data["training"], "epochs": epochs}
    return config_from_dict(data, check_dataset=False)


def run_demo(output_dir: str | Path, *, epochs: int | None = None, device: str = "auto",
             progress: bool = True) -> DemoResult:
    """Build the sample slide, train on the top half of its derived annotation, segment it all."""
    import time

    from ..checkpoint import load_checkpoint
    from ..jobs.prediction import ChunkDone, PredictionSettings, SlidePrediction
    from ..labelstore.omezarr import LabelOutput
    from ..slides import open_slide
    from ..training import TqdmProgress, train_on_annotations
    from ..training.visualize import palette, save_panel

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    slide_path = demo_slide_path(output_dir)
    slide = open_slide(slide_path)
    try:
        image = np.asarray(slide.levels[0].compute())
    finally:
        slide.close()
    truth = demo_annotation(image)
    half = image.shape[0] // 2
    annotation = truth + 1  # napari convention: 0 = not annotated, k = class k-1
    annotation[half:] = 0  # annotate the top half only; the bottom half is held out

    config = training_config(output_dir, epochs, device)
    start = time.perf_counter()
    trained = train_on_annotations(
        config, [image], [annotation], val_images=[image[half:]], val_labels=[truth[half:] + 1],
        callbacks=[TqdmProgress()] if progress else (),
    )
    seconds_training = time.perf_counter() - start

    model = load_checkpoint(trained.best_checkpoint, device=None)
    start = time.perf_counter()
    bar = _ChunkBar(progress)
    settings = PredictionSettings(**SLIDE_SETTINGS, overwrite=True, measure=False, device=config.system.device)
    outcome = SlidePrediction(model, slide_path, output_dir, settings).run(
        lambda event: bar.update_chunk(event.chunk) if isinstance(event, ChunkDone) else None)
    bar.close()
    seconds_inference = time.perf_counter() - start

    labels = np.asarray(LabelOutput(outcome.path).levels[0][:])
    prediction = np.where(labels > 0, labels.astype(np.int64) - 1, 0)  # outside tissue = background
    colours = palette(len(DEMO_CLASS_NAMES))
    overlay_path = save_panel(output_dir / "demo_overlay.png", image, truth, prediction, colours)
    metrics = {
        "held-out half": _scores(prediction[half:], truth[half:]),
        "whole slide": _scores(prediction, truth),
    }
    majority = np.bincount(truth[half:].ravel(), minlength=len(DEMO_CLASS_NAMES)).max() / truth[half:].size
    return DemoResult(
        slide=slide_path, prediction=outcome.path, overlay=overlay_path,
        training_curve=trained.output_dir / "training_history.png", checkpoint=trained.best_checkpoint,
        metrics=metrics, baseline_pixel_accuracy=float(majority), seconds_training=seconds_training,
        seconds_inference=seconds_inference,
    )


def _scores(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    from ..metrics import confusion_matrix, metrics_from_confusion

    flat = metrics_from_confusion(confusion_matrix(prediction, truth, len(DEMO_CLASS_NAMES)))
    return {k: flat[k] for k in ("mIoU", "Mean_Dice", "Pixel_Accuracy")}


class _ChunkBar:
    """tqdm over finished slide chunks (or nothing when progress is off)."""

    def __init__(self, enabled: bool):
        self.bar: Any = None
        self.enabled = enabled

    def update_chunk(self, chunk: Any) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=chunk.total, initial=chunk.done - 1, desc="Segmenting slide", unit="chunk")
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
