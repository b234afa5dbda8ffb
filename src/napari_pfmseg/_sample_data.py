"""Sample data: the engine's embedded demo slide, no download.

It is the same pyramidal TIFF that ``python -m pfmseg_engine demo`` segments (built once from the
immunohistochemistry image that ships with scikit-image), opened through the plugin's reader so the
sample exercises the real slide path: tiffslide, lazy levels, physical scale.
"""

from __future__ import annotations

# where the plugin keeps the demo slide and its session outputs: the engine's cache, shared with the CLI
from pfmseg_engine.paths import cache_dir as cache_dir

from ._layers import LayerDataTuple


def demo_slide() -> list[LayerDataTuple]:
    """napari sample data: the demo slide as a lazy multiscale RGB layer."""
    from pfmseg_engine.demo import demo_slide_path

    from ._reader import read_one

    data, meta, kind = read_one(demo_slide_path())
    meta["name"] = "demo slide (IHC)"
    return [(data, meta, kind)]
