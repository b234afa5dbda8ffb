"""The OME-Zarr label store that whole-slide inference writes into, chunk by chunk.

Layout (``<name>.ome.zarr``)::

    .zattrs / zarr.json   multiscales (y, x in micrometres) + image-label (class names, colours)
                          + "pfmseg" (classes, label convention, resolution plan, run settings)
    0, 1, 2 ...           uint8 labels, level 0 at the inference resolution, 2x2-mode pyramid
    probabilities/0, ...  optional (classes, y, x) uint8 softmax * 255, 2x2-mean pyramid

Label 0 means "no prediction" (outside tissue), label k means class k - 1, the napari convention.
NGFF 0.4 (zarr v2, what most viewers read today) is the default; 0.5 (zarr v3) on request. The
version differences are data in :data:`NGFF`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from .colors import label_colors
from .pyramid import downsample_level, pyramid_shapes

NGFF: dict[str, dict[str, Any]] = {
    "0.4": {"zarr_format": 2, "array_kwargs": {"chunk_key_encoding": {"name": "v2", "separator": "/"}},
            "versioned": True},
    "0.5": {"zarr_format": 3, "array_kwargs": {}, "versioned": False},
}

LABELS, PROBS = "labels", "probabilities"


def _ngff(version: str) -> dict[str, Any]:
    if version not in NGFF:
        raise ConfigError(f"Unknown OME-Zarr version '{version}'; choose one of {', '.join(NGFF)}.")
    return NGFF[version]


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
    """Create or reopen the label (and probability) arrays and write them chunk by chunk."""

    def __init__(self, path: Path, *, shape: tuple[int, int], chunk: int, num_classes: int,
                 probabilities: bool, ngff: str = "0.4", create: bool = True):
        import zarr

        self.path = Path(path)
        self.shape, self.chunk, self.num_classes = tuple(shape), int(chunk), int(num_classes)
        self.ngff = ngff
        spec = _ngff(ngff)
        if create:
            root = zarr.open_group(str(self.path), mode="w", zarr_format=spec["zarr_format"])
            root.create_array("0", shape=self.shape, chunks=(self.chunk, self.chunk), dtype="uint8",
                              fill_value=0, **spec["array_kwargs"])
            if probabilities:
                group = root.create_group(PROBS)
                group.create_array("0", shape=(self.num_classes, *self.shape),
                                   chunks=(1, self.chunk, self.chunk), dtype="uint8", fill_value=0,
                                   **spec["array_kwargs"])
        self.root = zarr.open_group(str(self.path), mode="r+")
        self.labels = self.root["0"]
        self.probabilities = self.root[f"{PROBS}/0"] if probabilities else None

    def write(self, box: tuple[int, int, int, int], labels: np.ndarray,
              probs: np.ndarray | None = None) -> None:
        y0, y1, x0, x1 = box
        self.labels[y0:y1, x0:x1] = labels
        if self.probabilities is not None and probs is not None:
            self.probabilities[:, y0:y1, x0:x1] = probs

    def finalize(self, nonempty: set[tuple[int, int]], *, name: str, mpp: float, slide_mpp: float,
                 class_names: Sequence[str], extra: dict[str, Any], method: str = "mode") -> None:
        """Build the pyramids and write all metadata (the last step before the rename)."""
        spec = _ngff(self.ngff)
        shapes = pyramid_shapes(self.shape, self.chunk)
        if method not in ("mode", "nearest"):
            raise ConfigError(f"Label pyramids use 'mode' or 'nearest' downsampling, not '{method}'.")
        label_arrays = self._pyramid(self.root, shapes, method, nonempty, channels=None)
        space = {"type": "space", "unit": "micrometer"}
        yx_axes = [{"name": "y", **space}, {"name": "x", **space}]
        levels = range(len(label_arrays))
        # pixel centres: level k pixel i covers slide level-0 pixels [i*d, (i+1)*d), d in level-0 px
        d0 = mpp / slide_mpp
        scales = [[mpp * 2**k] * 2 for k in levels]
        shifts = [[round((d0 * 2**k - 1) / 2 * slide_mpp, 9)] * 2 for k in levels]
        image_label = {"colors": label_colors(class_names),
                       "properties": [{"label-value": 0, "class": "no prediction"}]
                       + [{"label-value": i + 1, "class": n} for i, n in enumerate(class_names)]}
        ome = {"multiscales": [multiscales(name, yx_axes, scales, shifts, method, self.ngff)],
               "image-label": {"version": self.ngff, **image_label} if spec["versioned"] else image_label}
        self._write_attrs(self.root, ome, {"pfmseg": extra})
        if self.probabilities is not None:
            group = self.root[PROBS]
            prob_arrays = self._pyramid(group, shapes, "mean", nonempty, channels=self.num_classes)
            c_axis = [{"name": "c", "type": "channel"}]
            ome_p = {"multiscales": [multiscales(f"{name} probabilities", c_axis + yx_axes,
                                                 [[1.0, *s] for s in scales[: len(prob_arrays)]],
                                                 [[0.0, *t] for t in shifts[: len(prob_arrays)]],
                                                 "mean", self.ngff)],
                     "omero": {"channels": [{"label": n, "active": True, "color": "FFFFFF",
                                             "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
                                            for n in class_names]}}
            self._write_attrs(group, ome_p, {"pfmseg": {"class_names": list(class_names), "scale": 255}})

    def _write_attrs(self, group, ome: dict[str, Any], extra: dict[str, Any]) -> None:
        if _ngff(self.ngff)["versioned"]:
            group.attrs.update({**ome, **extra})
        else:
            group.attrs.update({"ome": {"version": self.ngff, **ome}, **extra})

    def _pyramid(self, group, shapes: list[tuple[int, int]], method: str,
                 nonempty: set[tuple[int, int]], channels: int | None) -> list[Any]:
        spec = _ngff(self.ngff)
        arrays = [group["0"]]
        for level, shape in enumerate(shapes[1:], start=1):
            full = shape if channels is None else (channels, *shape)
            chunks = (self.chunk, self.chunk) if channels is None else (1, self.chunk, self.chunk)
            target = group.create_array(str(level), shape=full, chunks=chunks, dtype="uint8", fill_value=0,
                                        overwrite=True, **spec["array_kwargs"])
            nonempty = downsample_level(arrays[-1], target, method, nonempty, self.chunk)
            arrays.append(target)
        return arrays


class LabelOutput:
    """A finished label store opened for reading (exports, viewers, tests)."""

    def __init__(self, path: str | Path):
        import zarr

        self.path = Path(path)
        if not self.path.exists():
            raise ConfigError(f"Prediction '{self.path}' does not exist; run inference first.")
        self.root = zarr.open_group(str(self.path), mode="r")
        attrs = dict(self.root.attrs)
        self.pfmseg: dict[str, Any] = attrs.get("pfmseg", {})
        ome = attrs.get("ome", attrs)
        self.multiscales: dict[str, Any] = ome["multiscales"][0]
        self.image_label: dict[str, Any] = ome.get("image-label", {})
        self.levels = [self.root[d["path"]] for d in self.multiscales["datasets"]]

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
    def bounds_offset(self) -> tuple[int, int]:
        x, y = self.pfmseg.get("slide", {}).get("bounds_offset", (0, 0))
        return int(x), int(y)

    def colours(self) -> dict[int, list[int]]:
        return {int(c["label-value"]): list(c["rgba"]) for c in self.image_label.get("colors", [])}
