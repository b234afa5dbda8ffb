"""Adapters for engine APIs the plugin needs but the engine does not offer (yet).

Everything here is glue over public engine pieces, kept in one place so each function can be
deleted when the engine grows the API (see the plugin's notes for the exact requests):

* :func:`crop_slide` - a region of a slide as a slide (the engine predicts whole slides only).
* :func:`write_label_store` / :func:`set_store_colours` / :func:`set_store_attrs` - a labels
  array into the engine's OME-Zarr label store, class colours of the user's choice in a store
  (``LabelStore.finalize`` always writes the default palette), and where a region lies.

Training (``Trainer.iter_fit``, ``build_annotation_trainer``, ``TrainConfig.from_model_config``,
``split_annotations``, the pause token) and device resolution (``pfmseg_engine.resolve_device``)
are engine APIs now and no longer live here. Heavy imports happen inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


# --- slides --------------------------------------------------------------------------------------
class _CropReader:
    """A window of a level reader, as an array-like the engine's ``Slide.from_array`` accepts."""

    ndim = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, reader: Any, y0: int, x0: int, height: int, width: int):
        self.reader, self.y0, self.x0 = reader, int(y0), int(x0)
        self.shape = (int(height), int(width), 3)

    def __getitem__(self, key: Any) -> np.ndarray:
        from pfmseg_engine.slides.readers import _bounds

        y0, y1, x0, x1 = _bounds(key, self.shape)
        return np.asarray(self.reader[self.y0 + y0:self.y0 + y1, self.x0 + x0:self.x0 + x1])


def align_box(box: Sequence[float], shape: Sequence[int], step: int) -> tuple[int, int, int, int]:
    """Grow a level-0 box (y0, y1, x0, x1) outward to multiples of ``step`` and clip it to ``shape``."""
    y0, y1, x0, x1 = box
    h, w = int(shape[0]), int(shape[1])
    y0 = max(0, math.floor(y0 / step) * step)
    x0 = max(0, math.floor(x0 / step) * step)
    y1 = min(h, math.ceil(y1 / step) * step)
    x1 = min(w, math.ceil(x1 / step) * step)
    return y0, y1, x0, x1


def crop_slide(slide: Any, box: Sequence[float]) -> tuple[Any, tuple[int, int, int, int]]:
    """The level-0 region ``box`` = (y0, y1, x0, x1) of ``slide`` as a :class:`Slide` of its own.

    The box is aligned to the coarsest level's pixel grid so every level crops exactly; the
    returned slide's ``bounds_offset`` places it in the original file's frame (so GeoJSON exports
    land in the right place). Returns (slide, aligned box).
    """
    from pfmseg_engine.slides import Slide

    step = max(1, round(max(slide.downsamples)))
    height, width = slide.levels[0].shape[:2]
    y0, y1, x0, x1 = align_box(box, (height, width), step)
    if y1 <= y0 or x1 <= x0:
        from pfmseg_engine import SlideError

        raise SlideError(f"The region {tuple(int(v) for v in box)} lies outside slide '{slide.name}'.")
    crops, downsamples = [], []
    for reader, ds in zip(slide.readers, slide.downsamples, strict=True):
        ly0, lx0 = round(y0 / ds), round(x0 / ds)
        lh = max(1, min(reader.shape[0] - ly0, round((y1 - y0) / ds)))
        lw = max(1, min(reader.shape[1] - lx0, round((x1 - x0) / ds)))
        if crops and (lh < 2 or lw < 2):
            break
        crops.append(_CropReader(reader, ly0, lx0, lh, lw))
        downsamples.append(ds)
    bx, by = slide.bounds_offset
    region = Slide.from_array(crops, slide.mpp, name=f"{slide.name}_x{x0}_y{y0}_{x1 - x0}x{y1 - y0}",
                              downsamples=downsamples, bounds_offset=(bx + x0, by + y0))
    region.path = slide.path
    return region, (y0, y1, x0, x1)


# --- outputs -------------------------------------------------------------------------------------
def write_label_store(path: Path, labels: Any, *, class_names: Sequence[str], colours: dict[int, Sequence[int]],
                      mpp: float, slide_mpp: float, chunk: int = 1024, extra: dict[str, Any] | None = None,
                      ngff: str = "0.4") -> Path:
    """Write an (H, W) integer labels array (label k = class k-1) as the engine's OME-Zarr store."""
    import shutil

    from pfmseg_engine.inference.omezarr import LabelStore

    path = Path(path)
    height, width = labels.shape[-2:]
    values = len(class_names)
    if path.exists():
        shutil.rmtree(path)
    store = LabelStore(path, shape=(height, width), chunk=chunk, num_classes=max(1, values),
                       probabilities=False, ngff=ngff, create=True)
    nonempty = set()
    for cy, y in enumerate(range(0, height, chunk)):
        for cx, x in enumerate(range(0, width, chunk)):
            block = np.asarray(labels[y:y + chunk, x:x + chunk])
            if block.any():
                if block.max() > 255 or block.min() < 0:
                    from pfmseg_engine import DataError

                    raise DataError(f"Labels hold values outside 0..255 (max {block.max()}); OME-Zarr label "
                                    "stores are uint8: relabel the layer first.")
                store.write((y, min(height, y + chunk), x, min(width, x + chunk)), block.astype(np.uint8))
                nonempty.add((cy, cx))
    ds = mpp / slide_mpp
    plan = {"level": 0, "level_mpp": slide_mpp, "target_mpp": mpp, "factor": ds, "mpp": mpp,
            "shape": [height, width], "downsample": ds}
    metadata = {"class_names": list(class_names), "label_values": {"0": "not annotated / no prediction",
                                                                   "k": "class k-1"},
                "resolution_plan": plan, **(extra or {})}
    store.finalize(nonempty, name=path.name.split(".")[0], mpp=mpp, slide_mpp=slide_mpp, class_names=class_names,
                   extra=metadata)
    set_store_colours(store.root, colours)
    return path


def set_store_colours(root: Any, colours: dict[int, Sequence[int]]) -> None:
    """Replace the default palette in a label store's ``image-label`` by the given class colours.

    ``root`` is the store's zarr group opened for writing (or its path).
    """
    if isinstance(root, (str, Path)):
        import zarr

        root = zarr.open_group(str(root), mode="r+")
    attrs = dict(root.attrs)
    ome = attrs.get("ome", attrs)
    label = dict(ome.get("image-label", {}))
    given = {int(k): [int(c) for c in v][:4] for k, v in colours.items() if int(k) > 0}
    label["colors"] = [{"label-value": 0, "rgba": [0, 0, 0, 0]}] + [
        {"label-value": k, "rgba": ([*v, 255])[:4]} for k, v in sorted(given.items())]
    if "ome" in attrs:
        root.attrs.update({"ome": {**ome, "image-label": label}})
    else:
        root.attrs.update({"image-label": label})


def set_store_attrs(path: str | Path, attrs: dict[str, Any]) -> None:
    """Add plugin attributes to a finished store (e.g. where a region lies on its slide)."""
    import zarr

    zarr.open_group(str(path), mode="r+").attrs.update(attrs)
