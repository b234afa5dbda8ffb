"""The OME-Zarr label store that whole-slide inference writes into, chunk by chunk.

Layout (``<name>.ome.zarr``)::

    .zattrs / zarr.json   multiscales (y, x in micrometres) + image-label (class names, colours)
                          + "pfmseg" (classes, label convention, resolution plan, run settings)
    0, 1, 2 ...           uint8 labels, level 0 at the inference resolution, 2x2-mode pyramid
    probabilities/0, ...  optional (classes, y, x) uint8 softmax * 255, 2x2-mean pyramid

Label 0 means "no prediction" (outside tissue), label k means class k - 1, the napari convention.
NGFF 0.4 (zarr v2, what most viewers read today) is the default; 0.5 (zarr v3, arrays with
``dimension_names``) on request; both validate under ome-zarr-models. The version differences are
data in :data:`NGFF`. Each level's transformations are the spec's scale then translation, in µm: the
translation puts the level's pixel centres where they lie on the slide (slide pixel (0, 0)'s centre at
the origin), so a region output overlays its slide in any reader that applies them (napari-ome-zarr
0.10 applies only the scale; napari-pfmseg places it, and so do NGFF readers that follow the spec).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from ..colors import ClassColors, class_palette, label_colors
from ..errors import ConfigError
from ..storage import writing
from .geometry import placement
from .pyramid import merge_boxes, pyramid_shapes, update_levels

if TYPE_CHECKING:
    import zarr

#: Per NGFF version: the zarr format, extra array options, whether the attributes carry a "version" key
#: at the top (0.4) or sit under "ome" (0.5), and whether arrays name their dimensions (zarr v3's
#: ``dimension_names``, which 0.5 requires to equal the multiscales axes' names).
NGFF: dict[str, dict[str, Any]] = {
    "0.4": {"zarr_format": 2, "array_kwargs": {"chunk_key_encoding": {"name": "v2", "separator": "/"}},
            "versioned": True, "dimension_names": False},
    "0.5": {"zarr_format": 3, "array_kwargs": {}, "versioned": False, "dimension_names": True},
}

YX, CYX = ("y", "x"), ("c", "y", "x")

LABELS, PROBS = "labels", "probabilities"


def _ngff(version: str) -> dict[str, Any]:
    if version not in NGFF:
        raise ConfigError(f"Unknown OME-Zarr version '{version}'; choose one of {', '.join(NGFF)}.")
    return NGFF[version]


def _array_kwargs(version: str, dims: tuple[str, ...]) -> dict[str, Any]:
    """zarr ``create_array`` options of one NGFF version for an array with axes ``dims``."""
    spec = _ngff(version)
    return {**spec["array_kwargs"], **({"dimension_names": dims} if spec["dimension_names"] else {})}


def multiscales(name: str, axes: list[dict[str, str]], scales: list[list[float]],
                translations: list[list[float]], method: str, version: str) -> dict[str, Any]:
    """One NGFF multiscales entry (scale then translation per level, as the spec orders them)."""
    datasets = []
    for i, (scale, shift) in enumerate(zip(scales, translations, strict=True)):
        transforms = [{"type": "scale", "scale": scale}]
        if any(shift):
            transforms.append({"type": "translation", "translation": shift})
        datasets.append({"path": str(i), "coordinateTransformations": transforms})
    entry = {"name": name, "axes": axes, "datasets": datasets, "type": method,
             "metadata": {"method": f"pfmseg.inference.pyramid.{method}2x2"}}
    return {"version": version, **entry} if _ngff(version)["versioned"] else entry


class LabelStore:
    """Create or reopen the label (and probability) pyramids and write them chunk by chunk.

    Every level exists from the start and :meth:`write` keeps the coarser ones up to date, so a
    viewer can open the (partial) store and show a zoomed-out view while chunks stream in; zarr writes
    each chunk file atomically, so a reader never sees a torn one. ``method`` is the label
    downsampling ("mode" or "nearest"); probabilities always use the 2x2 mean.

    ``pyramid_interval`` (seconds, default 0: at once) batches the coarser levels' updates: level 0
    is written at once, the boxes written since the last update are merged into rectangles and the
    coarser levels brought up to date at most that often (and by :meth:`flush_pyramid`). A coarse
    chunk is then rewritten once per update instead of once per level-0 chunk it covers, which is most
    of the cost of writing; the result is the same (each update recomputes coarse pixels from their
    full 2x2 sources). :attr:`pyramid_pending` says whether an update is still owed.
    """

    def __init__(self, path: Path, *, shape: tuple[int, int], chunk: int, num_classes: int,
                 probabilities: bool, ngff: str = "0.4", create: bool = True, method: str = "mode",
                 pyramid_interval: float = 0.0):
        import zarr

        if method not in ("mode", "nearest"):
            raise ConfigError(f"Label pyramids use 'mode' or 'nearest' downsampling, not '{method}'.")
        self.path = Path(path)
        self.shape: tuple[int, int] = (int(shape[0]), int(shape[1]))
        self.chunk, self.num_classes = int(chunk), int(num_classes)
        self.ngff, self.method = ngff, method
        spec = _ngff(ngff)
        shapes = pyramid_shapes(self.shape, self.chunk)
        with writing(self.path, "the OME-Zarr output"):
            if create:
                root = zarr.open_group(str(self.path), mode="w", zarr_format=spec["zarr_format"])
                for level, level_shape in enumerate(shapes):
                    root.create_array(str(level), shape=level_shape, chunks=(self.chunk, self.chunk), dtype="uint8",
                                      fill_value=0, **_array_kwargs(ngff, YX))
                if probabilities:
                    group = root.create_group(PROBS)
                    for level, level_shape in enumerate(shapes):
                        group.create_array(str(level), shape=(self.num_classes, *level_shape),
                                           chunks=(1, self.chunk, self.chunk), dtype="uint8", fill_value=0,
                                           **_array_kwargs(ngff, CYX))
        self.root = zarr.open_group(str(self.path), mode="r+")
        # label chunks are only ever written with labels in them: skip zarr's all-fill-value check
        self.levels = [_written_as_is(_array(self.root, str(level))) for level in range(len(shapes))]
        self.labels = self.levels[0]
        self.prob_levels = ([_array(self.root, f"{PROBS}/{level}") for level in range(len(shapes))]
                            if probabilities else [])
        self.probabilities = self.prob_levels[0] if probabilities else None
        self.pyramid_interval = float(pyramid_interval)
        self._pending: list[tuple[tuple[int, int, int, int], bool]] = []
        self._last_update = -math.inf

    def write(self, box: tuple[int, int, int, int], labels: np.ndarray,
              probs: np.ndarray | None = None) -> None:
        """Write one box (y0, y1, x0, x1) of level 0 and bring every coarser level up to date (at once, or
        within ``pyramid_interval`` seconds)."""
        y0, y1, x0, x1 = (int(v) for v in box)
        with writing(self.path, "the OME-Zarr output"):
            self.labels[y0:y1, x0:x1] = labels
            with_probs = False
            if self.probabilities is not None and probs is not None:
                self.probabilities[:, y0:y1, x0:x1] = probs
                with_probs = True
            self._pending.append(((y0, y1, x0, x1), with_probs))
            if time.monotonic() - self._last_update >= self.pyramid_interval:
                self._update_pyramid()

    @property
    def pyramid_pending(self) -> bool:
        """Whether boxes written to level 0 still wait for their coarser levels."""
        return bool(self._pending)

    def is_complete(self, box: tuple[int, int, int, int]) -> bool:
        """Whether a box written with :meth:`write` has its coarser levels written too."""
        y0, y1, x0, x1 = (int(v) for v in box)
        return all(pending != (y0, y1, x0, x1) for pending, _ in self._pending)

    def flush_pyramid(self) -> None:
        """Bring the coarser levels up to date with everything written so far."""
        with writing(self.path, "the OME-Zarr output"):
            self._update_pyramid()

    def _update_pyramid(self) -> None:
        pending = self._pending
        for box in merge_boxes([b for b, _ in pending]):
            update_levels(self.levels, box, self.method)
        for box in merge_boxes([b for b, with_probs in pending if with_probs]):
            update_levels(self.prob_levels, box, "mean")
        del self._pending[:len(pending)]  # only once every update went through: a failed one is retried
        self._last_update = time.monotonic()

    def finalize(self, *, name: str, mpp: float, slide_mpp: float, class_names: Sequence[str],
                 extra: dict[str, Any], class_colors: ClassColors | None = None,
                 offset: tuple[float, float] = (0.0, 0.0)) -> None:
        """Write all metadata (the last step before the rename); the pyramids are already complete.

        ``offset`` is the (y, x) slide level-0 pixel where this store's pixel (0, 0) starts (a region),
        recorded in the NGFF translation so the store overlays the slide where it belongs.
        ``class_colors`` (list by class, or class name -> RGB) go into image-label ``colors``.
        """
        spec = _ngff(self.ngff)
        space = {"type": "space", "unit": "micrometer"}
        yx_axes = [{"name": n, **space} for n in YX]  # the arrays' dimension_names (0.5) match these
        levels = range(len(self.levels))
        # pixel centres: level k pixel i covers slide level-0 pixels [i*d, (i+1)*d), d in level-0 px
        d0 = mpp / slide_mpp
        scales = [[mpp * 2**k] * 2 for k in levels]
        shifts = [[round(t, 9) for t in placement(slide_mpp, d0 * 2**k, offset)["translate"]] for k in levels]
        image_label = {"colors": label_colors(class_names, class_colors=class_colors),
                       "properties": [{"label-value": 0, "class": "no prediction"}]
                       + [{"label-value": i + 1, "class": n} for i, n in enumerate(class_names)]}
        ome = {"multiscales": [multiscales(name, yx_axes, scales, shifts, self.method, self.ngff)],
               "image-label": {"version": self.ngff, **image_label} if spec["versioned"] else image_label}
        self._write_attrs(self.root, ome, {"pfmseg": extra})
        if self.probabilities is not None:
            group = self.root[PROBS]
            c_axis = [{"name": CYX[0], "type": "channel"}]
            ome_p = {"multiscales": [multiscales(f"{name} probabilities", c_axis + yx_axes,
                                                 [[1.0, *s] for s in scales], [[0.0, *t] for t in shifts],
                                                 "mean", self.ngff)],
                     "omero": {"channels": [{"label": n, "active": True, "color": "FFFFFF",
                                             "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
                                            for n in class_names]}}
            self._write_attrs(group, ome_p, {"pfmseg": {"class_names": list(class_names), "scale": 255}})

    def _write_attrs(self, group, ome: dict[str, Any], extra: dict[str, Any]) -> None:
        attrs = {**ome, **extra} if _ngff(self.ngff)["versioned"] else {"ome": {"version": self.ngff, **ome}, **extra}
        with writing(self.path, "the OME-Zarr metadata"):
            group.attrs.update(attrs)


def _array(group: zarr.Group, path: str) -> zarr.Array:
    """The array at ``path`` of a store this module wrote (every level is an array)."""
    return cast("zarr.Array", group[path])


def _written_as_is(array: zarr.Array) -> zarr.Array:
    """``array`` writing every chunk it is given, without first checking whether it holds only the fill value
    (zarr 3's default check costs as much as compressing the chunk)."""
    with_config = getattr(array, "with_config", None)
    return with_config({"write_empty_chunks": True}) if callable(with_config) else array


def write_labels(path: str | Path, labels: Any, *, class_names: Sequence[str], mpp: float,
                 slide_mpp: float | None = None, class_colors: ClassColors | None = None,
                 offset: tuple[float, float] = (0.0, 0.0), chunk: int = 1024, ngff: str = "0.4",
                 method: str = "mode", extra: dict[str, Any] | None = None, overwrite: bool = True) -> Path:
    """Write an (H, W) integer labels array (0 = none, k = class k-1) as an OME-Zarr label store.

    The same layout whole-slide inference writes (pyramid, classes, colours, micrometre scale), so a
    napari labels layer or any array of annotations opens in QuPath, napari and the exporters like a
    prediction. ``mpp`` is the labels' resolution, ``slide_mpp`` the slide's level 0 (default: the
    same), ``offset`` the (y, x) slide level-0 pixel of the array's pixel (0, 0). The array is read
    one chunk at a time (zarr and dask arrays work without loading them whole).
    """
    import shutil

    path = Path(path)
    if path.exists():
        if not overwrite:
            raise ConfigError(f"'{path}' exists already; pass overwrite=True or choose another path.")
        shutil.rmtree(path)
    if len(labels.shape) != 2:
        raise ConfigError(f"write_labels takes an (H, W) labels array, got shape {tuple(labels.shape)}.")
    slide_mpp = float(slide_mpp or mpp)
    height, width = (int(v) for v in labels.shape)
    store = LabelStore(path, shape=(height, width), chunk=chunk, num_classes=max(1, len(class_names)),
                       probabilities=False, ngff=ngff, create=True, method=method)
    for y in range(0, height, chunk):
        for x in range(0, width, chunk):
            block = np.asarray(labels[y:y + chunk, x:x + chunk])
            if not block.any():
                continue
            if block.min() < 0 or block.max() > 255:
                from ..errors import DataError

                raise DataError(f"Labels hold values outside 0..255 (max {block.max()}, min {block.min()}); "
                                "OME-Zarr label stores are uint8: relabel first.")
            store.write((y, y + block.shape[0], x, x + block.shape[1]), block.astype(np.uint8))
    ds = mpp / slide_mpp
    plan = {"level": 0, "level_mpp": slide_mpp, "target_mpp": mpp, "factor": ds, "mpp": mpp,
            "shape": [height, width], "downsample": ds}
    metadata = {"class_names": list(class_names),
                "label_values": {"0": "not annotated / no prediction", "k": "class k-1"},
                "resolution_plan": plan, "region_offset": [float(o) for o in offset],
                "class_colors": [list(c) for c in class_palette(len(class_names), class_colors, class_names).tolist()],
                **(extra or {})}
    store.finalize(name=path.name.split(".")[0], mpp=mpp, slide_mpp=slide_mpp, class_names=class_names,
                   extra=metadata, class_colors=class_colors, offset=offset)
    return path


class LabelOutput:
    """A finished label store opened for reading (exports, viewers, tests)."""

    def __init__(self, path: str | Path):
        import zarr

        self.path = Path(path)
        if not self.path.exists():
            raise ConfigError(f"Prediction '{self.path}' does not exist; run inference first.")
        self.root = zarr.open_group(str(self.path), mode="r")
        attrs: dict[str, Any] = dict(self.root.attrs)
        self.pfmseg: dict[str, Any] = attrs.get("pfmseg", {})
        ome = attrs.get("ome", attrs)
        self.multiscales: dict[str, Any] = ome["multiscales"][0]
        self.image_label: dict[str, Any] = ome.get("image-label", {})
        self.levels = [_array(self.root, d["path"]) for d in self.multiscales["datasets"]]

    @property
    def class_names(self) -> list[str]:
        return list(self.pfmseg.get("class_names", []))

    @property
    def mpp(self) -> float:
        """Micrometres per pixel of level 0."""
        return float(self.multiscales["datasets"][0]["coordinateTransformations"][0]["scale"][-1])

    @property
    def downsample(self) -> float:
        """Slide level-0 pixels per label level-0 pixel."""
        return float(self.pfmseg.get("resolution_plan", {}).get("downsample", 1.0))

    @property
    def slide_mpp(self) -> float:
        """Micrometres per slide level-0 pixel (recorded, else level 0's divided by the downsample)."""
        recorded = self.pfmseg.get("slide", {}).get("mpp")
        return float(recorded) if recorded else self.mpp / self.downsample

    @property
    def region_offset(self) -> tuple[float, float]:
        """(y, x) slide level-0 pixel where this output's pixel (0, 0) lies (non-zero for regions)."""
        y, x = self.pfmseg.get("region_offset", (0.0, 0.0))
        return float(y), float(x)

    @property
    def bounds_offset(self) -> tuple[int, int]:
        x, y = self.pfmseg.get("slide", {}).get("bounds_offset", (0, 0))
        return int(x), int(y)

    def colours(self) -> dict[int, list[int]]:
        return {int(c["label-value"]): list(c["rgba"]) for c in self.image_label.get("colors", [])}
