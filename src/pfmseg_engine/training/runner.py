"""From a configuration to a finished run: datasets, model and trainer wired together.

:func:`train_from_config` is what ``python -m pfmseg_engine train`` runs (seed JSON datasets);
:func:`train_on_annotations` is the same for in-memory images with napari-style sparse labels, and
:func:`build_annotation_trainer` is its first half (the trainer, not yet run), which the napari
plugin drives through ``Trainer.iter_fit``. Each takes ``model=`` to continue training an existing
model (more annotations, a loaded checkpoint) instead of building a new one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ..data.augment import JointAugment
from ..data.dataset import ArrayImageSet, SegmentationDataset
from ..data.masks import sparse_to_targets
from ..data.seed_json import load_seed_json
from ..data.sparse import SparsePatchDataset, crop_boxes, split_annotations
from ..errors import ConfigError, DataError
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


def check_model_matches(config: TrainConfig, model: Any) -> None:
    """Refuse to train ``model`` under a config that describes another model.

    Checkpoints of the run store the config, and the loss needs the model's class count, so a
    mismatch would fail late or write checkpoints that rebuild the wrong model.
    """
    wanted = config.model_config()
    have = model.config
    for what, a, b in (("backbone", have.backbone, wanted.backbone), ("num_classes", have.num_classes,
                                                                      wanted.num_classes)):
        if a != b:
            raise ConfigError(
                f"The model has {what} {a!r} but the training config says {b!r}; build the config from the "
                "model with TrainConfig.from_model_config(model.config, ...)."
            )


def model_or_new(config: TrainConfig, model: Any | None) -> Any:
    """``model`` after checking it fits ``config`` (and seeding, as a new build would), else a new one."""
    if model is None:
        return build_model_for(config)
    check_model_matches(config, model)
    seed_everything(config.system.seed)
    return model


def train_from_config(config: TrainConfig, *, model: Any | None = None, resume: str | Path | None = None,
                      device: str | None = None, callbacks: Iterable[Callback] = (),
                      cancel: CancelToken | None = None) -> TrainResult:
    """Train on the seed JSON dataset of ``config``; outputs go to ``log_dir/experiment_name``.

    ``model`` continues training an existing model instead of building the one ``config`` describes.
    """
    train, val = build_datasets(config)
    trainer = Trainer(config, model_or_new(config, model), train, val, device=device, callbacks=callbacks,
                      cancel=cancel)
    return trainer.fit(resume=resume)


def build_annotation_trainer(config: TrainConfig, images: Sequence[Any], labels: Sequence[Any], *,
                             model: Any | None = None, val_images: Sequence[Any] | None = None,
                             val_labels: Sequence[Any] | None = None, validation_share: float | None = None,
                             validation_block: int | None = None, samples_per_epoch: int | None = None,
                             device: str | None = None, callbacks: Iterable[Callback] = (),
                             cancel: CancelToken | None = None, output_dir: str | Path | None = None) -> Trainer:
    """A :class:`Trainer` for sparse annotations (napari labels: 0 = not annotated, k = class k-1).

    Patches of ``RandomResizedCropSize`` pixels are drawn around annotated pixels of ``images``
    (numpy or dask arrays of any size). ``model`` continues from an existing model (retraining after
    more annotations) instead of building a new one. Validation scores whole ``val_images`` against
    ``val_labels`` at native resolution, unannotated pixels excluded; without them,
    ``validation_share`` holds out that share of each image's annotated squares of
    ``validation_block`` pixels (default twice the training window) with :func:`split_annotations`.
    Call ``fit()`` or iterate ``iter_fit()`` on the result.
    """
    images, labels = list(images), list(labels)
    n, ignore = config.num_classes, config.dataset.ignore_index
    if val_images is None and val_labels is None and validation_share:
        block = validation_block or 2 * config.crop_size
        val_images, val_labels, kept = [], [], []
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            train_labels, boxes = split_annotations(label, validation_share, block=block,
                                                    seed=config.system.seed + index)
            kept.append(train_labels)
            val_images += crop_boxes(image, boxes)
            val_labels += crop_boxes(label, boxes)
        labels = kept
    elif (val_images is None) != (val_labels is None):
        raise DataError("Give both val_images and val_labels (one label array per image), or neither.")
    elif val_images is not None and validation_share:
        raise ConfigError("Give either val_images/val_labels or validation_share, not both.")
    train = SparsePatchDataset(
        images, labels, patch_size=config.crop_size, num_classes=n,
        samples_per_epoch=samples_per_epoch or config.training.samples_per_epoch or 256,
        ignore_index=ignore, transform=build_augmentation(config, crop=False), seed=config.system.seed,
    )
    val = None
    if val_images is not None and len(val_images):
        masks = [sparse_to_targets(lab, n, ignore) for lab in val_labels]
        val = ArrayImageSet(list(val_images), masks)
    return Trainer(config, model_or_new(config, model), train, val, device=device, callbacks=callbacks,
                   cancel=cancel, output_dir=output_dir)


def train_on_annotations(config: TrainConfig, images: Sequence[Any], labels: Sequence[Any], *,
                         model: Any | None = None, val_images: Sequence[Any] | None = None,
                         val_labels: Sequence[Any] | None = None, validation_share: float | None = None,
                         samples_per_epoch: int | None = None, resume: str | Path | None = None,
                         device: str | None = None, callbacks: Iterable[Callback] = (),
                         cancel: CancelToken | None = None) -> TrainResult:
    """Train on sparse annotations: :func:`build_annotation_trainer` (same arguments), then ``fit``."""
    trainer = build_annotation_trainer(config, images, labels, model=model, val_images=val_images,
                                       val_labels=val_labels, validation_share=validation_share,
                                       samples_per_epoch=samples_per_epoch, device=device, callbacks=callbacks,
                                       cancel=cancel)
    return trainer.fit(resume=resume)
