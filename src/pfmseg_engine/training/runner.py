"""From a configuration to a finished run: datasets, model and trainer wired together.

:func:`train_from_config` is what ``python -m pfmseg_engine train`` runs (seed JSON datasets);
:func:`train_on_annotations` is the same for in-memory images with napari-style sparse labels, which
is what the napari plugin and slide-level training use.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..data.augment import JointAugment
from ..data.dataset import ArrayImageSet, SegmentationDataset
from ..data.masks import sparse_to_targets
from ..data.seed_json import load_seed_json
from ..data.sparse import SparsePatchDataset
from .callbacks import Callback, CancelToken
from .config import TrainConfig
from .state import seed_everything
from .trainer import Trainer, TrainResult


def build_augmentation(config: TrainConfig, crop: bool = True) -> JointAugment:
    """The training augmentation a config describes (with the random resized crop unless ``crop=False``)."""
    aug = config.training.augmentation
    return JointAugment(aug.transforms, crop_size=aug.RandomResizedCropSize if crop else None,
                        crop_scale=aug.scale, crop_ratio=aug.ratio, ignore_index=config.dataset.ignore_index)


def build_datasets(config: TrainConfig) -> tuple[SegmentationDataset, SegmentationDataset | None]:
    """Training and validation datasets from ``dataset.json_file``; every mask is checked up front."""
    seed_json = load_seed_json(config.dataset.json_file)
    common = {"num_classes": config.num_classes, "ignore_index": config.dataset.ignore_index,
              "class_colors": config.dataset.class_colors}
    train = SegmentationDataset(seed_json.split("train", require_masks=True), transform=build_augmentation(config),
                                seed=config.system.seed, length=config.training.samples_per_epoch, **common)
    train.validate()
    val = None
    if seed_json.splits.get("val"):
        val = SegmentationDataset(seed_json.split("val", require_masks=True), **common)
        val.validate()
    return train, val


def build_model_for(config: TrainConfig) -> Any:
    """The segmentation model a config describes (seeded, so a resumed run rebuilds the same one)."""
    from ..model import build_model

    seed_everything(config.system.seed)
    return build_model(config.model_config())


def train_from_config(config: TrainConfig, *, resume: str | Path | None = None, device: str | None = None,
                      callbacks: Iterable[Callback] = (), cancel: CancelToken | None = None) -> TrainResult:
    """Train on the seed JSON dataset of ``config``; outputs go to ``log_dir/experiment_name``."""
    train, val = build_datasets(config)
    model = build_model_for(config)
    trainer = Trainer(config, model, train, val, device=device, callbacks=callbacks, cancel=cancel)
    return trainer.fit(resume=resume)


def train_on_annotations(config: TrainConfig, images: Sequence[Any], labels: Sequence[Any], *,
                         val_images: Sequence[Any] | None = None, val_labels: Sequence[Any] | None = None,
                         samples_per_epoch: int | None = None, resume: str | Path | None = None,
                         device: str | None = None, callbacks: Iterable[Callback] = (),
                         cancel: CancelToken | None = None) -> TrainResult:
    """Train on sparse annotations (napari labels: 0 = not annotated, k = class k-1).

    Patches of ``RandomResizedCropSize`` pixels are drawn around annotated pixels of ``images``
    (numpy or dask arrays of any size). Validation, when given, scores whole ``val_images`` against
    ``val_labels`` at native resolution, unannotated pixels excluded.
    """
    n = config.num_classes
    train = SparsePatchDataset(
        list(images), list(labels), patch_size=config.crop_size, num_classes=n,
        samples_per_epoch=samples_per_epoch or config.training.samples_per_epoch or 256,
        ignore_index=config.dataset.ignore_index, transform=build_augmentation(config, crop=False),
        seed=config.system.seed,
    )
    val = None
    if val_images is not None and val_labels is not None:
        masks = [sparse_to_targets(lab, n, config.dataset.ignore_index) for lab in val_labels]
        val = ArrayImageSet(list(val_images), masks)
    model = build_model_for(config)
    trainer = Trainer(config, model, train, val, device=device, callbacks=callbacks, cancel=cancel)
    return trainer.fit(resume=resume)
