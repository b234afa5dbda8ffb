"""Image-set inference in the seed framework's form: a dataset JSON split in, masks and overlays out.

Matches ``scripts/infer.py`` of the seed: ``predictions_masks/`` (class-index PNGs, one per image),
``predictions_overlays/`` (label | prediction side by side when a mask exists) and ``metrics.json``
with the seed's metric names when ground truth exists. Two modes, as in the seed:

* ``windowslide``: sliding windows of ``input_size`` over the full image (Gaussian-blended by
  default), so predictions keep the native resolution;
* ``resize``: the image is resized to ``input_size`` square, and the logits are resized back to
  the original size before the argmax (the seed scored square-resized masks; we never do).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..colors import class_palette, overlay
from ..errors import ConfigError
from ..storage import ensure_output_dir, writing
from .runner import ModelRunner
from .window import check_window, predict_image

log = logging.getLogger(__name__)

MASKS_DIR, OVERLAYS_DIR = "predictions_masks", "predictions_overlays"


def _predict_windowslide(model, images: Sequence[np.ndarray], *, input_size: int, overlap: float,
                         blend: str, batch_size: int, device) -> list[np.ndarray]:
    options = {"window": input_size, "overlap": overlap, "blend": blend, "batch_size": batch_size,
               "device": device}
    return [predict_image(model, image, **options).argmax(0).astype(np.uint8) for image in images]


def _predict_resize(model, images: Sequence[np.ndarray], *, input_size: int, batch_size: int, device,
                    **_: Any) -> list[np.ndarray]:
    """Resize to ``input_size``, predict in one batch, resize logits back to each original size."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    runner = ModelRunner(model, device=device, batch_size=batch_size)
    size = (input_size, input_size)
    bilinear = Image.Resampling.BILINEAR
    resized = np.stack([np.asarray(Image.fromarray(im).resize(size, bilinear)) for im in images])
    logits = runner(resized)
    masks = []
    for image, item in zip(images, logits, strict=True):
        full = F.interpolate(torch.from_numpy(item)[None], size=image.shape[:2], mode="bilinear",
                             align_corners=False)[0]
        masks.append(full.argmax(0).numpy().astype(np.uint8))
    return masks


MODES: dict[str, Callable[..., list[np.ndarray]]] = {"windowslide": _predict_windowslide,
                                                     "resize": _predict_resize}


def _label_banner(image: np.ndarray, text: str) -> np.ndarray:
    from PIL import Image, ImageDraw

    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = draw.textbbox((8, 8), text)
    draw.rectangle((left - 4, top - 4, right + 4, bottom + 4), fill=(0, 0, 0))
    draw.text((8, 8), text, fill=(255, 255, 255))
    return np.asarray(canvas)


def overlay_panel(image: np.ndarray, prediction: np.ndarray, mask: np.ndarray | None,
                  palette: np.ndarray) -> np.ndarray:
    """The seed's visualisation: label overlay | prediction overlay (prediction only without a mask)."""
    pred = _label_banner(overlay(image, prediction, palette), "Prediction")
    if mask is None:
        return pred
    return np.concatenate([_label_banner(overlay(image, mask, palette), "Label"), pred], axis=1)


@dataclass
class ImageSetResult:
    output_dir: Path
    count: int
    metrics: dict[str, float | None] | None


def _finite(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def infer_image_set(
    model,
    input_json: str | Path,
    output_dir: str | Path,
    *,
    input_size: int,
    mode: str = "windowslide",
    batch_size: int = 8,
    device=None,
    overlap: float = 0.25,
    blend: str = "gaussian",
    split: str = "test",
    ignore_index: int = 255,
    progress: Callable[[int, int], Any] | None = None,
) -> ImageSetResult:
    """Predict every image of ``split`` and write masks, overlays and (with masks) ``metrics.json``."""
    if mode not in MODES:
        raise ConfigError(
            f"Unknown inference mode '{mode}'; choose resize or windowslide."
        )
    runner_info = ModelRunner(model, device=device, batch_size=batch_size).info
    check_window(input_size, runner_info.patch_size)
    # imported here: the data and training packages pull in torchvision, which slide inference,
    # readers and the napari plugin must not pay for when they import this package
    from ..data.images import read_image
    from ..data.masks import read_mask
    from ..data.seed_json import load_seed_json
    from ..metrics import confusion_matrix, metrics_from_confusion

    dataset = load_seed_json(input_json)
    if dataset.num_classes != runner_info.num_classes:
        raise ConfigError(
            f"Dataset '{dataset.path}' has {dataset.num_classes} classes but the model predicts "
            f"{runner_info.num_classes}; use a checkpoint trained on this class list."
        )
    samples = dataset.split(split)
    out = ensure_output_dir(output_dir)
    with writing(out, "image-set predictions"):
        (out / MASKS_DIR).mkdir(parents=True, exist_ok=True)
        (out / OVERLAYS_DIR).mkdir(parents=True, exist_ok=True)
    palette = (np.asarray(dataset.class_colors, np.uint8) if dataset.class_colors
               else class_palette(dataset.num_classes))
    cm = np.zeros((dataset.num_classes, dataset.num_classes), np.int64)
    scored = 0
    group = batch_size if mode == "resize" else 1
    for start in range(0, len(samples), group):
        batch: list = list(samples[start:start + group])
        images = [read_image(s.image_path) for s in batch]
        predictions = MODES[mode](model, images, input_size=input_size, overlap=overlap, blend=blend,
                                  batch_size=batch_size, device=device)
        for sample, image, prediction in zip(batch, images, predictions, strict=True):
            mask = None
            if sample.mask_path is not None:
                mask = read_mask(sample.mask_path, dataset.num_classes, ignore_index, dataset.class_colors)
                cm += confusion_matrix(prediction, mask, dataset.num_classes, ignore_index)
                scored += 1
            with writing(out, "image-set predictions"):
                _save_png(out / MASKS_DIR / f"{sample.image_path.stem}.png", prediction)
                _save_png(out / OVERLAYS_DIR / f"{sample.image_path.stem}.png",
                          overlay_panel(image, prediction, mask, palette))
        if progress:
            progress(min(start + group, len(samples)), len(samples))
    metrics = None
    if scored:
        metrics = _finite(metrics_from_confusion(cm))
        with writing(out / "metrics.json", "the metrics"):
            (out / "metrics.json").write_text(json.dumps(metrics, indent=4))
    log.info("Predicted %d images into %s%s.", len(samples), out,
             f"; mIoU {metrics['mIoU']}" if metrics else "")
    return ImageSetResult(out, len(samples), metrics)


def _save_png(path: Path, array: np.ndarray) -> None:
    """Write a PNG under a temporary name, then rename: a full disk never leaves a torn mask."""
    from PIL import Image

    tmp = path.with_name(f".{path.name}.tmp")
    try:
        Image.fromarray(array).save(tmp, format="PNG")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
