"""Writers: a labels layer to OME-Zarr (the engine's label store layout) or to a pyramidal OME-TIFF.

Both go through the engine: the labels are written chunk by chunk into its ``LabelStore`` (NGFF
multiscales + image-label colours + class names), and the TIFF is the engine's pyramidal OME-TIFF
export of that store. So a saved annotation or prediction opens again in napari, QuPath or the
engine's CLI with its classes, colours and physical scale.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from ._layers import META, MICRON
from ._torch_guard import guard_triton


def _levels(data: Any) -> list[Any]:
    return list(data) if isinstance(data, (list, tuple)) else [data]


def _classes(data: Any, meta: dict[str, Any]) -> tuple[list[str], dict[int, list[int]]]:
    """Class names and colours from our metadata, else from the label values present."""
    import numpy as np

    from pfmseg_engine.classes import default_class_names

    ours = meta.get("metadata", {}).get(META, {})
    names = list(ours.get("class_names") or [])
    if not names:
        coarsest = np.asarray(_levels(data)[-1])
        names = list(default_class_names(max(1, int(coarsest.max()) if coarsest.size else 1)))
    colours = ours.get("colours")
    if isinstance(colours, list):
        colours = {i + 1: c for i, c in enumerate(colours)}
    if not colours:
        from ._layers import default_colours

        colours = {i + 1: c for i, c in enumerate(default_colours(len(names)))}
    return names, {int(k): list(v) for k, v in colours.items()}


def _resolution(meta: dict[str, Any]) -> tuple[float, float]:
    """(mpp of the labels, mpp of the slide's level 0), from our metadata, else the layer scale."""
    ours = meta.get("metadata", {}).get(META, {})
    scale = float(meta.get("scale", (1.0, 1.0))[-1])
    units = [str(u) for u in meta.get("units") or ()]
    in_microns = bool(units) and units[-1] in (MICRON, "micrometer", "um")
    downsample = float(ours.get("downsample") or 1.0)
    if ours.get("target_mpp") and ours.get("slide_mpp"):
        return float(ours["target_mpp"]), float(ours["slide_mpp"])
    mpp = scale if in_microns else downsample  # pixels: 1 unit per level-0 pixel
    return mpp, mpp / downsample


def write_ome_zarr(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """napari writer: one labels layer -> ``path`` (``.zarr``/``.ome.zarr``) as an OME-Zarr label store."""
    from pfmseg_engine.labelstore.omezarr import write_labels

    guard_triton()
    target = Path(path)
    if not target.name.endswith(".zarr"):
        target = target.with_name(target.name + ".ome.zarr")
    names, colours = _classes(data, meta)
    mpp, slide_mpp = _resolution(meta)
    offset = meta.get("metadata", {}).get(META, {}).get("offset_px") or (0.0, 0.0)
    write_labels(target, _levels(data)[0], class_names=names, mpp=mpp, slide_mpp=slide_mpp,
                 class_colors=[colours.get(i + 1, [0, 0, 0]) for i in range(len(names))], offset=tuple(offset),
                 extra={"source": "napari-pfmseg", "layer": meta.get("name")})
    return [str(target)]


def write_tiff(path: str, data: Any, meta: dict[str, Any]) -> list[str]:
    """napari writer: one labels layer -> pyramidal, tiled OME-TIFF (via a temporary OME-Zarr store)."""
    from pfmseg_engine.inference.export_tiff import export_ome_tiff

    target = Path(path)
    scratch = Path(tempfile.mkdtemp(prefix=".pfmseg-write-", dir=target.parent if target.parent.exists() else None))
    try:
        store = scratch / "labels.ome.zarr"
        write_ome_zarr(str(store), data, meta)
        export_ome_tiff(store, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return [str(target)]
