"""Sample data: the engine's embedded demo slide, no download.

It is the same pyramidal TIFF that ``python -m pfmseg_engine demo`` segments (built once from the
immunohistochemistry image that ships with scikit-image), opened through the plugin's reader so the
sample exercises the real slide path: tiffslide, lazy levels, physical scale.
"""

from __future__ import annotations

from pathlib import Path

from ._layers import LayerDataTuple


def cache_dir() -> Path:
    """Where the plugin keeps the demo slide and its session outputs: the engine's cache, shared with the CLI
    (imported when called: napari starts without the engine)."""
    from pfmseg_engine.paths import cache_dir as engine_cache_dir

    return engine_cache_dir()


def demo_slide() -> list[LayerDataTuple]:
    """napari sample data: the demo slide as a lazy multiscale RGB layer."""
    from pfmseg_engine.demo import demo_slide_path

    from ._reader import read_one

    data, meta, kind = read_one(demo_slide_path())
    meta["name"] = "demo slide (IHC)"
    return [(data, meta, kind)]
