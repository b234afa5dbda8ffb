"""Training patches from sparse annotations on images of any size (numpy, dask or zarr arrays).

Annotations follow napari's labels convention: 0 means "not annotated", k means class k-1. A few
scribbles on a slide are valid training data: patches are drawn around annotated pixels and every
unannotated pixel becomes ``ignore_index``, so the loss only sees what the annotator said.

Images are only ever sliced, never loaded whole, so a lazily read whole-slide level works; the
annotation index is built block by block for the same reason.

:func:`split_annotations` holds out whole squares of annotation for validation, so scribbles alone
give an honest validation score (see its docstring for why squares and not pixels).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from ..errors import DataError
from .augment import JointAugment, sample_seed
from .images import composite_on_white
from .masks import sparse_to_targets

BLOCK = 4096  # side of the blocks in which labels are scanned

Box = tuple[int, int, int, int]  # (y0, y1, x0, x1), end-exclusive


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _blocks(height: int, width: int, block: int = BLOCK):
    for y in range(0, height, block):
        for x in range(0, width, block):
            yield y, x, min(height, y + block), min(width, x + block)


def label_blocks(labels: Any) -> list[tuple[int, int, int, int]]:
    """(y0, x0, y1, x1) blocks of ``labels`` that may hold annotations.

    Every ``BLOCK``-sized block of an array; lazy label sources that know where their annotations are
    (polygon labels over a whole slide, where most blocks are empty) name them by ``candidate_blocks``,
    so only those are read.
    """
    candidates = getattr(labels, "candidate_blocks", None)
    if candidates is not None:
        return [(y0, x0, y1, x1) for y0, y1, x0, x1 in candidates(BLOCK)]
    return list(_blocks(*labels.shape[:2]))


class SparsePatchDataset(Dataset):
    """``samples_per_epoch`` patches of ``patch_size`` pixels around annotated pixels.

    With ``class_balanced`` each patch first draws a class uniformly, then an annotated pixel of that
    class, so a class annotated with one short stroke is seen as often as one painted over large areas.
    The annotated pixel lands at a random position inside the patch (not always at its centre).
    Items are ``{"image": (3,P,P) float in [0,1], "label": (P,P) long, "index"}``; a patch reaching past
    the image border is padded with zeros and ``ignore_index``. ``zoom=(a, b)`` reads a square of
    ``P / z`` pixels, ``z`` drawn log-uniformly from [a, b], and resizes it to ``P`` (the same zoom
    jitter as :class:`~.augment.ZoomCrop`); ``None`` cuts patches at exactly native resolution.
    """

    def __init__(
        self,
        images: Any,
        labels: Any,
        patch_size: int,
        num_classes: int | None = None,
        samples_per_epoch: int = 256,
        ignore_index: int = 255,
        transform: JointAugment | None = None,
        seed: int = 0,
        class_balanced: bool = True,
        max_points_per_class: int = 200_000,
        zoom: tuple[float, float] | None = None,
    ):
        self.images = _as_list(images)
        self.labels = _as_list(labels)
        if len(self.images) != len(self.labels):
            raise DataError(f"{len(self.images)} images but {len(self.labels)} label arrays; give one per image.")
        for i, (image, label) in enumerate(zip(self.images, self.labels, strict=True)):
            if image.ndim != 3 or image.shape[2] not in (3, 4):
                raise DataError(f"Image {i} has shape {tuple(image.shape)}; expected (H, W, 3) RGB.")
            if tuple(label.shape) != tuple(image.shape[:2]):
                raise DataError(
                    f"Labels {i} have shape {tuple(label.shape)} but image {i} is {tuple(image.shape[:2])}; "
                    "annotations must lie on the image's pixel grid."
                )
        if patch_size < 1:
            raise DataError(f"patch_size must be positive, got {patch_size}.")
        self.patch_size = int(patch_size)
        if zoom is not None and not 0 < zoom[0] <= zoom[1]:
            raise DataError(f"zoom must satisfy 0 < min <= max, got {list(zoom)}.")
        self.zoom = (float(zoom[0]), float(zoom[1])) if zoom is not None else None
        self.samples_per_epoch = int(samples_per_epoch)
        self.ignore_index = int(ignore_index)
        self.transform = transform
        self.seed = int(seed)
        self.epoch = 0
        self.class_balanced = class_balanced
        self.points = self._index(max_points_per_class)
        if not self.points:
            raise DataError("No annotated pixels found (all labels are 0); paint at least one class first.")
        largest = max(self.points)
        if num_classes is None:
            num_classes = largest
        elif largest > num_classes:
            raise DataError(
                f"Annotations use label {largest} but num_classes={num_classes}; labels must be 1..{num_classes} "
                "(label k = class k-1)."
            )
        self.num_classes = int(num_classes)
        self.classes = sorted(self.points)

    # --- annotation index ------------------------------------------------------------------------
    def _index(self, cap: int) -> dict[int, np.ndarray]:
        """label value -> (n, 3) int64 rows (pair, y, x) of annotated pixels, at most ``cap`` per value."""
        found: dict[int, list[np.ndarray]] = {}
        for pair, labels in enumerate(self.labels):
            for y0, x0, y1, x1 in label_blocks(labels):
                block = np.asarray(labels[y0:y1, x0:x1])
                if block.min() < 0:
                    raise DataError(f"Labels {pair} contain negative values; use 0 for not annotated, k for class k-1.")
                ys, xs = np.nonzero(block)
                if ys.size == 0:
                    continue
                values = block[ys, xs]
                for value in np.unique(values):
                    sel = values == value
                    rows = np.stack([np.full(sel.sum(), pair), ys[sel] + y0, xs[sel] + x0], axis=1)
                    found.setdefault(int(value), []).append(rows.astype(np.int64))
        rng = np.random.default_rng(self.seed)
        points = {}
        for value, chunks in found.items():
            rows = np.concatenate(chunks)
            if len(rows) > cap:
                rows = rows[np.sort(rng.choice(len(rows), cap, replace=False))]
            points[value] = rows
        return points

    def class_pixel_counts(self) -> dict[int, int]:
        """Indexed annotated pixels per label value (after the per-class cap)."""
        return {k: len(v) for k, v in self.points.items()}

    # --- sampling ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.samples_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _pick(self, rng: np.random.Generator) -> tuple[int, int, int]:
        if self.class_balanced:
            rows = self.points[self.classes[rng.integers(len(self.classes))]]
            pair, y, x = rows[rng.integers(len(rows))]
        else:
            sizes = np.array([len(self.points[c]) for c in self.classes])
            flat = int(rng.integers(sizes.sum()))
            which = int(np.searchsorted(np.cumsum(sizes), flat, side="right"))
            pair, y, x = self.points[self.classes[which]][flat - (sizes[:which].sum() if which else 0)]
        return int(pair), int(y), int(x)

    def _origin(self, centre: int, extent: int, rng: np.random.Generator, side: int | None = None) -> int:
        p = side or self.patch_size
        start = centre - int(rng.integers(p))
        return 0 if extent <= p else min(max(start, 0), extent - p)

    def read_patch(self, pair: int, top: int, left: int, side: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Image (S, S, 3) float32 and label (S, S) int64 targets of the window at (top, left).

        ``S`` is ``side`` (default: the patch size).
        """
        image, labels = self.images[pair], self.labels[pair]
        height, width = labels.shape
        p = side or self.patch_size
        y1, x1 = min(height, top + p), min(width, left + p)
        img = composite_on_white(np.asarray(image[top:y1, left:x1]))  # RGBA: transparent = white glass
        lab = np.asarray(labels[top:y1, left:x1])
        img = img.astype(np.float32) / 255.0 if np.issubdtype(img.dtype, np.integer) else img.astype(np.float32)
        targets = sparse_to_targets(lab, self.num_classes, self.ignore_index, source=f"Labels {pair}")
        if img.shape[:2] != (p, p):
            pad = ((0, p - img.shape[0]), (0, p - img.shape[1]))
            img = np.pad(img, (*pad, (0, 0)))
            targets = np.pad(targets, pad, constant_values=self.ignore_index)
        return img, targets

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        seed = sample_seed(self.seed, self.epoch, index)
        rng = np.random.default_rng(seed)
        pair, y, x = self._pick(rng)
        height, width = self.labels[pair].shape
        side = self.patch_size
        if self.zoom is not None:
            lo, hi = np.log(self.zoom[0]), np.log(self.zoom[1])
            side = max(1, round(self.patch_size / float(np.exp(rng.uniform(lo, hi)))))
        img, targets = self.read_patch(pair, self._origin(y, height, rng, side), self._origin(x, width, rng, side),
                                       side)
        image = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).contiguous()
        label = torch.from_numpy(targets)
        if side != self.patch_size:  # zoom jitter: bilinear image, nearest-neighbour targets
            size = [self.patch_size, self.patch_size]
            image = v2.functional.resize(image, size, antialias=True).clamp_(0, 1)
            label = v2.functional.resize(tv_tensors.Mask(label), size).as_subclass(torch.Tensor)
        if self.transform is not None:
            image, label = self.transform(image, label, seed=seed)
        return {"image": image, "label": label, "index": index}


# --- validation split ------------------------------------------------------------------------------
def annotated_blocks(labels: Any, block: int) -> list[Box]:
    """The ``block``-sized squares of a grid over ``labels`` that hold any annotation, row by row."""
    if block < 1:
        raise DataError(f"The validation block size must be positive, got {block}.")
    height, width = labels.shape
    step = block * max(1, BLOCK // block)  # read whole grid squares, a few thousand pixels at a time
    boxes = []
    for y0, x0, y1, x1 in _blocks(height, width, step):
        chunk = np.asarray(labels[y0:y1, x0:x1])
        for y in range(y0, y1, block):
            for x in range(x0, x1, block):
                if chunk[y - y0:y - y0 + block, x - x0:x - x0 + block].any():
                    boxes.append((y, min(height, y + block), x, min(width, x + block)))
    return sorted(boxes)


def split_annotations(labels: Any, share: float, *, block: int, seed: int = 0) -> tuple[np.ndarray, list[Box]]:
    """Hold out about ``share`` of the annotated ``block``-sized squares for validation.

    Returns (training labels: a copy with the held-out squares cleared to 0, held-out boxes). Crop the
    image and the *original* labels with :func:`crop_boxes` to get the validation pairs.

    Whole squares, not random pixels, are held out so validation measures how the model does on
    places it has not seen, not interpolation between neighbouring pixels of one stroke; a square
    of about twice the training window keeps a held-out stroke away from the training patches.
    Deterministic for a given ``seed``. Nothing is held out when ``share`` is 0 or fewer than two
    squares hold annotations, and at least one annotated square always stays for training.
    """
    if not 0.0 <= share < 1.0:
        raise DataError(f"The validation share must be in [0, 1), got {share}.")
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise DataError(f"Labels have shape {labels.shape}; a validation split needs 2-D (H, W) labels.")
    boxes = annotated_blocks(labels, block)
    if share == 0 or len(boxes) < 2:
        return labels.copy(), []
    count = min(len(boxes) - 1, max(1, math.floor(len(boxes) * share + 0.5)))
    chosen = np.random.default_rng(seed).choice(len(boxes), count, replace=False)
    held = [boxes[i] for i in sorted(chosen.tolist())]
    train = labels.copy()
    for y0, y1, x0, x1 in held:
        train[y0:y1, x0:x1] = 0
    return train, held


def crop_boxes(array: Any, boxes: Sequence[Box]) -> list[np.ndarray]:
    """``array[y0:y1, x0:x1]`` for each box, read into memory (validation reads them every epoch)."""
    return [np.asarray(array[y0:y1, x0:x1]) for y0, y1, x0, x1 in boxes]
