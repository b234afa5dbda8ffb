"""Is this folder zarr, and is it a label store pfmseg wrote? Decided here once, from metadata files alone.

Reading a few JSON bytes (never opening zarr) keeps the answer cheap for readers that napari asks
about every path it is given, and one rule keeps the engine, the CLI and the plugin in agreement.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: Files that make a folder a zarr group or array: zarr v3 (``zarr.json``) or v2 (``.zgroup``, ``.zarray``).
ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray")

#: Files holding a zarr node's attributes: v2 (``.zattrs``) or v3 (``zarr.json``'s ``attributes``).
ATTRIBUTE_FILES = (".zattrs", "zarr.json")

#: Every zarr metadata file name (v2 and v3): what identifies a zarr folder's content without its chunks.
ZARR_METADATA = (".zattrs", ".zarray", ".zgroup", "zarr.json")

#: Key of our metadata block in a store's attributes (beside the OME keys).
PFMSEG_KEY = "pfmseg"


def is_zarr(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a zarr group or array (v2 or v3)."""
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in ZARR_MARKERS)


def store_attributes(path: str | Path) -> dict[str, Any] | None:
    """The ``pfmseg`` metadata block of a zarr folder (v2 or v3; at the top or under ``ome``), or None."""
    path = Path(path)
    for name in ATTRIBUTE_FILES:
        file = path / name
        if file.is_file():
            try:
                attrs = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            if not isinstance(attrs, dict):
                return None
            attrs = attrs.get("attributes", attrs)
            ome = attrs.get("ome", attrs)
            block = attrs.get(PFMSEG_KEY) or (ome.get(PFMSEG_KEY) if isinstance(ome, dict) else None)
            return block if isinstance(block, dict) else None
    return None


def is_label_store(path: str | Path) -> bool:
    """Whether ``path`` is a label store pfmseg wrote (a prediction, or labels saved with ``write_labels``).

    Only our metadata block counts (it names the classes): other OME-Zarr images and label images
    are left to other readers.
    """
    return "class_names" in (store_attributes(path) or {})
