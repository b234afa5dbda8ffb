"""Image-set datasets: whole images with dense masks (seed JSON splits).

:class:`SegmentationDataset` serves training crops (augmented, fixed size) through ``__getitem__``
and whole images at native resolution through :meth:`SegmentationDataset.load`, which validation
and evaluation use. Checks happen where they can fail cheapest: :meth:`validate` reads every mask
once before training starts, so a bad mask stops a run in seconds instead of hours.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .augment import JointAugment, sample_seed
from .images import composite_on_white, image_size, read_image
from .masks import read_mask
from .seed_json import Sample


class SegmentationDataset(Dataset):
    """Samples of one split; items are ``{"image": (3,H,W) float in [0,1], "label": (H,W) long, "index"}``.

    ``repeats`` lets a small dataset give more random crops per epoch (``samples_per_epoch`` in the
    config); item ``i`` then reads image ``i % len(samples)``. ``cache`` keeps decoded images in memory,
    which pays off for the small tiles of typical patch datasets.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        num_classes: int,
        ignore_index: int = 255,
        transform: JointAugment | None = None,
        class_colors=None,
        seed: int = 0,
        length: int | None = None,
        cache: bool = True,
    ):
        if not samples:
            raise DataError("A dataset needs at least one sample.")
        self.samples = tuple(samples)
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.transform = transform
        self.class_colors = class_colors
        self.seed = int(seed)
        self.epoch = 0
        self.length = int(length) if length else len(self.samples)
        self.cache = cache
        self._cache: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose augmentations ``__getitem__`` draws (deterministic per epoch)."""
        self.epoch = int(epoch)

    def name(self, index: int) -> str:
        return self.samples[index % len(self.samples)].name

    def num_images(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Image (H, W, 3) uint8 and mask (H, W) int64 (or None) of sample ``index`` at native size."""
        index = index % len(self.samples)
        if index in self._cache:
            return self._cache[index]
        sample = self.samples[index]
        image = read_image(sample.image_path)
        mask = None
        if sample.mask_path is not None:
            mask = read_mask(sample.mask_path, self.num_classes, self.ignore_index, self.class_colors)
            if mask.shape != image.shape[:2]:
                raise DataError(
                    f"Image '{sample.image_path}' is {image.shape[1]}x{image.shape[0]} (WxH) but its mask "
                    f"'{sample.mask_path}' is {mask.shape[1]}x{mask.shape[0]}; they must be the same size."
                )
        if self.cache:
            self._cache[index] = (image, mask)
        return image, mask

    def validate(self) -> None:
        """Check every sample once (mask readable, values valid, same size as its image)."""
        for sample in self.samples:
            if sample.mask_path is None:
                raise DataError(f"Image '{sample.image_path}' has no mask; training needs one for every image.")
            mask = read_mask(sample.mask_path, self.num_classes, self.ignore_index, self.class_colors)
            size = image_size(sample.image_path)
            if mask.shape != size:
                raise DataError(
                    f"Image '{sample.image_path}' is {size[1]}x{size[0]} (WxH) but its mask "
                    f"'{sample.mask_path}' is {mask.shape[1]}x{mask.shape[0]}; they must be the same size."
                )

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        image, mask = self.load(index)
        if mask is None:
            raise DataError(f"Image '{self.samples[index % len(self.samples)].image_path}' has no mask to train on.")
        img = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
        lbl = torch.from_numpy(mask)
        if self.transform is not None:
            img, lbl = self.transform(img, lbl, seed=sample_seed(self.seed, self.epoch, index))
        return {"image": img, "label": lbl, "index": index}


def dataset_paths(dataset: SegmentationDataset) -> list[Path]:
    """Image paths, in order (for logs and reports)."""
    return [s.image_path for s in dataset.samples]


class ArrayImageSet:
    """In-memory images with dense targets, usable wherever validation needs ``load``/``name``.

    ``masks`` hold class indices and ``ignore_index`` (use :func:`~pfmseg_engine.data.masks.sparse_to_targets`
    to convert napari labels first). Images may be numpy or dask arrays; each is read whole when loaded.
    """

    def __init__(self, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], names: Sequence[str] | None = None):
        if len(images) != len(masks):
            raise DataError(f"{len(images)} images but {len(masks)} masks; give one mask per image.")
        self.images, self.masks = list(images), list(masks)
        self.names = list(names) if names is not None else [f"image_{i}" for i in range(len(images))]
        for i, (image, mask) in enumerate(zip(self.images, self.masks, strict=True)):
            if tuple(image.shape[:2]) != tuple(mask.shape):
                raise DataError(f"Image {i} is {tuple(image.shape[:2])} but its mask is {tuple(mask.shape)}.")

    def __len__(self) -> int:
        return len(self.images)

    def num_images(self) -> int:
        return len(self.images)

    def name(self, index: int) -> str:
        return self.names[index]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        image = composite_on_white(np.asarray(self.images[index]))  # RGBA: transparent = white glass
        return image, np.asarray(self.masks[index]).astype(np.int64)
