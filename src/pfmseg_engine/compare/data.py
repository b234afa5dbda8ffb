"""What a comparison trains and scores on, and the fixed crop set that makes frozen features reusable.

:class:`CompareData` bundles the three roles of a comparison's data: training images (dense masks or
sparse annotations, as an :class:`~pfmseg_engine.training.validation.ImageSource` whose ``load`` may
return lazy arrays), the images validated on during training, and the images every model is scored
on. Two sources exist: a seed JSON dataset (:meth:`CompareData.from_seed_json`) and napari-style
sparse annotations on images of any size (:meth:`CompareData.from_annotations`); another annotation
source only has to fill the same fields.

**Fixed crops and exact symmetries.** A frozen backbone gives the same features for the same input,
so its features can be computed once and reused across epochs, heads and seeds, but only if the
inputs repeat exactly. Random crop positions, zoom, affine/elastic warps and colour jitter make every
draw a new input. The crop set used here repeats exactly:

* each training image is covered by a fixed grid of ``crop`` x ``crop`` windows at native resolution
  (stride ``crop // 2`` by default; the last window is shifted inward, images smaller than the crop
  are padded with 0 / ``ignore_index``; windows without any labelled pixel are dropped);
* the only augmentations are the symmetries of a square, ``hflip``, ``vflip``, ``rot90`` and
  ``transpose`` (:data:`EXACT_TRANSFORMS`): each permutes pixels exactly, so any combination of them is
  one of the 8 elements of the dihedral group D4 (:data:`D4_OPS`).

A ViT is *not* equivariant to these symmetries (patch embedding and position embeddings have an
orientation), so rotating the features of a crop is not the features of the rotated crop; the cache
therefore stores the features of each (crop, op) pair computed on the transformed crop itself, which is
exactly the input the live model would see. Each training sample is one window with one op, drawn per
(seed, epoch, index) with the configured probabilities, so training with and without the cache sees
identical inputs in an identical order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.augment import TRANSFORMS, sample_seed
from ..errors import ConfigError, DataError

#: Augmentations that permute the pixels of a square crop exactly (the generators of D4).
EXACT_TRANSFORMS: tuple[str, ...] = ("hflip", "vflip", "rot90", "transpose")

def exact_augmentation() -> dict[str, Any]:
    """A ``training.augmentation`` section whose inputs repeat exactly, so frozen features can be cached:
    every transform that is not a symmetry of the square off (the symmetries keep their defaults), no
    zoom. Front ends ask for it instead of listing the other transforms themselves."""
    return {"zoom": None,
            "transforms": {name: {"p": 0.0} for name in TRANSFORMS if name not in EXACT_TRANSFORMS}}


#: The 8 symmetries of a square: op ``4 * t + k`` transposes (``t`` = 1) and then rotates by ``k`` x 90 degrees.
D4_OPS: tuple[str, ...] = ("identity", "rot90", "rot180", "rot270", "transpose", "transpose+rot90",
                           "transpose+rot180", "transpose+rot270")


def apply_op(tensor: torch.Tensor, op: int) -> torch.Tensor:
    """D4 element ``op`` applied to the last two axes of ``tensor`` (see :data:`D4_OPS`)."""
    transpose, k = divmod(int(op), 4)
    if transpose:
        tensor = tensor.transpose(-2, -1)
    if k:
        tensor = torch.rot90(tensor, k, dims=(-2, -1))
    return tensor.contiguous()


_PROBE = torch.arange(4).view(2, 2)  # four distinct corners: D4 acts on it faithfully
_CANONICAL = {tuple(apply_op(_PROBE, op).flatten().tolist()): op for op in range(8)}


def _step(tensor: torch.Tensor, name: str, k: int = 1) -> torch.Tensor:
    if name == "hflip":
        return tensor.flip(-1)
    if name == "vflip":
        return tensor.flip(-2)
    if name == "rot90":
        return torch.rot90(tensor, k, dims=(-2, -1))
    return tensor.transpose(-2, -1)


def compose_op(steps: Sequence[tuple[str, int]]) -> int:
    """The D4 element equal to applying ``steps`` ((transform name, rot90 count), in order)."""
    probe = _PROBE
    for name, k in steps:
        probe = _step(probe, name, k)
    return _CANONICAL[tuple(probe.flatten().tolist())]


def exact_probabilities(transforms: dict[str, Any] | None) -> dict[str, float]:
    """Probabilities of the exact (D4) transforms that are switched on, in application (registry) order."""
    out = {}
    for name in TRANSFORMS:
        if name in EXACT_TRANSFORMS and transforms and transforms.get(name) is not None:
            p = float(dict(transforms[name]).get("p", 0.0))
            if p > 0:
                out[name] = min(1.0, p)
    return out


def reachable_ops(probabilities: dict[str, float]) -> tuple[int, ...]:
    """Every D4 element the configured transforms can produce (identity only when none is on)."""
    states: set[int] = set()
    steps: list[tuple[str, int]] = []

    def walk(index: int) -> None:
        if index == len(order):
            states.add(compose_op(steps))
            return
        name = order[index]
        p = probabilities[name]
        if p < 1.0:  # skipped
            walk(index + 1)
        for k in (1, 2, 3) if name == "rot90" else (1,):
            steps.append((name, k))
            walk(index + 1)
            steps.pop()

    order = list(probabilities)
    walk(0)
    return tuple(sorted(states))


def draw_op(probabilities: dict[str, float], seed: int) -> int:
    """One D4 element drawn like the augmentation pipeline would: each transform with its probability."""
    rng = np.random.default_rng(seed)
    steps = []
    for name, p in probabilities.items():
        if rng.random() < p:
            steps.append((name, int(rng.integers(1, 4)) if name == "rot90" else 1))
    return compose_op(steps)


def cache_incompatibilities(augmentation: Any) -> list[str]:
    """Why a config's training augmentation cannot use exact frozen-feature reuse (empty: it can).

    ``augmentation`` is the config's ``training.augmentation`` section.
    """
    reasons = []
    if augmentation.scale is not None:
        reasons.append(f"training.augmentation.scale is {list(augmentation.scale)} (area-scale crops resample pixels; "
                       "set it to null)")
    zoom = augmentation.zoom
    if zoom is not None and tuple(float(z) for z in zoom) != (1.0, 1.0):
        reasons.append(f"training.augmentation.zoom is {list(zoom)} (zoom jitter resamples pixels; set it to null)")
    for name, params in (augmentation.transforms or {}).items():
        if name not in EXACT_TRANSFORMS and params is not None and float(dict(params).get("p", 0.0)) > 0:
            reasons.append(f"training.augmentation.transforms.{name}.p is {dict(params)['p']} (set it to 0)")
    return reasons


def crop_positions(extent: int, crop: int, stride: int) -> list[int]:
    """Window starts covering ``extent`` pixels (the last one shifted inward; 0 when the image is smaller)."""
    if extent <= crop:
        return [0]
    starts = list(range(0, extent - crop + 1, stride))
    if starts[-1] != extent - crop:
        starts.append(extent - crop)
    return starts


def _read(array: Any, y0: int, x0: int, size: int, fill: float | int, dtype: Any) -> np.ndarray:
    """``array[y0:y0+size, x0:x0+size]`` read into memory and padded with ``fill`` past the border."""
    height, width = array.shape[:2]
    part = np.asarray(array[y0:min(height, y0 + size), x0:min(width, x0 + size)])
    if part.shape[:2] == (size, size):
        return part.astype(dtype, copy=False)
    out = np.full((size, size, *part.shape[2:]), fill, dtype=dtype)
    out[:part.shape[0], :part.shape[1]] = part
    return out


def _rgb(array: np.ndarray) -> np.ndarray:
    from ..data.images import composite_on_white

    return composite_on_white(array) if array.ndim == 3 and array.shape[2] == 4 else array


@dataclass(frozen=True)
class CropBox:
    """One fixed training window: image ``image`` of the source, top-left (``y``, ``x``)."""

    image: int
    y: int
    x: int


class CropSetDataset(Dataset):
    """Fixed training windows of ``source`` with exact D4 augmentation (see the module docstring).

    Items are ``{"image": (3, crop, crop) float in [0, 1], "label": (crop, crop) long, "index",
    "box", "op"}``, plus ``"features"`` (a list of (C, h, w) tensors, one per tapped block) once
    :meth:`attach_features` gave it a feature store. ``length`` items make an epoch (default: one per
    window); item ``i`` reads window ``i % len(boxes)`` with an op drawn from (seed, epoch, i).
    """

    def __init__(self, source: Any, *, crop: int, stride: int | None = None,
                 transforms: dict[str, Any] | None = None, seed: int = 0, length: int | None = None,
                 ignore_index: int = 255):
        self.source = source
        self.crop = int(crop)
        self.stride = int(stride or max(1, crop // 2))
        if self.stride < 1:
            raise ConfigError(f"The crop stride must be positive, got {self.stride}.")
        self.ignore_index = int(ignore_index)
        self.probabilities = exact_probabilities(transforms)
        self.ops = reachable_ops(self.probabilities)
        self.seed = int(seed)
        self.epoch = 0
        self.boxes: list[CropBox] = []
        self.images_boxes: dict[int, list[int]] = {}
        for index in range(source.num_images()):
            image, mask = source.load(index)
            if mask is None:
                raise DataError(f"Training image '{source.name(index)}' has no mask; training needs one.")
            height, width = image.shape[:2]
            for y in crop_positions(height, self.crop, self.stride):
                for x in crop_positions(width, self.crop, self.stride):
                    window = np.asarray(mask[y:y + self.crop, x:x + self.crop])
                    if (window != self.ignore_index).any():
                        self.images_boxes.setdefault(index, []).append(len(self.boxes))
                        self.boxes.append(CropBox(index, y, x))
        if not self.boxes:
            raise DataError("No training window holds a labelled pixel; give masks or paint annotations first.")
        self.length = int(length) if length else len(self.boxes)
        self.features: Any = None  # a feature store with .read(box_index, op) -> list[Tensor]

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def attach_features(self, store: Any) -> CropSetDataset:
        """Serve ``store.read(box index, op)`` as each item's ``"features"``."""
        self.features = store
        return self

    def op_for(self, index: int) -> int:
        return draw_op(self.probabilities, sample_seed(self.seed, self.epoch, index))

    def window(self, box_index: int, op: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(image (3, crop, crop) float in [0, 1], label (crop, crop) long) of window ``box_index`` under ``op``."""
        box = self.boxes[box_index]
        image, mask = self.source.load(box.image)
        rgb = _rgb(_read(image, box.y, box.x, self.crop, 0, np.asarray(image[:1, :1]).dtype))
        target = _read(mask, box.y, box.x, self.crop, self.ignore_index, np.int64)
        img = torch.from_numpy(np.ascontiguousarray(rgb[..., :3])).permute(2, 0, 1).float()
        if rgb.dtype == np.uint8:
            img = img.div_(255.0)
        return apply_op(img, op), apply_op(torch.from_numpy(target), op)

    def __getitem__(self, index: int) -> dict[str, Any]:
        box_index = index % len(self.boxes)
        op = self.op_for(index)
        image, label = self.window(box_index, op)
        item: dict[str, Any] = {"image": image, "label": label, "index": index, "box": box_index, "op": op}
        if self.features is not None:
            item["features"] = self.features.read(box_index, op)
        return item


# --- the data of a comparison ------------------------------------------------------------------------------
@dataclass
class CompareData:
    """Training, validation and scoring sources of a comparison (see the module docstring).

    ``train``/``val``/``test`` follow :class:`~pfmseg_engine.training.validation.ImageSource`
    (``num_images``, ``load(i) -> (image, mask)``, ``name(i)``); training images may be lazy arrays that
    are only sliced. ``identity(i)`` of ``train`` (when present) names an image's content for the feature
    cache, else it is hashed from the pixels. ``default_train_dataset(config)`` is the training dataset
    used when the fixed crop set is not (the ordinary augmentation pipeline). ``eval_split`` says what
    the leaderboard scores on. ``groups`` maps scoring image names to the slide or patient they come from
    (``group_unit`` says which), so confidence intervals resample them together; images without one are
    grouped by the TCGA patient in their name, else stand alone
    (:func:`~pfmseg_engine.training.statistics.resolve_groups`).
    """

    train: Any
    val: Any | None
    test: Any
    eval_split: str
    num_classes: int
    class_names: tuple[str, ...]
    ignore_index: int
    default_train_dataset: Callable[[Any], Dataset]
    description: str = ""
    notes: list[str] = field(default_factory=list)
    groups: dict[str, str] = field(default_factory=dict)
    group_unit: str = "groups"

    @classmethod
    def from_seed_json(cls, config: Any) -> CompareData:
        """The splits of ``config``'s dataset JSON; scored on ``test`` (only images with masks), else ``val``."""
        from ..data.dataset import SegmentationDataset
        from ..data.seed_json import load_seed_json
        from ..training.runner import build_datasets

        seed_json = load_seed_json(config.dataset.json_file)
        common = {"num_classes": config.num_classes, "ignore_index": config.dataset.ignore_index,
                  "class_colors": config.dataset.class_colors}
        train = _SeedSource(SegmentationDataset(seed_json.split("train", require_masks=True), **common))
        val_samples: Sequence[Any] = seed_json.splits.get("val") or ()
        val = SegmentationDataset(seed_json.split("val", require_masks=True), **common) if val_samples else None
        test_samples = [s for s in (seed_json.splits.get("test") or []) if s.mask_path is not None]
        notes = []
        if test_samples:
            test, split = SegmentationDataset(test_samples, cache=False, **common), "test"
            skipped = len(seed_json.splits.get("test") or []) - len(test_samples)
            if skipped:
                notes.append(f"{skipped} test images without a mask are not scored.")
        elif val is not None:
            test_samples = list(val_samples)
            test, split = val, "val"
            notes.append("The test split has no masks, so models are scored on the val split (which also chose "
                         "each run's best epoch: an optimistic estimate).")
        else:
            raise DataError(f"Dataset '{seed_json.path}' has no test or val images with masks to score models on; "
                            "add a val or test split with masks.")

        def default_train_dataset(run_config: Any) -> Dataset:
            return build_datasets(run_config)[0]

        return cls(train=train, val=val, test=test, eval_split=split, num_classes=config.num_classes,
                   class_names=config.class_names, ignore_index=config.dataset.ignore_index,
                   default_train_dataset=default_train_dataset, description=str(seed_json.path), notes=notes,
                   groups={s.name: s.group for s in test_samples if s.group is not None})

    @classmethod
    def from_annotations(cls, images: Sequence[Any], labels: Sequence[Any], *, class_names: Sequence[str],
                         crop: int, validation_share: float = 0.2, validation_block: int | None = None,
                         seed: int = 0, ignore_index: int = 255, identities: Sequence[str] | None = None,
                         samples_per_epoch: int = 256) -> CompareData:
        """Sparse napari-style labels (0 = not annotated, k = class k-1) on images of any size.

        ``validation_share`` of the annotated squares (``validation_block`` pixels, default twice the
        crop) is held out, as the Train widget does; models are validated during training and scored
        on those held-out squares. ``identities`` name each image's content (e.g. slide path and
        resolution) for the feature cache.
        """
        from ..data.dataset import ArrayImageSet
        from ..data.masks import sparse_to_targets
        from ..data.sparse import SparsePatchDataset, crop_boxes, split_annotations

        images, labels = list(images), [np.asarray(lab) for lab in labels]
        n = len(class_names)
        block = validation_block or 2 * crop
        kept: list[Any] = []
        val_images: list[Any] = []
        val_labels: list[Any] = []
        groups: dict[str, str] = {}
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            train_labels, boxes = split_annotations(label, validation_share, block=block, seed=seed + index)
            kept.append(train_labels)
            for k in range(len(boxes)):  # held-out squares of one image are correlated: resampled together
                groups[f"image_{len(val_images) + k}"] = f"image {index}"  # the names ArrayImageSet gives them
            val_images += crop_boxes(image, boxes)
            val_labels += crop_boxes(label, boxes)
        if not val_images:
            raise DataError("Too few annotated squares to hold some out for scoring; annotate more places (at least "
                            f"two {block} px squares) or raise the validation share.")
        targets = [sparse_to_targets(lab, n, ignore_index) for lab in kept]
        train = _ArraySource(images, targets, identities)
        val = ArrayImageSet(val_images, [sparse_to_targets(lab, n, ignore_index) for lab in val_labels])

        def default_train_dataset(run_config: Any) -> Dataset:
            from ..training.runner import build_augmentation

            return SparsePatchDataset(images, kept, patch_size=run_config.crop_size, num_classes=n,
                                      samples_per_epoch=run_config.training.samples_per_epoch or samples_per_epoch,
                                      ignore_index=ignore_index, transform=build_augmentation(run_config, crop=False),
                                      seed=run_config.system.seed, zoom=run_config.training.augmentation.zoom)

        return cls(train=train, val=val, test=val, eval_split="held-out annotations", num_classes=n,
                   class_names=tuple(class_names), ignore_index=ignore_index,
                   default_train_dataset=default_train_dataset, description="annotations", groups=groups,
                   group_unit="annotated images",
                   notes=[f"Models are scored on {len(val_images)} held-out annotated squares, which also chose each "
                          "run's best epoch."])


def compare_on_slides(config: Any, slides: Sequence[Any], annotations: Sequence[Any], *,
                      train_mpp: float | None = None, mpp: float | None = None, validation_share: float = 0.2,
                      frame: str = "qupath", import_options: Any = None) -> tuple[Any, CompareData]:
    """(the config with the annotations' classes and resolution, the data) to compare models on whole slides.

    ``annotations`` are one QuPath GeoJSON or saved label store per slide, read as slide-level training
    reads them (:func:`~pfmseg_engine.training.slides.prepare_slides`): lazily, at ``train_mpp`` (default:
    the model's, else 0.5 µm/px). ``validation_share`` of the annotated squares is held out: runs validate
    on them and the leaderboard scores them. Patches are sampled lazily around the annotations, never a
    whole-slide raster; the fixed crop set of the feature cache would scan whole slides, so slides train
    without it.
    """
    from ..data.dataset import ArrayImageSet
    from ..data.masks import sparse_to_targets
    from ..data.sparse import SparsePatchDataset
    from ..training.slides import config_for_classes, default_train_mpp, hold_out, prepare_slides

    train_mpp = float(train_mpp or default_train_mpp(config))
    pairs, table = prepare_slides(slides, annotations, train_mpp=train_mpp, class_names=config.dataset.class_names,
                                  class_colours=config.dataset.class_colors, mpp=mpp, frame=frame,
                                  import_options=import_options)
    config = config_for_classes(config, table, train_mpp)
    n, ignore = config.num_classes, config.dataset.ignore_index
    train_labels, val_images, val_labels, val_names = hold_out(pairs, validation_share, 2 * config.crop_size,
                                                               config.system.seed)
    if not val_images:
        raise DataError("Too few annotated squares to hold some out for scoring; annotate more places (at least "
                        f"two {2 * config.crop_size} px squares per slide) or raise the validation share.")
    images = [pair.image for pair in pairs]
    val = ArrayImageSet(val_images, [sparse_to_targets(lab, n, ignore) for lab in val_labels], names=val_names)

    def default_train_dataset(run_config: Any) -> Dataset:
        from ..training.runner import build_augmentation

        return SparsePatchDataset(images, train_labels, patch_size=run_config.crop_size, num_classes=n,
                                  samples_per_epoch=run_config.training.samples_per_epoch or 256,
                                  ignore_index=ignore, transform=build_augmentation(run_config, crop=False),
                                  seed=run_config.system.seed, zoom=run_config.training.augmentation.zoom)

    data = CompareData(train=None, val=val, test=val, eval_split="held-out annotations", num_classes=n,
                       class_names=tuple(config.class_names), ignore_index=ignore,
                       default_train_dataset=default_train_dataset,
                       description=", ".join(pair.name for pair in pairs),
                       groups=_slide_groups(val_names, [pair.name for pair in pairs]), group_unit="slides",
                       notes=[f"Models are scored on {len(val_images)} held-out annotated squares of "
                              f"{len(pairs)} slide(s) at {train_mpp:g} µm/px, which also chose each run's best "
                              "epoch; slides train without the fixed crop set (no feature cache)."])
    return config, data


def _slide_groups(square_names: Sequence[str], slide_names: Sequence[str]) -> dict[str, str]:
    """Held-out square name (``<slide>_y<row>_x<col>``) -> its slide, so a slide's squares are resampled together."""
    groups = {}
    for square in square_names:
        owners = [slide for slide in slide_names if square.startswith(f"{slide}_y")]
        if owners:
            groups[square] = max(owners, key=len)  # the longest match: one slide's name may prefix another's
    return groups


class _SeedSource:
    """A seed-JSON training split as an image source with content identities."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def num_images(self) -> int:
        return self.dataset.num_images()

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        return self.dataset.load(index)

    def name(self, index: int) -> str:
        return self.dataset.name(index)

    def identity(self, index: int) -> str:
        return file_identity(self.dataset.samples[index].image_path)


class _ArraySource:
    """In-memory or lazy images with dense targets; ``load`` returns them unread (they are sliced)."""

    def __init__(self, images: Sequence[Any], targets: Sequence[np.ndarray], identities: Sequence[str] | None):
        self.images, self.targets = list(images), list(targets)
        self.identities = list(identities) if identities is not None else None

    def num_images(self) -> int:
        return len(self.images)

    def load(self, index: int) -> tuple[Any, np.ndarray]:
        return self.images[index], self.targets[index]

    def name(self, index: int) -> str:
        return f"image_{index}"

    def identity(self, index: int) -> str:
        if self.identities is not None:
            return str(self.identities[index])
        return "pixels:" + hashlib.sha256(np.ascontiguousarray(np.asarray(self.images[index])).tobytes()).hexdigest()


def file_identity(path: str | Path) -> str:
    """A file's identity for cache keys: resolved path, size and modification time (ns)."""
    path = Path(path).resolve()
    stat = path.stat()
    return f"{path}:{stat.st_size}:{stat.st_mtime_ns}"


def source_identity(source: Any, index: int) -> str:
    identity = getattr(source, "identity", None)
    if callable(identity):
        return identity(index)
    image, _ = source.load(index)
    return "pixels:" + hashlib.sha256(np.ascontiguousarray(np.asarray(image)).tobytes()).hexdigest()
