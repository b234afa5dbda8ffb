"""The embedded demo: a small redistributable slide, its derived annotation, and the end-to-end run."""

from .sample import (
    DEMO_CLASS_NAMES,
    DEMO_MPP,
    demo_annotation,
    demo_image,
    demo_slide_path,
    write_pyramid_tiff,
)

__all__ = [
    "DEMO_CLASS_NAMES",
    "DEMO_MPP",
    "demo_annotation",
    "demo_image",
    "demo_slide_path",
    "write_pyramid_tiff",
]
